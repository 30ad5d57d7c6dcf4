"""The GPU rows of the performance goals, on whatever CUDA card this host has: one markdown table.
Needs only torch, numpy and pyyaml (as tests/test_gpu.py); `make gpu-check` runs it after the tests.

    python3 benchmarks/gpu_bench.py [--epochs 3]

Each row trains in process on full MNIST (60k, global batch 128, 468 steps an epoch) with the
per-step gradient norms on, and reports the median over epochs 2.. of the training steps' time
(perf/epoch_s: evaluation and probe excluded; epoch 1 includes warm-up and capture).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a bare checkout, distnet not installed

import torch  # noqa: E402

from distnet import data, worker  # noqa: E402
from distnet.config import build_config  # noqa: E402
from torch_harness import EpochClock  # noqa: E402

SMALL, WIDE = [784, 30, 10], [784] + [1000] * 5 + [10]
TARGETS = {"small": 0.1, "wide": 0.25, "population": 500.0}


def epoch_s(arrays, sizes: list[int], graph: bool, epochs: int, population: int = 1) -> float:
    cfg = build_config({"model": {"sizes": sizes, "activation": "sigmoid", "init": "xavier_normal"},
                        "train": {"epochs": epochs, "lr": 0.1, "cuda_graph": graph},
                        "ray": {"num_workers": 1, "use_gpu": True},
                        "population": [{"seed": s} for s in range(population)] if population > 1 else []})
    clock = EpochClock()
    worker.train(cfg, arrays, worker.WorkerEnv(device=torch.device("cuda")), clock)
    return statistics.median(clock.epoch_s[1:] or clock.epoch_s)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA device", file=sys.stderr)
        return 1
    arrays = data.select(data.load_mnist(), "test", None, None)
    rows = []
    for label, sizes, target in (("[784,30,10]", SMALL, TARGETS["small"]), ("[784,1000x5,10]", WIDE, TARGETS["wide"])):
        for graph in (False, True):
            t = epoch_s(arrays, sizes, graph, args.epochs)
            rows.append((f"{label}, s/epoch with per-step norms, {'CUDA graph' if graph else 'eager'}",
                         f"{t:.4f}", f"<= {target}", "met" if t <= target else "missed"))
            print(rows[-1], flush=True)
    for graph in (False, True):
        t = epoch_s(arrays, SMALL, graph, args.epochs, population=512)
        rate = 512 / t
        rows.append((f"population of 512 [784,30,10], member-epochs/s, {'CUDA graph' if graph else 'eager'}",
                     f"{rate:.0f}", f">= {TARGETS['population']:.0f}", "met" if rate >= TARGETS["population"] else "missed"))
        print(rows[-1], flush=True)
    peak = torch.cuda.max_memory_allocated() / 2**20
    rows.append(("peak GPU memory allocated (MiB), all rows", f"{peak:.0f}", "", ""))
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}\n")
    print("| row | measured | target | |\n| --- | --- | --- | --- |")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
