"""A sweep's cell records in bulk: what `distnet report` reads instead of a few dozen requests per cell.

When rank 0 closes a job's runs it also writes, to the sweep's parent run, one Parquet part under
`cells/`: every metric value it wrote to each of the job's runs, and their step tables' weight-
gradient-norm columns (what the report draws). So a sweep of any size is read back in a listing of
its cells and one download of `cells/`. A job that resumed after a restart writes no part (its rank 0
did not see the whole training): the report reads those cells run by run.

Long format, one row per value: run_id, key, step, value (float64); a step-table column's key is
`step_metrics/<column>`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from mlflow.tracking import MlflowClient

ARTIFACT_DIR = "cells"
STEP_PREFIX = "step_metrics/"
STEP_COLUMNS = "grad_norm/w/"  # the step-table columns kept: the report's per-step figures draw these


class Collector:
    """What a sink wrote, per member, until the job's part is made."""

    def __init__(self, members: int):
        self.keys: list[list[str]] = [[] for _ in range(members)]
        self.steps: list[list[np.ndarray]] = [[] for _ in range(members)]
        self.values: list[list[np.ndarray]] = [[] for _ in range(members)]

    def metrics(self, k: int, rows: list[tuple]) -> None:
        """Metric rows (key, value, timestamp, step) written to member k's run."""
        if rows:
            self.keys[k] += [r[0] for r in rows]
            self.steps[k].append(np.array([r[3] for r in rows], dtype=np.int64))
            self.values[k].append(np.array([r[1] for r in rows], dtype=np.float64))

    def step_rows(self, k: int, steps: np.ndarray, columns: dict[str, np.ndarray]) -> None:
        """Step-table rows written to member k's run: its weight-gradient-norm columns."""
        for name, v in columns.items():
            if name.startswith(STEP_COLUMNS):
                self.keys[k] += [STEP_PREFIX + name] * len(steps)
                self.steps[k].append(np.asarray(steps, dtype=np.int64))
                self.values[k].append(np.asarray(v, dtype=np.float64))

    def table(self, run_ids: list[str]) -> pa.Table:
        ids = [run_id for run_id, keys in zip(run_ids, self.keys) for _ in keys]
        cat = lambda parts, dtype: np.concatenate([p for member in parts for p in member]) if ids else np.array([], dtype)
        return pa.table({"run_id": pa.array(ids, pa.string()).dictionary_encode(),
                         "key": pa.array([k for keys in self.keys for k in keys], pa.string()).dictionary_encode(),
                         "step": pa.array(cat(self.steps, np.int64)), "value": pa.array(cat(self.values, np.float64))})


def write_part(folder: Path, name: str, table: pa.Table) -> Path:
    path = Path(folder) / f"{name}.parquet"
    pq.write_table(table, path, compression="zstd")
    return path


def read(client: MlflowClient, parent_run_id: str) -> dict[str, dict[str, dict[int, float]]]:
    """run_id -> key -> {step: value}, for every cell whose job wrote a part; {} if none did."""
    parts = [a.path for a in client.list_artifacts(parent_run_id, ARTIFACT_DIR) if a.path.endswith(".parquet")]
    if not parts:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(client.download_artifacts(parent_run_id, ARTIFACT_DIR, tmp))
        table = pa.concat_tables([pq.read_table(local / Path(p).name) for p in parts]).combine_chunks()
    out: dict[str, dict[str, dict[int, float]]] = {}
    for run_id, key, step, value in zip(*(table.column(c).to_pylist() for c in ("run_id", "key", "step", "value"))):
        out.setdefault(run_id, {}).setdefault(key, {})[step] = value
    return out
