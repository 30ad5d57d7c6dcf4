"""`ray up`, `ray submit` and `ray down` with cluster/local.yaml, the way the README tells a user with
machines of their own to run distnet: two hosts of their own (tests/hosts.py), each an SSH server
with its own processes, home and /tmp; this machine is the user's, running Ray's cluster launcher.

What the test changes in cluster/local.yaml (`launcher_file`), and why: the hosts' addresses, the
ssh user (root) and key; one worker host, not two; no `apt-get` (PostgreSQL is installed, there is
no network) and no `pip install`: the file's virtual environment is this machine's installed one
(a link at ~/distnet-env), and the hosts import distnet from what `ray up` shipped (PYTHONPATH in
their ~/.bashrc). MNIST is in each host's ~/.cache/distnet as `distnet data download` leaves it (no
network), and `distnet data verify` checks it there. The folder the file wants every machine to
mount at /mnt/shared is one folder of this machine, bound there on both hosts (as NFS would be).
Every other command runs as the file has it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

import hosts
from conftest import http_status
from distnet import steptable, tracking_server

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.namespaces, pytest.mark.ray]
BIN = Path(sys.executable).parent
VENV = BIN.parent
MNIST = ROOT.parent / "shared" / "data" / "mnist"


def launcher_file(workdir: Path, head: hosts.Host, worker: hosts.Host, key: Path) -> Path:
    """cluster/local.yaml with the test's changes (the module's docstring says which and why)."""
    cfg = yaml.safe_load((ROOT / "cluster" / "local.yaml").read_text())
    cfg["cluster_name"] = f"distnet-test-{head.netns}"  # the launcher's state files are named by it
    cfg["provider"].update(head_ip=head.address, worker_ips=[worker.address])
    cfg["auth"] = {"ssh_user": "root", "ssh_private_key": str(key)}
    cfg["min_workers"] = cfg["max_workers"] = 1
    install = f"ln -sfn {VENV} ~/distnet-env"  # the environment the file's pip install makes, made
    cfg["setup_commands"] = [install if "pip install" in c else c for c in cfg["setup_commands"]]
    cfg["head_setup_commands"] = [c for c in cfg["head_setup_commands"] if "apt-get" not in c and "pip install" not in c]
    path = workdir / "cluster" / "test-local.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def shared_python() -> list[Path]:
    """The installed environment and the Python it runs on, where the hosts' own home and /tmp
    would hide them (pyenv's in the home; a checkout in /tmp): tests/hosts.py shows them there."""
    return [p for p in (Path(sys.base_prefix).resolve(), VENV.resolve())
            if p.is_relative_to(Path.home()) or p.is_relative_to("/tmp")]


@pytest.fixture
def ssh_hosts(tmp_path):
    """(head, worker, key, root): two hosts serving SSH to `key`, MNIST only in their home's cache.
    `root`/HOSTNAME/home is a host's home; `root`/nfs the folder both mount at /mnt/shared."""
    if os.geteuid() != 0 or not all(shutil.which(c) for c in ("ip", "unshare", "rsync", "/usr/sbin/sshd")):
        pytest.fail("ray up's hosts need root, ip, unshare, rsync and sshd (make test installs them; CI runs as root)")
    root = Path(tempfile.mkdtemp(prefix="dnup", dir="/tmp"))  # Ray's socket paths must stay short
    root.chmod(0o755)
    key = root / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    try:
        nfs = root / "nfs"  # the folder both hosts mount at /mnt/shared, as cluster/local.yaml wants one
        nfs.mkdir()
        with hosts.extra_hosts(2) as (_, (head, worker)):
            servers = []
            for host in (head, worker):
                home = root / host.hostname / "home"
                (home / ".cache" / "distnet").mkdir(parents=True)
                shutil.copytree(MNIST, home / ".cache" / "distnet" / "mnist")
                (home / ".bashrc").write_text("export PYTHONPATH=$HOME/distnet\n")
                servers.append(host.serve_ssh(root / host.hostname, (key.with_suffix(".pub")).read_text(),
                                              hide=[ROOT.parent / "shared"], share=shared_python(),
                                              mnt={"shared": nfs}))
            before = set(Path("/tmp").glob("ray_ssh_*")) | set(Path("/tmp").glob("ray_ssh_*/*"))
            try:
                yield head, worker, key, root
            finally:
                for server in servers:
                    server.kill()
                    server.wait()
                # The launcher's SSH connection masters (ControlPersist) and their sockets: Ray
                # keeps them in /tmp/ray_ssh_<user>/<cluster>, whatever TMPDIR says.
                for made in set(Path("/tmp").glob("ray_ssh_*/*")) - before:
                    hosts.end_process_trees(str(made))
                    shutil.rmtree(made, ignore_errors=True)
                for made in set(Path("/tmp").glob("ray_ssh_*")) - before:
                    shutil.rmtree(made, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def monitor_log(host_root: Path) -> str:
    """The head autoscaler's log (how it set the worker up), for a failure's message."""
    logs = sorted((host_root / "tmp" / "ray").glob("session_2*/logs"))  # session_latest links to the host's /tmp
    return "\n".join(f"== {p.name}\n" + p.read_text()[:6000] for p in logs[-1].glob("monitor*")) if logs else "(no Ray session)"


def launcher(*args: str, cwd: Path, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / "ray"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"ray {args[0]} -> {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    return proc


def ray_processes(host: hosts.Host) -> list[str]:
    """The command lines of the host's Ray processes (its raylet, GCS, workers)."""
    return [cmd for cmd in host.command_lines() if re.search(r"raylet|gcs_server|ray::", cmd)]


def test_ray_up_submit_down_on_two_hosts(ssh_hosts, tmp_path, monkeypatch):
    """The README's cluster commands from a user's machine (this one) to two hosts over SSH:
    `ray up` (the head's setup, tracking server and Ray; the head's autoscaler then sets the worker
    up over SSH), `ray submit` of a sweep through cluster/submit_entry.py, `ray down`. Every cell is
    FINISHED on the head's tracking server with its whole step table, the trainings ran on both
    hosts (the checkpoints of the worker's in the shared folder), the cluster's Ray answers only
    with the user's token, the checkout's ignored files stayed here, and `ray down` ended Ray on
    both hosts."""
    head, worker, key, root = ssh_hosts
    work = tmp_path / "checkout"  # the user's checkout, with an environment of its own that must stay here
    shutil.copytree(ROOT, work, ignore=shutil.ignore_patterns(".venv", ".git", "*.db", "mlruns", "mlartifacts",
                                                              "distnet_runs", "__pycache__", ".pytest_cache"))
    (work / ".venv").mkdir()
    (work / ".venv" / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (work / "configs" / "up_sweep.yaml").write_text("""name: upsweep
model: {width: 20, activation: tanh}
data: {train_limit: 3840, eval_limit: 300}
train: {epochs: 20}  # 600 steps, seconds a job: both lanes are up before one lane could take them all
ray: {num_workers: 1, cpus_per_worker: 2}  # one training a host
mlflow: {experiment: upsweep}
sweep: {pack: 1, max_concurrent: 2}
grid: {model.depth: [1, 2], seed: [0, 1]}
""")
    cluster = launcher_file(work, head, worker, key)
    laptop = root / "laptop"  # the user's home: the launcher's state, cached configs, Ray's token
    laptop.mkdir()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "HOME": str(laptop), "RAY_TMPDIR": str(laptop),
           "RAY_USAGE_STATS_ENABLED": "0",  # the launcher reports nothing anywhere
           "TMPDIR": str(laptop)}
    for k in (tracking_server.USERNAME, tracking_server.PASSWORD, "MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RAY_AUTH_MODE",
              "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(k, None)
    token = launcher("get-auth-token", "--generate", cwd=work, env=env).stdout.strip()
    started = time.time()
    launcher("up", "-y", "--no-config-cache", str(cluster), cwd=work, env=env)
    up_s = time.time() - started
    # `ray up` returns once the head is up; the head's autoscaler then sets the worker up over SSH.
    # The user waits for it with `ray exec` on the head, until the cluster has both nodes.
    count = "python -c 'import ray; ray.init(address=\"auto\"); print(\"alive:\", sum(n[\"Alive\"] for n in ray.nodes()))'"
    deadline = time.time() + 300
    while "alive: 2" not in launcher("exec", str(cluster), count, cwd=work, env=env).stdout:
        assert time.time() < deadline, monitor_log(root / head.hostname)
        time.sleep(3)
    both_s = time.time() - started
    jobs = f"http://{head.address}:8265/api/jobs/"
    assert [http_status(jobs, {"Authorization": f"Bearer {t}"} if t else {}) for t in (None, "0" * 32, token)] == [
        401, 403, 200]

    started = time.time()
    out = launcher("submit", str(cluster), "cluster/submit_entry.py", "sweep", "configs/up_sweep.yaml", cwd=work,
                   env=env).stdout
    submit_s = time.time() - started
    assert "sweep upsweep: 4 cells, 0 already finished, 4 to train" in out
    for key_, value in tracking_server.Login.from_file(root / head.hostname / "home" / "mlflow" / "credentials").environ().items():
        monkeypatch.setenv(key_, value)
    client = MlflowClient(f"http://{head.address}:5000")
    exp = client.get_experiment_by_name("upsweep")
    cells = client.search_runs([exp.experiment_id], "tags.`distnet.cell_id` != ''")
    assert len(cells) == 4 and all(r.info.status == "FINISHED" for r in cells)
    assert len({r.data.tags["distnet.ray_node"] for r in cells}) == 2  # trainings on both hosts
    for r in cells:
        assert steptable.read(client, r.info.run_id)["step"].tolist() == list(range(600))
        assert "config.yaml" in {a.path for a in client.list_artifacts(r.info.run_id)}
    assert list((root / "nfs" / "distnet" / "distnet_runs").glob("upsweep-*"))  # the lanes' checkpoints, shared
    assert not (root / head.hostname / "home" / "distnet" / ".venv").exists()  # .gitignore'd: not shipped

    started = time.time()
    launcher("down", "-y", str(cluster), cwd=work, env=env)
    # `ray down` stops the head's Ray; the worker's ends by itself once it has lost the head (about
    # two minutes: cluster/README.md), and with the host here.
    assert not ray_processes(head)
    print(f"ray up {up_s:.0f} s (both nodes up {both_s:.0f} s), ray submit of 4 cells {submit_s:.0f} s, "
          f"ray down {time.time() - started:.0f} s")
