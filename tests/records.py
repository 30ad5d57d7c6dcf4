"""What a run holds against what its training computed (a RecordingSink of the same training run
again in-process): every step-table value and every MLflow value, each once; for a sweep also each
cell's params, tags, config.yaml and its row of the parent's summary.csv."""

from __future__ import annotations

import csv
import io
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from conftest import RecordingSink
from distnet import data, schema, steptable, sweep, tracking, worker
from distnet.config import flatten

PERF = {"perf/epoch_s", "perf/max_rss_mb"}  # timings: differ from run to run
# A training in a Ray worker and the same training in the test process have differed in the last bit
# of a gradient norm (1 ulp of float32, 2 steps of 1 cell in 36, 1 run in 5), the steps after it
# equal again: the norm's reduction differed, not the training. Not the torch thread count
# (1 vs 2 give equal norms here) nor the order the packs train in (checked); cause not found. A
# value lost, duplicated or taken from another cell or step differs far more than 1e-6.
OTHER_PROCESS = 1e-6


def assert_run_holds(client: MlflowClient, run, recorded, k: int, rtol: float = OTHER_PROCESS) -> dict:
    """`run` holds member k of `recorded`: its step table every step once, each column equal (within
    `rtol`: by default a training in another process, OTHER_PROCESS; more where it summed in
    another order), and every MLflow series step for step. Returns the step table."""
    run_id = run.info.run_id
    table = steptable.read(client, run_id)
    np.testing.assert_array_equal(table["step"], [s for s, _ in recorded.steps])
    for name in table.keys() - {"step"}:
        np.testing.assert_allclose(table[name], [v[name][k] for _, v in recorded.steps], rtol=rtol, atol=0,
                                   err_msg=name)
    logged: dict[str, list[tuple[int, float]]] = {}
    for step, values in recorded.logged:
        for key, v in values.items():
            logged.setdefault(key, []).append((step, float(v[k])))
    keys = set(run.data.metrics) - PERF - {schema.RATIO_INIT, schema.RATIO_END}
    assert keys == set(logged) - PERF
    for key in keys:  # every value once, the training's
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert [s for s, _ in history] == [s for s, _ in logged[key]], key
        np.testing.assert_allclose([v for _, v in history], [v for _, v in logged[key]], rtol=rtol,
                                   err_msg=key)
    return table


def assert_sweep_as_computed(client: MlflowClient, sw: sweep.Sweep, experiment: str) -> dict:
    """Every cell of `sw` has one live run in `experiment`, FINISHED (returned by cell id), no run
    is left RUNNING, and each cell's run holds what its training computes here without a fault:
    every step-table value and every MLflow value, each once; its params, tags and config.yaml
    those of its config; and its row of the parent's summary.csv its run, status, final accuracy
    and gradient ratios."""
    exp = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([exp], "tags.`distnet.cell_id` != ''", max_results=50_000)
    cells = {r.data.tags[schema.CELL_ID]: r for r in runs}
    assert len(runs) == len(cells) == len(sw.cells), (len(runs), len(cells), len(sw.cells))
    assert [r.info.run_id for r in runs if r.info.status != "FINISHED"] == []
    parents = {r.data.tags["mlflow.parentRunId"] for r in runs}
    assert len(parents) == 1, parents  # one sweep, however often its driver ran
    summary = {row["cell"]: row for row in csv.DictReader(io.StringIO(download(client, parents.pop(), "summary.csv")))}
    assert set(summary) == {c.label for c in sw.cells}
    mnist = data.load_mnist(sw.cells[0].config.data.dir)
    arrays = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers (one CPU each): the same sums in the same order
    try:
        for cell in sw.cells:
            d = cell.config.data
            key = (d.split, d.train_limit, d.eval_limit)
            if key not in arrays:
                arrays[key] = data.select(mnist, *key)
            recorded = RecordingSink()
            worker.train(sweep.population_config([cell], "ref"), arrays[key], worker.WorkerEnv(), recorded)
            run = cells[cell.id]
            table = assert_run_holds(client, run, recorded, 0)
            assert_described(client, run, sw, cell)
            acc = schema.acc(schema.eval_prefix(d.split))
            assert_summarised(summary[cell.label], run, float(recorded.series(acc)[-1][1][0]), table, cell)
    finally:
        torch.set_num_threads(threads)
    return cells


def assert_described(client: MlflowClient, run, sw: sweep.Sweep, cell: sweep.Cell) -> None:
    """The run's name, params, tags and config.yaml are those of `cell` trained in the job its
    `name` param names (a pack's member config is the cell's, named for the job)."""
    job = run.data.params["name"]
    cfg = sweep.population_config([cell], job)
    member = cfg.member_config(0)
    assert run.info.run_name == f"{sw.name}/{cell.label}", run.info.run_name
    params = {k: str(v) for k, v in flatten(member).items()}
    assert run.data.params == params, (cell.label, set(run.data.params.items()) ^ set(params.items()))
    expected = {**tracking.member_tags(cfg, 0), schema.CELL_ID: cell.id, **{k: str(v) for k, v in cell.axes.items()}}
    tags = {k: run.data.tags.get(k) for k in expected}
    assert tags == expected, (cell.label, set(tags.items()) ^ set(expected.items()))
    assert yaml.safe_load(download(client, run.info.run_id, "config.yaml")) == member, cell.label


def assert_summarised(row: dict, run, acc: float, table: dict, cell: sweep.Cell) -> None:
    """summary.csv's row of `cell`: its live run, its status as the run's tags say, the training's
    final accuracy `acc`, and the gradient ratios of its step table's first and last rows."""
    first, last = (np.float64(table[f"grad_norm/w/layer_{l}"]) for l in (1, cell.config.model.depth + 1))
    step = run.data.tags.get(schema.DIVERGED_STEP)
    assert (row["run_id"], row["status"]) == (run.info.run_id, "finished" if step is None else f"diverged@{step}"), row
    assert [float(row[k]) for k in ("acc", "ratio_init", "ratio_end")] == pytest.approx(
        [acc, first[0] / last[0], first[-1] / last[-1]], rel=OTHER_PROCESS)


def download(client: MlflowClient, run_id: str, path: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        return Path(client.download_artifacts(run_id, path, tmp)).read_text()
