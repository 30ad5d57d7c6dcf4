"""The dynamical-isometry section of `distnet report` (distnet/isometry.py): learning speed, the rank
correlation and each arm's numbers by hand, then a real sweep with cases and train.jacobian (real Ray,
real MLflow) whose report holds the values its runs logged."""

import math

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from distnet import isometry, launch, meanfield, report, schema, steptable, sweep


def test_steps_to_accuracy_is_the_end_of_the_first_window_at_the_threshold():
    acc = np.array([0.5, 0.9, 0.9, 0.7, 0.9, 0.95, 0.95])
    # windows of 3: 0.767, 0.833, 0.833, 0.833, 0.933: the first past 0.8 is steps 1..3, so 4 steps trained
    assert isometry.steps_to_accuracy(acc, 0.8, 3) == 4
    assert isometry.steps_to_accuracy(acc, 0.9, 3) == 7
    assert isometry.steps_to_accuracy(acc, 0.95, 3) is None
    assert isometry.steps_to_accuracy(acc[:2], 0.5, 3) is None  # not one whole window


def test_rank_correlation_is_spearmans_with_mean_ranks_for_ties():
    assert isometry.rank_correlation([1, 2, 3, 4], [1, 3, 2, math.inf]) == pytest.approx(0.8)  # 1 - 6 * 2 / 60
    # ranks [1.5, 1.5, 3] and [1, 2, 3]: covariance 1.5 over sqrt(1.5 * 2)
    assert isometry.rank_correlation([0, 0, 1], [5, 6, 7]) == pytest.approx(1.5 / math.sqrt(3))
    assert isometry.rank_correlation([3, 2, 1], [10, 20, 30]) == pytest.approx(-1)


def run(case, init, depth, seed, sigma_w2, spread0, acc_steps, activation="tanh", sigma_b2=0.05):
    """A report.Run as read from a store: the moments at epochs 0 and 1, quantiles q (x 2 at epoch 1)."""
    q = np.geomspace(1e-4, 10, len(schema.JACOBIAN_QUANTILES)) * (seed + 1)
    series = {"jacobian/mean": {0: 1.0 + seed, 1: 2.0}, "jacobian/spread": {0: spread0, 1: 3 * spread0},
              "jacobian/q_in": {0: 0.1 + 0.1 * seed, 1: 5.0},
              "jacobian/max": {0: 10.0, 1: 20.0}, "test/acc": {0: 0.1, 1: 0.8 + 0.1 * seed}}
    series |= {schema.quantile_name(p): {0: v, 1: 2 * v} for p, v in zip(schema.JACOBIAN_QUANTILES, q)}
    return report.Run(f"{case}{depth}{seed}", activation, init, depth, seed, "finished", 0.8 + 0.1 * seed,
                      series=series, steps={"train/batch_acc": np.asarray(acc_steps, np.float32)},
                      sigma_w2=sigma_w2, sigma_b2=sigma_b2, case=case)


def test_arms_hold_each_cases_numbers_and_the_prediction():
    w2 = 1.76095
    slow, fast = [0.5] * 31 + [0.95] * 19, [0.9] * 50  # slow: 14 of a window at 0.95 after 45 steps
    runs = [run("g", "lecun_normal", 4, 0, w2, 5.0, slow), run("g", "lecun_normal", 4, 1, w2, 7.0, [0.1] * 3 + fast[:47]),
            run("o", "orthogonal", 4, 0, w2, 1.0, fast), run("o", "orthogonal", 4, 1, w2, 1.0, fast[:45]),
            run("x", "xavier_uniform", 4, 0, w2, 2.0, [0.1] * 50)]
    runs.append(report.Run("plain", "tanh", "lecun_normal", 4, 0, "finished", 0.5))  # no spectrum: not an arm
    g, o, x = isometry.arms(runs)
    assert (g.case, g.weights, g.depth, g.family) == ("g", "gaussian", 4, ("tanh", w2, 0.05))
    assert g.predicted == meanfield.jacobian_spectrum("tanh", w2, 0.05, 3, "gaussian")  # 3 square layers
    assert o.predicted == meanfield.jacobian_spectrum("tanh", w2, 0.05, 3, "orthogonal")
    assert g.from_data == meanfield.jacobian_spectrum("tanh", w2, 0.05, 3, "gaussian", q_in=0.15)  # seeds' mean at init
    assert x.weights is None and x.predicted is None and x.from_data is None
    assert g.measured == {0: {"mean": 1.5, "spread": 6.0, "max": 10.0}, 1: {"mean": 2.0, "spread": 18.0, "max": 20.0}}
    q = np.geomspace(1e-4, 10, len(schema.JACOBIAN_QUANTILES))
    np.testing.assert_allclose(g.quantiles[0], q * math.sqrt(2), rtol=1e-12)  # geometric mean of q and 2q
    np.testing.assert_allclose(g.quantiles[1], 2 * q * math.sqrt(2), rtol=1e-12)
    assert g.steps == [45, 21]
    assert (g.speed, o.speed, o.budget, g.acc) == (33.0, 20.0, 45, pytest.approx(0.85))
    assert math.isinf(x.speed) and x.steps == [None]
    assert isometry.ensemble_pairs([g, o, x]) == [(g, o)]
    assert isometry.correlations([g, o, x]) == {}  # two arms with a prediction: too few to rank

    text = "\n".join(isometry.lines([g, o, x], "test"))
    assert f"| g | 4 | 1 / {g.from_data.mean:.3g} | 1.5 | {g.predicted.spread:.3g} / {g.from_data.spread:.3g} | 6 | 18 | 33 " \
           "| 45, 21 | 85.00 |" in text
    assert "| x | 4 | - | 1 | - | 2 | 6 | > 50 | - | 80.00 |" in text
    assert "orthogonal reached 80% first in 1 of 1 pairs" in text and "| tanh, 1.761, 0.05 | 4 | 33 | 20 |" in text


def test_report_of_a_sweep_with_cases_and_the_spectrum(ray_cluster, tracking_uri, tmp_path, monkeypatch):
    """configs/isometry.yaml in small: four cases at two depths; the report's isometry numbers are
    the runs' own logged values, its figures a line per case."""
    monkeypatch.chdir(tmp_path)
    critical = {"model.sigma_w2": 1.76095, "model.sigma_b2": 0.05, "model.activation": "tanh"}
    sw = sweep.build_sweep({
        "name": "iso", "model": {"width": 20}, "ray": {"num_workers": 1}, "mlflow": {"experiment": "iso"},
        "train": {"epochs": 2, "log_every": 5, "lr": 0.1, "jacobian": True, "probe_size": 50},
        "data": {"train_limit": 1280, "eval_limit": 300}, "sweep": {"pack": 8, "max_concurrent": 1},  # one lane: tests/test_ui.py
        "cases": {"tanh_gaussian": critical | {"model.init": "lecun_normal"},
                  "tanh_orthogonal": critical | {"model.init": "orthogonal"},
                  "linear_gaussian": {"model.activation": "identity", "model.init": "lecun_normal"},
                  "linear_orthogonal": {"model.activation": "identity", "model.init": "orthogonal"}},
        "grid": {"model.depth": [2, 4], "seed": [0]}})
    result = launch.run_sweep(sw, tracking_uri, say=lambda *_: None)
    assert result.trained == 8 and not result.failed
    monkeypatch.setattr(isometry, "THRESHOLD", 0.5)  # reached in 20 steps of a tiny set, by some
    monkeypatch.setattr(isometry, "WINDOW", 5)
    manifest, parent = report.report(tracking_uri, ["iso"], tmp_path / "report")
    assert manifest["isometry_spectra.png"] == {"panels": 2, "lines": [4 + 4, 4 + 4], "cells": [0, 0]}  # + ticks
    assert manifest["isometry_speed.png"]["lines"][0] == 4 + 1  # a line per case, and the budget's

    client = MlflowClient(tracking_uri)
    listed, parent, _ = report.find_runs(tracking_uri, ["iso"])
    arms = isometry.arms(report.read_runs(tracking_uri, listed, parent))
    assert [(a.case, a.depth) for a in arms] == [(c, d) for c in sorted(sw.grid["case"]) for d in (2, 4)]
    for a in arms:
        (r,) = [r for r in listed if r.data.tags["case"] == a.case and int(r.data.tags["depth"]) == a.depth]
        history = {k: {m.step: m.value for m in client.get_metric_history(r.info.run_id, k)}
                   for k in ["jacobian/mean", "jacobian/spread", "jacobian/max", "jacobian/q_in"]
                   + [schema.quantile_name(p) for p in schema.JACOBIAN_QUANTILES]}
        assert sorted(history["jacobian/spread"]) == [0, 1, 2]
        assert a.measured == {e: {m: history[f"jacobian/{m}"][e] for m in schema.JACOBIAN_MOMENTS} for e in (0, 1, 2)}
        np.testing.assert_allclose(a.quantiles[2], [history[schema.quantile_name(p)][2]
                                                    for p in schema.JACOBIAN_QUANTILES], rtol=1e-12)
        table = steptable.read(client, r.info.run_id)
        assert a.steps == [isometry.steps_to_accuracy(table["train/batch_acc"], 0.5, 5)] and a.budget == 20
        activation = "identity" if a.case.startswith("linear") else "tanh"
        sigma_w2, sigma_b2 = (1.0, 0.0) if activation == "identity" else (1.76095, 0.05)
        assert a.family == (activation, pytest.approx(sigma_w2, rel=1e-12), pytest.approx(sigma_b2, rel=1e-12))
        assert a.predicted == meanfield.jacobian_spectrum(*a.family, a.depth - 1, a.case.split("_")[1])
        assert a.from_data == meanfield.jacobian_spectrum(*a.family, a.depth - 1, a.case.split("_")[1],
                                                          q_in=history["jacobian/q_in"][0])
    assert any(s is not None for a in arms for s in a.steps)
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## Dynamical isometry" in text and text.count("| linear_orthogonal |") == 2
