"""What `train.jacobian` costs: the Jacobian spectrum's epoch-end metrics (metrics.jacobian, on the
first 8 probe images) against one epoch of training of the same net, in this process, 1 thread (as
a 1-CPU Ray worker).

    PYTHONPATH=benchmarks .venv/bin/python benchmarks/bench_jacobian.py [--repeat 3]

Each row: the median of --repeat calls of metrics.jacobian, and the median time of a 1-epoch
in-process training with it off (the 50k training images, the loop of worker.py, its evaluation
included), for nets of the sizes distnet's experiments train on a CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from distnet import data, metrics, worker
from distnet.config import build_config
from distnet.model import PopulationMLP, init_theta

NETS = {"[784, 100 x 5, 10] tanh, 1 member": {"model": {"depth": 5, "width": 100, "activation": "tanh"}},
        "[784, 100 x 5, 10] tanh, 16 members": {"model": {"depth": 5, "width": 100, "activation": "tanh"},
                                                "population": [{"seed": s} for s in range(16)]},
        "[784, 400 x 8, 10] tanh, 1 member": {"model": {"depth": 8, "width": 400, "activation": "tanh"}}}


def epoch_seconds(raw: dict, arrays: dict, repeat: int) -> float:
    cfg = build_config({**raw, "ray": {"num_workers": 1}, "train": {"epochs": 1}})
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        worker.train(cfg, arrays, worker.WorkerEnv(), None)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def jacobian_seconds(raw: dict, x: torch.Tensor, repeat: int) -> float:
    cfg = build_config(raw)
    model = PopulationMLP(cfg.sizes, cfg.model.activation, cfg.model.loss, init_theta(cfg.sizes, cfg.members))
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        metrics.jacobian(model, x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rows(repeat: int = 3) -> list[tuple]:
    torch.set_num_threads(1)
    mnist = data.load_mnist()
    arrays = data.select(mnist, "validation", None, None)
    x = torch.tensor(arrays["train_x"][:metrics.JACOBIAN_INPUTS], dtype=torch.float32) / 255.0
    out = []
    for name, raw in NETS.items():
        jac, epoch = jacobian_seconds(raw, x, repeat), epoch_seconds(raw, arrays, repeat)
        out.append((f"train.jacobian, {name}: the spectrum at an epoch's end vs the epoch's training (1 thread)",
                    f"{jac:.3f}", f"{epoch:.3f}", "s", f"{jac / epoch:.1%} of an epoch"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print("\n| row | spectrum | epoch | unit | cost |\n| --- | --- | --- | --- | --- |")
    for r in rows(args.repeat):
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
