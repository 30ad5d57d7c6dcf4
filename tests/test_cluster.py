"""The cluster way to run distnet: Ray's own validator on the cluster files, and a real two-node Ray
cluster on loopback with a real MLflow server, driven by `ray job submit` from the command line."""

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from distnet import steptable

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml", "local.yaml"])
def test_cluster_file_passes_rays_validator(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster" / name).read_text())
    validate_config(prepare_config(raw))  # what `ray up` runs before it touches a cloud
    assert raw["file_mounts"] == {"~/distnet": "."}
    assert "bash ~/distnet/cluster/mlflow_server.sh start ~/mlflow" in raw["head_start_ray_commands"]
    assert any("install" in c and "postgresql" in c for c in raw["head_setup_commands"])
    assert any("pip install" in c and "~/distnet" in c for c in raw["setup_commands"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, env, timeout=120, check=True):
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode:
        raise AssertionError(f"{cmd} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture
def two_node_cluster(tmp_path):
    """A Ray head and a second Ray node (1 CPU each) and an MLflow server, all on 127.0.0.1."""
    # Ray 2.60 heads use token auth; a fresh machine has no ~/.ray/auth_token, so the cluster gets
    # its own token, shared by both nodes and every CLI call through the environment.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    gcs, dash, mlflow_port = free_port(), free_port(), free_port()
    temp = Path(tempfile.mkdtemp(prefix="dnray", dir="/tmp"))  # Ray's socket paths must stay short
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination",
         str(tmp_path / "artifacts"), "--workers", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        run([str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", "1",
             "--temp-dir", str(temp), "--include-dashboard", "true"], env)
        run([str(BIN / "ray"), "start", "--address", f"127.0.0.1:{gcs}", "--node-ip-address", "127.0.0.1",
             "--num-cpus", "1"], env)
        uri = f"http://127.0.0.1:{mlflow_port}"
        deadline = time.time() + 60
        while True:
            try:
                MlflowClient(uri).search_experiments()
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(1)
        yield {"env": env, "dashboard": f"http://127.0.0.1:{dash}", "gcs": f"127.0.0.1:{gcs}", "mlflow": uri}
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_sweep_on_two_nodes(two_node_cluster, tmp_path):
    c = two_node_cluster
    work = tmp_path / "job"
    shutil.copytree(ROOT, work, ignore=shutil.ignore_patterns(".venv", ".git", "*.db", "mlruns", "mlartifacts",
                                                              "distnet_runs", "__pycache__", ".pytest_cache"))
    (work / "job_sweep.yaml").write_text("""name: jobsweep
model: {width: 20, activation: tanh}
data: {train_limit: 3840, eval_limit: 300, dir: %s}
train: {epochs: 1}
ray: {num_workers: 1, storage_path: %s}
mlflow: {experiment: cluster}
sweep: {pack: 1, max_concurrent: 2}  # 6 jobs on 2 lanes, one lane per node
grid: {model.depth: [1, 2], seed: [0, 1, 2]}
""" % (ROOT.parent / "shared" / "data" / "mnist", tmp_path / "storage"))
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": c["mlflow"]}}
    submit = run([str(BIN / "ray"), "job", "submit", "--address", c["dashboard"], "--working-dir", str(work),
                  "--runtime-env-json", json.dumps(runtime_env), "--",
                  "python", "-m", "distnet.cli", "sweep", "job_sweep.yaml"], c["env"], timeout=600, check=False)
    assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-2000:]
    job_id = re.search(r"raysubmit_\w+", submit.stdout + submit.stderr).group(0)
    status = run([str(BIN / "ray"), "job", "status", "--address", c["dashboard"], job_id], c["env"])
    assert re.search(rf"Job '{job_id}' succeeded", status.stdout + status.stderr)  # Ray's words for SUCCEEDED
    client = MlflowClient(c["mlflow"])
    exp = client.get_experiment_by_name("cluster")
    cells = client.search_runs([exp.experiment_id], "tags.`distnet.cell_id` != ''")
    assert len(cells) == 6 and all(r.info.status == "FINISHED" for r in cells)
    assert len({r.data.tags["distnet.ray_node"] for r in cells}) == 2  # trainings ran on both nodes
    for r in cells:
        assert len(client.get_metric_history(r.info.run_id, "grad_norm/w/layer_1")) == 30
        assert steptable.read(client, r.info.run_id)["step"].tolist() == list(range(30))
        assert "config.yaml" in {a.path for a in client.list_artifacts(r.info.run_id)}
    parent = client.search_runs([exp.experiment_id], "tags.`distnet.kind` = 'sweep'")[0]
    assert "summary.csv" in {a.path for a in client.list_artifacts(parent.info.run_id)}


GPU_PLACEMENT = """
import json, os
import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from distnet import launch
from distnet.config import build_config

ray.init(num_cpus=4, num_gpus=4, include_dashboard=False, log_to_driver=False)  # 4 declared GPUs
cfg = build_config({"model": {"sizes": [784, 30, 10]}, "ray": {"use_gpu": True, "num_workers": 2}})
bundles = launch.scaling_config(cfg).as_placement_group_factory().bundles
pg = ray.util.placement_group(bundles)
ray.get(pg.ready(), timeout=60)

@ray.remote
def visible():
    return os.environ.get("CUDA_VISIBLE_DEVICES")

workers = [i for i, b in enumerate(bundles) if b.get("GPU")]
seen = ray.get([visible.options(num_cpus=bundles[i]["CPU"], num_gpus=1,
                                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, i)).remote() for i in workers])
print(json.dumps({"bundles": bundles, "visible": seen, "concurrency": launch.default_concurrency(cfg)}))
"""


def test_gpu_config_reserves_one_gpu_per_worker_on_cpu_only_machine(tmp_path):
    """The use_gpu placement path without a GPU: a Ray node with 4 declared GPUs, the scaling distnet
    builds for ray.use_gpu=true, ray.num_workers=2, reserved as Ray Train would reserve it."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", GPU_PLACEMENT], env=env, capture_output=True, text=True,
                          timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    workers = [b for b in out["bundles"] if b.get("GPU")]
    assert len(workers) == 2 and all(b["GPU"] == 1 and b["CPU"] == 1 for b in workers)
    assert sorted(out["visible"]) == sorted(set(out["visible"])) and len(out["visible"]) == 2  # one GPU each
    assert out["concurrency"] == 2  # a sweep runs 4 GPUs / 2 workers = 2 trainings at once
