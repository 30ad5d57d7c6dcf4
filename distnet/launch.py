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

from distnet import data, sweep, tracking, worker
from distnet.config import Config
from distnet.progress import ProgressPrinter


@dataclass
class TrainingResult:
    run_ids: list[str]
    theta: torch.Tensor  # final [P, T] parameters
    metrics: dict[str, list[float]]  # rank 0's final per-member metrics
    steps: int
    diverged: dict[int, int]  # member -> step of its first non-finite gradient


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
                                   on_progress=board and (lambda s: board.update.remote(s)))
    out = worker.train(loop_config["cfg"], arrays, env, sink)
    # Every rank must call report the same number of times; rank 0 alone carries the checkpoint.
    if rank != 0:
        ray.train.report({}, checkpoint=None)
        return
    final = {k: np.asarray(v).tolist() for k, v in out["metrics"].items()}
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(out["theta"], Path(tmp) / "theta.pt")
        (Path(tmp) / "final.json").write_text(
            json.dumps({"metrics": final, "steps": out["steps"], "diverged": out["diverged"]}))
        ray.train.report({"steps": out["steps"]}, checkpoint=Checkpoint.from_directory(tmp))


def _storage_path(path: str) -> str:
    return path if "://" in path else str(Path(path).resolve())


def fit(cfg: Config, data_ref: ray.ObjectRef, tracking_uri: str, run_ids: list[str],
        board: ray.actor.ActorHandle | None = None) -> TrainingResult:
    """One population's training on the connected Ray cluster; its MLflow runs already exist.
    With a progress board, the driver shows the progress line while it runs."""
    trainer = TorchTrainer(
        _train_loop,
        # The ObjectRef sits inside a list so Ray passes the reference, not a copy, to each worker.
        train_loop_config={"cfg": cfg, "data": [data_ref], "tracking_uri": tracking_uri,
                           "run_ids": run_ids, "board": board},
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                     resources_per_worker={"CPU": cfg.ray.cpus_per_worker}),
        run_config=RunConfig(name=f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
                             storage_path=_storage_path(cfg.ray.storage_path)),
    )
    if board is not None:
        eval_name = "test" if cfg.data.split == "test" else "val"
        with ProgressPrinter(lambda: ray.get(board.get.remote(), timeout=10), cfg.train.epochs, eval_name):
            result = trainer.fit()
    else:
        result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        theta = torch.load(Path(d) / "theta.pt")
        final = json.loads((Path(d) / "final.json").read_text())
    return TrainingResult(run_ids, theta, final["metrics"], final["steps"],
                          {int(k): v for k, v in final["diverged"].items()})


def run_training(cfg: Config, tracking_uri: str, data_dir: str | None = None, address: str | None = None,
                 show_progress: bool = True) -> TrainingResult:
    """`distnet train`: verify the data, create the runs, train, end the runs."""
    arrays = data.select(data.load_mnist(data_dir), cfg.data.split, cfg.data.train_limit, cfg.data.eval_limit)
    run_ids = tracking.create_runs(tracking_uri, cfg)
    with tracking.closing_runs(tracking_uri, run_ids) as outcome:
        ensure_ray(address)
        board = ProgressBoard.remote() if show_progress else None
        result = fit(cfg, ray.put(arrays), tracking_uri, run_ids, board)
        outcome.diverged = result.diverged
    return result


# ---------------------------------------------------------------- sweeps
@ray.remote(num_cpus=0)
def _sweep_training(cfg: Config, data_refs: list, tracking_uri: str, run_ids: list[str]) -> dict:
    """One pack of a sweep as a Ray task: a failure is recorded on its runs and returned, so the
    sweep goes on. (The task holds no CPU; the trainer's workers reserve theirs.)"""
    try:
        with tracking.closing_runs(tracking_uri, run_ids) as outcome:
            outcome.diverged = fit(cfg, data_refs[0], tracking_uri, run_ids).diverged
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}
    return {"diverged": outcome.diverged}


@dataclass
class SweepResult:
    parent_run_id: str
    rows: list[dict]  # one per cell, as in summary.csv
    trained: int  # cells trained by this invocation (the rest were already finished)

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.rows if r["status"] == "failed"]


def default_concurrency(cfg: Config) -> int:
    """As many trainings as the cluster's resources hold at once."""
    res = ray.cluster_resources()
    if cfg.ray.use_gpu:
        return max(1, int(res.get("GPU", 0) // cfg.ray.num_workers))
    return max(1, int(res.get("CPU", 1) // (cfg.ray.num_workers * cfg.ray.cpus_per_worker)))


def run_sweep(sw: sweep.Sweep, tracking_uri: str, data_dir: str | None = None, address: str | None = None,
              force: bool = False, say=print) -> SweepResult:
    """`distnet sweep`: skip finished cells, pack the rest into populations, run the trainings
    concurrently as Ray tasks, then summarise every cell from the MLflow store."""
    first = sw.cells[0].config
    mnist = data.load_mnist(data_dir)
    grid_params = {f"grid.{k}": v for k, v in sw.grid.items()} | {f"sweep.{k}": v for k, v in vars(sw.settings).items()}
    parent = tracking.sweep_parent(tracking_uri, first.mlflow.experiment, sw.name, sw.id, grid_params)
    by_cell: dict[str, list] = {}
    for run in tracking.child_runs(tracking_uri, parent):
        by_cell.setdefault(run.data.tags.get("distnet.cell_id"), []).append(run)
    todo, stale = [], []
    for cell in sw.cells:
        runs = by_cell.get(cell.id, [])
        if not force and any(r.info.status == "FINISHED" for r in runs):
            continue
        stale += runs  # failed, interrupted, or forced: replaced by a fresh run
        todo.append(cell)
    tracking.delete_runs(tracking_uri, [r.info.run_id for r in stale])
    groups = sweep.packs(todo, sw.settings.pack)
    say(f"sweep {sw.name}: {len(sw.cells)} cells, {len(sw.cells) - len(todo)} already finished, "
        f"{len(todo)} to train in {len(groups)} training(s); MLflow parent run {parent}")
    if groups:
        ensure_ray(address)
        limit = sw.settings.max_concurrent or default_concurrency(first)
        data_refs: dict[tuple, ray.ObjectRef] = {}  # one object-store copy per distinct data selection
        pending, running = list(enumerate(groups)), {}
        counts = {"done": 0, "diverged": 0, "failed": 0}
        while pending or running:
            while pending and len(running) < limit:
                i, group = pending.pop(0)
                cfg = sweep.population_config(group, f"{sw.name}-{i}")
                dc = cfg.data
                key = (dc.split, dc.train_limit, dc.eval_limit)
                if key not in data_refs:
                    data_refs[key] = ray.put(data.select(mnist, *key))
                tags = [{"distnet.cell_id": c.id, "mlflow.runName": f"{sw.name}/{c.label}",
                         **{k: str(v) for k, v in c.axes.items()}} for c in group]
                run_ids = tracking.create_runs(tracking_uri, cfg, parent, tags)
                running[_sweep_training.remote(cfg, [data_refs[key]], tracking_uri, run_ids)] = group
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                group = running.pop(ref)
                outcome = ray.get(ref)
                if "error" in outcome:
                    counts["failed"] += len(group)
                    say(f"  training of {len(group)} cell(s) failed: {tracking.short_reason(outcome['error'])[:300]}")
                else:
                    counts["diverged"] += len(outcome["diverged"])
                    counts["done"] += len(group) - len(outcome["diverged"])
            in_flight = sum(len(g) for g in running.values())
            say(f"  cells: {counts['done']} done, {in_flight} running, {counts['diverged']} diverged, "
                f"{counts['failed']} failed, {len(todo) - in_flight - sum(counts.values())} waiting")
    eval_prefix = "test" if first.data.split == "test" else "val"
    live = {r.data.tags.get("distnet.cell_id"): r for r in tracking.child_runs(tracking_uri, parent)}
    rows = [{"cell": c.label, **tracking.cell_summary(tracking_uri, live[c.id], len(c.config.sizes) - 1, eval_prefix)}
            for c in sw.cells]
    tracking.finish_parent(tracking_uri, parent, sweep.summary_csv(rows))
    say(sweep.summary_table(rows, eval_prefix))
    return SweepResult(parent, rows, len(todo))
