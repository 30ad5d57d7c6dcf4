"""A sweep as pandas DataFrames, for notebooks: `distnet.results` (one row per cell) and
`distnet.steps` (step tables, long format).

Read in bulk, as `distnet report` reads a sweep: the sweep's cell index (distnet.cellindex: each
cell's run, typed grid values and outcome) and the cell records its trainings left on the parent run
(distnet.cellrecords). A cell without records (its job resumed after a restart, so its rank 0 did
not see the whole training) is read run by run; a sweep without an index (its driver has not
finished it) is listed through MLflow. The `source` column says which, per cell.
"""

from __future__ import annotations

import ast
import math

import numpy as np
import pandas as pd
import pyarrow as pa
from mlflow.tracking import MlflowClient

from distnet import cellindex, cellrecords, schema, steptable, sweep, tracking, tracking_server
from distnet.outcome import CellOutcome

RECORDS, RUN, LISTING = "records", "run", "listing"  # the `source` column: where a row was read from
# What a row takes from its cell's series: the held-out accuracy (best over the evaluations), the
# last epoch's training loss and each layer's last weight-gradient norm.
SERIES = schema.ACC_KEYS + (schema.TRAIN_LOSS, schema.GRAD_NORM_W)
STEP_KEYS = tuple(cellrecords.STEP_PREFIX + c for c in cellrecords.STEP_COLUMNS)


class ResultsError(ValueError):
    """Not a sweep: an unknown name (the message lists the sweeps there are) or a run of no sweep."""


def results(sweep: str, tracking_uri: str | None = None) -> pd.DataFrame:
    """One row per cell of `sweep` (a sweep's name: its newest parent run; or a parent run's id):
    the grid's axes (ints, floats, categories), status, diverged_at, acc (final held-out accuracy),
    acc_best, train_loss (the last epoch's), ratio_init and ratio_end (|grad W_1| / |grad W_L| at
    the first and last step), each layer's last weight-gradient norm (`grad_norm/w/layer_<l>`, NaN
    past a cell's depth), run_id, cell (its label) and source."""
    uri = tracking_server.resolve_tracking_uri(tracking_uri)
    client = MlflowClient(uri)
    parent = _parent(uri, sweep)
    index, source = _index(uri, parent)
    ids = index.column("run_id").to_pylist()
    records = {run_id: record for run_id, record in cellrecords.read(client, parent.info.run_id, SERIES)}
    values = pd.DataFrame([_series_row(records[i]) if i in records else _run_row(uri, i) for i in ids])
    layers = sorted((c for c in values if c.startswith(schema.GRAD_NORM_W)), key=lambda c: int(c.rsplit("_", 1)[1]))
    frame = _frame(index)
    axes = cellindex.axes(index)
    cells = pd.concat([frame[[*axes, "status", "diverged_at", "acc"]], values[["acc_best", "train_loss"]],
                       frame[["ratio_init", "ratio_end"]], values[layers], frame[["run_id", "cell"]]], axis=1).assign(
        source=pd.Categorical([RECORDS if i in records else source for i in ids], [RECORDS, RUN, LISTING]))
    acc_key = next((k for r in records.values() for k in schema.ACC_KEYS if k in r), schema.acc("test"))
    cells.attrs = {"axes": axes, "acc": acc_key}
    return cells


def listing_columns(cells: pd.DataFrame) -> dict[str, str]:
    """Each column of a `results` frame that `mlflow.search_runs` gives too, and its name there (a
    tag's or a metric's latest value, as strings and floats): for moving code over, or comparing."""
    return ({c: f"tags.{key}" for c, key in cells.attrs["axes"].items()} |
            {"status": f"tags.{schema.STATUS}", "diverged_at": f"tags.{schema.DIVERGED_STEP}",
             "acc": f"metrics.{cells.attrs['acc']}", "train_loss": f"metrics.{schema.TRAIN_LOSS}",
             "ratio_init": f"metrics.{schema.RATIO_INIT}", "ratio_end": f"metrics.{schema.RATIO_END}"} |
            {c: f"metrics.{c}" for c in cells if c.startswith(schema.GRAD_NORM_W)} | {"run_id": "run_id"})


def steps(selector: str, where: dict | None = None, tracking_uri: str | None = None) -> pd.DataFrame:
    """A run's step table (`selector` a run id, `where` unused): a row per step, a column per series.
    Or a sweep's (`selector` its name or parent run id): the cells that `where` ({axis: value}, an
    axis by its column name or grid key) selects, long format: their axes, run_id, step, and the
    step-table columns the cell records keep (weight-gradient norms and batch accuracy)."""
    uri = tracking_server.resolve_tracking_uri(tracking_uri)
    client = MlflowClient(uri)
    parent = _parent(uri, selector, run_ok=True)
    if parent is None:
        return pd.DataFrame(steptable.read(client, selector))
    index, _ = _index(uri, parent)
    cells = _frame(index)[[*cellindex.axes(index), "run_id"]]
    for axis, value in (where or {}).items():
        column = axis if axis in cells else axis.split(".")[-1]
        if column not in cells or column == "run_id":
            raise ResultsError(f"{axis!r} is not an axis of sweep {parent.info.run_name}; "
                               f"its axes: {', '.join(cells.columns[:-1])}")
        cells = cells[cells[column] == value]
    wanted = set(cells["run_id"])
    tables = {run_id: {k.removeprefix(cellrecords.STEP_PREFIX): v for k, v in record.items()}
              for run_id, record in cellrecords.read(client, parent.info.run_id, STEP_KEYS) if run_id in wanted}
    parts = []
    for row in cells.itertuples(index=False):
        part = (_from_record(tables[row.run_id]) if row.run_id in tables else
                pd.DataFrame({k: v for k, v in steptable.read(client, row.run_id).items()
                              if k == "step" or k.startswith(cellrecords.STEP_COLUMNS)}))
        parts.append(part.assign(**row._asdict()))
    if not parts:
        return pd.DataFrame(columns=[*cells.columns, "step"])
    long = pd.concat(parts, ignore_index=True)
    for c in cells:  # concat turns categories with different values into objects: back to the index's
        long[c] = long[c].astype(cells[c].dtype)
    series = [c for c in long if c not in cells and c != "step"]
    return long[[*cells.columns, "step", *sorted(series)]]


# ---------------------------------------------------------------- the sweep and its index
def _parent(uri: str, selector: str, run_ok: bool = False):
    """The sweep's parent run, by name (its newest) or by run id; None for a run id that is no
    sweep's where `run_ok` (the steps of one run)."""
    found = tracking.find_sweep(uri, name=selector)
    if found is not None:
        return found
    try:
        run = MlflowClient(uri).get_run(selector)
    except Exception:  # MLflow raises its own error type per store
        names = sorted({r.info.run_name for r in tracking.sweep_parents(uri)})
        raise ResultsError(f"no sweep named {selector!r} and no run with that id in {uri}; the sweeps there: "
                           f"{', '.join(names) or 'none'}") from None
    if run.data.tags.get(schema.KIND) == schema.SWEEP_KIND:
        return run
    if run_ok:
        return None
    of = run.data.tags.get(schema.PARENT)
    raise ResultsError(f"run {selector} is not a sweep's parent run" + (f" but a cell of the sweep of run {of}" if of
                                                                          else " (distnet.steps reads one run)"))


def _index(uri: str, parent) -> tuple[pa.Table, str]:
    """The sweep's cell index, and where its cells' values are to be read where they have no
    records: run by run (the index is there) or from the listing (it is not: made from it here)."""
    index = cellindex.read(MlflowClient(uri), parent.info.run_id)
    return (index, RUN) if index is not None else (_listed_index(uri, parent), LISTING)


def _listed_index(uri: str, parent) -> pa.Table:
    """The index of a sweep whose driver has not written one: its cells from MLflow's listing, their
    grid values typed as the grid (the parent's `grid.*` params) gives them."""
    grid = {k.removeprefix("grid."): ast.literal_eval(v) for k, v in parent.data.params.items() if k.startswith("grid.")}
    typed = {axis: {str(v): v for v in values} for axis, values in grid.items()}
    position = {axis: {str(v): i for i, v in enumerate(values)} for axis, values in grid.items()}
    tag = lambda r, axis: r.data.tags[axis]  # every axis is a tag of its cells' runs (the cases' too)
    # in grid order, as the driver writes its index: categories come in the grid's order
    runs = sorted(tracking.child_runs(uri, parent.info.run_id),
                  key=lambda r: [position[axis][tag(r, axis)] for axis in grid])
    eval_key = lambda r: schema.held_out_acc(r.data.metrics) or schema.acc("test")
    rows, axes = [], []
    for r in runs:
        axes.append({axis: typed[axis][tag(r, axis)] for axis in grid})
        ratios = tuple(tracking.unstored(r.data.metrics.get(k, math.nan)) for k in (schema.RATIO_INIT, schema.RATIO_END))
        rows.append(CellOutcome.listed(r, ratios, eval_key(r)).of_cell(sweep.label(axes[-1])))
    return cellindex.table(axes, rows)


def _frame(index: pa.Table) -> pd.DataFrame:
    """The index as a DataFrame: string axes and status as categories (in the index's order),
    diverged_at and an int axis with a None among its values (fault.raise_at_step) as nullable ints."""
    frame = index.to_pandas()
    for c in index.column_names:
        kind = index.schema.field(c).type
        if c == "diverged_at" or (pa.types.is_integer(kind) and index.column(c).null_count):
            frame[c] = frame[c].astype("Int64")
        elif pa.types.is_string(kind) and c not in ("run_id", "cell", "error"):
            frame[c] = pd.Categorical(frame[c], list(dict.fromkeys(frame[c])))
    return frame


# ---------------------------------------------------------------- a cell's values
def _series_row(record: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """What a row takes from a cell's series ({key: (steps, values)}, in step order)."""
    acc = next((record[k][1] for k in schema.ACC_KEYS if k in record), np.array([]))
    row = {"acc_best": float(np.nanmax(acc)) if len(acc) and not np.isnan(acc).all() else math.nan,
           "train_loss": float(record[schema.TRAIN_LOSS][1][-1]) if schema.TRAIN_LOSS in record else math.nan}
    row |= {k: float(v[-1]) for k, (_, v) in record.items() if k.startswith(schema.GRAD_NORM_W) and len(v)}
    return {k: tracking.unstored(v) for k, v in row.items()}


def _run_row(uri: str, run_id: str) -> dict[str, float]:
    """The same, read from the run: its latest metrics, and its accuracy's history for the best."""
    client = MlflowClient(uri)
    latest = client.get_run(run_id).data.metrics
    record = {k: (np.zeros(1), np.array([v])) for k, v in latest.items() if k.startswith(SERIES)}
    key = schema.held_out_acc(latest)
    if key:
        history = client.get_metric_history(run_id, key)
        record[key] = np.array([m.step for m in history]), np.array([m.value for m in history])
    return _series_row(record)


def _from_record(table: dict[str, tuple[np.ndarray, np.ndarray]]) -> pd.DataFrame:
    """A cell's kept step-table columns ({column: (steps, values)}) as rows by step."""
    steps = np.unique(np.concatenate([s for s, _ in table.values()])) if table else np.array([], np.int64)
    frame = pd.DataFrame({"step": steps})
    for name, (s, v) in table.items():
        column = np.full(len(steps), np.nan, np.float32)
        column[np.searchsorted(steps, s)] = v
        frame[name] = column
    return frame
