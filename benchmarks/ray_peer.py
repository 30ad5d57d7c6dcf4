"""The peer distnet is measured against: Ray Train's getting-started loop, written as Ray's docs
show it (TorchTrainer + a DataLoader + prepare_data_loader + prepare_model), on the same MLP, the
same MNIST arrays (from the object store) and the same global batch of 128.

It logs nothing per step: it is the plain baseline a Ray user would start from. Each epoch's report
carries what the benchmark compares: the epoch times so far, the wall-clock time of the first step
and the worker's peak resident memory. As a script it is the peer's whole command (for start-up):

    python benchmarks/ray_peer.py --epochs 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time

import ray
import ray.train
import ray.train.torch
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from distnet import data, registry


def build_mlp(sizes: list[int], activation: str, init: str, seed: int) -> nn.Sequential:
    """nn.Sequential of Linear layers initialised with distnet's registry (Linear stores W^T)."""
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        lin = nn.Linear(n_in, n_out)
        w, b = registry.init_layer(init, n_in, n_out, g, 1.0, None)
        with torch.no_grad():
            lin.weight.copy_(w.T)
            lin.bias.copy_(b)
        layers.append(lin)
        if i < len(sizes) - 2:
            layers.append(Lambda(registry.ACTIVATIONS[activation].fn))
    return nn.Sequential(*layers)


class Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def train_func(config: dict) -> None:
    """Per-worker loop, as in Ray Train's PyTorch getting-started guide."""
    model = build_mlp(config["sizes"], config["activation"], config["init"], config["seed"])
    model = ray.train.torch.prepare_model(model)
    (arrays,) = ray.get(config["data"])
    dataset = TensorDataset(torch.tensor(arrays["train_x"], dtype=torch.float32) / 255,
                            torch.tensor(arrays["train_y"], dtype=torch.int64))
    batch_size = config["batch_size"] // ray.train.get_context().get_world_size()
    loader = ray.train.torch.prepare_data_loader(DataLoader(dataset, batch_size=batch_size, shuffle=True))
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"])
    epoch_s, first_step = [], None
    for epoch in range(config["epochs"]):
        if ray.train.get_context().get_world_size() > 1:
            loader.sampler.set_epoch(epoch)
        start = time.perf_counter()
        for x, y in loader:
            loss = criterion(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            first_step = first_step or time.time()
        epoch_s.append(time.perf_counter() - start)
        metrics = {"epoch": epoch, "loss": loss.item(), "epoch_s": list(epoch_s), "first_step_unix": first_step,
                   "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        # As the guide does: rank 0 saves the model with each report (Train V2 returns metrics with
        # checkpoints only).
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if ray.train.get_context().get_world_rank() == 0:
                torch.save(model.state_dict(), os.path.join(tmp, "model.pt"))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    ray.init(log_to_driver=False)
    config = {"sizes": [784, 30, 10], "activation": "sigmoid", "init": "xavier_normal", "seed": 0, "lr": 0.5,
              "epochs": args.epochs, "batch_size": 128,
              "data": [ray.put(data.select(data.load_mnist(), "test", None, None))]}
    with tempfile.TemporaryDirectory() as storage:
        result = TorchTrainer(train_func, train_loop_config=config, scaling_config=ScalingConfig(num_workers=args.workers),
                              run_config=RunConfig(storage_path=storage)).fit()
    print(json.dumps(result.metrics))


if __name__ == "__main__":
    main()
