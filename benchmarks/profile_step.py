"""Where a training step's time goes, and how far an epoch is from this machine's limit.

    .venv/bin/python benchmarks/profile_step.py                      # [784,30,10], 1 thread
    .venv/bin/python benchmarks/profile_step.py --sizes 784,100,100,100,100,100,10 --threads 1

Runs the training's own step (distnet.stepper.Stepper, as the loop calls it) over an epoch of
real MNIST batches and prints its median microseconds, and a whole epoch of the loop around it
(worker.train on one worker, nothing recorded); then the matmul FLOPs of an epoch, the matmul
throughput this machine measures at the step's own shapes, and the resulting floor: the epoch time
if the step did nothing but its matmuls at that throughput. torch.profiler's operator table for
the same step follows: where inside the step the time goes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from distnet import data, sharding, worker
from distnet.config import build_config
from distnet.model import PopulationMLP, init_theta
from distnet.stepper import Stepper


def matmul_flops(sizes: list[int], batch: int, population: int) -> float:
    """Forward z = W a and backprop dW = delta a^T for every layer, delta_in = W^T delta for all but
    the first: 2 * n_in * n_out * batch FLOPs each."""
    layers = list(zip(sizes[:-1], sizes[1:]))
    per_member = sum(2 * a * b * batch * (2 if i == 0 else 3) for i, (a, b) in enumerate(layers))
    return per_member * population


def matmul_throughput(sizes: list[int], batch: int, population: int) -> float:
    """FLOP/s of this step's own matmuls, run back to back (best of 5 rounds of 50)."""
    ws = [torch.randn(population, b, a) for a, b in zip(sizes[:-1], sizes[1:])]
    acts = [torch.rand(batch, sizes[0]).T] + [torch.rand(population, a, batch) for a in sizes[1:-1]]
    deltas = [torch.randn(population, b, batch) for b in sizes[1:]]

    def round_():
        for i, (w, a, d) in enumerate(zip(ws, acts, deltas)):
            torch.matmul(w, a)
            torch.matmul(d, a.transpose(-2, -1))
            if i:
                torch.bmm(w.transpose(1, 2), d)

    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(50):
            round_()
        best = min(best, (time.perf_counter() - start) / 50)
    return matmul_flops(sizes, batch, population) / best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="784,30,10")
    ap.add_argument("--population", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    P, B = args.population, args.batch
    cfg = build_config({"model": {"sizes": sizes, "activation": "sigmoid"}, "train": {"epochs": 1, "batch_size": B},
                        "population": [{"seed": k, "lr": 0.1} for k in range(P)]})
    arrays = data.select(data.load_mnist(), "test", None, None)
    d = worker.to_device(arrays, torch.device("cpu"))
    model = PopulationMLP(cfg.sizes, cfg.model.activation, cfg.model.loss, init_theta(cfg.sizes, cfg.members))
    step = Stepper(cfg, model, d["train_x"], d["train_y"], B)
    batches = sharding.epoch_batches(len(d["train_x"]), B, 1, 0, 0, 1)
    steps = len(batches)
    times = []
    for rep in range(2):  # the first pass warms up
        for i in range(steps):
            start = time.perf_counter()
            step(batches[i])
            times.append(time.perf_counter() - start)
    us = statistics.median(times[steps:]) * 1e6
    epochs = []
    for _ in range(3):
        start = time.perf_counter()
        worker.train(cfg, arrays, worker.WorkerEnv(), None)
        epochs.append(time.perf_counter() - start)
    print(f"sizes {sizes}, population {P}, batch {B}, {args.threads} thread(s), torch {torch.__version__}")
    print(f"| the step (Stepper, median of {steps}) | {us:.1f} us |")
    print(f"| x {steps} steps | {us * steps / 1e6:.3f} s/epoch |")
    print(f"| the loop around it: worker.train, one epoch, no sink (set-up included), median of 3 | "
          f"{statistics.median(epochs):.3f} s |")
    flops = matmul_flops(sizes, B, P) * steps
    rate = matmul_throughput(sizes, B, P)
    print(f"\nmatmul FLOPs per epoch {flops / 1e9:.2f} G; this machine's throughput at these shapes "
          f"{rate / 1e9:.1f} GFLOP/s -> floor {flops / rate:.3f} s/epoch")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(100):
            step(batches[i])
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
