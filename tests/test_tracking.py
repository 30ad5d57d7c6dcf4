"""tracking.write_metrics: the SQL-store fast path writes exactly what MLflow's log_batch writes."""

import math

import pytest
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from distnet import tracking


def _metrics(first_step: int, n: int) -> list[tracking.Row]:
    """Per-step values of three keys with NaN and infinities among them, one key's steps logged out
    of order, and one value repeated (MLflow keeps a repeat once)."""
    out = []
    for s in range(first_step, first_step + n):
        out += [("grad_norm/w/layer_1", 0.5 + s, 1000 + s, s),
                ("grad_norm/b/layer_1", [math.nan, math.inf, -math.inf, 2.0][s % 4], 1000 + s, s)]
    out += [("train/loss", 3.0, 2000, first_step + 5), ("train/loss", 4.0, 2000, first_step + 1),
            ("train/loss", 4.0, 2000, first_step + 1)]
    return out


def _held(client: MlflowClient, run_id: str) -> tuple[dict, dict]:
    keys = ("grad_norm/w/layer_1", "grad_norm/b/layer_1", "train/loss")
    history = {k: sorted((m.step, m.timestamp, m.value if not math.isnan(m.value) else "nan")
                         for m in client.get_metric_history(run_id, k)) for k in keys}
    latest = {k: (v if not math.isnan(v) else "nan") for k, v in client.get_run(run_id).data.metrics.items()}
    return history, latest


def test_fast_path_writes_what_log_batch_writes(tmp_path, monkeypatch):
    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    exp = client.create_experiment("t")
    ours, theirs = client.create_run(exp).info.run_id, client.create_run(exp).info.run_id
    # Two flushes; the second holds older steps of train/loss than the first (latest must not regress).
    batches = [_metrics(10, 8), _metrics(0, 6) + _metrics(30, 3)]
    for batch in batches:
        client.log_batch(theirs, metrics=[Metric(*row) for row in batch])
    with monkeypatch.context() as m:  # the fast path never falls back to log_batch here
        m.setattr(client, "log_batch", lambda *a, **k: pytest.fail("log_batch called"))
        for batch in batches:
            tracking.write_metrics(client, ours, batch)
    assert _held(client, ours) == _held(client, theirs)
    history, latest = _held(client, ours)
    assert len(history["grad_norm/w/layer_1"]) == 17 and latest["grad_norm/w/layer_1"] == 0.5 + 32
    assert latest["grad_norm/b/layer_1"] == "nan"  # step 32's value
    assert (1, 1001, 1.7976931348623157e308) in history["grad_norm/b/layer_1"]  # +inf, as MLflow stores it


def test_repeated_values_are_skipped_and_deleted_runs_refused(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    exp = client.create_experiment("t")
    run_id = client.create_run(exp).info.run_id
    tracking.write_metrics(client, run_id, _metrics(0, 4))
    tracking.write_metrics(client, run_id, _metrics(0, 4))  # the same values again: held once
    assert len(client.get_metric_history(run_id, "grad_norm/w/layer_1")) == 4
    client.delete_run(run_id)
    with pytest.raises(MlflowException, match="must be in the 'active' state"):
        tracking.write_metrics(client, run_id, _metrics(10, 1))
