"""Fault tolerance on a real local Ray: a SIGKILLed worker resumes exactly from its checkpoint;
a killed driver's training or sweep resumes on the next identical command; MLflow holds every step
exactly once. Each test costs about a minute here, so there are few of them."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from distnet import launch, metrics, schema, sharding, steptable, sweep
from distnet.config import build_config

import records
from disks import full_file_system

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.ray]


def config(tmp_path, **fault):
    """2 workers, 2 members (member 1 diverges at step 3), 40 steps, checkpoints every 5."""
    return build_config({
        "name": "ft", "model": {"sizes": [784, 30, 30, 10], "activation": "relu"},
        "data": {"train_limit": 2560, "eval_limit": 300},
        "train": {"epochs": 2, "momentum": 0.9, "log_every": 3},  # 40 steps
        "checkpoint": {"every": 5, "unit": "step"},
        "ray": {"num_workers": 2, "storage_path": str(tmp_path / "runs")},
        "population": [{"seed": 0, "lr": 0.1}, {"seed": 1, "lr": 1e4}], "fault": fault})


def attempts(trace: Path) -> dict[int, list[dict]]:
    """rank -> what each attempt of that rank noted: its first step and that step's examples."""
    return {r: [json.loads(line) for line in (trace / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)}


def assert_each_step_once(uri, run_id, steps, epochs, points=50) -> dict:
    """Every step once in the run's step table (returned), every interval and epoch once in MLflow."""
    client = MlflowClient(uri)
    table = steptable.read(client, run_id)
    np.testing.assert_array_equal(table["step"], np.arange(steps))
    every = metrics.interval(steps, points)
    for name in metrics.step_names(3):
        for key in (name, schema.max_name(name)):
            assert sorted(m.step for m in client.get_metric_history(run_id, key)) == list(range(0, steps, every))
    for name in ["test/acc", "speed/layer_2", "act/std/layer_1", "train/loss"]:
        expected = list(range(epochs + 1)) if name != "train/loss" else list(range(1, epochs + 1))
        assert sorted(m.step for m in client.get_metric_history(run_id, name)) == expected
    return table


def assert_same_record(a: tuple[str, str], b: tuple[str, str]) -> None:
    """Two runs ((store, run id) each) logged the same values: every step-table column and every
    MLflow series, step for step."""
    (uri_a, run_a), (uri_b, run_b) = a, b
    ca, cb = MlflowClient(uri_a), MlflowClient(uri_b)
    ta, tb = steptable.read(ca, run_a), steptable.read(cb, run_b)
    assert list(ta) == list(tb)
    for name in ta:
        np.testing.assert_allclose(ta[name], tb[name], rtol=1e-6, atol=0, err_msg=name)
    perf = {"perf/epoch_s", "perf/max_rss_mb"}
    keys = ca.get_run(run_a).data.metrics.keys() - perf
    assert keys == cb.get_run(run_b).data.metrics.keys() - perf
    for key in keys:
        ha, hb = ([(m.step, m.value) for m in sorted(c.get_metric_history(r, key), key=lambda m: m.step)]
                  for c, r in ((ca, run_a), (cb, run_b)))
        assert [s for s, _ in ha] == [s for s, _ in hb], key
        np.testing.assert_allclose([v for _, v in ha], [v for _, v in hb], rtol=1e-6, atol=0, err_msg=key)


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clean")
    uri = f"sqlite:///{tmp / 'mlruns.db'}"
    return uri, launch.run_training(config(tmp, trace=str(tmp / "trace")), uri, show_progress=False), tmp / "trace"


# (rank killed, where, from which step, the checkpoints the restart may resume from)
KILLS = {"rank0-in-a-step": (0, "step", 13, (5, 10)),
         "rank0-inside-a-flush": (0, "flush", 13, (10, 15)),
         # Rank 1 dies right after its report of step 5's checkpoint, before Ray Train's controller
         # has collected it: Ray never registers it and restarts the group from the start, while
         # rank 0 may already have flushed the records that checkpoint covered.
         "rank1-after-an-unregistered-commit": (1, "commit", 5, (0,))}


@pytest.mark.parametrize("kill", KILLS.values(), ids=KILLS.keys())
def test_sigkilled_rank_resumes_exactly(uninterrupted, tmp_path, monkeypatch, kill):
    """A rank SIGKILLed: rank 0, the one that writes to MLflow, at step 13 (or inside the flush of
    the checkpoint at step 15, after the first run's records are written), or rank 1 before Ray
    registered the first checkpoint; member 1 diverged at step 3. The resumed training starts every
    rank at the latest registered checkpoint's step, counts its restart, and ends with every logged
    value (each once) and the final parameters of the uninterrupted run."""
    monkeypatch.chdir(tmp_path)
    rank, where, at_step, checkpoints = kill
    clean_uri, clean, clean_trace = uninterrupted
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    marker, trace = tmp_path / "killed-once", tmp_path / "trace"
    crashed = launch.run_training(
        config(tmp_path, kill_at_step=at_step, kill_rank=rank, kill_in=where, once_marker=str(marker),
               trace=str(trace)), uri, show_progress=False)
    assert marker.exists()  # the kill did happen
    assert crashed.diverged == clean.diverged == {1: 3}
    torch.testing.assert_close(crashed.theta, clean.theta, atol=1e-6, rtol=0)
    client = MlflowClient(uri)
    resumed = {int(client.get_run(r).data.tags["distnet.resumed_from_step"]) for r in crashed.run_ids}
    (step,) = resumed
    assert step in checkpoints
    seen = attempts(trace)
    for r in (0, 1):  # two attempts; the second began where the tag says, on every rank
        assert [a["first_step"] for a in seen[r]] == [0, step]
        assert len({a["pid"] for a in seen[r]}) == 2
    for k, run_id in enumerate(crashed.run_ids):
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags["distnet.restarts"] == "1"
        if k == 1:
            assert run.data.tags["distnet.status"] == "diverged"
            np.testing.assert_array_equal(steptable.read(client, run_id)["step"], np.arange(4))
        else:
            assert_each_step_once(uri, run_id, 40, 2)
        assert_same_record((uri, run_id), (clean_uri, clean.run_ids[k]))
    # Sharding, as run inside Ray: each rank's first batch is its own half of the global batch.
    first = attempts(clean_trace)
    global_batch = sharding.epoch_batches(2560, 128, 1, 0, 0, 1)[0].tolist()
    assert first[0][0]["batch"] + first[1][0]["batch"] == global_batch
    assert not set(first[0][0]["batch"]) & set(first[1][0]["batch"])
    assert client.get_run(crashed.run_ids[0]).data.tags["distnet.all_reduce"] == "shared_memory"


def wait_for(predicate, timeout):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_killed_driver_training_resumes_into_the_same_run(ray_cluster, tmp_path):
    """`distnet train` killed mid-run; the same command again resumes from its checkpoint."""
    cfg = tmp_path / "ft.yaml"
    cfg.write_text(f"""name: ftdriver
model: {{sizes: [784, 30, 30, 10]}}
data: {{train_limit: 2560, eval_limit: 300}}
train: {{epochs: 3, log_every: 3}}
checkpoint: {{every: 1, unit: epoch}}
ray: {{num_workers: 1, storage_path: {tmp_path / 'runs'}}}
""")
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    cmd = [sys.executable, "-m", "distnet.cli", "train", str(cfg), "--address", ray_cluster]
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    ckpts = tmp_path / "runs"
    # Killed once Ray Train has registered a checkpoint (its manager snapshot is in storage).
    assert wait_for(lambda: any(ckpts.glob("ftdriver-*/checkpoint_manager_snapshot.json")), 120), "no checkpoint"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    record = tmp_path / "runs" / "ftdriver.resume.json"
    assert record.exists()
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "resuming the unfinished training" in again.stdout
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("distnet").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert int(runs[0].data.tags["distnet.restarts"]) >= 1
    assert int(runs[0].data.tags["distnet.resumed_from_step"]) >= 20  # from a checkpoint, not from scratch
    table = assert_each_step_once(uri, runs[0].info.run_id, 60, 3)
    first, last = (table[f"grad_norm/w/layer_{l}"].astype(np.float64) for l in (1, 3))
    # The summary's gradient ratios span the whole training, not just the part after the resume.
    assert runs[0].data.metrics["grad_ratio/init"] == pytest.approx(first[0] / last[0], rel=1e-12)
    assert runs[0].data.metrics["grad_ratio/end"] == pytest.approx(first[-1] / last[-1], rel=1e-12)
    assert not record.exists()


def test_killed_sweep_driver_rerun_skips_finished_cells(ray_cluster, tmp_path):
    spec = tmp_path / "sw.yaml"
    spec.write_text("""name: ftsweep
model: {width: 20, activation: tanh}
data: {train_limit: 1280, eval_limit: 300}
train: {epochs: 1}
ray: {num_workers: 1}
sweep: {pack: 1, max_concurrent: 1}
grid: {model.depth: [1], seed: [0, 1, 2, 3]}
""")
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    cmd = [sys.executable, "-m", "distnet.cli", "sweep", str(spec), "--address", ray_cluster]
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)

    # The driver's lines, read as they come: once it has announced the sweep, its store exists and is
    # migrated, and a client of ours cannot race that first migration.
    said: list[str] = []
    reader = threading.Thread(target=lambda: said.extend(iter(proc.stdout.readline, b"")), daemon=True)
    reader.start()
    assert wait_for(lambda: any(b"sweep ftsweep: 4 cells" in line for line in said), 120), b"".join(said)[-2000:]
    client = MlflowClient(uri)
    exp_id = client.get_experiment_by_name("distnet").experiment_id

    def finished_cells() -> set[str]:
        runs = client.search_runs([exp_id], "attributes.status = 'FINISHED'")
        return {r.info.run_id for r in runs if "distnet.cell_id" in r.data.tags}

    assert wait_for(lambda: len(finished_cells()) >= 1, 180)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # The training in flight is Ray's, not the driver process group's: Ray ends it once it sees its
    # owner gone, but a rank 0 that was closing its run may still mark it FINISHED in that moment
    # (seen once, on a loaded machine). What the rerun finds is what has settled.
    done_before = finished_cells()
    for _ in range(6):
        time.sleep(5)
        if finished_cells() == done_before:
            break
        done_before = finished_cells()
    assert 1 <= len(done_before) < 4
    result = launch.run_sweep(sweep.load_sweep(spec), uri, address=ray_cluster, say=lambda *_: None)
    assert result.trained == 4 - len(done_before)
    assert {r.run_id for r in result.rows} >= done_before  # finished cells kept their runs
    assert all(r.status == "finished" for r in result.rows)
    for r in result.rows:
        np.testing.assert_array_equal(steptable.read(MlflowClient(uri), r.run_id)["step"], np.arange(10))


def test_a_full_disk_holds_the_sweep_until_space_is_back(ray_cluster, tmp_path):
    """The artifacts' file system full from the start: rank 0's first write waits, the driver says
    which file it is and how many bytes it needs; once the space is freed the sweep finishes with
    no restart, and every cell holds what its training computes here: every step-table value and
    every MLflow value, each once."""
    spec = tmp_path / "full.yaml"
    spec.write_text("""name: full
model: {width: 20, activation: tanh}
data: {train_limit: 1280, eval_limit: 300}
train: {epochs: 1}
checkpoint: {every: 5, unit: step}
ray: {num_workers: 1, storage_path: %s}
mlflow: {experiment: full}
sweep: {pack: 1, max_concurrent: 1}
grid: {model.depth: [1, 2]}
""" % (tmp_path / "storage"))
    sw = sweep.load_sweep(spec)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    said: list[str] = []
    done: list[launch.SweepResult] = []
    with full_file_system(tmp_path / "mlartifacts") as filler:  # where a sqlite store keeps artifacts
        driver = threading.Thread(target=lambda: done.append(launch.run_sweep(sw, uri, address=ray_cluster,
                                                                             say=said.append)))
        driver.start()
        assert wait_for(lambda: any("no space left" in line for line in said), 180), said
        (line,) = [line for line in said if "no space left" in line]
        full = re.fullmatch(r"lane 0: no space left on device for (\S+): it needs ([\d,]+) bytes \(([\d,]+) bytes "
                            r"free there\); the training waits and retries every 5 s until there is room", line)
        assert full, line
        path, needed, free = Path(full[1]), int(full[2].replace(",", "")), int(full[3].replace(",", ""))
        # the first step-table part of the first cell's run, on the full file system
        assert path.parent.name == steptable.ARTIFACT_DIR and path.is_relative_to(tmp_path / "mlartifacts")
        assert needed > free == 0
        time.sleep(6)  # a retry or more, still waiting
        assert driver.is_alive() and not any("room again" in line for line in said)
        filler.unlink()
        driver.join(300)
        assert done, said
        assert "lane 0: room again; its records went in and it trains on" in said
        assert path.stat().st_size == needed  # the file the message named went in, whole
        assert {r.status for r in done[0].rows} == {"finished"}
        cells = records.assert_sweep_as_computed(MlflowClient(uri), sw, "full")
        assert not any(schema.RESTARTS in r.data.tags for r in cells.values())
