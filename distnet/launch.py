"""Ray at the edge: run trainings (populations) on a Ray cluster with Ray Train V2.

A *job* is one population's training: its config, its MLflow run ids, and a reference to the data
in the object store. A *lane* is one TorchTrainer (gloo on CPU, NCCL with one GPU per worker) whose
workers take jobs from a queue actor one after another, so a sweep pays Ray Train's start-up
(about 12 s here) once per lane instead of once per job. Lanes are driver threads; the queue
and the progress board are the small actors of lanes.py. `distnet train` is one lane with one job.

Each worker gets the arrays from the object store (only the driver needs the files) and runs the
plain-PyTorch loop in worker.py. After each job rank 0 reports the final parameters as a checkpoint
and ends the job's MLflow runs; if a lane's trainer fails, the job it was on is recorded FAILED and
the lane starts a new trainer for the rest of the queue.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
import ray.train
import torch
from ray.train import FailureConfig, RunConfig, ScalingConfig
from mlflow.entities import RunTag
from ray.train.torch import TorchConfig, TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from distnet import cellindex, checkpoint, data, download, network, schema, space, sweep, tracking, tracking_server, worker
from distnet.config import Config, config_hash
from distnet.lanes import JobQueue, LaneWaits, ProgressBoard
from distnet.outcome import CellOutcome
from distnet.progress import ProgressPrinter


@dataclass(frozen=True)
class Job:
    cfg: Config
    runs: list[tracking.RunRef]
    data: ray.ObjectRef
    resumed: bool = False  # its runs already hold metrics from an earlier (dead) driver
    parent: tracking.RunRef | None = None  # the sweep's parent run, which keeps the cell records

    @property
    def run_ids(self) -> list[str]:
        return [r.run_id for r in self.runs]


@dataclass
class TrainingResult:
    run_ids: list[str]
    theta: torch.Tensor  # final [P, T] parameters
    metrics: dict[str, list[float]]  # rank 0's final per-member metrics
    steps: int
    diverged: dict[int, int]  # member -> step of its first non-finite gradient


def ensure_ray(address: str | None = None) -> None:
    """Connect to `address` (or $RAY_ADDRESS), or start a local Ray in-process."""
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)


def on_drivers_node() -> dict:
    """Actor options that keep an actor on the driver's node: the job queue and the progress board
    hold state that dies with the driver anyway, and on any other node a lost node would take it
    with it (a sweep whose queue had landed on the node that was lost failed whole). Ray Train's
    controller is kept there too, by Ray Train itself."""
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)}


def _train_loop(loop_config: dict) -> None:
    """Runs in every Ray Train worker of a lane: take jobs until the queue is empty. After a worker
    failure Ray Train restarts the group here, and the latest checkpoint says where to go on: into
    the middle of a job, or (done) straight to closing its runs."""
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    env = worker.WorkerEnv(rank, ctx.get_world_size(), ray.train.torch.get_device())
    queue, lane, uri, board = loop_config["queue"], loop_config["lane"], loop_config["tracking_uri"], loop_config["board"]
    loop_config["login"].install()  # before rank 0's first request to a tracking server that asks for it
    seq, resume, done = 0, None, False
    if (ckpt := ray.train.get_checkpoint()) is not None:
        meta, resume = checkpoint.load(ckpt)
        seq, done = meta["seq"], meta["done"]
    while (taken := ray.get(queue.take.remote(lane, seq, rank)))[0] is not None:
        ref, again = taken
        job = ray.get(ref)
        sink = _open_sink(uri, job, lane, ctx.get_experiment_name(), board, queue, resume, again) if rank == 0 else None
        if done:  # trained before the restart; its last records are in the checkpoint
            state = resume.loop
        else:
            (arrays,) = ray.get([job.data])
            # As many torch threads as the CPUs the worker reserved (Ray leaves torch at 1 here).
            torch.set_num_threads(max(1, int(job.cfg.ray.cpus_per_worker)))
            state = worker.train(job.cfg, arrays, env, sink, checkpoint.committer(rank, seq, sink), resume and resume.loop)
        if rank == 0:
            acc_key = schema.acc(schema.eval_prefix(job.cfg.data.split))
            end = tracking.TrainingEnd(state.diverged, state.all_reduce, acc_key)
            ray.get(queue.done.remote(lane, seq, sink.close(end)))
        seq, resume, done = seq + 1, None, False


def _open_sink(uri: str, job: Job, lane: int, trainer: str, board, queue, resume: checkpoint.Saved | None,
               again: bool) -> tracking.MlflowSink:
    """Rank 0's sink for a job's runs. Where the training ran goes with its first records; a job
    picked up again (`again`: after a worker died; `job.resumed`: after a driver died) first writes
    what the dead group had not, and nothing MLflow holds is written again, even where Ray had not
    registered the group's last checkpoint, or any checkpoint of the job (it then starts at step 0)."""
    sink = tracking.MlflowSink(uri, job.cfg, job.runs, on_progress=board and (lambda s: board.update.remote(s)),
                               tags={schema.RAY_NODE: ray.get_runtime_context().get_node_id(),
                                     schema.LANE: str(lane), schema.TRAINER: trainer}, parent=job.parent,
                               on_full=lambda full: queue.wait.remote(lane, None if full is None else full.waits()))
    if resume is not None or again or job.resumed:
        step = resume.loop.step if resume is not None else 0
        sink.tags.append(RunTag(schema.RESUMED_FROM_STEP, str(step)))
        sink.resume(resume.records if resume is not None else None)
        tracking.count_restart(uri, job.run_ids)
    return sink


def storage_path(cfg: Config) -> str:
    """Where Ray Train keeps a training's checkpoints: `ray.storage_path`, a relative one under
    $DISTNET_STORAGE, else under the working directory. On several nodes it must be a folder they
    all reach at the same path (NFS) or a bucket URI: the cluster files set DISTNET_STORAGE."""
    path = cfg.ray.storage_path
    return path if "://" in path else str((Path(os.environ.get("DISTNET_STORAGE", ".")) / path).resolve())


def scaling_config(cfg: Config) -> ScalingConfig:
    """Ray Train's scaling: `num_workers` workers of `cpus_per_worker` CPUs, and with `use_gpu`
    `gpus_per_worker` of a GPU each (Ray sets CUDA_VISIBLE_DEVICES; workers with a share of one GPU
    see the same device)."""
    gpus = {"GPU": cfg.ray.gpus_per_worker} if cfg.ray.use_gpu else {}
    return ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                         resources_per_worker={"CPU": cfg.ray.cpus_per_worker, **gpus})


@dataclass
class PinnedTorchConfig(TorchConfig):
    """Ray Train's torch backend, once every worker has pinned gloo to the interface of its node's
    Ray address (distnet.network): left to itself, a rank on another host may advertise loopback."""

    @property
    def backend_cls(self):
        torch_backend = super().backend_cls

        class PinnedBackend(torch_backend):
            def on_start(self, worker_group, backend_config):
                worker_group.execute(network.pin_gloo_interface)
                super().on_start(worker_group, backend_config)

        return PinnedBackend


def torch_config(cfg: Config) -> PinnedTorchConfig:
    """The process group: Ray Train's choice (NCCL on GPUs, gloo on CPUs) unless `ray.backend` names one."""
    return PinnedTorchConfig(backend=None if cfg.ray.backend == "auto" else cfg.ray.backend)


def trainer_name(cfg: Config) -> str:
    """A Ray Train run's name (the `distnet.trainer` tag of the runs it trains): unique per trainer."""
    return f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def fit_lane(cfg: Config, queue: ray.actor.ActorHandle, lane: int, tracking_uri: str, name: str,
             board: ray.actor.ActorHandle | None = None) -> ray.train.Result:
    """One TorchTrainer that trains the queue's jobs until it is empty. `cfg` sets the scaling (every
    job of a lane shares it); with a progress board the driver shows the progress line."""
    # Ray Train polls its workers every 2 s by default, which adds seconds to every short training.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"queue": queue, "lane": lane, "tracking_uri": tracking_uri, "board": board,
                           "login": tracking_server.Login.from_env()},
        scaling_config=scaling_config(cfg),
        torch_config=torch_config(cfg),
        run_config=RunConfig(name=name,
                             storage_path=storage_path(cfg),
                             failure_config=FailureConfig(max_failures=cfg.ray.max_failures)),
    )
    if board is None:
        return trainer.fit()
    eval_name = schema.eval_prefix(cfg.data.split)
    with ProgressPrinter(lambda: ray.get(board.get.remote(), timeout=10), cfg.train.epochs, eval_name):
        return trainer.fit()


def _resume_record(cfg: Config) -> Path | None:
    """Where `distnet train` notes an unfinished training (Ray run name, MLflow run ids) so that the
    same command after a dead driver resumes it; local (or NFS-mounted) storage only."""
    path = storage_path(cfg)
    return None if "://" in path else Path(path) / f"{cfg.name}.resume.json"


def run_training(cfg: Config, tracking_uri: str, data_dir: str | None = None, address: str | None = None,
                 show_progress: bool = True, say=print) -> TrainingResult:
    """`distnet train`: verify the data, create the runs (or find the unfinished ones of the same
    name and config), train (one lane, one job), forget the resume record once it is done."""
    mnist = download.load_or_fetch(data_dir or cfg.data.dir, say)
    arrays = data.select(mnist, cfg.data.split, cfg.data.train_limit, cfg.data.eval_limit)
    record = _resume_record(cfg)
    chash = config_hash(cfg.to_dict())
    previous = json.loads(record.read_text()) if record is not None and record.exists() else None
    resumed = bool(previous and previous["config_hash"] == chash and previous["tracking_uri"] == tracking_uri)
    if resumed:
        runs, ray_name = [tracking.RunRef(*r) for r in previous["runs"]], previous["ray_name"]
        run_ids = [r.run_id for r in runs]
        tracking.reopen_runs(tracking_uri, run_ids)
        say(f"resuming the unfinished training {ray_name} into MLflow run(s) {', '.join(run_ids)}")
    else:
        runs = tracking.create_runs(tracking_uri, cfg)
        run_ids = [r.run_id for r in runs]
        ray_name = trainer_name(cfg)
        if record is not None:
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps({"config_hash": chash, "tracking_uri": tracking_uri,
                                          "runs": [list(dataclasses.astuple(r)) for r in runs], "ray_name": ray_name}))
    try:
        ensure_ray(address)
        entries = [(ray.put(Job(cfg, runs, ray.put(arrays), resumed)), run_ids)]  # held while it trains
        queue = JobQueue.options(**on_drivers_node()).remote(entries)
        board = ProgressBoard.options(**on_drivers_node()).remote() if show_progress else None
        with tracking_server.ServerWatch(tracking_uri, say), LaneWaits(queue, say):
            result = fit_lane(cfg, queue, 0, tracking_uri, ray_name, board)
        state = checkpoint.load(result.checkpoint)[1].loop
    except Exception as e:
        tracking.fail_runs(tracking_uri, run_ids, e, cfg=cfg)
        raise
    if record is not None:
        record.unlink(missing_ok=True)
    return TrainingResult(run_ids, state.theta, {k: np.asarray(v).tolist() for k, v in state.final.items()},
                          state.step, state.diverged)


# ---------------------------------------------------------------- sweeps
def _lane(cfg: Config, queue: ray.actor.ActorHandle, lane: int, tracking_uri: str) -> None:
    """A sweep lane, run in a driver thread (Ray Train's fit supports that, as Tune uses it): a trainer
    that fails marks the job it was on FAILED and the lane goes on with a new trainer. A thread rather
    than a Ray task: a task would start one more Python process and import torch, Ray Train and MLflow
    there, seconds of start-up per lane."""
    while ray.get(queue.status.remote())["more"]:
        name = trainer_name(cfg)
        try:
            fit_lane(cfg, queue, lane, tracking_uri, name)
        except Exception as e:
            failed = ray.get(queue.fail_in_flight.remote(lane, f"{type(e).__name__}: {e}"))
            if failed is not None:  # where it failed, as rank 0 tags what it trains
                ref, run_ids = failed
                tracking.fail_runs(tracking_uri, run_ids, e, {schema.LANE: str(lane), schema.TRAINER: name},
                                   ray.get(ref).cfg)


@dataclass
class SweepResult:
    parent_run_id: str
    rows: list[CellOutcome]  # one per cell, in grid order, as in summary.csv
    trained: int  # cells trained by this invocation (the rest were already finished)

    @property
    def failed(self) -> list[CellOutcome]:
        return [r for r in self.rows if r.status == schema.FAILED]


def default_concurrency(cfg: Config) -> int:
    """As many trainings as the cluster's resources hold at once."""
    res = ray.cluster_resources()
    if cfg.ray.use_gpu:
        return max(1, int(res.get("GPU", 0) // (cfg.ray.num_workers * cfg.ray.gpus_per_worker)))
    return max(1, int(res.get("CPU", 1) // (cfg.ray.num_workers * cfg.ray.cpus_per_worker)))


def _progress_line(status: dict, total: int) -> str:
    waiting = total - status["done"] - status["failed"] - status["diverged"] - status["running"]
    return (f"  cells: {status['done']} done, {status['running']} running, {status['diverged']} diverged, "
            f"{status['failed']} failed, {waiting} waiting")


@dataclass
class Feed:
    """The driver's producer, run in a thread: each pack's runs created (concurrently), then its job
    queued, a few jobs ahead of the lanes; the queue closed after the last. It keeps which run each
    cell got, the jobs' references (held while the lanes train), and an error (the tracking server
    gone) for the driver to raise once the lanes have stopped."""

    sw: sweep.Sweep
    groups: list[list[sweep.Cell]]
    mnist: data.MNIST
    queue: ray.actor.ActorHandle
    tracking_uri: str
    exp_id: str
    parent: tracking.RunRef
    cell_runs: dict[str, str] = field(default_factory=dict)
    held: list[ray.ObjectRef] = field(default_factory=list)
    error: Exception | None = None

    def run(self) -> None:
        data_refs: dict[tuple, ray.ObjectRef] = {}  # one object-store copy per distinct data selection
        try:
            for i, group in enumerate(self.groups):
                cfg = sweep.population_config(group, f"{self.sw.name}-{i}")
                key = (cfg.data.split, cfg.data.train_limit, cfg.data.eval_limit)
                if key not in data_refs:
                    data_refs[key] = ray.put(data.select(self.mnist, *key))
                tags = [{schema.CELL_ID: c.id, schema.RUN_NAME: f"{self.sw.name}/{c.label}",
                         **{k: str(v) for k, v in c.axes.items()}} for c in group]
                runs = tracking.create_runs(self.tracking_uri, cfg, self.exp_id, self.parent.run_id, tags)
                self.cell_runs.update((c.id, r.run_id) for c, r in zip(group, runs))
                self.held.append(ray.put(Job(cfg, runs, data_refs[key], parent=self.parent)))
                ray.get(self.queue.put.remote((self.held[-1], [r.run_id for r in runs])))
        except Exception as e:
            self.error = e
        finally:
            ray.get(self.queue.close.remote())


def run_sweep(sw: sweep.Sweep, tracking_uri: str, data_dir: str | None = None, address: str | None = None,
              force: bool = False, say=print) -> SweepResult:
    """`distnet sweep`: skip finished cells, pack the rest into populations (jobs) whose runs are
    created while the first ones already train, run them on concurrent lanes, then summarise every
    cell from what the trainings returned (the finished ones from the listing)."""
    first = sw.cells[0].config
    mnist = download.load_or_fetch(data_dir or first.data.dir, say)
    grid_params = {f"grid.{k}": v for k, v in sw.grid.items()} | {f"sweep.{k}": v for k, v in vars(sw.settings).items()}
    exp_id = tracking.experiment_id(tracking_uri, first.mlflow.experiment)
    parent_ref = tracking.sweep_parent(tracking_uri, exp_id, sw.name, sw.id, grid_params)
    parent = parent_ref.run_id
    todo, stale, finished = sweep.select(sw.cells, tracking.child_runs(tracking_uri, parent), force)
    tracking.delete_runs(tracking_uri, [r.info.run_id for r in stale])
    groups = sweep.packs(todo, sw.settings.pack)
    trained: dict[str, CellOutcome] = {}
    if groups:
        ensure_ray(address)
        lanes = min(len(groups), sw.settings.max_concurrent or default_concurrency(first))
        say(f"sweep {sw.name}: {len(sw.cells)} cells, {len(sw.cells) - len(todo)} already finished, "
            f"{len(todo)} to train in {len(groups)} job(s) on {lanes} lane(s); MLflow parent run {parent}")
        queue = JobQueue.options(**on_drivers_node()).remote(ahead=lanes)
        feed = Feed(sw, groups, mnist, queue, tracking_uri, exp_id, parent_ref)
        # Daemon threads: an interrupted driver exits at once, and Ray ends the trainers it owned.
        pending = [threading.Thread(target=feed.run, daemon=True)]
        pending += [threading.Thread(target=_lane, args=(first, queue, lane, tracking_uri), daemon=True)
                    for lane in range(lanes)]
        for t in pending:
            t.start()
        shown = None
        with tracking_server.ServerWatch(tracking_uri, say), LaneWaits(queue, say):
            while pending:
                pending[0].join(timeout=1.0)
                pending = [t for t in pending if t.is_alive()]
                line = _progress_line(ray.get(queue.status.remote()), len(todo))
                if line != shown:
                    say(line)
                    shown = line
        if feed.error is not None:
            raise feed.error
        by_run = {r.run_id: r for r in ray.get(queue.results.remote())}
        trained = {cell_id: by_run[run_id] for cell_id, run_id in feed.cell_runs.items()}
    else:
        say(f"sweep {sw.name}: all {len(sw.cells)} cells already finished; MLflow parent run {parent}")
    eval_prefix = schema.eval_prefix(first.data.split)
    rows = _summary_rows(sw, finished, trained, tracking_uri, eval_prefix)
    index = cellindex.table([c.axes for c in sw.cells], rows)
    tracking.finish_parent(tracking_uri, parent, sweep.summary_csv(rows), index,
                           space.announce(say, f"sweep {sw.name}'s summary"))
    say(sweep.summary_table(rows, eval_prefix, sw.cells))
    return SweepResult(parent, rows, len(todo))


def _summary_rows(sw: sweep.Sweep, finished: dict, trained: dict[str, CellOutcome], uri: str,
                  eval_prefix: str) -> list[CellOutcome]:
    """One outcome per cell, in grid order: a cell trained now as its training (or its lane's
    failure) returned it, a finished one from its listed run."""
    return [(trained[c.id] if c.id in trained else
             tracking.cell_outcome(uri, finished[c.id], len(c.config.sizes) - 1, eval_prefix)).of_cell(c.label)
            for c in sw.cells]
