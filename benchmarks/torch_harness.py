"""The distnet worker loop without Ray or MLflow: torch.distributed only (NCCL on GPU, gloo on CPU).

For machines where Ray cannot be installed (the lent GPU box) and for timing the loop itself.
Launch one process, or several with torchrun:

    python benchmarks/torch_harness.py configs/default.yaml train.epochs=5 --data-dir DIR
    torchrun --nproc_per_node=4 benchmarks/torch_harness.py configs/default.yaml ray.num_workers=4

Prints the seconds per epoch of training steps (perf/epoch_s: gradient norms included, evaluation
excluded; median over epochs after the first, which includes warm-up), the final accuracy and where
it ran.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
import torch.distributed as dist

from distnet import data, worker
from distnet.config import load_config


class EpochClock:
    """A sink that keeps the per-epoch metrics: perf/epoch_s is the epoch's training steps alone."""

    def __init__(self):
        self.epoch_s: list[float] = []
        self.last: dict = {}

    def log(self, step, values, active):
        if "perf/epoch_s" in values:
            self.epoch_s.append(float(values["perf/epoch_s"][0]))
            self.last = values

    def log_steps(self, steps, columns, active):
        pass

    def progress(self, state):
        pass

    def flush(self):
        pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--data-dir")
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if cfg.ray.use_gpu:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    arrays = data.select(data.load_mnist(args.data_dir), cfg.data.split, cfg.data.train_limit, cfg.data.eval_limit)
    clock = EpochClock() if rank == 0 else None
    out = worker.train(cfg, arrays, worker.WorkerEnv(rank, world, device), clock)
    if rank == 0:
        per_epoch = clock.epoch_s
        acc = {k: float(v.mean()) for k, v in clock.last.items() if k.endswith("/acc")}
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        print(f"backend {dist.get_backend()} world {world} device {name} torch {torch.__version__}")
        print(f"epoch times {[round(t, 4) for t in per_epoch]}")
        print(f"median s/epoch (epochs 2+) {statistics.median(per_epoch[1:] or per_epoch):.4f}  steps {out.step}  {acc}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
