"""Ray Train at the edge: run one training (one population) on a Ray cluster.

The driver verifies the data once, creates the MLflow runs, puts the arrays in the object store and
starts a Ray Train V2 TorchTrainer (gloo on CPU, NCCL with one GPU per worker). Each worker takes the
arrays from the object store (so only the driver needs the files) and runs the plain-PyTorch loop in
worker.py. Rank 0 reports the final parameters as the run's checkpoint.
"""

from __future__ import annotations

import json
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import ray.train
import torch
from ray.train import Checkpoint, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from distnet import data, tracking, worker
from distnet.config import Config
from distnet.progress import ProgressPrinter


@dataclass
class TrainingResult:
    run_ids: list[str]
    theta: torch.Tensor  # final [P, T] parameters
    metrics: dict[str, list[float]]  # rank 0's final per-member metrics
    steps: int


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Rank 0 posts its progress here; the driver polls it for the progress line."""

    def __init__(self):
        self.state: dict = {}

    def update(self, state: dict) -> None:
        self.state.update(state)

    def get(self) -> dict:
        return self.state


def ensure_ray(address: str | None = None) -> None:
    """Connect to `address` (or $RAY_ADDRESS), or start a local Ray in-process."""
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)


def _train_loop(loop_config: dict) -> None:
    """Runs in every Ray Train worker: unpack, call the plain-PyTorch loop, report the result."""
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    env = worker.WorkerEnv(rank, ctx.get_world_size(), ray.train.torch.get_device())
    (arrays,) = ray.get(loop_config["data"])
    sink = None
    if rank == 0:
        board = loop_config["board"]
        sink = tracking.MlflowSink(loop_config["tracking_uri"], loop_config["run_ids"],
                                   on_progress=lambda s: board.update.remote(s))
    out = worker.train(loop_config["cfg"], arrays, env, sink)
    # Every rank must call report the same number of times; rank 0 alone carries the checkpoint.
    if rank != 0:
        ray.train.report({}, checkpoint=None)
        return
    final = {k: np.asarray(v).tolist() for k, v in out["metrics"].items()}
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(out["theta"], Path(tmp) / "theta.pt")
        (Path(tmp) / "final.json").write_text(json.dumps({"metrics": final, "steps": out["steps"]}))
        ray.train.report({"steps": out["steps"]}, checkpoint=Checkpoint.from_directory(tmp))


def _storage_path(path: str) -> str:
    return path if "://" in path else str(Path(path).resolve())


def run_training(cfg: Config, tracking_uri: str, data_dir: str | None = None, address: str | None = None,
                 show_progress: bool = True) -> TrainingResult:
    arrays = data.select(data.load_mnist(data_dir), cfg.data.split, cfg.data.train_limit, cfg.data.eval_limit)
    run_ids = tracking.create_runs(tracking_uri, cfg)
    try:
        ensure_ray(address)
        board = ProgressBoard.remote()
        trainer = TorchTrainer(
            _train_loop,
            # The ObjectRef sits inside a list so Ray passes the reference, not a copy, to each worker.
            train_loop_config={"cfg": cfg, "data": [ray.put(arrays)], "tracking_uri": tracking_uri,
                               "run_ids": run_ids, "board": board},
            scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                         resources_per_worker={"CPU": cfg.ray.cpus_per_worker}),
            run_config=RunConfig(name=f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
                                 storage_path=_storage_path(cfg.ray.storage_path)),
        )
        eval_name = "test" if cfg.data.split == "test" else "val"
        if show_progress:
            with ProgressPrinter(lambda: ray.get(board.get.remote(), timeout=10), cfg.train.epochs, eval_name):
                result = trainer.fit()
        else:
            result = trainer.fit()
        with result.checkpoint.as_directory() as d:
            theta = torch.load(Path(d) / "theta.pt")
            final = json.loads((Path(d) / "final.json").read_text())
    except BaseException as e:
        tracking.end_runs(tracking_uri, run_ids, error=e)
        raise
    tracking.end_runs(tracking_uri, run_ids)
    return TrainingResult(run_ids, theta, final["metrics"], final["steps"])
