"""Where a training step's time goes, and how far an epoch is from this machine's limit.

    .venv/bin/python benchmarks/profile_step.py                      # [784,30,10], 1 thread
    .venv/bin/python benchmarks/profile_step.py --sizes 784,100,100,100,100,100,10 --threads 1

Runs the worker's step phases (the same calls as worker.train's step) one at a time over an epoch
of real MNIST batches and prints the median microseconds of each; then the matmul FLOPs of an
epoch, the matmul throughput this machine measures at the step's own shapes, and the resulting
floor: the epoch time if the step did nothing but its matmuls at that throughput. torch.profiler's
operator table for the same step follows, for the detail.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from distnet import data, worker
from distnet.config import Member
from distnet.model import PopulationMLP, PopulationSGD, init_theta


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
    arrays = data.select(data.load_mnist(), "test", None, None)
    d = worker.to_device(arrays, torch.device("cpu"))
    x, y = d["train_x"], d["train_y"]
    members = [Member("xavier_normal", 1.0, None, k, 0.1) for k in range(P)]
    model = PopulationMLP(sizes, "sigmoid", "softmax_ce", init_theta(sizes, members))
    opt = PopulationSGD(model, [m.lr for m in members], 0.0, 0.0, len(x))
    alive, newly = torch.ones(P, dtype=torch.bool), torch.zeros(P, dtype=torch.bool)
    diverged_at, loss_sum = torch.full((P,), -1), torch.zeros(P)
    xb_u8, xb, yb = x.new_empty(B, x.shape[1]), torch.empty(B, x.shape[1]), y.new_empty(B)
    S = model.n_segments
    record, buf, idx_buf = torch.zeros(P, S + 2), torch.zeros(50, P, S + 2), torch.zeros(B, dtype=torch.long)
    norms, loss, acc = record[:, :S], record[:, S], record[:, S + 1]
    steps = len(x) // B
    batches = data.epoch_batches(len(x), B, 1, 0, 0, 1)

    def divergence_check(idx):
        finite = torch.isfinite(norms).all(1)
        torch.logical_and(alive, ~finite, out=newly)
        alive.logical_and_(finite)
        loss_sum.add_(loss)

    def bookkeeping(idx):  # what worker.train does around each step
        idx_buf.copy_(idx)
        diverged_at.masked_fill_(newly, 0)
        buf[0].copy_(record)

    # The same calls as worker.train's step, in its order; the all-reduce is absent (1 worker).
    phases = {
        "gather batch (uint8 -> float)": lambda idx: worker.pixels(torch.index_select(x, 0, idx, out=xb_u8), 255.0, out=xb),
        "gather labels": lambda idx: torch.index_select(y, 0, idx, out=yb),
        "forward + loss + backprop": lambda idx: loss.copy_(model.loss_and_grad(xb, yb, acc)),
        "gradient norms (2L segments)": lambda idx: norms.copy_(model.segment_norms(model.grad)),
        "divergence check and loss sum": divergence_check,
        "SGD update": lambda idx: opt.step(model.grad, alive),
        "loop bookkeeping (batch index in, norms and loss to the log buffer)": bookkeeping,
    }
    times = {name: [] for name in phases}
    for rep in range(2):  # the first pass warms up
        for i in range(steps):
            for name, fn in phases.items():
                start = time.perf_counter()
                fn(batches[i])
                times[name].append(time.perf_counter() - start)
    total = 0.0
    print(f"sizes {sizes}, population {P}, batch {B}, {args.threads} thread(s), torch {torch.__version__}")
    print("| phase | us/step (median) |\n| --- | --- |")
    for name, ts in times.items():
        us = statistics.median(ts[steps:]) * 1e6
        total += us
        print(f"| {name} | {us:.1f} |")
    print(f"| sum of phases | {total:.1f} |")
    flops = matmul_flops(sizes, B, P) * steps
    rate = matmul_throughput(sizes, B, P)
    print(f"\nmatmul FLOPs per epoch {flops / 1e9:.2f} G; this machine's throughput at these shapes "
          f"{rate / 1e9:.1f} GFLOP/s -> floor {flops / rate:.3f} s/epoch; sum of phases x {steps} steps = "
          f"{total * steps / 1e6:.3f} s/epoch")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(100):
            for fn in phases.values():
                fn(batches[i])
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
