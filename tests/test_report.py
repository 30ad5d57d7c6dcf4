"""`distnet report`: the numbers behind each figure from a store the test fills, then the whole
report on a tiny finished sweep (real Ray, real MLflow): every file, every line and cell."""

import contextlib
import math
import tempfile
import urllib.parse
from pathlib import Path
from types import SimpleNamespace

import matplotlib.image
import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

import distnet
import distnet.frames
from distnet import cellrecords, cli, launch, report, steptable, sweep
from listing import assert_same_as_listed

ROOT = Path(__file__).resolve().parents[1]


def fill(uri: str) -> list[str]:
    """Six runs: sigmoid x {xavier_normal: depths 1, 2 with seeds 0, 1; he_normal: depth 2, seed 0}
    and a tanh run; speed_l(epoch e) = (seed + 1) * l * 10^-e, saturation = 0.1 * l, acc known."""
    client = MlflowClient(uri)
    exp = client.create_experiment("filled")
    cells = [("sigmoid", "xavier_normal", 1, 0, 0.90), ("sigmoid", "xavier_normal", 1, 1, 0.92),
             ("sigmoid", "xavier_normal", 2, 0, 0.80), ("sigmoid", "xavier_normal", 2, 1, 0.84),
             ("sigmoid", "he_normal", 2, 0, 0.70), ("tanh", "xavier_normal", 1, 0, 0.95)]
    ids = []
    for act, init, depth, seed, acc in cells:
        run = client.create_run(exp, tags={"activation": act, "init": init, "depth": str(depth), "seed": str(seed),
                                           "distnet.status": "finished"})
        ms = [Metric("test/acc", acc * e / 2, 0, e) for e in range(3)]
        for l in range(1, depth + 1):
            ms += [Metric(f"speed/layer_{l}", (seed + 1) * l * 10.0 ** -e, 0, e) for e in range(3)]
            ms += [Metric(f"act/saturated/layer_{l}", 0.1 * l, 0, e) for e in range(3)]
            ms += [Metric(f"act/mean/layer_{l}", 0.5, 0, e) for e in range(3)]
            ms += [Metric(f"act/std/layer_{l}", 0.1 * e, 0, e) for e in range(3)]
        client.log_batch(run.info.run_id, metrics=ms)
        client.set_terminated(run.info.run_id)
        ids.append(run.info.run_id)
    return ids


def test_extraction_from_a_filled_store(tracking_uri):
    ids = fill(tracking_uri)
    mlflow_runs, parent, _ = report.find_runs(tracking_uri, ids)
    assert parent is None and len(mlflow_runs) == 6
    runs = report.read_runs(tracking_uri, mlflow_runs)

    speed = report.layer_curves(runs, "speed")
    assert set(speed) == {("sigmoid", "xavier_normal"), ("sigmoid", "he_normal"), ("tanh", "xavier_normal")}
    b = speed[("sigmoid", "xavier_normal")][2][2]  # depth 2, hidden layer 2: seeds give 2*10^-e and 4*10^-e
    np.testing.assert_array_equal(b.x, [0, 1, 2])
    np.testing.assert_allclose(b.mean, [3, 0.3, 0.03])
    np.testing.assert_allclose(b.lo, [2, 0.2, 0.02])
    np.testing.assert_allclose(b.hi, [4, 0.4, 0.04])
    assert b.n == 2 and set(speed[("sigmoid", "xavier_normal")]) == {1, 2}

    g = ("sigmoid", "xavier_normal")
    bars = report.within_layer(report.layer_curves(runs, "act/mean")[g], report.layer_curves(runs, "act/std")[g])
    np.testing.assert_allclose(bars[2][1].lo, [0.5, 0.4, 0.3])
    np.testing.assert_allclose(bars[2][1].hi, [0.5, 0.6, 0.7])

    sat = report.layer_curves(runs, "act/saturated")[("sigmoid", "xavier_normal")][2]
    np.testing.assert_allclose(sat[1].mean, [0.1] * 3)
    np.testing.assert_allclose(sat[2].mean, [0.2] * 3)

    profile = report.init_profile(runs)[("sigmoid", "xavier_normal")]
    np.testing.assert_array_equal(profile[2].x, [1, 2])
    np.testing.assert_allclose(profile[2].mean, [1.5, 3.0])  # epoch 0: (seed + 1) * l, mean over seeds 0, 1

    grids = report.accuracy_grid(runs)
    depths, inits, grid = grids["sigmoid"]
    assert depths == [1, 2] and inits == ["he_normal", "xavier_normal"]
    np.testing.assert_allclose(grid[1], [0.70, 0.82])
    assert math.isnan(grid[0, 0]) and grid[0, 1] == pytest.approx(0.91)

    speeds = {(r["activation"], r["init"], r["depth"]): r for r in report.init_table(runs)}
    s = speeds[("sigmoid", "xavier_normal", 2)]
    np.testing.assert_allclose(s["mean"], [1.5, 3.0])
    np.testing.assert_allclose(s["std"], [np.std([1, 2], ddof=1), np.std([2, 4], ddof=1)])
    assert s["ratio"] == pytest.approx(0.5) and speeds[("tanh", "xavier_normal", 1)]["std"] is None

    # What the figures draw is those numbers: a line's y data, a heatmap cell.
    fig = report.layer_figure(speed[("sigmoid", "xavier_normal")], "t", "speed", log=True)
    line = [l for l in fig.axes[1].get_lines() if l.get_label() == "hidden layer 2"][0]  # panel: depth 2
    np.testing.assert_allclose(line.get_ydata(), [3, 0.3, 0.03])
    np.testing.assert_array_equal(line.get_xdata(), [0, 1, 2])
    fig = report.accuracy_figure(grids, "test")
    cells = fig.axes[0].images[0].get_array()  # sigmoid: depths [1, 2] x inits [he_normal, xavier_normal]
    assert cells[1, 1] == pytest.approx(82.0) and cells[1, 0] == pytest.approx(70.0)
    assert [t.get_text() for t in fig.axes[0].texts][3] == "82.0"

    rows = {(r["activation"], r["init"], r["depth"]): r for r in report.cell_table(runs)}
    r = rows[("sigmoid", "xavier_normal", 2)]
    assert r["seeds"] == 2 and r["acc_mean"] == pytest.approx(0.82) and r["acc_min"] == pytest.approx(0.80)
    assert r["acc_std"] == pytest.approx(np.std([0.80, 0.84], ddof=1)) and r["status"] == "2 finished"


def test_band_keeps_only_epochs_every_seed_has():
    b = report.band([{0: 1.0, 1: 2.0, 2: 3.0}, {0: 3.0, 1: 4.0}])  # the second seed diverged after epoch 1
    np.testing.assert_array_equal(b.x, [0, 1])
    np.testing.assert_allclose(b.mean, [2, 3])


def test_unknown_selector_is_refused(tracking_uri):
    fill(tracking_uri)
    with pytest.raises(report.ReportError, match="neither a sweep name nor a run id"):
        report.find_runs(tracking_uri, ["no-such-sweep"])


# The module's sweep is a miniature of configs/depth_init_grid.yaml, and named so: README's "Analyse
# in Python" example runs against it as written.
SWEEP = "depth_init_grid"


@pytest.fixture(scope="module")
def both(ray_cluster, tmp_path_factory) -> tuple[str, launch.SweepResult]:
    """A real sweep, trained once for the module's report tests: 16 cells (2 depths x 2 inits x 2
    activations x 2 seeds), 2 epochs of 10 steps each, 4 jobs of 4 cells, into `mlruns.db` in a folder
    of its own (the default store there). (Its store and result.)"""
    where = tmp_path_factory.mktemp("both")
    uri = f"sqlite:///{where / 'mlruns.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(where)
        result = launch.run_sweep(sweep.build_sweep({
            "name": SWEEP, "model": {"width": 16}, "train": {"epochs": 2, "log_every": 5},
            "data": {"train_limit": 1280, "eval_limit": 300}, "ray": {"num_workers": 1},
            "mlflow": {"experiment": SWEEP}, "sweep": {"pack": 8, "max_concurrent": 1},  # one lane: tests/test_ui.py
            "grid": {"model.depth": [1, 2], "model.init": ["xavier_normal", "nielsen"],
                     "model.activation": ["sigmoid", "tanh"], "seed": [0, 1]}}), uri, say=lambda *_: None)
    assert result.trained == 16 and not result.failed
    return uri, result


def test_report_on_a_finished_sweep(both, tmp_path, capsys):
    """`distnet report` on a real sweep: every file, each figure's panels and lines, the per-step
    curves equal to the step tables' seed means, the tables' rows, the report logged to the sweep."""
    tracking_uri, result = both
    out = tmp_path / "report"
    code = cli.main(["report", "--tracking-uri", tracking_uri, "--out", str(out), SWEEP])
    printed = capsys.readouterr().out
    assert code == 0, printed[-3000:]
    assert f"open the UI: distnet ui {result.parent_run_id} --tracking-uri {tracking_uri}" in printed
    expected = {f"{kind}_{act}_{init}.png" for kind in ("speed", "saturation", "activation", "grad_norm")
                for act in ("sigmoid", "tanh") for init in ("xavier_normal", "nielsen")} | \
        {"init_profile.png", "accuracy.png", "report.md"}
    assert {p.name for p in out.iterdir()} == expected
    for png in out.glob("*.png"):
        h, w, _ = matplotlib.image.imread(png).shape
        assert h > 200 and w > 200

    manifest, _ = report.report(tracking_uri, [SWEEP], tmp_path / "again")
    for act in ("sigmoid", "tanh"):
        for init in ("xavier_normal", "nielsen"):
            for kind in ("speed", "saturation", "activation"):  # a panel per depth, a line per hidden layer
                assert manifest[f"{kind}_{act}_{init}.png"] == {"panels": 2, "lines": [1, 2], "cells": [0, 0]}
            # every layer's weight-gradient norm at every step: a line per layer, output layer included
            assert manifest[f"grad_norm_{act}_{init}.png"] == {"panels": 2, "lines": [2, 3], "cells": [0, 0]}
    # a panel per activation x init, a line per depth
    assert manifest["init_profile.png"] == {"panels": 4, "lines": [2, 2, 2, 2], "cells": [0, 0, 0, 0]}
    # The per-step curves are the step tables' values, averaged over the seeds.
    runs = report.read_runs(tracking_uri, report.find_runs(tracking_uri, [SWEEP])[0])
    curve = report.step_curves(runs)[("sigmoid", "xavier_normal")][2][3]  # depth 2, output layer
    cell = [r for r in runs if (r.activation, r.init, r.depth) == ("sigmoid", "xavier_normal", 2)]
    tables = [steptable.read(MlflowClient(tracking_uri), r.run_id) for r in cell]
    np.testing.assert_array_equal(curve.x, np.arange(20))
    np.testing.assert_allclose(curve.mean, np.mean([t["grad_norm/w/layer_3"] for t in tables], 0), rtol=1e-6)
    np.testing.assert_allclose(curve.hi, np.max([t["grad_norm/w/layer_3"] for t in tables], 0), rtol=1e-6)
    assert manifest["accuracy.png"]["cells"] == [4, 4]  # 2 depths x 2 inits, a panel per activation
    text = (out / "report.md").read_text()
    assert "16 runs in 8 cells" in text and "2 finished" in text
    # a row per cell in each table: accuracy, speed at init
    assert text.count("| sigmoid |") == text.count("| tanh |") == 8

    client = MlflowClient(tracking_uri)
    logged = {a.path for a in client.list_artifacts(result.parent_run_id, "report")}
    assert {f"report/{name}" for name in expected} <= logged


def test_cell_records_are_read_back_per_run_in_step_order(tracking_uri, tmp_path):
    """cellrecords.read: two jobs' parts, values written out of step order, only the keys asked for."""
    client = MlflowClient(tracking_uri)
    parent = client.create_run(client.create_experiment("records")).info.run_id
    for job, run_ids in enumerate((["a", "b"], ["c"])):
        collector = cellrecords.Collector(len(run_ids))
        for k in range(len(run_ids)):
            collector.metrics(k, [("speed/layer_1", 10.0 * k + 2, 0, 2), ("loss", 1.0, 0, 0),
                                  ("speed/layer_1", 10.0 * k, 0, 0)])
            collector.step_rows(k, np.array([0, 1]), {"grad_norm/w/layer_1": np.array([0.5, 0.25], np.float32),
                                                      "train/batch_loss": np.array([2.0, 1.0], np.float32)})
        client.log_artifact(parent, str(cellrecords.write_part(tmp_path, f"job{job}", collector.table(run_ids))),
                            cellrecords.ARTIFACT_DIR)
    got = dict(cellrecords.read(client, parent, ("speed/", "step_metrics/grad_norm/w/")))
    assert sorted(got) == ["a", "b", "c"]
    for run_id, record in got.items():
        k = 1 if run_id == "b" else 0
        assert sorted(record) == ["speed/layer_1", "step_metrics/grad_norm/w/layer_1"]
        steps, values = record["speed/layer_1"]
        assert steps.tolist() == [0, 2] and values.tolist() == [10.0 * k, 10.0 * k + 2]
        steps, values = record["step_metrics/grad_norm/w/layer_1"]
        assert steps.tolist() == [0, 1] and values.tolist() == [0.5, 0.25]
    everything = dict(cellrecords.read(client, parent))["a"]
    assert sorted(everything) == ["loss", "speed/layer_1", "step_metrics/grad_norm/w/layer_1"]


def assert_same_runs(a: list[report.Run], b: list[report.Run]) -> None:
    """Two reads of the same runs agree on every field, series value and step-table column."""
    assert [r.run_id for r in a] == [r.run_id for r in b]
    for x, y in zip(a, b):
        assert (x.activation, x.init, x.depth, x.seed, x.status, x.variant, x.sigma_w2, x.sigma_b2, x.case) == \
               (y.activation, y.init, y.depth, y.seed, y.status, y.variant, y.sigma_w2, y.sigma_b2, y.case)
        assert x.acc == y.acc and x.series == y.series  # a trained cell's numbers are finite
        assert x.steps.keys() == y.steps.keys()
        for k in x.steps:
            assert x.steps[k].dtype == y.steps[k].dtype and np.array_equal(x.steps[k], y.steps[k]), k


@contextlib.contextmanager
def moved_aside(parent_run, paths: list[str]):
    """The parent run's artifacts `paths` out of its store for a while (as a sweep whose driver has not
    written them yet): a test of how a reader does without them."""
    root = Path(urllib.parse.urlparse(parent_run.info.artifact_uri).path)
    kept = {root / p: root.parent / f"aside-{p}" for p in paths}
    for a, b in kept.items():
        a.rename(b)
    try:
        yield
    finally:
        for a, b in kept.items():
            b.rename(a)


def test_results_and_steps_hold_what_mlflow_lists(both, monkeypatch):
    """distnet.results: one typed row per cell, each value equal to what mlflow.search_runs lists for
    the column both have (and the best accuracy to the run's history), whether read from the cell
    records, run by run, or from the listing; distnet.steps: the step tables of a slice, each value
    the run's own step table's. Bad selectors are named."""
    uri, result = both
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    listed = mlflow.search_runs(experiment_names=[SWEEP], filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    client = MlflowClient(uri)
    parent = client.get_run(result.parent_run_id)

    def check(cells, source):
        assert len(cells) == 16
        assert list(cells.columns[:4]) == ["depth", "init", "activation", "seed"]
        assert cells["depth"].dtype == np.int64 and cells["seed"].dtype == np.int64
        assert list(cells["init"].cat.categories) == ["xavier_normal", "nielsen"]
        assert list(cells["activation"].cat.categories) == ["sigmoid", "tanh"]
        assert (cells["source"] == source).all() and cells["diverged_at"].isna().all()
        # every column that search_runs has too: 16 cells x (4 axes, status, diverged_at, acc, train_loss,
        # 2 ratios, 3 layers)
        assert assert_same_as_listed(cells, listed) == 16 * 13
        for values in cells.to_dict("records"):
            row = SimpleNamespace(**{k: v for k, v in values.items() if "/" not in k})
            assert row.status == "finished"
            assert row.cell == f"depth={row.depth},init={row.init},activation={row.activation},seed={row.seed}"
            assert np.isnan(values["grad_norm/w/layer_3"]) == (row.depth == 1)
            assert row.acc_best == max(m.value for m in client.get_metric_history(row.run_id, "test/acc"))

    cells = distnet.results(SWEEP, tracking_uri=uri)
    check(cells, "records")
    assert distnet.results(result.parent_run_id, tracking_uri=uri).equals(cells)
    with moved_aside(parent, ["cells"]):
        check(distnet.results(SWEEP), "run")  # $MLFLOW_TRACKING_URI
        with moved_aside(parent, ["cell_index.parquet"]):
            listing = distnet.results(SWEEP)
            check(listing, "listing")
    assert listing.sort_values("run_id").drop(columns="source").reset_index(drop=True).equals(
        cells.sort_values("run_id").drop(columns="source").reset_index(drop=True))

    deep = distnet.steps(SWEEP, where={"model.depth": 2, "activation": "tanh"})
    assert list(deep.columns) == ["depth", "init", "activation", "seed", "run_id", "step", "grad_norm/w/layer_1",
                                  "grad_norm/w/layer_2", "grad_norm/w/layer_3", "train/batch_acc"]
    assert len(deep) == 4 * 20 and set(deep["depth"]) == {2} and set(deep["activation"]) == {"tanh"}
    for run_id, part in deep.groupby("run_id"):
        table = steptable.read(client, run_id)
        np.testing.assert_array_equal(part["step"], table["step"])
        for column in deep.columns[6:]:
            np.testing.assert_array_equal(part[column].to_numpy(np.float32), table[column])
    one = distnet.steps(deep["run_id"].iloc[0], tracking_uri=uri)
    assert list(one["step"]) == list(range(20)) and "train/batch_loss" in one

    with pytest.raises(distnet.frames.ResultsError, match=f"no sweep named .{SWEEP}x. and no run with that id .*the sweeps there: {SWEEP}"):
        distnet.results(f"{SWEEP}x")
    with pytest.raises(distnet.frames.ResultsError, match=f"run {deep['run_id'].iloc[0]} is not a sweep's parent run but a cell"):
        distnet.results(deep["run_id"].iloc[0])
    with pytest.raises(distnet.frames.ResultsError, match=f"'width' is not an axis of sweep {SWEEP}; its axes: depth, init"):
        distnet.steps(SWEEP, where={"width": 16})


def test_the_readmes_analysis_example_runs_as_written(both, monkeypatch, capsys):
    """README's "Analyse in Python" block, run as written in the sweep's folder (the default store):
    what it prints and the frames it leaves are the sweep's."""
    uri, result = both
    monkeypatch.chdir(Path(uri.removeprefix("sqlite:///")).parent)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    block = (ROOT / "README.md").read_text().split("### Analyse in Python")[1].split("```python\n")[1].split("```")[0]
    names: dict = {}
    exec(compile(block, "README.md", "exec"), names)
    printed = capsys.readouterr().out
    acc = names["cells"].groupby(["depth", "init"], observed=True)["acc"].mean()
    assert acc.to_dict() == pytest.approx({(d, i): np.mean([r.acc for r in result.rows if r.cell.startswith(
        f"depth={d},init={i},")]) for d in (1, 2) for i in ("xavier_normal", "nielsen")}, rel=1e-12)
    assert printed.count("xavier_normal") == 2 and printed.count("nielsen") == 2  # a column of each table
    assert set(names["steps"]["depth"]) == {2} and len(names["steps"]) == 8 * 20
    assert list(names["one"]["step"]) == list(range(20))


def test_records_and_run_reads_give_the_same_report(both, tmp_path, monkeypatch):
    """A real sweep read from its cell records, and run by run: the same Runs and the same report;
    a job whose part is gone is read from its runs; past the group cap, the figures of the groups
    drawn and a word on the others. (Last in the module: it deletes one of the sweep's parts.)"""
    tracking_uri, _ = both
    listed, parent, _ = report.find_runs(tracking_uri, [SWEEP])
    per_run = report.read_runs(tracking_uri, listed)
    assert all(sorted(r.acc_series) == [0, 1, 2] and len(r.steps["step"]) == 20 for r in per_run)

    reads = []
    get_history = MlflowClient.get_metric_history
    monkeypatch.setattr(MlflowClient, "get_metric_history", lambda self, run_id, key: reads.append(run_id) or
                        get_history(self, run_id, key))
    assert_same_runs(report.read_runs(tracking_uri, listed, parent), per_run)
    assert reads == []  # every cell came from the records
    assert report.write_report(report.read_runs(tracking_uri, listed, parent), tmp_path / "records", SWEEP) == \
        report.write_report(per_run, tmp_path / "runs", SWEEP)
    assert (tmp_path / "records" / "report.md").read_text() == (tmp_path / "runs" / "report.md").read_text()

    # A job's part gone (as after a restart, which writes none): its cells (one depth and activation,
    # 4 runs) are read run by run, the rest from the records, to the same Runs.
    cells = Path(MlflowClient(tracking_uri).get_run(parent).info.artifact_uri.removeprefix("file://")) / "cells"
    parts = sorted(cells.glob("*.parquet"))
    assert len(parts) == 4  # a job per depth x activation
    lost = set(pq.read_table(parts[0]).column("run_id").to_pylist())
    parts[0].unlink()
    assert_same_runs(report.read_runs(tracking_uri, listed, parent), per_run)
    assert set(reads) == lost and len(lost) == 4

    # The group cap: 2 of the 4 (activation, init) groups drawn, said so; heatmaps and tables whole.
    monkeypatch.setattr("distnet.report.write.GROUP_FIGURES", 2)  # where `distnet report` reads it
    manifest, _ = report.report(tracking_uri, [SWEEP], tmp_path / "capped")
    drawn = report.drawn_groups(per_run, 2)
    assert drawn == [("sigmoid", "nielsen"), ("tanh", "xavier_normal")]  # the first and the last
    assert {n for n in manifest if n.startswith(("speed_", "saturation_", "activation_", "grad_norm_"))} == \
        {f"{kind}_{a}_{i}.png" for kind in ("speed", "saturation", "activation", "grad_norm") for a, i in drawn}
    assert manifest["init_profile.png"]["panels"] == 2 and manifest["accuracy.png"]["cells"] == [4, 4]
    text = (tmp_path / "capped" / "report.md").read_text()
    assert "for 2 of the 4 (activation, init) groups" in text and "sigmoid nielsen, tanh xavier_normal." in text
    assert "--all-figures" in text and "16 runs in 8 cells" in text
    assert text.count("| sigmoid |") == text.count("| tanh |") == 8  # every cell in both tables
    everything, _ = report.report(tracking_uri, [SWEEP], tmp_path / "all", all_figures=True)
    assert len([n for n in everything if n.startswith("speed_")]) == 4
    assert "--all-figures" not in (tmp_path / "all" / "report.md").read_text()
    assert cli.parser().parse_args(["report", SWEEP, "--all-figures"]).all_figures


def fill_meanfield(uri: str) -> dict:
    """tanh, lecun_normal, sigma_b^2 = 0.05 runs over sigma_w^2 {1.0, 1.76, 4.0} x depth {10, 60} x
    seeds {0, 1}, params as distnet logs them (the gains sigma_w, sigma_b); test/acc known per epoch;
    a step table whose step-0 weight-gradient norms grow by a known factor per layer."""
    client = MlflowClient(uri)
    exp = client.create_experiment("mf")
    acc, factor = {}, {1.0: 0.8, 1.76: 1.0, 4.0: 1.3}  # squared-norm growth per layer towards the input
    for sw in (1.0, 1.76, 4.0):
        for depth in (10, 60):
            for seed in (0, 1):
                run = client.create_run(exp, tags={"activation": "tanh", "init": "lecun_normal", "depth": str(depth),
                                                   "seed": str(seed), "distnet.status": "finished"})
                a = {1: 0.2 + 0.1 * seed + (0.5 if (sw, depth) != (4.0, 60) else 0.0) + 0.01 * depth,
                     2: 0.3 + 0.1 * seed + (0.5 if sw == 1.76 or depth == 10 else 0.0)}
                acc[(sw, depth, seed)] = a
                params = {"model.init": "lecun_normal", "model.sigma_w": str(math.sqrt(sw)),
                          "model.sigma_b": str(math.sqrt(0.05)), "model.activation": "tanh", "seed": str(seed),
                          "model.depth": str(depth)}
                ms = [Metric("test/acc", a.get(e, 0.1), 0, e) for e in range(3)]
                client.log_batch(run.info.run_id, metrics=ms,
                                 params=[mlflow_param(k, v) for k, v in params.items()])
                norms = {f"grad_norm/w/layer_{l}": np.array([(seed + 1) * factor[sw] ** ((depth + 1 - l) / 2), 1.0])
                         for l in range(1, depth + 2)}
                with tempfile.TemporaryDirectory() as tmp:
                    part = steptable.write_part(Path(tmp), np.array([0, 1]), norms)
                    client.log_artifact(run.info.run_id, str(part), steptable.ARTIFACT_DIR)
                client.set_terminated(run.info.run_id)
    return {"experiment": exp, "acc": acc, "factor": factor}


def mlflow_param(key, value):
    from mlflow.entities import Param

    return Param(key, value)


def test_trainability_map_against_mean_field_theory(tracking_uri, tmp_path):
    from distnet import meanfield

    filled = fill_meanfield(tracking_uri)
    client = MlflowClient(tracking_uri)
    ids = [r.info.run_id for r in client.search_runs([filled["experiment"]])]
    runs = report.read_runs(tracking_uri, report.find_runs(tracking_uri, ids)[0])
    (m,) = report.trainability_maps(runs)
    assert (m.activation, m.other, m.depths) == ("tanh", "", [10, 60])
    assert m.sigma_b2 == pytest.approx(0.05) and m.sigma_w2 == pytest.approx([1.0, 1.76, 4.0])
    assert sorted(m.acc) == [1, 2]  # budgets: after epoch 1 and after the last
    for (sw, depth, seed), a in filled["acc"].items():
        if seed == 0:
            i, j = m.depths.index(depth), [round(s, 9) for s in m.sigma_w2].index(sw)
            for epoch in (1, 2):
                assert m.acc[epoch][i, j] == pytest.approx((a[epoch] + filled["acc"][(sw, depth, 1)][epoch]) / 2)

    # Agreement: trained (acc > 0.5) vs depth < 6 xi_c, counted by hand from the numbers above.
    bounds = {sw: meanfield.mean_field("tanh", sw, 0.05).max_depth for sw in (1.0, 1.76, 4.0)}
    assert 10 < bounds[1.0] < 60 and 10 < bounds[4.0] < 60 < bounds[1.76]  # both outcomes occur
    for epoch in (1, 2):
        agree = sum((a[epoch] > 0.5) == (depth < bounds[sw]) for (sw, depth, _), a in filled["acc"].items())
        got, n, wrong = m.agreement(epoch)
        assert (got, n, len(wrong)) == (agree, 12, 12 - agree)

    # What the map draws: the mesh holds the accuracies, the white line is 6 xi_c at its x.
    fig = report.trainability_figure(m, "test")
    ax = fig.axes[0]
    np.testing.assert_allclose(np.asarray(ax.collections[0].get_array()).reshape(2, 3), m.acc[1] * 100)
    curve = [l for l in ax.get_lines() if "xi" in l.get_label()][0]
    x, y = curve.get_xdata(), curve.get_ydata()
    for k in (0, 75, 149):
        assert y[k] == pytest.approx(min(meanfield.mean_field("tanh", x[k], 0.05).max_depth, ax.get_ylim()[1] * 10))

    # The gradient profile at init: the deepest runs' step-0 norms per layer, mean over seeds, and
    # the fitted factor per layer is the one written.
    depth, profile = report.init_grad_profile(m)
    assert depth == 60
    for sw, b in profile.items():
        f = filled["factor"][round(sw, 9)]
        np.testing.assert_allclose(b.mean, [1.5 * f ** ((61 - l) / 2) for l in range(1, 62)], rtol=1e-5)
        assert report.per_layer_factor(b) == pytest.approx(f, rel=1e-5)

    manifest = report.write_report(runs, tmp_path / "r", "mf")
    assert manifest["trainability_tanh_0_05.png"]["cells"] == [6, 6]
    assert manifest["meanfield_grad_profile_tanh_0_05.png"]["lines"] == [3]
    text = (tmp_path / "r" / "report.md").read_text()
    for epoch in (1, 2):
        got, n, _ = m.agreement(epoch)
        assert f"| {epoch} | {n} | {got} | {got / n:.3f} |" in text
