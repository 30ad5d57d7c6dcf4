"""The cluster's tracking server for real: PostgreSQL and an MLflow server over it, started by
cluster/mlflow_server.sh (what the cluster files run on the head), and a sweep of 104 cells written
through it by two trainings at a time."""

import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from conftest import free_port
from distnet import launch, metrics, steptable, sweep, tracking

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "cluster" / "mlflow_server.sh"


@pytest.fixture(scope="module")
def postgres_mlflow():
    """PostgreSQL on a loopback port (as the `postgres` user when we are root) and `mlflow server`
    over it; both stopped at the end."""
    assert list(Path("/usr/lib/postgresql").glob("*/bin/initdb")), \
        "PostgreSQL is not installed: `make test` installs Debian's postgresql where it can (apt-get as root)"
    state = Path(tempfile.mkdtemp(prefix="dnpg", dir="/tmp"))
    state.chmod(0o755)  # the postgres user must reach its data directory inside
    port = free_port()
    env = {**os.environ, "MLFLOW": str(Path(sys.executable).parent / "mlflow"), "MLFLOW_HOST": "127.0.0.1",
           "MLFLOW_PORT": str(port), "PG_PORT": str(free_port()), "MLFLOW_WORKERS": "2"}
    try:
        subprocess.run(["bash", str(SCRIPT), "start", str(state)], env=env, check=True, timeout=120)
        uri = f"http://127.0.0.1:{port}"
        tracking.wait_for_server(uri, log=state / "mlflow.log")
        yield uri
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(state)], env=env, timeout=120)
        shutil.rmtree(state, ignore_errors=True)


def test_postgres_backed_server_takes_a_104_cell_sweep_from_concurrent_trainings(ray_cluster, postgres_mlflow,
                                                                                 tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = postgres_mlflow
    assert MlflowClient(uri).search_experiments()  # a real server: the default experiment is there
    raw = {"name": "pg104", "model": {"width": 16, "activation": "tanh"},
           "train": {"epochs": 1, "log_every": 4}, "data": {"train_limit": 1280, "eval_limit": 200},  # 10 steps
           "ray": {"num_workers": 1, "cpus_per_worker": 1, "storage_path": str(tmp_path / "runs")},
           "mlflow": {"experiment": "pg"}, "sweep": {"pack": 13, "max_concurrent": 2},  # 8 trainings, 2 at once
           "grid": {"model.depth": [1, 2], "model.init": ["xavier_normal", "he_normal", "nielsen_scaled", "lecun_normal"],
                    "seed": list(range(13))}}
    result = launch.run_sweep(sweep.build_sweep(raw), uri, say=lambda *_: None)
    assert result.trained == 104 and not result.failed
    client = MlflowClient(uri)
    runs = tracking.child_runs(uri, result.parent_run_id)
    assert len(runs) == 104 and len({r.data.tags["distnet.cell_id"] for r in runs}) == 104

    def check(r) -> tuple[str, list[int]]:
        """One cell against its step table; its lane and test/acc timestamps."""
        assert r.info.status == "FINISHED" and r.data.tags["distnet.status"] == "finished"
        depth = int(r.data.tags["depth"])
        table = steptable.read(client, r.info.run_id)  # every step once, nothing lost
        np.testing.assert_array_equal(table["step"], np.arange(10))
        assert np.isfinite(table["grad_norm/w/layer_1"]).all()
        for name in metrics.step_names(depth + 1):  # 10 steps: one MLflow point per step, the table's value
            hist = sorted(client.get_metric_history(r.info.run_id, name), key=lambda m: m.step)
            np.testing.assert_allclose([m.value for m in hist], table[name], rtol=1e-6)
        acc = client.get_metric_history(r.info.run_id, "test/acc")
        assert sorted(m.step for m in acc) == [0, 1]
        return r.data.tags["distnet.lane"], [m.timestamp for m in acc]

    spans: dict[str, list[int]] = {}
    with ThreadPoolExecutor(8) as pool:  # the reads are HTTP round trips: several in flight at once
        for lane, stamps in pool.map(check, runs):
            spans.setdefault(lane, []).extend(stamps)
    # The two lanes wrote at the same time: their spans of metric timestamps overlap.
    assert set(spans) == {"0", "1"}
    assert max(min(t) for t in spans.values()) < min(max(t) for t in spans.values())
    assert {row["run_id"] for row in result.rows} == {r.info.run_id for r in runs}
    assert all(np.isfinite(row["ratio_init"]) for row in result.rows)  # the summary read the step tables
