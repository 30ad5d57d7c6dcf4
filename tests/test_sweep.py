"""Sweeps on a real local Ray and a real MLflow sqlite store: cells, packing, resume, divergence,
failures, concurrent writers."""

import csv
import sqlite3
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import yaml
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

import distnet
from distnet import cli, config, launch, metrics, schema, steptable, sweep
from distnet.config import ConfigError, flatten
from distnet.outcome import CellOutcome
from listing import assert_same_as_listed

ROOT = Path(__file__).resolve().parents[1]


def children(uri, parent):
    client = MlflowClient(uri)
    exp = client.get_run(parent).info.experiment_id
    return client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'")


def metric_rows(uri) -> int:
    with sqlite3.connect(uri.removeprefix("sqlite:///")) as db:
        return db.execute("SELECT COUNT(*) FROM metrics").fetchone()[0]


@pytest.mark.parametrize("name,cells", [("nielsen_depth", 24), ("depth_init_grid", 216), ("glorot_bengio", 6),
                                        ("nielsen_speed_init", 30), ("nielsen_speed_training", 18), ("init_depth", 180),
                                        ("isometry", 64)])
def test_shipped_sweeps_validate(name, cells):
    sw = sweep.load_sweep(ROOT / "configs" / f"{name}.yaml")
    assert len(sw.cells) == cells and len({c.id for c in sw.cells}) == cells


def test_packing_groups_by_shape_and_activation():
    sw = sweep.load_sweep(ROOT / "configs" / "depth_init_grid.yaml")
    groups = sweep.packs(sw.cells, 16)
    assert len(groups) == 18 and all(len(g) == 12 for g in groups)
    for g in groups:
        assert len({(c.config.model.depth, c.config.model.activation) for c in g}) == 1
    assert len(sweep.packs(sw.cells, 5)) == 18 * 3


def test_cases_set_several_keys_at_once_as_one_axis():
    raw = {"model": {"width": 30, "init": "lecun_normal"}, "grid": {"model.depth": [2, 3]},
           "cases": {"tanh_a": {"model": {"activation": "tanh", "sigma_w2": 1.5, "sigma_b2": 0.05}},
                     "relu_orth": {"model.activation": "relu", "model.init": "orthogonal", "model.sigma_w2": 2.0}}}
    sw = sweep.build_sweep(raw)
    assert sw.grid == {"case": ["tanh_a", "relu_orth"], "model.depth": [2, 3]}
    got = [(c.axes, c.config.model.activation, c.config.model.init, c.config.model.depth, c.config.model.sigma_w,
            c.config.model.sigma_b) for c in sw.cells]
    assert got == [({"case": "tanh_a", "model.depth": 2}, "tanh", "lecun_normal", 2, 1.5 ** 0.5, 0.05 ** 0.5),
                   ({"case": "tanh_a", "model.depth": 3}, "tanh", "lecun_normal", 3, 1.5 ** 0.5, 0.05 ** 0.5),
                   ({"case": "relu_orth", "model.depth": 2}, "relu", "orthogonal", 2, 2 ** 0.5, None),
                   ({"case": "relu_orth", "model.depth": 3}, "relu", "orthogonal", 3, 2 ** 0.5, None)]
    assert sw.cells[2].label == "case=relu_orth,depth=2"
    # the cases are part of the sweep's identity; a sweep without them keeps the id it had before them
    other = sweep.build_sweep({**raw, "cases": {**raw["cases"], "tanh_a": {"model.activation": "tanh"}}})
    assert other.id != sw.id
    plain = {"model": {"width": 30}, "grid": {"model.depth": [2, 3]}}
    assert sweep.build_sweep(plain).id == config.config_hash({"base": {"model": {"width": 30}},
                                                               "grid": {"model.depth": [2, 3]}})
    for bad, field in [({"x": {"model.depth": 4}}, "cases.x.model.depth"), ({"x": {}}, "cases.x"), ([1], "cases"),
                       ({"x": {"population": [{"seed": 1}]}}, "cases.x.population")]:
        with pytest.raises(ConfigError) as e:
            sweep.build_sweep({**raw, "cases": bad})
        assert e.value.field == field
    with pytest.raises(ConfigError) as e:
        sweep.build_sweep({**raw, "cases": {"x": {"model.activation": "tahn"}}})
    assert e.value.field == "model.activation" and "'case': 'x'" in str(e.value)


def test_a_rerun_trains_the_unfinished_cells_and_replaces_their_runs():
    """sweep.select on listed runs (MLflow's Run shape: .data.tags, .info.status): a FINISHED run
    makes its cell done, unless forced; every other run of a cell that trains is stale."""
    sw = sweep.build_sweep({"model": {"width": 30}, "grid": {"model.depth": [1, 2, 3, 4]}})
    a, b, c, d = sw.cells

    def run(cell, status, run_id):
        return SimpleNamespace(data=SimpleNamespace(tags={schema.CELL_ID: cell.id}), info=SimpleNamespace(status=status),
                               run_id=run_id)

    listed = [run(a, "FINISHED", "a1"), run(b, "FAILED", "b1"), run(b, "RUNNING", "b2"), run(c, "FAILED", "c1"),
              run(c, "FINISHED", "c2"), run(c, "FINISHED", "c3"),
              SimpleNamespace(data=SimpleNamespace(tags={}), info=SimpleNamespace(status="FINISHED"), run_id="x")]
    todo, stale, finished = sweep.select(sw.cells, iter(listed))
    assert todo == [b, d] and [r.run_id for r in stale] == ["b1", "b2"]
    assert {k: r.run_id for k, r in finished.items()} == {a.id: "a1", c.id: "c2"}
    todo, stale, finished = sweep.select(sw.cells, listed, force=True)
    assert todo == [a, b, c, d] and [r.run_id for r in stale] == ["a1", "b1", "b2", "c1", "c2", "c3"] and not finished


def test_summary_reads_each_cells_outcome():
    """summary.csv and the terminal's tables from typed outcomes: a diverged cell is `diverged@N`
    in the file, counted as diverged in the tables; past 60 cells the tables go per axis value."""
    sw = sweep.build_sweep({"model": {"width": 30}, "grid": {"model.depth": [1, 2, 3, 4], "seed": list(range(16))}})
    rows = [(CellOutcome.failed(f"r{i}", "boom") if c.axes["seed"] == 0 else
             CellOutcome.trained(f"r{i}", 7 if c.axes["model.depth"] == 4 else None, 0.5, (2.0, 4.0))).of_cell(c.label)
            for i, c in enumerate(sw.cells)]
    csv = sweep.summary_csv(rows).splitlines()
    assert csv[0] == "cell,status,acc,ratio_init,ratio_end,run_id" and len(csv) == 65
    assert csv[1] == '"depth=1,seed=0",failed,nan,nan,nan,r0'
    assert csv[2] == '"depth=1,seed=1",finished,0.5,2.0,4.0,r1'
    assert csv[-1] == '"depth=4,seed=15",diverged@7,0.5,2.0,4.0,r63'
    table = sweep.summary_table(rows, "test", sw.cells).splitlines()
    assert table[0] == "64 cells: 45 finished, 15 diverged, 4 failed; every cell in summary.csv"
    depth4 = next(line for line in table if line.startswith("4 "))
    assert depth4.split()[:5] == ["4", "16", "0", "15", "1"] and "50.00%" in depth4
    small = sweep.summary_table(rows[:3], "test", sw.cells[:3]).splitlines()
    assert small[2].split()[:3] == ["depth=1,seed=0", "failed", "nan%"]


def test_bad_grid_fails_before_anything_with_the_field(tmp_path):
    with pytest.raises(ConfigError) as e:
        sweep.build_sweep({"model": {"width": 30}, "grid": {"model.depth": [1, 2], "model.init": ["he", "orthogonal"]}})
    assert e.value.field == "model.init" and "he_normal" in str(e.value)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {width: 30}\ngrid: {model.dpeth: [1, 2]}\n")
    proc = subprocess.run([sys.executable, "-m", "distnet.cli", "sweep", str(bad)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "model.dpeth" in proc.stderr and not (tmp_path / "mlruns.db").exists()


def test_grid_runs_once_and_resumes_without_logging_twice(ray_cluster, tracking_uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # 100 steps a job: with 10, one lane once drained the queue (7 of 8 jobs in 1.9 s) before
    # the other's worker had started, and nothing was written at the same time.
    raw = {"name": "g8", "train": {"epochs": 1, "log_every": 3}, "data": {"train_limit": 12800, "eval_limit": 300},
           "model": {"width": 20, "activation": "tanh"},
           "ray": {"num_workers": 1, "cpus_per_worker": 0.5}, "mlflow": {"experiment": "sweeps"},
           "sweep": {"pack": 1, "max_concurrent": 2},  # 2 lanes writing to one sqlite file at once
           "grid": {"model.depth": [1, 2], "model.init": ["xavier_normal", "he_normal"], "seed": [0, 1]}}
    sw = sweep.build_sweep(raw)
    first = launch.run_sweep(sw, tracking_uri, say=lambda *_: None)
    assert first.trained == 8
    runs = children(tracking_uri, first.parent_run_id)
    assert len(runs) == 8 and {r.data.tags["distnet.cell_id"] for r in runs} == {c.id for c in sw.cells}
    client = MlflowClient(tracking_uri)
    for r in runs:
        assert r.info.status == "FINISHED" and r.data.tags["distnet.status"] == "finished"
        assert {"model.depth", "model.init", "seed", "depth", "init", "activation"} <= set(r.data.tags)
        assert r.data.params["model.depth"] == r.data.tags["model.depth"]
        depth = int(r.data.tags["depth"])
        table = steptable.read(client, r.info.run_id)  # every step of every concurrent cell landed, once
        np.testing.assert_array_equal(table["step"], np.arange(100))
        assert list(table)[1:] == metrics.step_names(depth + 1)
        for name in metrics.grad_norm_names(depth + 1):  # train.metric_points 50: intervals of 2 steps
            assert sorted(m.step for m in client.get_metric_history(r.info.run_id, name)) == list(range(0, 100, 2))
        for name in ["test/acc", "speed/layer_1", "act/saturated/layer_1"]:
            assert sorted(m.step for m in client.get_metric_history(r.info.run_id, name)) == [0, 1]
    # The lanes did write at the same time: their spans of metric timestamps overlap.
    spans: dict[str, list[int]] = {}
    for r in runs:
        for name in ["test/acc", "grad_norm/w/layer_1"]:
            spans.setdefault(r.data.tags["distnet.lane"], []).extend(
                m.timestamp for m in client.get_metric_history(r.info.run_id, name))
    assert len(spans) == 2
    lanes = [(min(t), max(t)) for t in spans.values()]
    assert max(a for a, _ in lanes) < min(b for _, b in lanes), lanes
    parent = client.get_run(first.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.params["grid.model.depth"] == "[1, 2]"
    csv = Path(client.download_artifacts(first.parent_run_id, "summary.csv", str(tmp_path)))
    assert len(csv.read_text().strip().splitlines()) == 1 + 8
    assert all(r.status == "finished" and r.acc > 0.2 for r in first.rows)

    rows_before = metric_rows(tracking_uri)
    again = launch.run_sweep(sweep.build_sweep(raw), tracking_uri, say=lambda *_: None)
    assert again.trained == 0 and again.parent_run_id == first.parent_run_id
    assert metric_rows(tracking_uri) == rows_before
    assert len(children(tracking_uri, first.parent_run_id)) == 8


def test_divergence_and_failures_are_recorded_and_the_sweep_goes_on(ray_cluster, tmp_path, monkeypatch, capsys):
    """One lane, three packs of two members (lr 0.1 and 1e4), the first raising at step 2: its cells
    are FAILED with error.txt, their params and config.yaml; the lane starts a fresh trainer for the
    other two packs, where lr 1e4 diverges and is recorded so while lr 0.1 goes on; the driver says
    so and exits 1. A rerun trains only the failed cells, replacing their runs; --force replaces every
    run. (Two tests once: divergence and failure on two lanes, and a failing first pack on one; one
    store and one lane now, two trainer starts fewer.)"""
    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "bad.yaml"
    spec.write_text("""name: bad
model: {depth: 2, width: 30, activation: relu}
data: {train_limit: 1280, eval_limit: 300}
train: {epochs: 1, log_every: 3}  # 10 steps
ray: {num_workers: 1, max_failures: 0}  # a deterministic raise: no point retrying it
mlflow: {experiment: sweeps-bad}
sweep: {max_concurrent: 1}
grid: {train.lr: [0.1, 1.0e+4], fault.raise_at_step: [2, null, 50]}  # only the first pack reaches its fault
""")
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"

    def distnet_sweep(*flags) -> str:
        """`distnet sweep` (in this process: its start-up is the suite's time): what it printed;
        it exits 1, for the failed cells."""
        code = cli.main(["sweep", str(spec), "--address", ray_cluster, *flags])
        printed = capsys.readouterr().out
        assert code == 1, printed[-3000:]
        return printed

    printed = distnet_sweep()
    assert "cells: 2 done, 0 running, 2 diverged, 2 failed, 0 waiting" in printed
    assert {line.split(": ")[0] for line in printed.splitlines() if "RuntimeError: fault injection" in line} == \
        {f"FAILED lr={lr},raise_at_step=2" for lr in (0.1, 10000.0)}
    assert "open the UI: distnet ui " in printed and f"--tracking-uri {uri}" in printed
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("sweeps-bad").experiment_id
    runs = {r.data.tags["distnet.cell_id"]: r for r in client.search_runs([exp], "tags.`distnet.cell_id` != ''")}
    cells = {c.label: c for c in sweep.load_sweep(spec).cells}
    by_cell = {label: runs[c.id] for label, c in cells.items()}
    assert len(runs) == 6

    failed = [by_cell[f"lr={lr},raise_at_step=2"] for lr in (0.1, 10000.0)]
    for label, run in zip([f"lr={lr},raise_at_step=2" for lr in (0.1, 10000.0)], failed):
        assert run.info.status == "FAILED" and "fault injection" in run.data.tags["distnet.error"]
        error = Path(client.download_artifacts(run.info.run_id, "error.txt", str(tmp_path)))
        assert "fault injection" in error.read_text()
        # It failed before its first records: its params and config.yaml came with FAILED.
        member = cells[label].config.member_config(0)
        assert {k: v for k, v in run.data.params.items() if k != "name"} == \
            {k: str(v) for k, v in flatten(member).items() if k != "name"}
        config_yaml = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))).read_text())
        assert {k: v for k, v in config_yaml.items() if k != "name"} == {k: v for k, v in member.items() if k != "name"}

    later = [by_cell[f"lr={lr},raise_at_step={r}"] for lr in (0.1, 10000.0) for r in (None, 50)]
    assert len({r.data.tags["distnet.trainer"] for r in later}) == 1  # one fresh trainer took both packs ...
    assert later[0].data.tags["distnet.trainer"] != failed[0].data.tags["distnet.trainer"]  # ... not the failed one
    for r in (None, 50):
        healthy, diverged = by_cell[f"lr=0.1,raise_at_step={r}"], by_cell[f"lr=10000.0,raise_at_step={r}"]
        assert healthy.info.status == "FINISHED" and healthy.data.tags["distnet.status"] == "finished"
        assert diverged.info.status == "FINISHED" and diverged.data.tags["distnet.status"] == "diverged"
        step = int(diverged.data.tags["distnet.diverged_step"])
        assert step < 10
        history = client.get_metric_history(diverged.info.run_id, "grad_norm/w/layer_1")
        assert max(m.step for m in history) == step  # its series stops where it diverged
        np.testing.assert_array_equal(steptable.read(client, diverged.info.run_id)["step"], np.arange(step + 1))
        # the other member of the same population went on
        assert len(client.get_metric_history(healthy.info.run_id, "grad_norm/w/layer_1")) == 10
    summary = Path(client.download_artifacts(later[0].data.tags["mlflow.parentRunId"], "summary.csv", str(tmp_path)))
    statuses = {row["cell"]: row["status"] for row in csv.DictReader(summary.open())}
    assert statuses == {label: ("failed" if "=2" in label.split(",")[1] else "finished" if "lr=0.1" in label else
                                f"diverged@{by_cell[label].data.tags['distnet.diverged_step']}") for label in cells}
    # The sweep as a DataFrame: finished, diverged and failed cells (these without records: read run
    # by run), every value as mlflow.search_runs lists it.
    frame = distnet.results("bad", tracking_uri=uri)
    assert frame["lr"].dtype == np.float64 and str(frame["raise_at_step"].dtype) == "Int64"  # None: <NA>
    assert list(frame["status"]) == [statuses[c].split("@")[0] for c in frame["cell"]]
    assert list(frame["source"]) == ["run" if "=2" in c.split(",")[1] else "records" for c in frame["cell"]]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    listed = mlflow.search_runs([exp], f"tags.`mlflow.parentRunId` = '{later[0].data.tags['mlflow.parentRunId']}'")
    assert assert_same_as_listed(frame, listed) == 6 * 11  # 2 axes, status, diverged_at, acc, loss, 2 ratios, 3 layers

    again = launch.run_sweep(sweep.load_sweep(spec), uri, address=ray_cluster, say=lambda *_: None)
    assert again.trained == 2  # only the failed cells are re-run ...
    live = client.search_runs([exp], "tags.`distnet.cell_id` != ''")
    assert len(live) == 6  # ... and replace their old runs, which are deleted
    assert {r.info.run_id for r in live} == {r.info.run_id for r in later} | {r.run_id for r in again.failed}
    assert {r.cell for r in again.failed} == {f"lr={lr},raise_at_step=2" for lr in (0.1, 10000.0)}

    distnet_sweep("--force")
    now = client.search_runs([exp], "tags.`distnet.cell_id` != ''")
    assert len(now) == 6 and not {r.info.run_id for r in now} & {r.info.run_id for r in live}
    deleted = client.search_runs([exp], "tags.`distnet.cell_id` != ''", run_view_type=ViewType.DELETED_ONLY)
    assert {r.info.run_id for r in deleted} == {r.info.run_id for r in runs.values()} | {r.info.run_id for r in live}
