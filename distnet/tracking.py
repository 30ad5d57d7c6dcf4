"""MLflow: one run per population member.

The driver decides everything about the runs before any worker starts (experiment, run ids,
params, tags, config artifact) and ends them afterwards; rank 0 only appends metrics to the ids it
is given, in batches. So a run exists, with its config, even if training never gets going.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient

from distnet.config import Config, config_hash, dump_yaml, flatten

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


def ui_command(uri: str) -> str:
    return f"mlflow ui --backend-store-uri {uri}" if not uri.startswith("http") else f"open {uri}"


def _experiment_id(client: MlflowClient, uri: str, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith(SQLITE):  # keep artifacts beside the database, wherever the UI is started
        location = (Path(uri[len(SQLITE):]).parent / "mlartifacts" / name).as_uri()
    return client.create_experiment(name, artifact_location=location)


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


def create_runs(uri: str, cfg: Config) -> list[str]:
    """One run per member with its resolved config as params, tags and `config.yaml`; returns ids."""
    client = MlflowClient(uri)
    exp_id = _experiment_id(client, uri, cfg.mlflow.experiment)
    run_ids = []
    population = len(cfg.members)
    for k in range(population):
        name = cfg.name if population == 1 else f"{cfg.name}-m{k}"
        run = client.create_run(exp_id, run_name=name, tags=member_tags(cfg, k))
        mc = cfg.member_config(k)
        params = [Param(key, str(v)) for key, v in flatten(mc).items()]
        for i in range(0, len(params), MAX_PARAMS_PER_BATCH):
            client.log_batch(run.info.run_id, params=params[i:i + MAX_PARAMS_PER_BATCH])
        client.log_text(run.info.run_id, dump_yaml(mc), "config.yaml")
        run_ids.append(run.info.run_id)
    return run_ids


def end_runs(uri: str, run_ids: list[str], error: BaseException | None = None) -> None:
    """FINISHED, or FAILED with the reason as a tag and an `error.txt` artifact."""
    client = MlflowClient(uri)
    for run_id in run_ids:
        if error is not None:
            reason = f"{type(error).__name__}: {error}"
            client.log_batch(run_id, tags=[RunTag("distnet.error", reason[:5000])])
            client.log_text(run_id, reason, "error.txt")
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED if error else RunStatus.FINISHED))


class MlflowSink:
    """Rank 0's metric sink: buffers per-member metrics and writes them with log_batch (at most
    1000 a call) on flush, which the loop calls once per epoch."""

    def __init__(self, uri: str, run_ids: list[str], on_progress: Callable[[dict], None] | None = None):
        self.client = MlflowClient(uri)
        self.run_ids = run_ids
        self.buffers: list[list[Metric]] = [[] for _ in run_ids]
        self.on_progress = on_progress

    def log(self, step: int, values: dict[str, np.ndarray]) -> None:
        ts = int(time.time() * 1000)
        for name, per_member in values.items():
            for buf, v in zip(self.buffers, np.asarray(per_member, dtype=np.float64).tolist()):
                buf.append(Metric(name, v, ts, step))

    def progress(self, state: dict) -> None:
        if self.on_progress is not None:
            self.on_progress(state)

    def flush(self) -> None:
        for run_id, buf in zip(self.run_ids, self.buffers):
            for i in range(0, len(buf), MAX_METRICS_PER_BATCH):
                self.client.log_batch(run_id, metrics=buf[i:i + MAX_METRICS_PER_BATCH])
            buf.clear()
