"""Cells per hour for a 24-cell grid of small nets: `distnet sweep` vs one Ray Tune trial per cell,
each trial driving a TorchTrainer running Ray's getting-started loop (the Train V2 + Tune pattern
from Ray's docs). Same machine, same Ray instance, same invocation; medians of --reps runs.

    .venv/bin/python benchmarks/bench_sweep.py --reps 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import ray
import ray.tune
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from distnet import data, launch, sweep

import ray_peer

GRID = {"model.depth": [1, 2], "model.init": ["nielsen_scaled", "xavier_normal", "he_normal", "lecun_normal"],
        "seed": [0, 1, 2]}
BASE = {"name": "bench24", "model": {"width": 30, "activation": "sigmoid"}, "train": {"epochs": 1, "lr": 0.5},
        "ray": {"num_workers": 1}, "mlflow": {"experiment": "bench"}}
CONCURRENT = 2  # both sides: two 1-worker trainings at once on this 2-core machine


def run_distnet(workdir: Path) -> float:
    sw = sweep.build_sweep({**BASE, "grid": GRID, "sweep": {"pack": 16, "max_concurrent": CONCURRENT},
                            "ray": {"num_workers": 1, "storage_path": str(workdir / "runs")}})
    start = time.perf_counter()
    result = launch.run_sweep(sw, f"sqlite:///{workdir / 'mlruns.db'}", say=lambda *_: None)
    elapsed = time.perf_counter() - start
    assert result.trained == 24 and not result.failed
    return elapsed


def run_tune(workdir: Path, data_ref) -> float:
    def train_driver_fn(config: dict) -> None:
        trainer = TorchTrainer(
            ray_peer.train_func,
            train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=1),
            run_config=RunConfig(name=f"trial-{ray.tune.get_context().get_trial_id()}",
                                 storage_path=str(workdir / "tune-train")),
        )
        trainer.fit()

    space = {"sizes": ray.tune.grid_search([[784, 30, 10], [784, 30, 30, 10]]),
             "init": ray.tune.grid_search(GRID["model.init"]), "seed": ray.tune.grid_search(GRID["seed"]),
             "activation": "sigmoid", "lr": 0.5, "epochs": 1, "batch_size": 128, "data": [data_ref]}
    tuner = ray.tune.Tuner(
        train_driver_fn,
        param_space=space,
        tune_config=ray.tune.TuneConfig(max_concurrent_trials=CONCURRENT),
        run_config=ray.tune.RunConfig(storage_path=str(workdir / "tune"), verbose=0),
    )
    start = time.perf_counter()
    results = tuner.fit()
    elapsed = time.perf_counter() - start
    assert len(results) == 24 and not results.errors, results.errors
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    # 4 logical CPUs on the 2 cores: each Tune trial holds 1 CPU (its default) while its trainer's
    # worker holds another, so 2 concurrent trials need 4. Both sides are capped at 2 trainings.
    ray.init(num_cpus=4, log_to_driver=False)
    arrays = data.select(data.load_mnist(), "test", None, None)
    data_ref = ray.put(arrays)
    ours, theirs = [], []
    for rep in range(args.reps):
        with tempfile.TemporaryDirectory() as tmp:
            ours.append(run_distnet(Path(tmp)))
            print(f"rep {rep + 1}: distnet sweep {ours[-1]:.1f} s", flush=True)
            theirs.append(run_tune(Path(tmp), data_ref))
            print(f"rep {rep + 1}: Tune trial per cell {theirs[-1]:.1f} s", flush=True)
    a, b = statistics.median(ours), statistics.median(theirs)
    print("\n| 24-cell sweep, 1 epoch of 60k each | wall s (median) | cells/hour |")
    print("| --- | --- | --- |")
    print(f"| distnet sweep (pack 16, 2 concurrent, full MLflow logging) | {a:.1f} | {24 * 3600 / a:.0f} |")
    print(f"| Ray Tune, one trial per cell, TorchTrainer + DataLoader (2 concurrent, no logging) | {b:.1f} | {24 * 3600 / b:.0f} |")
    print(f"| ratio (cells/hour, distnet / Tune) | | {b / a:.1f}x |")


if __name__ == "__main__":
    main()
