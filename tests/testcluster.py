"""A real Ray cluster on one machine for the cluster tests and the soak: a Ray head here, worker
hosts of their own (tests/hosts.py: each its own network namespace, address, hostname and /dev/shm,
no MNIST) and the tracking server (cluster/mlflow_server.sh: PostgreSQL and `mlflow server`) on a
host of its own. Everything is reached by the addresses of the links between them, never by
127.0.0.1; everything started is ended by process id. Needs root, `ip` and `unshare` (CI has them)."""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import hosts
from conftest import free_port
from distnet import tracking_server

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SCRIPT = ROOT / "cluster" / "mlflow_server.sh"
SHARED_DATA = ROOT.parent / "shared" / "data"
NO_DATA = [SHARED_DATA, Path.home() / ".cache" / "distnet"]  # what the other hosts lack: MNIST

# Ray's health checks of its nodes (GCS settings a cluster's head takes from its environment, as
# users set them): a lost node is declared dead after 3 missed checks a second apart, instead of
# Ray's default 5 of 3 s. The node-loss tests wait that long for Ray to notice.
HEALTH_CHECKS = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                 "RAY_health_check_failure_threshold": "3"}


def run(cmd, env, timeout=120, check=True):
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode:
        raise AssertionError(f"{cmd} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def wait_for(predicate, timeout: float):
    """predicate()'s first true answer within `timeout` seconds, else None."""
    end = time.time() + timeout
    while time.time() < end:
        if answer := predicate():
            return answer
        time.sleep(0.2)
    return None


@dataclasses.dataclass
class Cluster:
    """The cluster (see `namespaced_cluster`): addresses, the hosts, and what puts a fault right again."""
    env: dict  # the commands' environment: Ray's token, the server's login
    dashboard: str
    gcs: str
    mlflow: str
    workers: list[hosts.Host]
    tracker: hosts.Host
    temp: Path
    server_env: dict
    login: dict  # the server's login, as MLflow's clients take it from the environment
    joins: int = 0  # the worker hosts' (re)joins so far: each with a temp dir of its own

    @property
    def node2(self) -> hosts.Host:
        return self.workers[0]

    @property
    def state(self) -> Path:
        return self.temp / "mlflow"  # the tracking server's STATE_DIR

    @property
    def artifacts(self) -> Path:
        return self.state / "artifacts"  # the server's --artifacts-destination (the script's default)

    def start_server(self) -> None:
        run(self.tracker.command(["bash", str(SCRIPT), "start", str(self.state)], NO_DATA), self.server_env)

    def stop_server(self) -> None:
        run(["bash", str(SCRIPT), "stop", str(self.state)], self.server_env)

    def start_node(self, host: hosts.Host) -> None:
        """(Re)join a worker host to the cluster: its Ray node, a fresh temp dir each time."""
        run(host.command([str(BIN / "ray"), "start", "--address", self.gcs, "--node-ip-address",
                          host.address, "--num-cpus", "1", "--temp-dir",
                          str(self.temp / f"node-{host.hostname}-{self.joins}")], NO_DATA), self.env)
        self.joins += 1

    def start_node2(self) -> None:
        self.start_node(self.node2)

    def node_ids(self) -> dict[str, str]:
        """Address -> Ray node id of the cluster's live nodes."""
        out = run([str(BIN / "ray"), "list", "nodes", "--address", self.gcs, "--format", "json"], self.env).stdout
        return {n["node_ip"]: n["node_id"] for n in json.loads(out) if n["state"] == "ALIVE"}

    def heal(self) -> None:
        """Whatever an earlier test or fault broke, whole again: the links up, the server
        answering, every worker host's Ray in the cluster."""
        self.tracker.mend()
        for host in self.workers:
            host.mend()
        if not tracking_server.answers(self.mlflow):
            self.start_server()
            tracking_server.wait_for_server(self.mlflow, log=self.state / "mlflow.log")
        # Each look is a `ray list nodes` command (seconds): one where the cluster is whole.
        alive = self.node_ids()
        lost = [h for h in self.workers if h.address not in alive]
        for host in lost:
            hosts.end_processes(host.pids)  # what is left of the lost node's
            self.start_node(host)
        if lost:
            assert wait_for(lambda: len(self.node_ids()) == 1 + len(self.workers), 60), self.node_ids()


@contextmanager
def namespaced_cluster(workers: int = 1, head_cpus: int = 1, artifacts_mib: int | None = None):
    """A Ray head (`head_cpus` CPUs) here, `workers` worker hosts of 1 CPU each and the tracking
    server on a host of its own; with `artifacts_mib`, the server's artifacts on a tmpfs of that
    size (mounted before the server starts, so the server's mount namespace shares it: a test fills
    it from here). Ray's token is the cluster's own (a fresh machine has no ~/.ray/auth_token); the
    server's login is in the head's Ray environment (its jobs' drivers inherit it) and in the
    commands' `env`, as a user on the head has it; the worker hosts have none but what distnet hands
    them. Ends only what it started."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    temp = Path(tempfile.mkdtemp(prefix="dnray", dir="/tmp"))  # Ray's socket paths must stay short
    temp.chmod(0o755)  # the postgres user reaches its data directory inside
    mounted = None
    with hosts.extra_hosts(workers + 1) as (head_ip, made):
        *worker_hosts, tracker = made
        # The tracking host has ports of its own: the script's defaults (5000, PostgreSQL's 5432).
        server_env = {**env, "MLFLOW": str(BIN / "mlflow"), "MLFLOW_HOST": tracker.address}
        gcs, dash = free_port(), free_port()
        c = Cluster(env, f"http://{head_ip}:{dash}", f"{head_ip}:{gcs}", f"http://{tracker.address}:5000",
                    worker_hosts, tracker, temp, server_env, {})
        try:
            if artifacts_mib:
                c.artifacts.mkdir(parents=True)
                run(["mount", "-t", "tmpfs", "-o", f"size={artifacts_mib}m", "distnet-artifacts", str(c.artifacts)], env)
                mounted = c.artifacts
            c.start_server()
            c.login = tracking_server.Login.from_file(c.state / "credentials").environ()
            # Its agents on free ports: a Ray of this test session on the same host holds the
            # defaults (the job agent's 52365 among them), and `ray job submit` found no agent.
            agent_ports = [f"--{flag}={free_port()}" for flag in (
                "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                "metrics-export-port")]
            run([str(BIN / "ray"), "start", "--head", "--node-ip-address", head_ip, "--port", str(gcs),
                 "--dashboard-host", head_ip, "--dashboard-port", str(dash), "--num-cpus", str(head_cpus), *agent_ports,
                 "--temp-dir", str(temp / "head"), "--include-dashboard", "true"], {**env, **c.login, **HEALTH_CHECKS})
            for host in worker_hosts:
                c.start_node(host)
            tracking_server.wait_for_server(c.mlflow, log=c.state / "mlflow.log")
            c.env = {**env, **c.login}
            yield c
        finally:
            # The head's processes, its workers and jobs; and Ray's client server, which `ray start`
            # leaves an orphan whose command line names only the GCS address (seen outliving the
            # head by a minute, a SIGTERM ignored).
            hosts.end_process_trees(str(temp / "head"), c.gcs)
            c.stop_server()
            if mounted is not None:
                run(["umount", str(mounted)], env, check=False)
            shutil.rmtree(temp, ignore_errors=True)
