"""A sweep's cell index: one row per cell (its run, its grid values, how it ended), written by the
driver to the sweep's parent run when the sweep ends, beside summary.csv.

With the cell records (distnet.cellrecords) it is what `distnet.results` reads a sweep from: two
downloads, whatever the sweep's size, where MLflow's listing of the cells takes a request per page
and builds an entity per run. The grid values keep their types (depth an int, lr a float, init a
string), which a run's tags and params, all strings, do not.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from mlflow.tracking import MlflowClient

from distnet.outcome import CellOutcome

ARTIFACT = "cell_index.parquet"
AXES_KEY = "distnet.axes"  # the schema's metadata: the grid's keys, in its order
# The index's own columns, after the grid's axes.
OUTCOME_COLUMNS = ("status", "diverged_at", "acc", "ratio_init", "ratio_end", "error", "run_id", "cell")


def axis_columns(axes: list[str]) -> dict[str, str]:
    """Grid key -> its column: the last part of the key (`model.depth` -> `depth`, as a cell's label
    names it) unless another axis or an outcome column has that name too."""
    short = [a.split(".")[-1] for a in axes]
    return {a: s if short.count(s) == 1 and s not in OUTCOME_COLUMNS else a for a, s in zip(axes, short)}


def table(axes: list[dict], rows: list[CellOutcome]) -> pa.Table:
    """The index of cells with grid values `axes` (one dict each, in grid order) and outcomes `rows`."""
    names = axis_columns(list(axes[0]))
    columns = {names[k]: pa.array([a[k] for a in axes]) for k in axes[0]}
    columns |= {"status": pa.array([r.status for r in rows], pa.string()),
                "diverged_at": pa.array([r.diverged_at for r in rows], pa.int64()),
                "acc": pa.array([r.acc for r in rows], pa.float64()),
                "ratio_init": pa.array([r.ratio_init for r in rows], pa.float64()),
                "ratio_end": pa.array([r.ratio_end for r in rows], pa.float64()),
                "error": pa.array([r.error for r in rows], pa.string()),
                "run_id": pa.array([r.run_id for r in rows], pa.string()),
                "cell": pa.array([r.cell for r in rows], pa.string())}
    return pa.table(columns).replace_schema_metadata({AXES_KEY: json.dumps(list(names))})


def axes(index: pa.Table) -> dict[str, str]:
    """The index's axis columns and the grid key each stands for, in the grid's order."""
    keys = json.loads(index.schema.metadata[AXES_KEY.encode()])
    return {column: key for key, column in axis_columns(keys).items()}


def write_file(folder: Path, index: pa.Table) -> Path:
    """The index as its artifact's file in `folder` (the caller uploads it to the parent run)."""
    path = folder / ARTIFACT
    pq.write_table(index, path, compression="zstd")
    return path


def read(client: MlflowClient, parent_run_id: str) -> pa.Table | None:
    """The sweep's index; None where its driver has not finished it (still running, killed, or a
    sweep from before the index)."""
    if ARTIFACT not in {a.path for a in client.list_artifacts(parent_run_id)}:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        return pq.read_table(client.download_artifacts(parent_run_id, ARTIFACT, tmp))
