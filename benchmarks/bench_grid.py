"""Grid-scale rows of `make bench`: what distnet itself costs per cell, and a 10,000-cell sweep.

    PYTHONPATH=benchmarks .venv/bin/python benchmarks/bench_grid.py [--big 10530] [--only sqlite|server|big] [--server-workers N] [--repeat 3] [--server-auth basic|none] [--server-sgi gunicorn|uvicorn]

Tiny cells (5 steps each: `train.max_steps=5`, `data.train_limit=1280`, `eval_limit=500`, width 30),
so that what is left is distnet's own cost per cell:
1. per-cell cost: the slope of sweep wall time between a 192-cell and a 768-cell sweep (depths 1-4 x
   4 inits x seeds, packs of 16), into a local sqlite store (medians of --repeat sweeps of each size)
   and through the cluster's tracking server (cluster/mlflow_server.sh: PostgreSQL);
2. requests per cell, by endpoint, counted in the server's access log over the 768-cell sweep;
3. the time from the sweep's start to its first trained step (the earliest `grad_norm/w/layer_1`
   timestamp), for 16 cells and for the big grid;
4. the big grid (depths 1-10 x 9 inits x 9 activations x 13 seeds = 10,530 cells, packs of 64)
   through the server: wall time, driver peak memory, every cell FINISHED with every step in its
   step table, and `distnet report` on it.
Sweeps run in this process (Ray started here, one lane per core, as `distnet sweep` would).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import ray
from mlflow.tracking import MlflowClient

from distnet import launch, steptable, sweep, tracking, tracking_server
from distnet.ui import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STEPS = 5
TINY = {"model": {"width": 30, "activation": "tanh"}, "train": {"epochs": 1, "max_steps": STEPS, "log_every": STEPS},
        "data": {"train_limit": 1280, "eval_limit": 500}, "ray": {"num_workers": 1}}
INITS = ["xavier_normal", "he_normal", "lecun_normal", "nielsen_scaled"]
BIG_GRID = {"model.depth": list(range(1, 11)),
            "model.init": ["xavier_normal", "xavier_uniform", "he_normal", "he_uniform", "lecun_normal", "nielsen",
                           "nielsen_scaled", "orthogonal", "uniform_sqrt_n"],
            "model.activation": ["sigmoid", "tanh", "softsign", "relu", "leaky_relu", "elu", "selu", "softplus",
                                 "identity"]}
# An access-log line of the server (uvicorn or gunicorn): `... "POST /api/2.0/mlflow/runs/create HTTP/1.1" 200 ...`
REQUEST = re.compile(r'"(GET|POST|PUT|PATCH|DELETE) (/[^ ?"]*)')
# An artifact's path, less its experiment and run: `.../artifacts/1/<run id>/artifacts/step_metrics/x.parquet`
ARTIFACT = re.compile(r"/artifacts/\d+/[0-9a-f]{32}/artifacts/([^/]+).*")


def tiny_sweep(name: str, work: Path, cells: int) -> sweep.Sweep:
    """`cells` (a multiple of 16) tiny cells: depths 1-4 x 4 inits x cells/16 seeds, packs of 16."""
    return sweep.build_sweep({**TINY, "name": name, "mlflow": {"experiment": name},
                              "ray": {**TINY["ray"], "storage_path": str(work / "runs")}, "sweep": {"pack": 16},
                              "grid": {"model.depth": [1, 2, 3, 4], "model.init": INITS,
                                       "seed": list(range(cells // 16))}})


def big_sweep(work: Path, cells: int) -> sweep.Sweep:
    seeds = max(1, round(cells / 810))
    return sweep.build_sweep({**TINY, "name": f"grid{cells}", "mlflow": {"experiment": "grid"},
                              "ray": {**TINY["ray"], "storage_path": str(work / "runs")}, "sweep": {"pack": 64},
                              "grid": {**BIG_GRID, "seed": list(range(seeds))}})


def timed(sw: sweep.Sweep, uri: str) -> tuple[float, float, launch.SweepResult]:
    """Unix time of the start, wall time of the sweep, its result."""
    start = time.time()
    result = launch.run_sweep(sw, uri, say=lambda *_: None)
    assert result.trained == len(sw.cells) and not result.failed, result.failed[:3]
    return start, time.time() - start, result


def first_step(uri: str, parent: str) -> float:
    """Unix time of the sweep's first trained step: the earliest layer-1 gradient-norm value of the
    cells that started first (the loop logs it once its first steps are done)."""
    client = MlflowClient(uri)
    exp = client.get_run(parent).info.experiment_id
    early = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'", order_by=["attributes.start_time ASC"],
                               max_results=64)
    return min(m.timestamp for r in early for m in client.get_metric_history(r.info.run_id, "grad_norm/w/layer_1")) / 1000


class Server:
    """cluster/mlflow_server.sh's PostgreSQL-backed server on loopback, stopped on exit; with its
    login (`auth`: basic, as a cluster has it, or none) in this process's environment meanwhile,
    where the driver takes it and hands it to the trainings. `auth_cache_ttl`: the script's
    MLFLOW_AUTH_CACHE_TTL (0: the password checked at every request). `sgi`: the script's MLFLOW_SGI
    (gunicorn, as shipped, or uvicorn, MLflow's default)."""

    def __init__(self, work: Path, workers: int | None = None, auth: str = "basic", auth_cache_ttl: int | None = None,
                 sgi: str = "gunicorn"):
        self.state = Path(tempfile.mkdtemp(prefix="dnpg", dir="/tmp"))
        self.state.chmod(0o755)
        port = free_port()
        self.env = {**os.environ, "MLFLOW": str(BIN / "mlflow"), "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(port),
                    "PG_PORT": str(free_port())}
        if workers:  # else the script's default
            self.env["MLFLOW_WORKERS"] = str(workers)
        self.env["MLFLOW_AUTH"] = auth
        self.env["MLFLOW_SGI"] = sgi
        if auth_cache_ttl is not None:
            self.env["MLFLOW_AUTH_CACHE_TTL"] = str(auth_cache_ttl)
        self.login: dict[str, str] = {}
        self.uri = f"http://127.0.0.1:{port}"
        self.log = self.state / "mlflow.log"

    def __enter__(self):
        subprocess.run(["bash", str(ROOT / "cluster/mlflow_server.sh"), "start", str(self.state)], env=self.env,
                       check=True, timeout=120)
        tracking_server.wait_for_server(self.uri, log=self.log)
        if (self.state / "credentials").exists():
            self.login = tracking_server.Login.from_file(self.state / "credentials").environ()
            os.environ.update(self.login)
        return self

    def requests(self) -> collections.Counter:
        """Requests so far, by method and endpoint (an artifact's by its top folder or file)."""
        return collections.Counter(method + " " + ARTIFACT.sub(r"/artifacts/\1", path)
                                   for method, path in REQUEST.findall(self.log.read_text()))

    def cpu_seconds(self) -> float:
        """CPU time so far of the server's processes (its session: `mlflow server` and its
        worker), PostgreSQL's aside: what a request costs the head, less noisy than wall time."""
        sid, tick, total = int((self.state / "mlflow.pid").read_text()), os.sysconf("SC_CLK_TCK"), 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:  # ended meanwhile
                continue
            if int(fields[3]) == sid:  # the session id (field 6 of proc(5))
                total += int(fields[11]) + int(fields[12])  # utime + stime
        return total / tick

    def __exit__(self, *exc):
        for key in self.login:
            os.environ.pop(key, None)
        subprocess.run(["bash", str(ROOT / "cluster/mlflow_server.sh"), "stop", str(self.state)], env=self.env,
                       timeout=120)
        shutil.rmtree(self.state, ignore_errors=True)


def complete(uri: str, result: launch.SweepResult) -> int:
    """Cells FINISHED with every step in their step table (a diverged cell's up to its divergence),
    read back 8 at a time."""
    client = MlflowClient(uri)
    last = {r["run_id"]: int(r["status"].split("@")[1]) if "@" in r["status"] else STEPS - 1 for r in result.rows}

    def ok(run) -> bool:
        steps = steptable.read(client, run.info.run_id).get("step", np.array([]))
        return run.info.status == "FINISHED" and np.array_equal(steps, np.arange(last[run.info.run_id] + 1))

    with ThreadPoolExecutor(8) as pool:
        return sum(pool.map(ok, tracking.child_runs(uri, result.parent_run_id)))


def slope(times: dict[int, float]) -> float:
    (n1, t1), (n2, t2) = sorted(times.items())
    return (t2 - t1) / (n2 - n1)


def sqlite_rows(work: Path, repeat: int = 3) -> list[tuple]:
    """The slope between the medians of `repeat` sweeps of each size: one pair of single timings
    swings by 10 ms a cell between invocations here."""
    walls = {n: [timed(tiny_sweep(f"sq{n}-{i}", work / f"sq{n}-{i}", n), f"sqlite:///{work / f'sq{n}-{i}.db'}")[1]
                 for i in range(repeat)] for n in (192, 768)}
    sqlite = {n: statistics.median(w) for n, w in walls.items()}
    each = {n: ", ".join(f"{t:.1f}" for t in w) for n, w in walls.items()}
    return [(f"tiny sweep into sqlite: 192 / 768 cells, wall time (median of {repeat}: {each[192]} / {each[768]})",
             f"{sqlite[192]:.1f} / {sqlite[768]:.1f}", "", "s", ""),
            ("per-cell cost into sqlite (slope 192 -> 768 of the medians; <= 25 ms wanted, was ~85)",
             f"{slope(sqlite) * 1e3:.1f}", "85", "ms/cell", f"{85 / (slope(sqlite) * 1e3):.1f}x")]


def server_rows(work: Path, workers: int | None, auth: str = "basic", sgi: str = "gunicorn") -> list[tuple]:
    with Server(work, workers, auth, sgi=sgi) as server:
        start, _, result = timed(tiny_sweep("pg16", work / "pg16", 16), server.uri)
        first16 = first_step(server.uri, result.parent_run_id) - start
        served = {}
        for n in (192, 768):
            before, cpu = server.requests(), server.cpu_seconds()
            served[n] = timed(tiny_sweep(f"pg{n}", work / f"pg{n}", n), server.uri)[1]
            by_endpoint, cpu = server.requests() - before, server.cpu_seconds() - cpu
    per_cell = {k: v / 768 for k, v in by_endpoint.most_common()}
    how = f"{sgi}, {workers or 'default'} server worker(s), {'with its login' if auth == 'basic' else 'no login'}"
    return [
        (f"tiny sweep through the PostgreSQL-backed server ({how}): 192 / 768 cells, wall time",
         f"{served[192]:.1f} / {served[768]:.1f}", "", "s", ""),
        (f"per-cell cost through the server ({how}; slope; <= 60 ms wanted, was ~900)", f"{slope(served) * 1e3:.1f}",
         "900", "ms/cell", f"{900 / (slope(served) * 1e3):.1f}x"),
        (f"the server's CPU time per cell ({how}; 768-cell sweep; PostgreSQL aside)", f"{cpu / 768 * 1e3:.1f}", "",
         "ms/cell", ""),
        ("requests per cell through the server (768-cell sweep; <= 6 wanted, was 21)",
         f"{sum(per_cell.values()):.2f}", "21", "requests", ""),
        ("  of which, by endpoint", "; ".join(f"{k} {v:.2f}" for k, v in per_cell.items()), "", "", ""),
        ("time to the first trained step, 16-cell sweep (server)", f"{first16:.1f}", "", "s", ""),
    ]


def big_rows(work: Path, cells: int, workers: int | None = None) -> list[tuple]:
    sw = big_sweep(work, cells)
    with Server(work, workers) as server:
        start, wall, result = timed(sw, server.uri)
        first = first_step(server.uri, result.parent_run_id) - start
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        done = complete(server.uri, result)
        start = time.time()
        subprocess.run([str(BIN / "distnet"), "report", sw.name, "--tracking-uri", server.uri, "--out",
                        str(work / "report")], check=True, capture_output=True, timeout=3600)
        report_s = time.time() - start
        start = time.time()  # the same sweep again: every cell found finished in the listing
        again = launch.run_sweep(sw, server.uri, say=lambda *_: None)
        rerun_s = time.time() - start
        assert again.trained == 0 and [r["status"] for r in again.rows] == [r["status"] for r in result.rows]
    return [
        (f"{len(sw.cells)}-cell tiny sweep through the server: wall time (<= 900 s wanted)", f"{wall:.0f}", "", "s", ""),
        (f"{len(sw.cells)}-cell sweep: cells FINISHED with every step in their table (diverged: up to the divergence)",
         f"{done}/{len(sw.cells)}", f"{sum(r['status'].startswith('diverged') for r in result.rows)} diverged", "cells", ""),
        (f"{len(sw.cells)}-cell sweep: time to the first trained step", f"{first:.1f}", "", "s", ""),
        (f"{len(sw.cells)}-cell sweep: driver peak memory (this process, Ray's own processes aside)", f"{peak_mb:.0f}",
         "", "MB", ""),
        (f"distnet report on the {len(sw.cells)}-cell sweep (<= 120 s wanted)", f"{report_s:.0f}", "", "s", ""),
        (f"the {len(sw.cells)}-cell sweep run again (every cell finished: listed, summarised, nothing trained)",
         f"{rerun_s:.0f}", "", "s", ""),
    ]


def rows(work: Path, big: int = 10530, only: str | None = None, server_workers: int | None = None,
         repeat: int = 3, server_auth: str = "basic", server_sgi: str = "gunicorn") -> list[tuple]:
    parts = {"sqlite": lambda: sqlite_rows(work, repeat),
             "server": lambda: server_rows(work, server_workers, server_auth, server_sgi),
             "big": lambda: big_rows(work, big, server_workers) if big else []}
    out = []
    for name, part in parts.items():
        if only in (None, name):
            out += (got := part())
            for r in got:
                print(r, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--big", type=int, default=10530, help="cells of the big grid (810 per seed; 0 skips it)")
    ap.add_argument("--only", choices=["sqlite", "server", "big"], help="run one part")
    ap.add_argument("--server-workers", type=int, help="MLFLOW_WORKERS of the server (default: the script's)")
    ap.add_argument("--repeat", type=int, default=3, help="sqlite sweeps of each size, for medians (default 3)")
    ap.add_argument("--server-auth", choices=["basic", "none"], default="basic",
                    help="the server's login (MLFLOW_AUTH of cluster/mlflow_server.sh; default basic, as a cluster has it)")
    ap.add_argument("--server-sgi", choices=["gunicorn", "uvicorn"], default="gunicorn",
                    help="what serves the server (MLFLOW_SGI of cluster/mlflow_server.sh; default gunicorn, as shipped)")
    args = ap.parse_args()
    ray.init(num_cpus=os.cpu_count(), log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        table = rows(Path(tmp), args.big, args.only, args.server_workers, args.repeat, args.server_auth, args.server_sgi)
    print("\n| row | distnet | before | unit | ratio |\n| --- | --- | --- | --- | --- |")
    for r in table:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
