"""What one training start costs, against Ray Train's own floor: a TorchTrainer whose workers do
nothing but report once, and a 1-step `distnet train` (launch.run_training), with 1 and 2 workers,
under Ray Train's default health-check interval (2 s) and the tests' (0.2 s). The test suite
starts about a hundred trainings, each of a few steps: their start-ups are most of its time.

    PYTHONPATH=benchmarks .venv/bin/python benchmarks/trainer_floor.py --reps 3

Each cell is the median of --reps starts, the settings taken in turn (paired) on one local Ray.
Prints one markdown table (docs/design.md, The tests).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import ray
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from distnet import launch
from distnet.config import build_config

INTERVAL = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"  # read by each controller from the driver's environment


def noop(_config) -> None:
    ray.train.report({"done": 1})


def bare(work: Path, workers: int, name: str) -> None:
    TorchTrainer(noop, scaling_config=ScalingConfig(num_workers=workers),
                 run_config=RunConfig(name=name, storage_path=str(work / "bare"))).fit()


def distnet_step(work: Path, workers: int, name: str) -> None:
    cfg = build_config({"name": name, "model": {"sizes": [784, 30, 10]}, "train": {"epochs": 1, "max_steps": 1},
                        "data": {"train_limit": 1280, "eval_limit": 100},
                        "ray": {"num_workers": workers, "storage_path": str(work / "runs")}})
    launch.run_training(cfg, f"sqlite:///{work / 'mlruns.db'}", show_progress=False, say=lambda *_: None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    ray.init(num_cpus=2, log_to_driver=False, include_dashboard=False)
    kinds = {"no-op TorchTrainer (Ray Train's floor)": bare, "1-step distnet training": distnet_step}
    intervals = ("2.0", "0.2")
    times: dict[tuple[str, int, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for label, start in kinds.items():
                for workers in (1, 2):
                    for interval in intervals:
                        os.environ[INTERVAL] = interval
                        began = time.perf_counter()
                        start(Path(tmp), workers, f"floor-{rep}-{workers}-{interval}-{start.__name__}")
                        times.setdefault((label, workers, interval), []).append(time.perf_counter() - began)
    print(f"| start (median of {args.reps}, s) | workers | health checks every 2 s (Ray's default) | every 0.2 s |")
    print("| --- | --- | --- | --- |")
    for label in kinds:
        for workers in (1, 2):
            row = [statistics.median(times[(label, workers, i)]) for i in intervals]
            print(f"| {label} | {workers} | {row[0]:.1f} | {row[1]:.1f} |")


if __name__ == "__main__":
    main()
