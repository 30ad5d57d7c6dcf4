"""A sweep's cell records in bulk: what `distnet report` reads instead of a few dozen requests per cell.

When rank 0 closes a job's runs it also writes, to the sweep's parent run, one Parquet part under
`cells/`: every metric value it wrote to each of the job's runs, and their step tables' weight-
gradient-norm and batch-accuracy columns (what the report draws). So a sweep of any size is read back in a listing of
its cells and one download of `cells/`. A job that resumed after a restart writes no part (its rank 0
did not see the whole training): the report reads those cells run by run.

Long format, one row per value: run_id, key, step, value (float64); a step-table column's key is
`step_metrics/<column>`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from mlflow.tracking import MlflowClient

from distnet import schema

ARTIFACT_DIR = "cells"
STEP_PREFIX = "step_metrics/"
# The step-table columns kept (prefixes): what the report's per-step figures and tables draw.
STEP_COLUMNS = (schema.GRAD_NORM_W, schema.BATCH_ACC)
# A cell as read back: its run id and {key: (steps, values)}.
Record = tuple[str, dict[str, tuple[np.ndarray, np.ndarray]]]


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
        """Step-table rows written to member k's run: its STEP_COLUMNS."""
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


def read(client: MlflowClient, parent_run_id: str, prefixes: tuple[str, ...] = ("",)) -> Iterator[Record]:
    """Per cell whose job wrote a part: (run_id, {key: (steps int64, values float64)}), each key's
    values in step order, for the keys that start with one of `prefixes`. Nothing if no job wrote a
    part. A part is one job's, so a cell's records are all in one part: parts are grouped one at a
    time, and only the values kept ever become arrays of their own."""
    parts = [a.path for a in client.list_artifacts(parent_run_id, ARTIFACT_DIR) if a.path.endswith(".parquet")]
    if not parts:
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(client.download_artifacts(parent_run_id, ARTIFACT_DIR, tmp))
        for p in parts:
            yield from _by_run(pq.read_table(local / Path(p).name), prefixes)


def _codes(column: pa.ChunkedArray) -> tuple[np.ndarray, list[str]]:
    """A string column as (codes [n], names): one name per distinct value, not per row."""
    encoded = column.combine_chunks()
    if not pa.types.is_dictionary(encoded.type):
        encoded = encoded.dictionary_encode()
    return encoded.indices.to_numpy(zero_copy_only=False), encoded.dictionary.to_pylist()


def _by_run(table: pa.Table, prefixes: tuple[str, ...]) -> Iterator[Record]:
    runs, run_ids = _codes(table.column("run_id"))
    keys, names = _codes(table.column("key"))
    keep = np.array([name.startswith(prefixes) for name in names], dtype=bool)[keys]
    runs, keys = runs[keep], keys[keep]
    steps, values = table.column("step").to_numpy()[keep], table.column("value").to_numpy()[keep]
    order = np.lexsort((steps, keys, runs))
    runs, keys, steps, values = runs[order], keys[order], steps[order], values[order]
    starts = np.flatnonzero((np.diff(runs, prepend=-1) != 0) | (np.diff(keys, prepend=-1) != 0))  # of each (run, key)
    ends = np.append(starts[1:], len(runs))
    record: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for a, b in zip(starts.tolist(), ends.tolist()):
        record[names[keys[a]]] = steps[a:b], values[a:b]
        if b == len(runs) or runs[b] != runs[a]:
            yield run_ids[runs[a]], record
            record = {}
