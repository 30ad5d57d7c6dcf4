"""The cluster way to run distnet: Ray's own validator on the cluster files, and a real two-node Ray
cluster (the second node a host of its own: tests/hosts.py) with a real MLflow server, driven by
`ray job submit` from the command line."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

import hosts
import records
from conftest import RecordingSink
from testcluster import BIN, SHARED_DATA, Cluster, namespaced_cluster, run, wait_for
from distnet import data, schema, steptable, sweep, tracking_server, worker
from distnet.config import build_config

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.namespaces, pytest.mark.ray]


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml", "local.yaml"])
def test_cluster_file_passes_rays_validator(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster" / name).read_text())
    validate_config(prepare_config(raw))  # what `ray up` runs before it touches a cloud
    assert raw["file_mounts"] == {"~/distnet": ".", "~/.ray/auth_token": "~/.ray/auth_token"}  # the code, Ray's token
    assert raw["rsync_filter"] == [".gitignore"]
    # Every node's shells: Ray's token auth on, the checkpoints where all nodes reach them.
    assert re.search(r"RAY_AUTH_MODE=token.*DISTNET_STORAGE=(/mnt/|s3://|gs://)", " ".join(raw["setup_commands"]))
    # The tracking server first, then the head's Ray with its login, which the jobs' drivers inherit.
    server, ray_head = (raw["head_start_ray_commands"].index(c) for c in (
        "bash ~/distnet/cluster/mlflow_server.sh start ~/mlflow",
        next(c for c in raw["head_start_ray_commands"] if "ray start --head" in c)))
    assert server < ray_head
    assert raw["head_start_ray_commands"][ray_head].startswith("set -a && . ~/mlflow/credentials && ")
    assert any("install" in c and "postgresql" in c for c in raw["head_setup_commands"])
    assert any("pip install" in c and "distnet" in c for c in raw["setup_commands"])


@pytest.fixture(scope="module")
def cluster():
    """A Ray head (1 CPU) here, a second Ray node (1 CPU) on a host of its own and the tracking
    server on a third (tests/testcluster.py), the server's login in this process's environment as a
    user on the head has it. One for the module: a test that breaks a part of it (a node, the server,
    a link) leaves it to `two_node_cluster` to mend before the next."""
    if os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("ip")):
        pytest.fail("the two-host cluster needs root, ip and unshare (CI runs as root)")
    with namespaced_cluster(workers=1) as c, pytest.MonkeyPatch.context() as mp:
        for key, value in c.login.items():  # for this process's own MLflow clients
            mp.setenv(key, value)
        yield c


@pytest.fixture
def two_node_cluster(cluster) -> Cluster:
    cluster.heal()
    return cluster


def working_dir(tmp_path: Path) -> Path:
    """The repository as a user's `--working-dir .` ships it."""
    work = tmp_path / "job"
    shutil.copytree(ROOT, work, ignore=shutil.ignore_patterns(".venv", ".git", "*.db", "mlruns", "mlartifacts",
                                                              "distnet_runs", "__pycache__", ".pytest_cache"))
    return work


def submit(c: Cluster, work: Path, runtime_env: list[str], *command: str) -> str:
    """`ray job submit` from the command line; the job's id once it SUCCEEDED."""
    for _ in range(60):  # a node's job agent comes up some seconds after `ray start` returns (a minute and more on a loaded machine)
        proc = run([str(BIN / "ray"), "job", "submit", "--address", c.dashboard, "--working-dir", str(work),
                    *runtime_env, "--", *command], c.env, timeout=600, check=False)
        if "No available agent to submit job" not in proc.stdout + proc.stderr:
            break
        time.sleep(2)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    job_id = re.search(r"raysubmit_\w+", proc.stdout + proc.stderr).group(0)
    status = run([str(BIN / "ray"), "job", "status", "--address", c.dashboard, job_id], c.env)
    assert re.search(rf"Job '{job_id}' succeeded", status.stdout + status.stderr)  # Ray's words for SUCCEEDED
    return job_id


def test_ray_job_submit_sweep_on_two_nodes(two_node_cluster, tmp_path):
    c = two_node_cluster
    work = working_dir(tmp_path)
    (work / "job_sweep.yaml").write_text("""name: jobsweep
model: {width: 20, activation: tanh}
data: {train_limit: 3840, eval_limit: 300, dir: %s}
train: {epochs: 20}  # 600 steps, seconds a job: both lanes are up before one lane could take them all
ray: {num_workers: 1, storage_path: %s}
mlflow: {experiment: cluster}
sweep: {pack: 1, max_concurrent: 2}  # 6 jobs on 2 lanes, one lane per node
grid: {model.depth: [1, 2], seed: [0, 1, 2]}
""" % (ROOT.parent / "shared" / "data" / "mnist", tmp_path / "storage"))
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": c.mlflow}}
    job_id = submit(c, work, ["--runtime-env-json", json.dumps(runtime_env)], "python", "-m", "distnet.cli", "sweep",
                    "job_sweep.yaml")
    # The driver had the tracking server's login from the head's Ray, and neither it nor Ray said it.
    logs = run([str(BIN / "ray"), "job", "logs", "--address", c.dashboard, job_id], c.env).stdout
    assert "summary.csv logged to the sweep's parent run" in logs
    assert os.environ[tracking_server.PASSWORD] not in logs
    client = MlflowClient(c.mlflow)
    exp = client.get_experiment_by_name("cluster")
    cells = client.search_runs([exp.experiment_id], "tags.`distnet.cell_id` != ''")
    assert len(cells) == 6 and all(r.info.status == "FINISHED" for r in cells)
    assert len({r.data.tags["distnet.ray_node"] for r in cells}) == 2  # trainings ran on both nodes
    for r in cells:
        assert len(client.get_metric_history(r.info.run_id, "grad_norm/w/layer_1")) == 50  # train.metric_points
        assert steptable.read(client, r.info.run_id)["step"].tolist() == list(range(600))
        assert "config.yaml" in {a.path for a in client.list_artifacts(r.info.run_id)}
    parent = client.search_runs([exp.experiment_id], "tags.`distnet.kind` = 'sweep'")[0]
    assert "summary.csv" in {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_two_workers_on_two_hosts_equal_one_worker(two_node_cluster, tmp_path):
    """`distnet train` with 2 workers, one per host (the second without MNIST), submitted as a user
    would: `ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml` (its HEAD_IP filled
    in). The gradient all-reduce goes through torch.distributed (the hosts differ), the worker on the
    second host trains on the arrays the driver read, and the run equals one process training the
    same config alone (the worker loop in this process: the 1-worker reference, without a second job
    and its environment)."""
    c = two_node_cluster
    work = working_dir(tmp_path)
    runtime_env = work / "cluster" / "runtime_env.yaml"
    runtime_env.write_text(runtime_env.read_text().replace("http://HEAD_IP:5000", c.mlflow))
    cfg = {"name": "hosts", "model": {"sizes": [784, 30, 30, 10]}, "train": {"epochs": 1, "momentum": 0.9},
           "data": {"train_limit": 2560, "eval_limit": 500, "dir": str(SHARED_DATA / "mnist")},
           "ray": {"num_workers": 2, "storage_path": str(tmp_path / "storage")},
           "mlflow": {"experiment": "hosts"}, "fault": {"trace": str(tmp_path / "trace")}}
    (work / "hosts.yaml").write_text(yaml.safe_dump(cfg))
    submit(c, work, ["--runtime-env", str(runtime_env)], "python", "-m", "distnet.cli", "train", "hosts.yaml")
    ranks = {r: json.loads((tmp_path / "trace" / f"rank{r}.jsonl").read_text())["host"] for r in (0, 1)}
    assert sorted(ranks.values()) == sorted([socket.gethostname(), c.node2.hostname])  # one worker on each host
    client = MlflowClient(c.mlflow)
    exp = client.get_experiment_by_name("hosts").experiment_id
    (two,) = client.search_runs([exp], "attributes.run_name = 'hosts'")
    assert two.info.status == "FINISHED" and two.data.tags["distnet.all_reduce"] == "torch"

    one_cfg = build_config({**cfg, "ray": {"num_workers": 1}, "fault": {}})
    sink = RecordingSink()
    arrays = data.select(data.load_mnist(cfg["data"]["dir"]), "test", 2560, 500)
    one = worker.train(one_cfg, arrays, worker.WorkerEnv(device=torch.device("cpu")), sink)
    t2 = steptable.read(client, two.info.run_id)
    np.testing.assert_array_equal(t2["step"], np.arange(20))
    assert [s for s, _ in sink.steps] == list(range(20))
    for name in sink.steps[0][1]:  # the same trajectory: every step's norms and global batch loss
        np.testing.assert_allclose(t2[name], [v[name][0] for _, v in sink.steps], rtol=1e-5, err_msg=name)
    assert two.data.metrics["test/acc"] == pytest.approx(float(one.final["test/acc"][0]), abs=1e-3)


def running_on(client: MlflowClient, experiment: str, node_id: str) -> list:
    """RUNNING runs whose rank 0 has written its first records (at a checkpoint) on node `node_id`."""
    exp = client.get_experiment_by_name(experiment)
    return exp and client.search_runs(
        [exp.experiment_id], f"tags.`distnet.ray_node` = '{node_id}' and attributes.status = 'RUNNING'")


def written_past(client: MlflowClient, runs: list, step: int) -> list:
    """Those of `runs` whose records reach past `step`. Rank 0 writes at a checkpoint; Ray registers
    that checkpoint a moment later, once every worker has reported it. A node lost in between costs
    the steps since the one before, and a training lost before its first registered checkpoint
    starts again from step 0 (no resume to assert): a node is killed only once the records show a
    second checkpoint, by which time the first is registered."""
    return [r for r in runs or () if max((m.step for m in client.get_metric_history(r.info.run_id, schema.BATCH_LOSS)),
                                         default=-1) > step]


def distnet(c: Cluster, tmp_path: Path, *args: str) -> subprocess.Popen:
    """A distnet command on this machine (the head), against the cluster and its MLflow server."""
    return subprocess.Popen([sys.executable, "-m", "distnet.cli", *args, "--address", c.gcs, "--tracking-uri",
                             c.mlflow], cwd=tmp_path, env=c.env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def first_records(proc: subprocess.Popen, predicate, timeout: float = 300):
    """predicate()'s first true answer while the distnet command `proc` runs (its output if it ends)."""
    answer = wait_for(lambda: predicate() or proc.poll() is not None, timeout)
    if proc.poll() is not None:
        raise AssertionError(f"the command ended first ({proc.returncode}):\n{proc.communicate()[0][-4000:]}")
    assert answer, "no checkpoint within the timeout"
    return answer


def finish(proc: subprocess.Popen, timeout: float = 400) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-4000:]
    return out


def long_sweep(tmp_path: Path, name: str) -> str:
    """A 4-cell sweep file of jobs long enough to fault in the middle of (300 steps, a checkpoint
    every 30), on two lanes: one per node."""
    (tmp_path / f"{name}.yaml").write_text("""name: %s
model: {depth: 2, width: 20, activation: tanh}
data: {train_limit: 3840, eval_limit: 300, dir: %s}
train: {epochs: 10, log_every: 10, metric_points: 30}
checkpoint: {every: 30, unit: step}
ray: {num_workers: 1, storage_path: %s}
mlflow: {experiment: %s}
sweep: {pack: 1, max_concurrent: 2}
grid: {seed: [0, 1, 2, 3]}
""" % (name, SHARED_DATA / "mnist", tmp_path / "storage", name))
    return f"{name}.yaml"


def assert_cells_as_computed(client: MlflowClient, tmp_path: Path, name: str) -> dict:
    """The sweep's cells, one FINISHED run each (returned by cell id), each as computed here."""
    return records.assert_sweep_as_computed(client, sweep.load_sweep(tmp_path / f"{name}.yaml"), name)


@pytest.mark.parametrize("fault", ["killed", "link-cut"])
def test_a_node_lost_mid_sweep_costs_only_the_steps_since_its_checkpoint(two_node_cluster, tmp_path, fault):
    """The second host lost while its lane is inside a job, past a checkpoint: every Ray process of it
    SIGKILLed, or its link cut for 15 s (Ray declares it dead after 3 s; its processes go on,
    cut off, and learn it once the link is back): the sweep finishes on the head alone, the lost job
    resumes from its last checkpoint (not from step 0) into the same run, and every cell's record
    equals its training computed here without a fault: every step-table value and every MLflow value,
    each once (nothing the cut-off rank 0 still held written when its link came back)."""
    c = two_node_cluster
    node2 = c.node_ids()[c.node2.address]
    client = MlflowClient(c.mlflow)
    name = f"lose-{fault}"
    proc = distnet(c, tmp_path, "sweep", long_sweep(tmp_path, name))
    lost = first_records(proc, lambda: written_past(client, running_on(client, name, node2), 30))
    faulted = time.time()
    if fault == "killed":
        hosts.end_processes(c.node2.pids)
    else:
        c.node2.cut()
        time.sleep(15)
        c.node2.mend()
    finish(proc)
    print(f"node {fault}: the sweep ended {time.time() - faulted:.0f} s after the fault")  # docs/fault-tolerance.md
    cells = assert_cells_as_computed(client, tmp_path, name)
    resumed = cells[lost[0].data.tags["distnet.cell_id"]]
    assert resumed.info.run_id == lost[0].info.run_id and resumed.data.tags["distnet.restarts"] == "1"
    step = int(resumed.data.tags["distnet.resumed_from_step"])
    assert step > 0 and step % 30 == 0  # from a checkpoint, not from the start
    assert sum("distnet.resumed_from_step" in r.data.tags for r in cells.values()) == 1


@pytest.mark.parametrize("fault", ["restarted", "cut-off"])
def test_the_tracking_server_lost_for_a_while_mid_sweep(two_node_cluster, tmp_path, fault):
    """The tracking server stopped for 8 s and started again (cluster/mlflow_server.sh, PostgreSQL
    with it), or every link to its host cut for 12 s, once trainings have written their first
    records: the driver says the server is not answering and when it answers again (it asks every
    5 s, and waits 5 s for an answer: so long at least), the trainings wait and retry (none
    restarts; a training ran through the outage), and every cell's record equals its training
    computed here: nothing lost, nothing written twice, no cell with two runs."""
    c = two_node_cluster
    client = MlflowClient(c.mlflow)
    ids = c.node_ids().values()
    name = f"away-{fault}"  # the cluster's server holds the other fault's sweep too
    proc = distnet(c, tmp_path, "sweep", long_sweep(tmp_path, name))
    first_records(proc, lambda: any(running_on(client, name, i) for i in ids))
    away = time.time()
    if fault == "restarted":
        c.stop_server()
        time.sleep(8)
        c.start_server()
    else:
        c.tracker.cut()
        time.sleep(12)
        c.tracker.mend()
    back = time.time()
    out = finish(proc)
    print(f"server {fault}: the sweep ended {time.time() - back:.0f} s after it was back "
          f"({back - away:.0f} s away)")
    assert f"tracking server {c.mlflow} is not answering" in out
    assert re.search(rf"tracking server {re.escape(c.mlflow)} answers again after \d+ s", out)
    cells = assert_cells_as_computed(client, tmp_path, name)
    assert not any("distnet.restarts" in r.data.tags for r in cells.values())
    # A training wrote before the outage and after it (at every checkpoint, a few a second): it
    # held its records through it.
    stamps = [[m.timestamp / 1000 for m in client.get_metric_history(r.info.run_id, schema.BATCH_LOSS)]
              for r in cells.values()]
    assert any(min(t) < away and max(t) > back for t in stamps)


def test_a_node_lost_mid_training_resumes_when_it_rejoins(two_node_cluster, tmp_path):
    """A 2-worker `distnet train`, one worker on each host; the second host's Ray processes SIGKILLed
    after a checkpoint, and the host rejoins 5 s later: the training resumes on both hosts from that
    checkpoint (each rank's second attempt starts there) and ends equal to one process training the
    same config alone."""
    c = two_node_cluster
    cfg = {"name": "rejoin", "model": {"sizes": [784, 30, 30, 10]}, "train": {"epochs": 4, "momentum": 0.9},
           "data": {"train_limit": 3840, "eval_limit": 500, "dir": str(SHARED_DATA / "mnist")},
           "checkpoint": {"every": 20, "unit": "step"},  # 120 steps
           "ray": {"num_workers": 2, "storage_path": str(tmp_path / "storage")},
           "mlflow": {"experiment": "rejoin"}, "fault": {"trace": str(tmp_path / "trace")}}
    (tmp_path / "rejoin.yaml").write_text(yaml.safe_dump(cfg))
    client = MlflowClient(c.mlflow)
    ids = c.node_ids()
    proc = distnet(c, tmp_path, "train", "rejoin.yaml")
    first_records(proc, lambda: any(written_past(client, running_on(client, "rejoin", i), 20) for i in ids.values()))
    killed = time.time()
    hosts.end_processes(c.node2.pids)
    time.sleep(5)
    c.start_node2()
    finish(proc)
    print(f"node lost and back after 5 s: the training ended {time.time() - killed:.0f} s after the kill")
    exp = client.get_experiment_by_name("rejoin").experiment_id
    (two,) = client.search_runs([exp], "attributes.run_name = 'rejoin'")
    assert two.info.status == "FINISHED" and two.data.tags["distnet.restarts"] == "1"
    step = int(two.data.tags["distnet.resumed_from_step"])
    assert step > 0 and (step % 20 == 0 or step % 30 == 0)  # checkpoints: every 20 steps, each epoch's end (30)
    for rank in (0, 1):
        seen = [json.loads(line) for line in (tmp_path / "trace" / f"rank{rank}.jsonl").read_text().splitlines()]
        assert [a["first_step"] for a in seen] == [0, step]
    one_cfg = build_config({**cfg, "ray": {"num_workers": 1}, "fault": {}})
    recorded = RecordingSink()
    arrays = data.select(data.load_mnist(cfg["data"]["dir"]), "test", 3840, 500)
    worker.train(one_cfg, arrays, worker.WorkerEnv(device=torch.device("cpu")), recorded)
    records.assert_run_holds(client, two, recorded, 0, rtol=1e-5)  # two workers sum in another order


GPU_PLACEMENT = """
import json, os, sys
import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from distnet import launch
from distnet.config import build_config

ray.init(num_cpus=4, num_gpus=4, include_dashboard=False, log_to_driver=False)  # 4 declared GPUs
cfg = build_config({"model": {"sizes": [784, 30, 10]}, "ray": json.loads(sys.argv[1])})
bundles = launch.scaling_config(cfg).as_placement_group_factory().bundles
pg = ray.util.placement_group(bundles)
ray.get(pg.ready(), timeout=60)

@ray.remote
def visible():
    return os.environ.get("CUDA_VISIBLE_DEVICES")

workers = [i for i, b in enumerate(bundles) if b.get("GPU")]
seen = ray.get([visible.options(num_cpus=bundles[i]["CPU"], num_gpus=bundles[i]["GPU"],
                                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, i)).remote() for i in workers])
print(json.dumps({"bundles": bundles, "visible": seen, "concurrency": launch.default_concurrency(cfg)}))
"""


def placement(tmp_path: Path, ray_section: dict) -> dict:
    """What a Ray node with 4 declared GPUs reserves for the scaling distnet builds from `ray_section`,
    as Ray Train would reserve it: the bundles, each GPU worker's CUDA_VISIBLE_DEVICES, a sweep's lanes."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", GPU_PLACEMENT, json.dumps(ray_section)], env=env,
                          capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_gpu_config_reserves_one_gpu_per_worker_on_cpu_only_machine(tmp_path):
    """The use_gpu placement path without a GPU: ray.use_gpu=true, ray.num_workers=2 reserve a GPU for
    each worker; two workers sharing a GPU (ray.gpus_per_worker=0.5, gloo) half a GPU each; a sweep's
    lanes are as many as the GPUs hold."""
    out = placement(tmp_path, {"use_gpu": True, "num_workers": 2})
    workers = [b for b in out["bundles"] if b.get("GPU")]
    assert len(workers) == 2 and all(b["GPU"] == 1 and b["CPU"] == 1 for b in workers)
    assert sorted(out["visible"]) == sorted(set(out["visible"])) and len(out["visible"]) == 2  # one GPU each
    assert out["concurrency"] == 2  # a sweep runs 4 GPUs / 2 workers = 2 trainings at once
    shared = placement(tmp_path, {"use_gpu": True, "num_workers": 2, "gpus_per_worker": 0.5, "backend": "gloo"})
    workers = [b for b in shared["bundles"] if b.get("GPU")]
    assert len(workers) == 2 and all(b["GPU"] == 0.5 and b["CPU"] == 1 for b in workers)
    assert all(len(v.split(",")) == 1 for v in shared["visible"])  # a device each (a share of one)
    assert shared["concurrency"] == 4  # 4 GPUs / (2 workers x 0.5) trainings at once
