"""The report's reading layer: which runs (a sweep by name, run ids), and each as a `Run` of
epoch-indexed series and step-table columns, from the sweep's cell records in bulk, run by run only
where records are missing."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from mlflow.tracking import MlflowClient

from distnet import cellrecords, choices, schema, steptable, tracking


class ReportError(ValueError):
    """Nothing to report on: an unknown sweep name or run id, or runs without metrics."""


@dataclass
class Run:
    """One member run as the report sees it: its cell and its epoch-indexed series."""

    run_id: str
    activation: str
    init: str
    depth: int
    seed: int
    status: str
    acc: float  # final test (or validation) accuracy; nan if never evaluated
    series: dict[str, dict[int, float]] = field(default_factory=dict)  # metric -> {epoch: value}
    steps: dict[str, np.ndarray] = field(default_factory=dict)  # its step table's STEP_COLUMNS
    variant: str = ""  # the other settings that vary between the runs, e.g. "train.batch_size=10"
    sigma_w2: float = 1.0  # the weight gain squared and the bias variance (the scheme's when not set)
    sigma_b2: float = 0.0
    case: str = ""  # its sweep's case (sweep.py's `cases`), if any

    @property
    def group(self) -> tuple[str, str]:
        """(activation, init and variant): what one figure panel set or heatmap column shows."""
        return self.activation, f"{self.init} {self.variant}".strip()

    @property
    def acc_series(self) -> dict[int, float]:
        """Accuracy by epoch: on the test set, or on the validation set where the run used one."""
        key = schema.held_out_acc(self.series)
        return self.series[key] if key else {}




# ---------------------------------------------------------------- selecting and reading runs
def find_runs(uri: str, selector: list[str]) -> tuple[list, str | None, str]:
    """`selector` is a sweep name (its newest parent run) or run ids. Returns the MLflow runs,
    the parent run id (None for run ids) and a title."""
    client = MlflowClient(uri)
    if len(selector) == 1:
        name = selector[0]
        found = tracking.find_sweep(uri, name=name)
        if found is not None:
            parent = found.info.run_id
            return tracking.child_runs(uri, parent), parent, name
    runs = []
    for run_id in selector:
        try:
            runs.append(client.get_run(run_id))
        except Exception as e:  # MLflow raises its own error type per store
            raise ReportError(f"{run_id!r} is neither a sweep name nor a run id in {uri}") from e
    return runs, None, ", ".join(selector)


# Params the report shows as axes of its own (or that follow from them): not part of a variant.
AXES = {"seed", "model.depth", "model.sizes", "model.init", "model.activation", "name"}


def _param(key: str, value: str | None) -> str:
    """key=value; a gain as the variance mean-field theory is written in (sigma_w^2=1.76, not 1.3266...)."""
    if key in ("model.sigma_w", "model.sigma_b") and value not in (None, "None"):
        return f"{key.split('.')[1]}^2={float(value) ** 2:.4g}"
    return f"{key}={value}"


def variants(mlflow_runs: list) -> list[str]:
    """Per run, the params outside AXES whose values differ between the runs, as "key=value"."""
    keys = set().union(*(r.data.params for r in mlflow_runs)) - AXES
    varying = sorted(k for k in keys if len({r.data.params.get(k) for r in mlflow_runs}) > 1)
    return [" ".join(_param(k, r.data.params.get(k)) for k in varying) for r in mlflow_runs]


def _variances(params: dict) -> tuple[float, float]:
    """(sigma_w^2, sigma_b^2) of a run: its gains squared, the init scheme's bias std when unset."""
    sigma_b = params.get("model.sigma_b", "None")
    bias = choices.INITS[params["model.init"]].bias_std if sigma_b == "None" else float(sigma_b)
    return float(params.get("model.sigma_w", 1.0)) ** 2, bias ** 2


# A cell's records that the report reads: its epoch series and its step table's STEP_COLUMNS.
RECORD_PREFIXES = (tuple(schema.layer(s, "") for s in schema.LAYER_SERIES) + schema.ACC_KEYS + (schema.JACOBIAN,)
                   + tuple(cellrecords.STEP_PREFIX + c for c in cellrecords.STEP_COLUMNS))


def _listed(r, variant: str) -> tuple[Run, list[str]]:
    """A listed run's cell, from its tags, params and latest metrics, and the series keys to read."""
    tags, latest = r.data.tags, r.data.metrics
    depth = int(tags["depth"])
    acc_key = schema.held_out_acc(latest) or schema.acc("val")
    run = Run(r.info.run_id, tags["activation"], tags["init"], depth, int(tags["seed"]),
              schema.run_status(tags, r.info.status), latest.get(acc_key, math.nan), variant=variant,
              case=tags.get(schema.CASE, ""))
    if "model.init" in r.data.params:
        run.sigma_w2, run.sigma_b2 = _variances(r.data.params)
    keys = [schema.layer(s, l) for l in range(1, depth + 1) for s in schema.LAYER_SERIES] + [acc_key]
    if schema.jacobian("spread") in latest:  # trained with train.jacobian
        keys += [schema.jacobian(m) for m in schema.JACOBIAN_MOMENTS + (schema.JACOBIAN_Q_IN,)]
        keys += [schema.quantile_name(p) for p in schema.JACOBIAN_QUANTILES]
    return run, keys


def _from_records(run: Run, keys: list[str], record: dict[str, tuple[np.ndarray, np.ndarray]]) -> Run:
    """Series and step columns from the cell's records, in the types the run's own reads give."""
    empty = (np.array([], np.int64), np.array([]))
    for key in keys:
        steps, values = record.get(key, empty)
        run.series[key] = dict(zip(steps.tolist(), values.tolist()))
    columns = {k[len(cellrecords.STEP_PREFIX):]: v for k, v in record.items() if k.startswith(cellrecords.STEP_PREFIX)}
    if columns:  # the step table's float32 values, exactly (the records widened them to float64)
        run.steps = {"step": columns[schema.grad_norm("w", 1)][0].copy()} | {k: v.astype(np.float32)
                                                                         for k, (_, v) in columns.items()}
    return run


def _from_run(client: MlflowClient, run: Run, keys: list[str]) -> Run:
    """Series and step columns read from the run itself: a request per key, and its step table."""
    for key in keys:
        run.series[key] = {m.step: tracking.unstored(m.value)
                           for m in client.get_metric_history(run.run_id, key)}
    table = steptable.read(client, run.run_id)
    run.steps = {k: v for k, v in table.items() if k == "step" or k.startswith(cellrecords.STEP_COLUMNS)}
    return run


def read_runs(uri: str, mlflow_runs: list, parent: str | None = None) -> list[Run]:
    """Each listed run's cell, epoch series of every hidden layer and step-table weight-gradient
    norms: from the sweep `parent`'s cell records, and for the runs they lack (a job resumed after
    a restart, a sweep recorded before there were records, plain run ids) from the run itself,
    SERVER_CONCURRENCY at once through a server. Either way gives the same Run."""
    client = MlflowClient(uri)
    listed = {r.info.run_id: _listed(r, variant) for r, variant in zip(mlflow_runs, variants(mlflow_runs))}
    out = {}
    if parent is not None:
        for run_id, record in cellrecords.read(client, parent, RECORD_PREFIXES):
            if run_id in listed:  # records of runs since deleted (cells re-run) are left
                out[run_id] = _from_records(*listed[run_id], record)
    missing = [cell for run_id, cell in listed.items() if run_id not in out]
    for run in tracking.concurrent(uri, lambda cell: _from_run(client, *cell), missing):
        out[run.run_id] = run
    if not out:
        raise ReportError("no runs to report on")
    return [out[run_id] for run_id in listed]


