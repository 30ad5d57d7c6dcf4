"""One training's wall time in this process, for paired comparisons of two versions of the loop
(run it alternately with PYTHONPATH at each tree, several times, and compare the medians):

    PYTHONPATH=<tree> .venv/bin/python benchmarks/loop_speed.py --sizes 784,30,10          # no sink
    PYTHONPATH=<tree> .venv/bin/python benchmarks/loop_speed.py --mlflow                   # MlflowSink, sqlite

Without --mlflow: 2 epochs of full MNIST, sigmoid, 1 thread, a sink that keeps nothing (the loop
alone), median of 3. With --mlflow: 4 members, 200 steps, checkpoints every 20 steps, through
MlflowSink into a fresh sqlite store and closed, one training.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from distnet import data, tracking, worker
from distnet.config import build_config


class Discard:
    def log(self, *a): pass

    def log_steps(self, *a): pass

    def progress(self, *a): pass

    def flush(self): pass

    def write(self, k): pass


def loop_alone(sizes: list[int]) -> float:
    cfg = build_config({"model": {"sizes": sizes, "activation": "sigmoid"}, "train": {"epochs": 2, "log_every": 50},
                        "data": {"eval_limit": 1000}, "checkpoint": {"every": 1}})
    arrays = data.select(data.load_mnist(), "test", None, 1000)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        worker.train(cfg, arrays, worker.WorkerEnv(), Discard())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def through_mlflow() -> float:
    cfg = build_config({"model": {"sizes": [784, 30, 30, 10]}, "train": {"epochs": 2, "log_every": 10},
                        "data": {"train_limit": 12800, "eval_limit": 1000}, "checkpoint": {"every": 20, "unit": "step"},
                        "population": [{"seed": s} for s in range(4)]})
    arrays = data.select(data.load_mnist(), "test", 12800, 1000)
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlruns.db"
        runs = tracking.create_runs(uri, cfg)
        start = time.perf_counter()
        sink = tracking.MlflowSink(uri, cfg, runs)
        state = worker.train(cfg, arrays, worker.WorkerEnv(), sink)
        end = getattr(tracking, "TrainingEnd", None) or tracking.Outcome  # its name before #36, to compare with it
        sink.close(end(state.diverged, state.all_reduce, "test/acc"))
        return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="784,30,10")
    ap.add_argument("--mlflow", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"{through_mlflow() if args.mlflow else loop_alone([int(s) for s in args.sizes.split(',')]):.3f}")


if __name__ == "__main__":
    main()
