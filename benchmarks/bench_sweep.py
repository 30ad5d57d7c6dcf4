"""The sweep rows of `make bench` (benchmarks/bench.py): a 24-cell grid of small nets, `distnet sweep`
vs one Ray Tune trial per cell, each trial driving a TorchTrainer running Ray's getting-started loop
(the Train V2 + Tune pattern from Ray's docs), on the caller's Ray (4 logical CPUs).

Each side runs as it runs best on the 2-core machine. Tune: two trials at once (one CPU each, Ray's
default; a trial is mostly start-up, so fewer at once is slower). distnet: its two populations one
after the other on one lane whose worker has both CPUs; the bench also times two lanes of one CPU
each, where two trainers start at once and share the two cores.
"""

from __future__ import annotations

import time
from pathlib import Path

import ray
import ray.tune
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from distnet import launch, sweep

import ray_peer

GRID = {"model.depth": [1, 2], "model.init": ["nielsen_scaled", "xavier_normal", "he_normal", "lecun_normal"],
        "seed": [0, 1, 2]}
BASE = {"name": "bench24", "model": {"width": 30, "activation": "sigmoid"}, "train": {"epochs": 1, "lr": 0.5},
        "ray": {"num_workers": 1}, "mlflow": {"experiment": "bench"}}
TUNE_CONCURRENT = 2
CORES = 2  # shared by distnet's lanes: each lane's worker gets CORES // lanes CPUs


def run_distnet(workdir: Path, lanes: int) -> float:
    sw = sweep.build_sweep({**BASE, "grid": GRID, "sweep": {"pack": 16, "max_concurrent": lanes},
                            "ray": {"num_workers": 1, "cpus_per_worker": CORES // lanes,
                                    "storage_path": str(workdir / "runs")}})
    workdir.mkdir(parents=True, exist_ok=True)
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
        tune_config=ray.tune.TuneConfig(max_concurrent_trials=TUNE_CONCURRENT),
        run_config=ray.tune.RunConfig(storage_path=str(workdir / "tune"), verbose=0),
    )
    start = time.perf_counter()
    results = tuner.fit()
    elapsed = time.perf_counter() - start
    assert len(results) == 24 and not results.errors, results.errors
    return elapsed
