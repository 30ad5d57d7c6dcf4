"""MLflow: one run per population member, written in as few requests as the record allows.

A cell's record is its run's tags, params, `config.yaml`, interval and epoch metrics, and Parquet
step table (steptable). Through a tracking server it costs six requests when the training fits in
one checkpoint interval, one from the driver and five from rank 0, each side's issued for all the
members of a job at once by a bounded pool of threads:
- the driver, before the job is queued: `create_run` with every tag it knows (the parent link
  among them);
- rank 0, at each checkpoint: one step-table part upload (the first preceded by MlflowClient's one
  read of the run, for its artifact location) and one `log_batch` of the metrics and of the tags it
  has learnt since (node, lane, trainer); the first time also the `config.yaml` upload and the
  params, in that same `log_batch`. At the end that last `log_batch` also carries the outcome's
  tags, and `set_terminated` closes the run.
The params and `config.yaml` go with rank 0's first records rather than with the driver's
`create_run` because the read of the run that an upload needs is then made once a run, by rank 0,
before the params make the run heavier to read. A job that fails before rank 0 wrote them gets
them with its FAILED status (fail_runs). No other request asks for what distnet already knows: the
experiment is looked up once, and MLflow's "View run" link, which reads the run back, is turned off
(distnet prints its own links).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, TypeVar

import numpy as np
import pyarrow as pa
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient

from distnet import cellindex, cellrecords, schema, space, steptable
from distnet.outcome import NAN, CellOutcome, grad_ratio
from distnet.progress import Progress
from distnet.recordbuffer import RecordBuffer, Row
from distnet.config import Config, Member, config_hash, dump_yaml, flatten
from distnet.tracking_server import SQLITE, is_server

# set_terminated on an HTTP store otherwise reads the run back to print a "View run" link: one
# more request per run. Read by MLflow at each call, so setting it here covers the driver and rank 0.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limits
MAX_PARAMS_PER_BATCH = 100
# Requests in flight at once from one writer (the driver, each rank 0) to a tracking server: enough
# to hide the round trips (a one-worker server here was as fast with 1 as with 8), few enough that
# a cluster's writers together stay within the server's database connections. A local sqlite store
# takes one writer at a time (and its requests are CPU, not waiting): one after another there.
SERVER_CONCURRENCY = 4

T = TypeVar("T")


def concurrent(uri: str, fn: Callable[..., T], items: Iterable) -> list[T]:
    """fn(item) for every item, in order: SERVER_CONCURRENCY at once through a server, one after
    another into a local store. The first error is raised once every call has ended."""
    items = list(items)
    if len(items) <= 1 or not is_server(uri):
        return [fn(item) for item in items]
    with ThreadPoolExecutor(min(SERVER_CONCURRENCY, len(items))) as pool:
        futures = [pool.submit(fn, item) for item in items]
    return [f.result() for f in futures]


@dataclasses.dataclass(frozen=True)
class RunRef:
    """A run as its writers hold it."""

    run_id: str


def upload(uri: str, run: RunRef, local_path: str | Path, artifact_dir: str | None, on_full: space.Notify) -> None:
    """One file into the run's artifacts (MlflowClient asks the server for the run's artifact location
    once per run and process, then uploads straight to it). A file system out of space makes it
    wait for room, and `on_full` hears where and how much (distnet.space)."""
    client, local_path = MlflowClient(uri), Path(local_path)

    def where() -> str:
        location = client.get_run(run.run_id).info.artifact_uri
        location = location.removeprefix("file://") if location.startswith("file:///") else location
        return "/".join([location, *([artifact_dir] if artifact_dir else []), local_path.name])

    space.waiting(lambda: client.log_artifact(run.run_id, str(local_path), artifact_dir), where,
                  local_path.stat().st_size, on_full)


def upload_text(uri: str, run: RunRef, text: str, name: str, on_full: space.Notify) -> None:
    """`text` as the artifact `name` (what MlflowClient.log_text does, through upload)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(text)
        upload(uri, run, path, None, on_full)


# MLflow's own mark of an experiment that holds model training. MLflow's UI (3.17, 3.18) does not go by it
# when it picks GenAI or model-training pages (a UI mode does, see distnet.ui); other versions may.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def experiment_id(uri: str, name: str) -> str:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith(SQLITE):  # keep artifacts beside the database, wherever the UI is started
        location = (Path(uri[len(SQLITE):]).parent / "mlartifacts" / name).as_uri()
    return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)


def member_tags(cfg: Config, k: int) -> dict[str, str]:
    m, mc = cfg.members[k], cfg.member_config(k)
    return {
        "depth": str(cfg.model.depth),
        "width": str(cfg.model.width),
        "sizes": str(cfg.sizes),
        "init": m.init,
        "activation": cfg.model.activation,
        "loss": cfg.model.loss,
        "seed": str(m.seed),
        "lr": str(m.lr),
        "config_hash": config_hash(mc),
    }


def member_name(cfg: Config, k: int) -> str:
    """A population member's run name: what sets it apart from the others, as a sweep cell's is
    (`default/init=he_normal,seed=1`), so the UI's tables and chart legends say which is which."""
    fields = [f.name for f in dataclasses.fields(Member)]
    varying = [f for f in fields if len({getattr(m, f) for m in cfg.members}) > 1]
    member = cfg.members[k]
    return f"{cfg.name}/" + ",".join(f"{f}={getattr(member, f)}" for f in varying) if varying else f"{cfg.name}-m{k}"


def member_record(cfg: Config, k: int) -> tuple[list[Param], str]:
    """Member k's params (its flattened config) and its `config.yaml`."""
    mc = cfg.member_config(k)
    return [Param(key, str(v)) for key, v in flatten(mc).items()], dump_yaml(mc)


def create_runs(uri: str, cfg: Config, exp_id: str | None = None, parent_run_id: str | None = None,
                extra_tags: list[dict[str, str]] | None = None) -> list[RunRef]:
    """One run per member, each created with every tag in one request, the members' concurrently
    (rank 0 writes the params and `config.yaml` with its first records). Under a sweep, each is a
    child of `parent_run_id` and carries its cell's `extra_tags`; `exp_id` saves the experiment's
    lookup (a sweep makes it once)."""
    exp_id = exp_id or experiment_id(uri, cfg.mlflow.experiment)
    client = MlflowClient(uri)
    population = len(cfg.members)

    def create(k: int) -> RunRef:
        name = cfg.name if population == 1 else member_name(cfg, k)
        tags = member_tags(cfg, k)
        if parent_run_id:
            tags[schema.PARENT] = parent_run_id
        tags.update(extra_tags[k] if extra_tags else {})
        run = retry_busy(client.create_run, exp_id, run_name=tags.pop(schema.RUN_NAME, name), tags=tags)
        return RunRef(run.info.run_id)

    return concurrent(uri, create, range(population))


def short_reason(error_text: str) -> str:
    """The line that says what went wrong: the last line of a (remote) traceback."""
    lines = [l.strip() for l in error_text.strip().splitlines() if l.strip()]
    return lines[-1] if lines else ""


# Errors that say the store is busy, not that the request is wrong: a local sqlite store locked by
# another writer; a server whose database connections are all in use (SQLAlchemy's pool timeout,
# which MLflow's server answers as a bad request).
BUSY = ("database is locked", "QueuePool limit")


def retry_busy(fn, *args, attempts: int = 8, **kwargs):
    """Call fn, retrying with back-off while the store is busy. Every MLflow write we make is one
    transaction, and a busy store wrote nothing of it, so a retried call never writes twice."""
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if not any(b in str(e) for b in BUSY) or i == attempts - 1:
                raise
            time.sleep(0.2 * 2**i)


def reopen_runs(uri: str, run_ids: list[str]) -> None:
    """RUNNING again: a resumed training continues the same runs."""
    client = MlflowClient(uri)
    concurrent(uri, lambda run_id: retry_busy(client.update_run, run_id, status=RunStatus.to_string(RunStatus.RUNNING)),
               run_ids)


def count_restart(uri: str, run_ids: list[str]) -> None:
    """`distnet.restarts` += 1 on each run: how often its training resumed from a checkpoint."""
    client = MlflowClient(uri)

    def bump(run_id: str) -> None:
        n = int(client.get_run(run_id).data.tags.get(schema.RESTARTS, "0")) + 1
        retry_busy(client.set_tag, run_id, schema.RESTARTS, str(n))

    concurrent(uri, bump, run_ids)


def fail_runs(uri: str, run_ids: list[str], error: BaseException, tags: dict[str, str] | None = None,
              cfg: Config | None = None) -> None:
    """FAILED, with the reason as the `distnet.error` tag and an `error.txt` artifact (and `tags`);
    with the job's `cfg`, also each member's params and `config.yaml`, which rank 0 may not have
    written before the failure (written again, they are the same)."""
    client = MlflowClient(uri)
    reason = f"{type(error).__name__}: {error}"
    extra = [RunTag(k, v) for k, v in (tags or {}).items()]

    def fail(k: int) -> None:
        run_id, params = run_ids[k], []
        if cfg is not None:
            params, text = member_record(cfg, k)
            client.log_text(run_id, text, "config.yaml")
        client.log_text(run_id, reason, "error.txt")
        write_batches(client, run_id, [], [RunTag(schema.STATUS, schema.FAILED),
                                           RunTag(schema.ERROR, reason[:5000])] + extra, params)
        retry_busy(client.set_terminated, run_id, RunStatus.to_string(RunStatus.FAILED))

    concurrent(uri, fail, range(len(run_ids)))


def write_batches(client: MlflowClient, run_id: str, metrics: list[Row], tags: list[RunTag] = (),
                  params: list[Param] = ()) -> None:
    """Append metric values (and set tags and params) with MLflow's log_batch, within its limits a
    call (1000 entities, of them 100 params and 100 tags). Each call is one transaction (so
    retry_busy never writes one twice); values are in step order, so a crash between calls leaves
    every key holding all its steps up to some step (what MlflowSink.resume relies on). The tags
    and params go with the last call, unless they would not fit there."""
    chunks = [metrics[i:i + MAX_METRICS_PER_BATCH] for i in range(0, len(metrics), MAX_METRICS_PER_BATCH)]
    last = chunks.pop() if chunks else []
    if len(params) > MAX_PARAMS_PER_BATCH or len(last) + len(tags) + len(params) > MAX_METRICS_PER_BATCH:
        for i in range(0, len(params), MAX_PARAMS_PER_BATCH):
            retry_busy(client.log_batch, run_id, params=params[i:i + MAX_PARAMS_PER_BATCH])
        params = []
    if len(last) + len(tags) + len(params) > MAX_METRICS_PER_BATCH:
        chunks, last = chunks + [last], []
    for chunk in chunks:
        retry_busy(client.log_batch, run_id, metrics=[Metric(*row) for row in chunk])
    if last or tags or params:
        retry_busy(client.log_batch, run_id, metrics=[Metric(*row) for row in last], tags=list(tags),
                   params=list(params))


@dataclasses.dataclass(frozen=True)
class TrainingEnd:
    """How a job's training ended, for closing its runs (each cell's CellOutcome is made from it):
    members that diverged (member -> step), which all-reduce it took, and the accuracy key its
    summary reports (`test/acc` or `val/acc`)."""

    diverged: dict[int, int]
    all_reduce: str
    acc_key: str


class MlflowSink:
    """Rank 0's sink: keeps what the loop logs in a RecordBuffer (which each checkpoint carries) and
    writes it on flush, which the loop calls at each checkpoint (after the checkpoint is committed);
    `close` writes the rest with the runs' outcome and ends them. The first write to a run also
    carries its member's params and `config.yaml` (from `cfg`). Members are written concurrently.
    A job picked up again after a restart is `resume`d first."""

    def __init__(self, uri: str, cfg: Config, runs: list[RunRef], on_progress: Callable[[Progress], None] | None = None,
                 tags: dict[str, str] | None = None, parent: RunRef | None = None,
                 on_full: space.Notify = lambda _: None):
        self.uri, self.cfg, self.runs = uri, cfg, runs
        self.on_full = on_full  # a write waiting for room on a full disk, and its end (space.waiting)
        self.client = MlflowClient(uri)
        self.buffer = RecordBuffer(len(runs))
        self.opened = [False] * len(runs)  # member k's params and config.yaml written
        # Under a sweep, what is written is also kept for the parent's cell records (cellrecords).
        self.parent = parent
        self.collector = cellrecords.Collector(len(runs)) if parent is not None else None
        # What MLflow held of each run when the job was resumed: each key's last step (not written
        # again) and its value there; and each key's value at its last step written since.
        self.written_upto: list[dict[str, int]] = [{} for _ in runs]
        self.latest_values: list[dict[str, float]] = [{} for _ in runs]
        self.tags = [RunTag(k, v) for k, v in (tags or {}).items()]  # go with the next log_batch
        self.on_progress = on_progress

    @property
    def run_ids(self) -> list[str]:
        return [r.run_id for r in self.runs]

    def log(self, step: int, values: dict[str, np.ndarray], active: np.ndarray) -> None:
        self.buffer.log(step, values, active)

    def log_steps(self, steps: list[int], columns: dict[str, np.ndarray], active: np.ndarray) -> None:
        self.buffer.log_steps(steps, columns, active)

    def progress(self, state: Progress) -> None:
        if self.on_progress is not None:
            self.on_progress(state)

    def state_dict(self) -> dict:
        """What log() and log_steps() hold that flush() has not written: goes into the checkpoint."""
        return self.buffer.state_dict()

    def resume(self, unflushed: dict | None) -> None:
        """A job picked up again after a restart: read what MLflow holds of its runs, write none of
        it again, and write the checkpoint's `unflushed` records (state_dict()). Each key's steps are
        written in order, one atomic log_batch at a time, so what MLflow holds of a key is all steps
        up to its last one. The dead group may have got past the checkpoint we resume from (Ray
        registers a reported checkpoint asynchronously; without `unflushed`, past the job's start)
        or died inside a flush; the replayed steps are the same numbers, computed again: metrics are
        not written twice, and a step-table part written again replaces itself (steptable)."""

        def written(run_id: str) -> tuple[dict[str, int], dict[str, float]]:
            latest = self.client.get_run(run_id).data.metrics
            return {key: max(m.step for m in self.client.get_metric_history(run_id, key)) for key in latest}, latest

        self.written_upto, self.latest_values = map(list, zip(*concurrent(self.uri, written, self.run_ids)))
        self.collector = None  # what the dead group wrote is not here: no cell records from this job
        if unflushed is not None:
            self.buffer.load_state_dict(unflushed)
        else:  # the step tables hold where the job started: the ratios' first rows
            for k, run_id in enumerate(self.run_ids):
                table = steptable.read(self.client, run_id)
                if table:
                    self.buffer.start_from(k, table)
        self.flush()

    def write(self, k: int, end_tags: list[RunTag] = ()) -> None:
        """Member k's step-table part (one upload), the first time its `config.yaml` (one upload),
        and its metrics (less what MLflow held at a resume), tags and the first time params (one
        log_batch, more only past MLflow's limits a call). The step-table part goes first: the
        upload's read of the run is then made before the params are in it."""
        rows, table = self.buffer.pending(k)
        if table is not None:
            steps, columns = table
            with tempfile.TemporaryDirectory() as tmp:
                upload(self.uri, self.runs[k], steptable.write_part(Path(tmp), steps, columns), steptable.ARTIFACT_DIR,
                       self.on_full)
            if self.collector is not None:
                self.collector.step_rows(k, steps, columns)
        rows = [r for r in rows if r[3] > self.written_upto[k].get(r[0], -1)]
        params = []
        if not self.opened[k]:
            params, text = member_record(self.cfg, k)
            upload_text(self.uri, self.runs[k], text, "config.yaml", self.on_full)
        write_batches(self.client, self.runs[k].run_id, rows, self.tags + list(end_tags), params)
        self.opened[k] = True
        self.latest_values[k].update((r[0], r[1]) for r in rows)  # a key's rows come in step order
        if self.collector is not None:
            self.collector.metrics(k, rows)
        self.buffer.clear(k)

    def flush(self) -> None:
        """Every member's records, concurrently."""
        concurrent(self.uri, self.write, range(len(self.runs)))
        self.tags = []

    def close(self, end: TrainingEnd) -> list[CellOutcome]:
        """The last flush, with each run's outcome tags and summary ratios, then FINISHED: returns
        each member's outcome."""
        ts = int(time.time() * 1000)

        def close_run(k: int) -> CellOutcome:
            ratios, first, latest = self.buffer.ratios(k), self.buffer.first[k], self.buffer.latest[k]
            if first is not None:
                self.buffer.add(k, [(schema.RATIO_INIT, ratios[0], ts, first[0]), (schema.RATIO_END, ratios[1], ts, latest[0])])
            diverged_at = end.diverged.get(k)
            if diverged_at is not None:
                tags = [RunTag(schema.STATUS, schema.DIVERGED), RunTag(schema.DIVERGED_STEP, str(diverged_at))]
            else:
                tags = [RunTag(schema.STATUS, schema.FINISHED)]
            self.write(k, tags + [RunTag(schema.ALL_REDUCE, end.all_reduce)])
            retry_busy(self.client.set_terminated, self.runs[k].run_id, RunStatus.to_string(RunStatus.FINISHED))
            return CellOutcome.trained(self.runs[k].run_id, diverged_at,
                                       self.latest_values[k].get(end.acc_key, NAN), ratios)

        rows = concurrent(self.uri, close_run, range(len(self.runs)))
        self.tags = []
        if self.collector is not None:  # one part per job, named by its first run
            with tempfile.TemporaryDirectory() as tmp:
                part = cellrecords.write_part(Path(tmp), self.runs[0].run_id, self.collector.table(self.run_ids))
                upload(self.uri, self.parent, part, cellrecords.ARTIFACT_DIR, self.on_full)
        return rows


# ---------------------------------------------------------------- sweeps
def sweep_parent(uri: str, exp_id: str, name: str, sweep_id: str, params: dict[str, str]) -> RunRef:
    """The sweep's parent run: found by its id tag (a re-run of the same sweep reuses it, RUNNING
    again), else created with the grid as params."""
    client = MlflowClient(uri)
    found = client.search_runs([exp_id], schema.tag_is(schema.SWEEP_ID, sweep_id), max_results=1)
    if found:
        run_id = found[0].info.run_id
        retry_busy(client.update_run, run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        return RunRef(run_id)
    run = retry_busy(client.create_run, exp_id, run_name=name,
                       tags={schema.SWEEP_ID: sweep_id, schema.KIND: schema.SWEEP_KIND})
    write_batches(client, run.info.run_id, [], params=[Param(k, str(v)) for k, v in params.items()])
    return RunRef(run.info.run_id)


def find_sweep(uri: str, name: str | None = None, sweep_id: str | None = None):
    """The newest parent run of a sweep, by its name or its id (`distnet.sweep_id`), in any
    experiment of the store; None if there is none."""
    client = MlflowClient(uri)
    query = " and ".join([schema.tag_is(schema.KIND, schema.SWEEP_KIND)] + ([schema.named(name)] if name else []) +
                         ([schema.tag_is(schema.SWEEP_ID, sweep_id)] if sweep_id else []))
    found = client.search_runs([e.experiment_id for e in client.search_experiments()], query,
                               order_by=[schema.NEWEST_FIRST], max_results=1)
    return found[0] if found else None


def sweep_parents(uri: str) -> list:
    """The parent runs of the store's sweeps (the newest first), in every experiment."""
    client = MlflowClient(uri)
    return list(client.search_runs([e.experiment_id for e in client.search_experiments()],
                                   schema.tag_is(schema.KIND, schema.SWEEP_KIND), order_by=[schema.NEWEST_FIRST]))


def child_runs(uri: str, parent_run_id: str) -> list:
    """Every live (not deleted) child run of a sweep's parent."""
    client = MlflowClient(uri)
    exp_id = client.get_run(parent_run_id).info.experiment_id
    runs, token = [], None
    while True:
        page = client.search_runs([exp_id], schema.tag_is(schema.PARENT, parent_run_id),
                                  max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def delete_runs(uri: str, run_ids: list[str]) -> None:
    """Soft-delete (recoverable in the UI): a cell about to be re-run keeps one live run."""
    client = MlflowClient(uri)
    concurrent(uri, lambda run_id: retry_busy(client.delete_run, run_id), run_ids)


def finish_parent(uri: str, run_id: str, summary_csv: str, index: pa.Table, on_full: space.Notify) -> None:
    """The sweep's summary.csv and cell index (distnet.cellindex) logged, its parent run FINISHED."""
    parent = RunRef(run_id)
    upload_text(uri, parent, summary_csv, "summary.csv", on_full)
    with tempfile.TemporaryDirectory() as tmp:
        upload(uri, parent, cellindex.write_file(Path(tmp), index), None, on_full)
    retry_busy(MlflowClient(uri).set_terminated, run_id, RunStatus.to_string(RunStatus.FINISHED))


def unstored(value: float) -> float:
    """A metric value as logged: MLflow's SQL stores keep an infinity (a diverged layer's norm) as the
    largest float of its sign."""
    return math.copysign(math.inf, value) if abs(value) == sys.float_info.max else value


def cell_outcome(uri: str, run, n_layers: int, eval_prefix: str) -> CellOutcome:
    """A listed cell run's outcome, as MlflowSink.close made it when it trained. Its gradient ratios
    were logged with its final metrics; runs recorded before distnet logged them have them read
    from the step table itself."""
    metrics = run.data.metrics
    if schema.RATIO_INIT in metrics:
        ratios = unstored(metrics[schema.RATIO_INIT]), unstored(metrics[schema.RATIO_END])
    else:
        table = steptable.read(MlflowClient(uri), run.info.run_id)
        ratios = tuple(grad_ratio({c: v[i] for c, v in table.items()}, n_layers) if table else NAN for i in (0, -1))
    return CellOutcome.listed(run, ratios, schema.acc(eval_prefix))
