"""Faults at random moments, from a seeded generator, on the namespaced cluster (tests/testcluster.py),
and the soak that runs sweeps under them: `make soak` (benchmarks/soak.py) for half an hour,
tests/test_soak.py for a couple of minutes. Each sweep is then checked whole: every cell FINISHED
once with one run, nothing RUNNING, every value equal to the cell's training computed without a
fault (tests/records.py).

The kinds (`KINDS`): a training worker SIGKILLed; a worker host lost (every Ray process of it
killed, back 5-20 s later); a worker host's link cut for 10-40 s; the tracking server stopped and
started again; PostgreSQL SIGKILLed (the postmaster and its backends) and started again; the sweep's
driver killed and the same command run again; the artifacts' file system full for 10-30 s. A new
fault comes every 15-30 s whatever the last is doing, so faults overlap and land in recoveries; one
target (a host, the server, the driver, the disk) takes one fault at a time. Each is logged with
its time, target and length, and with how long the sweep then took to make progress again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

import distnet
import hosts
import listing
import records
from disks import fill
from distnet import sweep
from testcluster import Cluster, wait_for

KINDS = ("worker-killed", "host-lost", "link-cut", "server-restarted", "postgres-killed", "driver-killed",
         "disk-full")
# Each kind's length in seconds (drawn uniformly), and the target it takes.
LENGTHS = {"worker-killed": (0, 0), "host-lost": (5, 20), "link-cut": (10, 40), "server-restarted": (5, 20),
           "postgres-killed": (2, 10), "driver-killed": (1, 5), "disk-full": (10, 30)}
PROGRESS = re.compile(r"cells: (\d+) done, \d+ running, (\d+) diverged, (\d+) failed")


@dataclasses.dataclass
class Fault:
    kind: str
    target: str
    at: float  # seconds since the soak's clock started
    length: float  # seconds from the fault to its repair
    ended: float = 0.0  # the repair's time (epoch seconds)
    recovered: float | None = None  # seconds from the repair until the sweep made progress again


class Driver:
    """`distnet sweep FILE` on the head, its lines stamped as they come; the injector kills it and
    runs the same command again. `progress` holds the times a cell was done."""

    def __init__(self, c: Cluster, workdir: Path, spec: Path):
        self.c, self.workdir, self.spec = c, workdir, spec
        self.lock = threading.Lock()
        self.proc: subprocess.Popen | None = None
        self.killed = False  # the running process was killed by a fault (it is being run again)
        self.starts = 0
        self.lines: list[tuple[float, str]] = []
        self.progress: list[float] = []
        self.done = False  # the sweep's command ended by itself with success: no fault touches it now

    def start(self) -> None:
        with self.lock:
            if self.done:
                return
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "distnet.cli", "sweep", str(self.spec), "--address", self.c.gcs,
                 "--tracking-uri", self.c.mlflow], cwd=self.workdir, env=self.c.env, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True, start_new_session=True)
            self.killed = False
            self.starts += 1
            threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()

    def _read(self, proc: subprocess.Popen) -> None:
        last = 0
        for line in proc.stdout:
            now = time.time()
            self.lines.append((now, line.rstrip()))
            if m := PROGRESS.search(line):
                ended = sum(int(g) for g in m.groups())
                if ended > last:
                    self.progress.append(now)
                last = ended

    def kill(self) -> str:
        with self.lock:
            if self.done:
                return "the sweep had ended"
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.killed = True
            return f"pid {self.proc.pid}"

    def wait(self) -> int:
        """Until the sweep's command ends by itself (not killed by a fault); its exit code."""
        while True:
            with self.lock:
                code = self.proc.poll()
                if code is not None and not self.killed:
                    self.done = code == 0
                    return code
            time.sleep(0.5)


class Injector:
    """Applies a fault every `gap` seconds (drawn from the seeded `rng`, as is every choice: which
    kind, which host, how long), each in a thread of its own, until stopped; `once`: each kind once,
    then no more. Lengths are scaled by `scale` (the short version's faults are shorter)."""

    def __init__(self, c: Cluster, driver: Driver, rng: random.Random, clock: float, gap=(15.0, 30.0),
                 scale: float = 1.0, once: bool = False):
        self.c, self.driver, self.rng, self.clock = c, driver, rng, clock
        self.gap, self.scale, self.once = gap, scale, once
        self.faults: list[Fault] = []
        self.busy: set[str] = set()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.deck: list[str] = []
        self.fired = 0
        self.threads: list[threading.Thread] = []
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        for t in self.threads:  # every fault repaired before the sweep is checked
            t.join()

    def _run(self) -> None:
        while not self.stop.wait(self.rng.uniform(*self.gap)):
            if self.once and self.fired >= len(KINDS):
                continue
            if not self.deck:
                self.deck = self.rng.sample(KINDS, len(KINDS))  # every kind as often as the others
            for i, kind in enumerate(self.deck):
                target = self._target(kind, self.rng.random())
                if target is not None:
                    del self.deck[i]
                    break
            else:
                continue  # every kind's target is taken: wait for the next moment
            length = self.rng.uniform(*LENGTHS[kind]) * self.scale
            self.fired += 1
            t = threading.Thread(target=self._apply, args=(kind, target, length), daemon=True)
            self.threads.append(t)
            t.start()

    def _target(self, kind: str, choice: float) -> str | None:
        """A free target for `kind`, taken (a worker host picked by `choice`; for a worker's kill, one
        that runs a training worker), or None."""
        with self.lock:
            if kind in ("worker-killed", "host-lost", "link-cut"):
                free = [h.hostname for h in self.c.workers if h.hostname not in self.busy
                        and (kind != "worker-killed" or training_workers(h))]
                target = free[int(choice * len(free))] if free else None
            else:
                target = {"server-restarted": "server", "postgres-killed": "server", "driver-killed": "driver",
                          "disk-full": "disk"}[kind]
                target = None if target in self.busy else target
            if target is not None:
                self.busy.add(target)
            return target

    def _apply(self, kind: str, target: str, length: float) -> None:
        at = time.time()
        fn = getattr(self, kind.replace("-", "_"))
        try:
            host = next((h for h in self.c.workers if h.hostname == target), None)
            said = fn(host, length) if host is not None else fn(length)
        except Exception as e:  # a fault that could not be applied or repaired is a finding
            said = f"failed: {type(e).__name__}: {e}"
            self.errors.append(f"{kind} on {target}: {said}")
            self.c.heal()  # the cluster whole again, so that the sweep can end and show the rest
        finally:
            with self.lock:
                self.busy.discard(target)
        ended = time.time()
        self.faults.append(Fault(kind, f"{target} {said}" if said else target, round(at - self.clock, 1),
                                 round(ended - at, 1), ended))

    # ---- the kinds
    def worker_killed(self, host, length) -> str:
        pids = training_workers(host)
        if not pids:
            return "no training worker left to kill"
        os.kill(pids[0], signal.SIGKILL)
        return f"pid {pids[0]}"

    def host_lost(self, host, length) -> None:
        hosts.end_processes(host.pids)
        time.sleep(length)
        self.c.start_node(host)

    def link_cut(self, host, length) -> None:
        host.cut()
        time.sleep(length)
        host.mend()

    def server_restarted(self, length) -> None:
        self.c.stop_server()
        time.sleep(length)
        self.c.start_server()

    def postgres_killed(self, length) -> str:
        postgres = hosts.process_trees(str(self.c.state / "pg"))
        for pid in postgres:
            os.kill(pid, signal.SIGKILL)
        # Gone, as a crashed server's processes are: killed, they are orphans that this machine's
        # init reaps a second or two later, and until then `pg_ctl status` takes the postmaster's
        # zombie for a running server and the script does not start PostgreSQL again (seen in a CI
        # run: the server stayed down and the sweep waited on it).
        wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in postgres), 60)
        time.sleep(length)
        self.c.start_server()  # idempotent: PostgreSQL again, the MLflow server left running
        return f"{len(postgres)} processes"

    def driver_killed(self, length) -> str:
        killed = self.driver.kill()
        time.sleep(length)
        self.driver.start()
        return killed

    def disk_full(self, length) -> None:
        filler = fill(self.c.artifacts)
        time.sleep(length)
        filler.unlink()


def training_workers(host: hosts.Host) -> list[int]:
    """The host's Ray Train worker processes (Ray names them after the actor class)."""
    return [pid for pid, cmd in host.processes().items() if "RayTrainWorker" in cmd]


def recoveries(faults: list[Fault], progress: list[float]) -> None:
    """Each fault's seconds from its repair until the next cell was done (None: none was after)."""
    for f in faults:
        after = [t for t in progress if t > f.ended]
        f.recovered = round(min(after) - f.ended, 1) if after else None


def soak_sweep(path: Path, name: str, seeds: int) -> Path:
    """The soak's sweep: depth 1 and 2 x `seeds` seeds, small cells of 20 steps each with a
    checkpoint every 5 (four intervals), packed 4 a job, a lane a worker host."""
    path.write_text(f"""name: {name}
model: {{width: 16, activation: tanh}}
data: {{train_limit: 1280, eval_limit: 200, dir: {Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'mnist'}}}
train: {{epochs: 2, log_every: 5, metric_points: 10}}
checkpoint: {{every: 5, unit: step}}
ray: {{num_workers: 1, storage_path: {path.parent / 'storage'}}}
mlflow: {{experiment: {name}}}
sweep: {{pack: 4, max_concurrent: 2}}
grid: {{model.depth: [1, 2], seed: [{", ".join(map(str, range(seeds)))}]}}
""")
    return path


def table(faults: list[Fault]) -> str:
    """Faults by kind: how many, their median length and median recovery."""
    def median(xs):
        xs = sorted(x for x in xs if x is not None)
        return f"{xs[len(xs) // 2]:.1f}" if xs else "-"
    rows = ["| fault | count | median length (s) | median s until progress again | never recovered before the sweep ended |",
            "| --- | --- | --- | --- | --- |"]
    for kind in KINDS:
        fs = [f for f in faults if f.kind == kind]
        rows.append(f"| {kind} | {len(fs)} | {median([f.length for f in fs])} | {median([f.recovered for f in fs])} | "
                    f"{sum(f.recovered is None for f in fs)} |")
    return "\n".join(rows)


def dump(faults: list[Fault], path: Path) -> None:
    path.write_text("".join(json.dumps(dataclasses.asdict(f)) + "\n" for f in faults))


@dataclasses.dataclass
class Round:
    """One sweep of the soak: its cells, wall time, faults, and how often its command ran."""
    name: str
    cells: int
    wall: float
    faults: list[Fault]
    starts: int  # the command's runs: 1, and one more after each driver kill
    reruns: int  # runs after it had ended by itself with an error: a person stepping in (target 0)
    errors: list[str]  # faults that could not be applied


def sweep_round(c: Cluster, workdir: Path, name: str, seeds: int, faults: dict | None, say=print) -> Round:
    """The soak's sweep `name`, under faults (`faults`: the Injector's settings; None: none), then
    checked whole (`check`). A command that ends with an error is run again (counted as a rerun)."""
    spec = soak_sweep(workdir / f"{name}.yaml", name, seeds)
    driver = Driver(c, workdir, spec)
    start = time.time()
    driver.start()
    reruns = 0
    injector = Injector(c, driver, clock=start, **faults) if faults is not None else None
    with injector or nullcontext():
        while (code := driver.wait()) != 0:
            reruns += 1
            say(f"{name}: the sweep's command ended with {code}; its last lines:\n" +
                "\n".join(line for _, line in driver.lines[-15:]))
            if reruns > 3:
                raise AssertionError(f"{name}: the sweep did not finish in {reruns} runs of its command")
            driver.start()
    wall = time.time() - start
    found = injector.faults if injector else []
    recoveries(found, driver.progress)
    c.heal()
    check(c, spec, name)
    return Round(name, 2 * seeds, round(wall, 1), found, driver.starts, reruns, injector.errors if injector else [])


def check(c: Cluster, spec: Path, name: str) -> None:
    """The whole store of the sweep: every cell FINISHED once with one run, no run of the
    experiment left RUNNING (the parent's neither), every cell's values as its training computes
    them without a fault, and distnet.results equal to MLflow's listing value for value. MLflow's
    fluent API must be pointed at the cluster's server ($MLFLOW_TRACKING_URI), as a user's is."""
    assert mlflow.get_tracking_uri() == c.mlflow, "MLFLOW_TRACKING_URI is not the cluster's server"
    client = MlflowClient(c.mlflow)
    records.assert_sweep_as_computed(client, sweep.load_sweep(spec), name)
    exp = client.get_experiment_by_name(name).experiment_id
    assert [r.info.run_id for r in client.search_runs([exp], "attributes.status = 'RUNNING'")] == []
    cells = distnet.results(name, tracking_uri=c.mlflow)
    listed = mlflow.search_runs([exp], "tags.`distnet.cell_id` != ''", max_results=50_000)
    listing.assert_same_as_listed(cells, listed)
    assert set(cells["status"]) == {"finished"}


def left_behind(c: Cluster) -> list[str]:
    """What the cluster left once it was ended: processes naming its folder or its GCS address, its
    namespaces."""
    netns = hosts.ip("netns", "list").stdout
    return ([f"process {p}" for p in hosts.process_trees(str(c.temp), c.gcs)] +
            [f"netns {h.netns}" for h in [*c.workers, c.tracker] if h.netns in netns])
