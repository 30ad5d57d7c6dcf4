"""MLflow: one run per population member.

The driver decides everything about the runs before any worker starts (experiment, run ids,
params, tags, config artifact) and ends them afterwards; rank 0 only appends metrics to the ids it
is given, in batches. So a run exists, with its config, even if training never gets going.
"""

from __future__ import annotations

import dataclasses
import os
import time
import urllib.request
from pathlib import Path
from typing import Callable

import numpy as np
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient

from distnet import steptable
from distnet.config import Config, Member, config_hash, dump_yaml, flatten

DEFAULT_URI = "sqlite:///mlruns.db"
MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit
MAX_PARAMS_PER_BATCH = 100
SQLITE = "sqlite:///"


def resolve_tracking_uri(cli_uri: str | None = None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db in the working directory.
    A relative sqlite path is made absolute: workers run in other directories."""
    uri = cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    if uri.startswith(SQLITE) and not uri.startswith(SQLITE + "/"):
        uri = SQLITE + str(Path(uri[len(SQLITE):]).resolve())
    return uri


def wait_for_server(uri: str, timeout: float = 90, log: Path | None = None, process=None) -> None:
    """Until the MLflow server at `uri` answers; past the timeout, or once `process` (the server's,
    if we started it) has exited, fail with the end of its log. Polled with plain requests: the
    MLflow client retries a refused connection with back-off for minutes."""
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.time() > deadline or (process is not None and process.poll() is not None):
            raise RuntimeError(f"no MLflow server at {uri}: "
                               + (log.read_text()[-3000:] if log and log.exists() else "no log"))
        time.sleep(0.5)


# MLflow's own mark of an experiment that holds model training. MLflow 3.17's UI does not go by it
# when it picks GenAI or model-training pages (a UI mode does, see distnet.ui); other versions may.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def _experiment_id(client: MlflowClient, uri: str, name: str) -> str:
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


def create_runs(uri: str, cfg: Config, parent_run_id: str | None = None,
                extra_tags: list[dict[str, str]] | None = None) -> list[str]:
    """One run per member with its resolved config as params, tags and `config.yaml`; returns ids.
    Under a sweep, each is a child of `parent_run_id` and carries its cell's `extra_tags`."""
    client = MlflowClient(uri)
    exp_id = _experiment_id(client, uri, cfg.mlflow.experiment)
    run_ids = []
    population = len(cfg.members)
    for k in range(population):
        name = cfg.name if population == 1 else member_name(cfg, k)
        tags = member_tags(cfg, k)
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        tags.update(extra_tags[k] if extra_tags else {})
        run = retry_locked(client.create_run, exp_id, run_name=tags.pop("mlflow.runName", name), tags=tags)
        mc = cfg.member_config(k)
        params = [Param(key, str(v)) for key, v in flatten(mc).items()]
        for i in range(0, len(params), MAX_PARAMS_PER_BATCH):
            retry_locked(client.log_batch, run.info.run_id, params=params[i:i + MAX_PARAMS_PER_BATCH])
        client.log_text(run.info.run_id, dump_yaml(mc), "config.yaml")
        run_ids.append(run.info.run_id)
    return run_ids


def short_reason(error_text: str) -> str:
    """The line that says what went wrong: the last line of a (remote) traceback."""
    lines = [l.strip() for l in error_text.strip().splitlines() if l.strip()]
    return lines[-1] if lines else ""


def retry_locked(fn, *args, attempts: int = 8, **kwargs):
    """Call fn, retrying while a local sqlite store is locked by another writer. Every MLflow write
    we make is one transaction, so a retried call never writes twice."""
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if "database is locked" not in str(e) or i == attempts - 1:
                raise
            time.sleep(0.2 * 2**i)


def end_runs(uri: str, run_ids: list[str], diverged: dict[int, int] | None = None) -> None:
    """FINISHED, tagged `distnet.status` finished, or diverged with `distnet.diverged_step`."""
    client = MlflowClient(uri)
    diverged = diverged or {}
    for k, run_id in enumerate(run_ids):
        if k in diverged:
            tags = [RunTag("distnet.status", "diverged"), RunTag("distnet.diverged_step", str(diverged[k]))]
        else:
            tags = [RunTag("distnet.status", "finished")]
        retry_locked(client.log_batch, run_id, tags=tags)
        retry_locked(client.set_terminated, run_id, RunStatus.to_string(RunStatus.FINISHED))


def tag_runs(uri: str, run_ids: list[str], tags: dict[str, str]) -> None:
    client = MlflowClient(uri)
    for run_id in run_ids:
        retry_locked(client.log_batch, run_id, tags=[RunTag(k, v) for k, v in tags.items()])


def reopen_runs(uri: str, run_ids: list[str]) -> None:
    """RUNNING again: a resumed training continues the same runs."""
    client = MlflowClient(uri)
    for run_id in run_ids:
        retry_locked(client.update_run, run_id, status=RunStatus.to_string(RunStatus.RUNNING))


def count_restart(uri: str, run_ids: list[str]) -> None:
    """`distnet.restarts` += 1 on each run: how often its training resumed from a checkpoint."""
    client = MlflowClient(uri)
    for run_id in run_ids:
        n = int(client.get_run(run_id).data.tags.get("distnet.restarts", "0")) + 1
        retry_locked(client.set_tag, run_id, "distnet.restarts", str(n))


def fail_runs(uri: str, run_ids: list[str], error: BaseException) -> None:
    """FAILED, with the reason as the `distnet.error` tag and an `error.txt` artifact."""
    client = MlflowClient(uri)
    reason = f"{type(error).__name__}: {error}"
    for run_id in run_ids:
        client.log_text(run_id, reason, "error.txt")
        tags = [RunTag("distnet.status", "failed"), RunTag("distnet.error", reason[:5000])]
        retry_locked(client.log_batch, run_id, tags=tags)
        retry_locked(client.set_terminated, run_id, RunStatus.to_string(RunStatus.FAILED))


Row = tuple[str, float, int, int]  # a metric value: key, value, timestamp (ms), step


def write_metrics(client: MlflowClient, run_id: str, metrics: list[Row]) -> None:
    """Append metric values to a run with MLflow's log_batch, 1000 values a call (its limit). Each
    call is one transaction; values are in step order, so a crash between calls leaves every key
    holding all its steps up to some step (what MlflowSink.restore relies on)."""
    for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
        batch = [Metric(*row) for row in metrics[i:i + MAX_METRICS_PER_BATCH]]
        retry_locked(client.log_batch, run_id, metrics=batch)


class StepRows:
    """One member's full-resolution rows since the last flush: steps and a [n, C] float32 block."""

    def __init__(self):
        self.steps: list[np.ndarray] = []
        self.values: list[np.ndarray] = []

    def add(self, steps: np.ndarray, values: np.ndarray) -> None:
        if len(steps):
            self.steps.append(steps)
            self.values.append(values)

    def block(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(steps [n], values [n, C]) of everything added since the last clear(), or None."""
        if not self.steps:
            return None
        if len(self.steps) > 1:  # compact once: the next call is free
            self.steps, self.values = [np.concatenate(self.steps)], [np.concatenate(self.values)]
        return self.steps[0], self.values[0]

    def clear(self) -> None:
        self.steps, self.values = [], []


class MlflowSink:
    """Rank 0's sink: buffers per-member MLflow metrics and step-table rows and writes them on
    flush, which the loop calls at each checkpoint (after the checkpoint is committed)."""

    def __init__(self, uri: str, run_ids: list[str], on_progress: Callable[[dict], None] | None = None):
        self.client = MlflowClient(uri)
        self.run_ids = run_ids
        # Plain (key, value, timestamp, step) tuples: an MLflow Metric object per value cost ~12 us
        # a value on the hot path.
        self.buffers: list[list[Row]] = [[] for _ in run_ids]
        self.columns: list[str] = []  # the step tables' series, fixed by the first log_steps
        self.rows = [StepRows() for _ in run_ids]
        self.written_upto: list[dict[str, int]] = [{} for _ in run_ids]  # filled by restore()
        self.on_progress = on_progress

    def log(self, step: int, values: dict[str, np.ndarray], active: np.ndarray) -> None:
        ts = int(time.time() * 1000)
        members = np.flatnonzero(active).tolist()
        for name, per_member in values.items():
            v = np.asarray(per_member, dtype=np.float64).tolist()
            for k in members:
                self._append(k, (name, v[k], ts, step))

    def log_steps(self, steps: list[int], columns: dict[str, np.ndarray], active: np.ndarray) -> None:
        self.columns = list(columns)
        block = np.stack([np.asarray(v, dtype=np.float32) for v in columns.values()], 2)  # [n, P, C]
        steps = np.asarray(steps, dtype=np.int64)
        for k in range(len(self.run_ids)):
            keep = active[:, k]
            self.rows[k].add(steps[keep], block[keep, k])

    def progress(self, state: dict) -> None:
        if self.on_progress is not None:
            self.on_progress(state)

    def unflushed(self) -> dict:
        """What log() and log_steps() hold that flush() has not written: goes into the checkpoint."""
        return {"metrics": [list(buf) for buf in self.buffers], "columns": list(self.columns),
                "rows": [r.block() for r in self.rows]}

    def restore(self, unflushed: dict | None) -> None:
        """After a restart, from a checkpoint: write its unflushed metrics and rows, and from now on
        skip every (key, step) MLflow already holds. Each key's steps are written in order, one
        atomic log_batch at a time, so what MLflow holds of a key is all steps up to its last one.
        The dead group may have got past the checkpoint we resume from (Ray registers a reported
        checkpoint asynchronously) or died inside a flush; the replayed steps are the same numbers,
        computed again: metrics are not written twice, and a step-table part written again replaces
        itself (steptable)."""
        for k, run_id in enumerate(self.run_ids):
            keys = self.client.get_run(run_id).data.metrics.keys()
            self.written_upto[k] = {key: max(m.step for m in self.client.get_metric_history(run_id, key))
                                    for key in keys}
            self.buffers[k] = []
            self.rows[k] = StepRows()
            if unflushed is None:
                continue
            for row in unflushed["metrics"][k]:
                self._append(k, tuple(row))
            if unflushed["rows"][k] is not None:
                self.rows[k].add(*unflushed["rows"][k])
        if unflushed is not None:
            self.columns = unflushed["columns"]
        self.flush()

    def _append(self, k: int, row: Row) -> None:
        if row[3] > self.written_upto[k].get(row[0], -1):
            self.buffers[k].append(row)

    def flush(self, midway: Callable[[], None] | None = None) -> None:
        for k, (run_id, buf, rows) in enumerate(zip(self.run_ids, self.buffers, self.rows)):
            block = rows.block()
            if block is not None:
                steps, values = block
                retry_locked(steptable.write_part, self.client, run_id, steps, dict(zip(self.columns, values.T)))
                rows.clear()
            write_metrics(self.client, run_id, buf)
            buf.clear()
            if k == 0 and midway is not None:
                midway()


# ---------------------------------------------------------------- sweeps
def sweep_parent(uri: str, experiment: str, name: str, sweep_id: str, params: dict[str, str]) -> str:
    """The sweep's parent run: found by its id tag (a re-run of the same sweep reuses it, RUNNING
    again), else created with the grid as params."""
    client = MlflowClient(uri)
    exp_id = _experiment_id(client, uri, experiment)
    found = client.search_runs([exp_id], f"tags.`distnet.sweep_id` = '{sweep_id}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        retry_locked(client.update_run, run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        return run_id
    run = retry_locked(client.create_run, exp_id, run_name=name,
                       tags={"distnet.sweep_id": sweep_id, "distnet.kind": "sweep"})
    items = [Param(k, str(v)) for k, v in params.items()]
    for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
        retry_locked(client.log_batch, run.info.run_id, params=items[i:i + MAX_PARAMS_PER_BATCH])
    return run.info.run_id


def find_sweep(uri: str, name: str | None = None, sweep_id: str | None = None):
    """The newest parent run of a sweep, by its name or its id (`distnet.sweep_id`), in any
    experiment of the store; None if there is none."""
    client = MlflowClient(uri)
    query = "tags.`distnet.kind` = 'sweep'" + (f" and attributes.run_name = '{name}'" if name else "") + \
        (f" and tags.`distnet.sweep_id` = '{sweep_id}'" if sweep_id else "")
    found = client.search_runs([e.experiment_id for e in client.search_experiments()], query,
                               order_by=["attributes.start_time DESC"], max_results=1)
    return found[0] if found else None


def child_runs(uri: str, parent_run_id: str) -> list:
    """Every live (not deleted) child run of a sweep's parent."""
    client = MlflowClient(uri)
    exp_id = client.get_run(parent_run_id).info.experiment_id
    runs, token = [], None
    while True:
        page = client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{parent_run_id}'",
                                  max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def delete_runs(uri: str, run_ids: list[str]) -> None:
    """Soft-delete (recoverable in the UI): a cell about to be re-run keeps one live run."""
    client = MlflowClient(uri)
    for run_id in run_ids:
        retry_locked(client.delete_run, run_id)


def finish_parent(uri: str, run_id: str, summary_csv: str) -> None:
    client = MlflowClient(uri)
    client.log_text(run_id, summary_csv, "summary.csv")
    retry_locked(client.set_terminated, run_id, RunStatus.to_string(RunStatus.FINISHED))


def cell_summary(uri: str, run, n_layers: int, eval_prefix: str) -> dict:
    """What a sweep's summary shows of one cell's run: status, final accuracy, and the layer-1 /
    last-layer weight-gradient-norm ratio at the first and the last step of its step table."""
    table = steptable.read(MlflowClient(uri), run.info.run_id)
    first, last = table.get("grad_norm/w/layer_1"), table.get(f"grad_norm/w/layer_{n_layers}")

    def ratio(i):
        if first is None or last is None or not len(first) or not last[i]:
            return float("nan")
        with np.errstate(all="ignore"):  # a diverged cell's last row: inf / inf
            return float(first[i] / last[i])

    status = run.data.tags.get("distnet.status") or run.info.status.lower()
    return {
        "status": status + (f"@{run.data.tags['distnet.diverged_step']}" if status == "diverged" else ""),
        "acc": run.data.metrics.get(f"{eval_prefix}/acc", float("nan")),
        "ratio_init": ratio(0),
        "ratio_end": ratio(-1),
        "run_id": run.info.run_id,
        "error": run.data.tags.get("distnet.error", ""),
    }
