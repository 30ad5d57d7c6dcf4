"""What a run holds against what its training computed (a RecordingSink of the same training run
again in-process): every step-table value and every MLflow value, each once."""

from __future__ import annotations

import numpy as np
import torch
from mlflow.tracking import MlflowClient

from conftest import RecordingSink
from distnet import data, schema, steptable, sweep, worker

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
    every step-table value and every MLflow value, each once."""
    exp = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([exp], "tags.`distnet.cell_id` != ''", max_results=50_000)
    cells = {r.data.tags[schema.CELL_ID]: r for r in runs}
    assert len(runs) == len(cells) == len(sw.cells), (len(runs), len(cells), len(sw.cells))
    assert [r.info.run_id for r in runs if r.info.status != "FINISHED"] == []
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
            assert_run_holds(client, cells[cell.id], recorded, 0)
    finally:
        torch.set_num_threads(threads)
    return cells
