"""What reaches MLflow: every step in the run's step table (the loop's own float32 values), interval
means and maxima of them as MLflow metrics, a diverged member's records ending where it diverged;
and the MLflow version the tests cover."""

import dataclasses
import importlib.metadata
import sys

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from packaging.requirements import Requirement

from distnet import data, metrics, schema, steptable, tracking, worker
from distnet.config import build_config

from conftest import RecordingSink


class Tee:
    """Hands everything the loop logs to both sinks."""

    def __init__(self, *sinks):
        self.sinks = sinks

    def __getattr__(self, name):
        return lambda *a, **k: [getattr(s, name)(*a, **k) for s in self.sinks][0]


def as_mlflow(x: float) -> float:
    """MLflow stores an infinity as the largest float of its sign."""
    return float(np.nan_to_num(x, nan=np.nan, posinf=sys.float_info.max, neginf=-sys.float_info.max))


def last_step(table) -> int:
    return int(table["step"][-1])


def test_step_tables_hold_every_step_and_mlflow_their_interval_summaries(mnist, tracking_uri):
    # 30 steps, 7 points a series: intervals of 5 steps; member 1 (relu, lr 1e4) diverges early.
    cfg = build_config({"name": "tables", "model": {"sizes": [784, 30, 30, 10], "activation": "relu"},
                        "train": {"epochs": 3, "log_every": 4, "metric_points": 7, "momentum": 0.5},
                        "checkpoint": {"every": 7, "unit": "step"}, "ray": {"num_workers": 1},
                        "data": {"train_limit": 1280, "eval_limit": 200},
                        "population": [{"seed": 0, "lr": 0.1}, {"seed": 1, "lr": 1e4}]})
    arrays = data.select(mnist, "test", 1280, 200)
    runs = tracking.create_runs(tracking_uri, cfg)
    run_ids = [r.run_id for r in runs]
    recorded, sink = RecordingSink(), tracking.MlflowSink(tracking_uri, cfg, runs)
    out = worker.train(cfg, arrays, worker.WorkerEnv(), Tee(sink, recorded))
    diverged = worker.diverged_members(out.diverged_at)
    summary = sink.close(tracking.TrainingEnd(diverged, out.all_reduce, "test/acc"))
    assert out.step == 30 and list(diverged) == [1] and diverged[1] < 25
    client = MlflowClient(tracking_uri)
    names = metrics.step_names(3)
    every = metrics.interval(30, 7)
    assert every == 5
    for k, run_id in enumerate(run_ids):
        last = diverged.get(k, 29)
        table = steptable.read(client, run_id)
        assert list(table) == ["step"] + names
        np.testing.assert_array_equal(table["step"], np.arange(last + 1))  # each step once, in order
        for name in names:  # bit for bit what the loop computed
            loop = np.array([v[name][k] for s, v in recorded.steps if s <= last], dtype=np.float32)
            np.testing.assert_array_equal(table[name], loop)
            assert np.isfinite(table[name][:last]).all()
        parts = [a.path for a in client.list_artifacts(run_id, steptable.ARTIFACT_DIR)]
        if k == 0:  # one part per checkpoint: steps 0-6, 7-9 (epoch end), 10-13, ...
            assert parts[:2] == [f"step_metrics/{steptable.part_name(0, 6)}", f"step_metrics/{steptable.part_name(7, 9)}"]
        for name in names:
            mean = {m.step: m.value for m in client.get_metric_history(run_id, name)}
            peak = {m.step: m.value for m in client.get_metric_history(run_id, schema.max_name(name))}
            starts = list(range(0, last + 1, every))  # a diverged member's series stops with it
            assert sorted(mean) == sorted(peak) == starts
            for s in starts:  # the summaries of the table's rows, the last interval cut at divergence
                window = table[name][s:s + every].astype(np.float64)
                assert mean[s] == pytest.approx(as_mlflow(window.mean()), rel=1e-6, nan_ok=True)
                assert peak[s] == pytest.approx(as_mlflow(window.max()), rel=1e-7, nan_ok=True)
            if k in diverged:  # its last row is the step whose gradient was not finite
                assert not np.isfinite([table[n][-1] for n in metrics.grad_norm_names(3)]).all()
        assert [m.step for m in client.get_metric_history(run_id, "test/acc")] == list(range(4 if k == 0 else 1))
        # The sweep summary's row is what the run holds: status, accuracy, the layer-1 / layer-3
        # gradient ratio at the table's first and last step, logged there at those steps too.
        run = client.get_run(run_id)
        first, last = table["grad_norm/w/layer_1"].astype(np.float64), table["grad_norm/w/layer_3"].astype(np.float64)
        with np.errstate(all="ignore"):
            expected = {"init": first[0] / last[0], "end": first[-1] / last[-1]}
        row = summary[k]
        assert row.run_id == run_id and row.status == ("finished" if k == 0 else "diverged")
        assert row.diverged_at == diverged.get(k) and row.error == "" and row.cell == ""
        assert row.status_text == ("finished" if k == 0 else f"diverged@{diverged[k]}")
        assert run.info.status == "FINISHED" and run.data.tags["distnet.status"] == row.status
        assert row.acc == run.data.metrics["test/acc"] == client.get_metric_history(run_id, "test/acc")[-1].value
        for end, value in expected.items():
            np.testing.assert_equal(getattr(row, f"ratio_{end}"), value)
            (logged,) = client.get_metric_history(run_id, f"grad_ratio/{end}")
            assert logged.step == (0 if end == "init" else last_step(table))
            assert logged.value == pytest.approx(as_mlflow(value), rel=1e-12, nan_ok=True)
        listed = tracking.cell_outcome(tracking_uri, run, 3, "test")  # a rerun's, from the listing
        assert dataclasses.astuple(listed) == pytest.approx(dataclasses.astuple(row), nan_ok=True)


def test_sink_restore_writes_what_the_checkpoint_held_once(tracking_uri):
    """A flush that never happened (the worker died after its checkpoint) is redone from the
    checkpoint's sink state; what MLflow already holds is not written again; a step-table part
    written again replaces itself."""
    cfg = build_config({"model": {"sizes": [784, 10]}})
    (run,) = tracking.create_runs(tracking_uri, cfg)
    run_id = run.run_id
    client = MlflowClient(tracking_uri)
    sink = tracking.MlflowSink(tracking_uri, cfg, [run])
    cols = {"grad_norm/w/layer_1": np.array([[1.0], [2.0], [3.0]]), "train/batch_loss": np.array([[4.0], [5.0], [6.0]])}
    sink.log_steps([0, 1, 2], cols, np.ones((3, 1), bool))
    sink.log(0, {"grad_norm/w/layer_1": np.array([2.0])}, np.ones(1, bool))
    sink.flush()
    sink.log_steps([3, 4], {k: v[:2] + 10 for k, v in cols.items()}, np.ones((2, 1), bool))
    sink.log(3, {"grad_norm/w/layer_1": np.array([11.5])}, np.ones(1, bool))
    held = sink.state_dict()  # the checkpoint; then the worker dies before flushing
    for _ in range(2):  # the second time, as if the restarted worker had died after its flush
        again = tracking.MlflowSink(tracking_uri, cfg, [run])
        again.resume(held)
        history = client.get_metric_history(run_id, "grad_norm/w/layer_1")
        assert sorted((m.step, m.value) for m in history) == [(0, 2.0), (3, 11.5)]
        table = steptable.read(client, run_id)
        np.testing.assert_array_equal(table["step"], [0, 1, 2, 3, 4])
        np.testing.assert_array_equal(table["grad_norm/w/layer_1"], [1, 2, 3, 11, 12])
        np.testing.assert_array_equal(table["train/batch_loss"], [4, 5, 6, 14, 15])


def test_installed_mlflow_is_in_the_pinned_range():
    """distnet uses MLflow's public client API as of the versions its tests ran on; pyproject.toml pins
    that range (the core's mlflow-skinny, the extras' full mlflow), and an environment that leaves it
    fails here."""
    reqs = [Requirement(r) for r in importlib.metadata.requires("distnet")]
    mlflows = [r for r in reqs if r.name in ("mlflow", "mlflow-skinny")]
    (core,) = [r for r in mlflows if r.marker is None]  # the dependency: MLflow's client
    assert core.name == "mlflow-skinny" and str(core.specifier), "mlflow must be pinned to a range"
    assert {r.name for r in mlflows if r.marker is not None} == {"mlflow"}  # the ui and server extras
    assert all(r.specifier == core.specifier for r in mlflows), mlflows  # one range for all of them
    for name in ("mlflow-skinny", "mlflow"):
        assert core.specifier.contains(importlib.metadata.version(name)), (core, name, importlib.metadata.version(name))
