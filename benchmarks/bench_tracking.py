"""The tracking rows of `make bench`: what a grid search costs the MLflow store, and what the UI then costs.

    PYTHONPATH=benchmarks .venv/bin/python benchmarks/bench_tracking.py        # also run by bench.py

1. configs/depth_init_grid.yaml (216 cells, 10 epochs) into a fresh sqlite store, with the per-step
   series on (step tables + interval summaries) and off (`train.step_norms=false`: epoch metrics
   only): sweep wall time, store size (database + artifacts), metric rows and the largest run's rows
   (counted through MlflowClient), the most points of one series in one run.
2. The MLflow chart view's query for 100 runs on `grad_norm/w/layer_1` (get-history-bulk-interval,
   320 points, the UI's own request), through an `mlflow server` over that store: median of 3.
3. A 1000-cell sweep of tiny cells (`data.train_limit`, 1 epoch) into an MLflow server over
   PostgreSQL (cluster/mlflow_server.sh): wall time, and how many runs are complete (FINISHED, every
   step in the step table).
Prints one row per number and returns them for bench.py's table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import ray
from mlflow.tracking import MlflowClient

from distnet import launch, steptable, sweep, tracking, tracking_server
from distnet.ui import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def du(path: Path) -> int:
    """Bytes of a file, or of every file under a folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def rows_per_run(uri: str, run_ids: list[str]) -> tuple[list[int], int]:
    """Metric rows of each run and the most points of one series, through the client."""
    client = MlflowClient(uri)
    counts, most = [], 0
    for run_id in run_ids:
        n = 0
        for key in client.get_run(run_id).data.metrics:
            points = len(client.get_metric_history(run_id, key))
            n, most = n + points, max(most, points)
        counts.append(n)
    return counts, most


def grid_sweep(work: Path, overrides: list[str]) -> dict:
    work.mkdir(parents=True)
    uri = f"sqlite:///{work / 'mlruns.db'}"
    # As many lanes as `distnet sweep` starts on this machine by default (one per core), whatever
    # the logical CPUs the calling Ray declares.
    sw = sweep.load_sweep(ROOT / "configs" / "depth_init_grid.yaml",
                          [f"ray.storage_path={work / 'runs'}", f"sweep.max_concurrent={os.cpu_count()}", *overrides])
    start = time.perf_counter()
    result = launch.run_sweep(sw, uri, say=lambda *_: None)
    wall = time.perf_counter() - start
    assert result.trained == 216 and not result.failed
    run_ids = [r.run_id for r in result.rows]
    counts, most = rows_per_run(uri, run_ids)
    return {"wall_s": wall, "store_mb": (du(work / "mlruns.db") + du(work / "mlartifacts")) / 1e6,
            "tables_mb": sum(du(p) for p in (work / "mlartifacts").rglob("step_metrics")) / 1e6,
            "rows": sum(counts), "largest_run_rows": max(counts), "most_points": most, "uri": uri,
            "run_ids": run_ids}


def chart_query(uri: str, run_ids: list[str], reps: int = 3) -> float:
    """Seconds for the chart view's request of 100 runs' `grad_norm/w/layer_1` through a server."""
    port = free_port()
    log = Path(uri.removeprefix("sqlite:///")).with_suffix(".server.log")
    server = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", uri, "--workers", "1"],
                              stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        tracking_server.wait_for_server(base, log=log)
        query = "&".join([f"run_ids={r}" for r in run_ids[:100]] +
                         ["metric_key=grad_norm%2Fw%2Flayer_1", "max_results=320"])
        url = f"{base}/ajax-api/2.0/mlflow/metrics/get-history-bulk-interval?{query}"
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            body = json.loads(urllib.request.urlopen(url, timeout=600).read())
            times.append(time.perf_counter() - start)
        assert len({m["run_id"] for m in body["metrics"]}) == 100, "the query did not return 100 runs"
        return statistics.median(times)
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)


def pg_sweep(work: Path, cells: int) -> dict:
    """`cells` tiny cells (10 steps each) through cluster/mlflow_server.sh's PostgreSQL-backed server."""
    state = Path(tempfile.mkdtemp(prefix="dnpg", dir="/tmp"))
    state.chmod(0o755)
    port = free_port()
    env = {**os.environ, "MLFLOW": str(BIN / "mlflow"), "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(port),
           "PG_PORT": str(free_port())}
    script = ROOT / "cluster" / "mlflow_server.sh"
    try:
        subprocess.run(["bash", str(script), "start", str(state)], env=env, check=True, timeout=120)
        uri = f"http://127.0.0.1:{port}"
        tracking_server.wait_for_server(uri, log=state / "mlflow.log")
        seeds = cells // 8
        sw = sweep.build_sweep({
            "name": f"pg{cells}", "model": {"width": 16, "activation": "tanh"}, "train": {"epochs": 1},
            "data": {"train_limit": 1280, "eval_limit": 500},
            "ray": {"num_workers": 1, "storage_path": str(work / "pg-runs")}, "mlflow": {"experiment": "bench-pg"},
            "sweep": {"pack": 16},
            "grid": {"model.depth": [1, 2], "model.init": ["xavier_normal", "he_normal", "nielsen_scaled", "lecun_normal"],
                     "seed": list(range(seeds))}})
        start = time.perf_counter()
        result = launch.run_sweep(sw, uri, say=lambda *_: None)
        wall = time.perf_counter() - start
        client = MlflowClient(uri)
        complete = 0
        for run in tracking.child_runs(uri, result.parent_run_id):
            table = steptable.read(client, run.info.run_id)
            steps = table.get("step", np.array([]))
            complete += run.info.status == "FINISHED" and np.array_equal(steps, np.arange(10))
        return {"cells": len(sw.cells), "wall_s": wall, "complete": complete}
    finally:
        subprocess.run(["bash", str(script), "stop", str(state)], env=env, timeout=120)
        shutil.rmtree(state, ignore_errors=True)


def rows(work: Path, cells: int = 1000) -> list[tuple]:
    """Every tracking row; bench.py's format: (label, distnet, baseline, unit, ratio)."""
    on = grid_sweep(work / "on", [])
    off = grid_sweep(work / "off", ["train.step_norms=false"])
    query = chart_query(on["uri"], on["run_ids"])
    out = [
        ("depth_init_grid (216 cells): sweep wall time, per-step series on vs off (within 10% wanted)",
         f"{on['wall_s']:.0f}", f"{off['wall_s']:.0f}", "s", f"{(on['wall_s'] / off['wall_s'] - 1) * 100:+.1f}%"),
        ("depth_init_grid: store size, database + artifacts (<= 150 MB wanted)",
         f"{on['store_mb']:.1f}", f"{off['store_mb']:.1f}", "MB", ""),
        ("depth_init_grid: of which step tables (Parquet artifacts)", f"{on['tables_mb']:.1f}",
         f"{off['tables_mb']:.1f}", "MB", ""),
        ("depth_init_grid: metric rows in MLflow", str(on["rows"]), str(off["rows"]), "rows", ""),
        ("depth_init_grid: largest run's metric rows (<= 20k wanted)", str(on["largest_run_rows"]),
         str(off["largest_run_rows"]), "rows", ""),
        ("depth_init_grid: most points of one series in one run (<= 500 wanted)", str(on["most_points"]),
         str(off["most_points"]), "points", ""),
        ("MLflow chart query, 100 runs x grad_norm/w/layer_1 (get-history-bulk-interval; < 1 s wanted)",
         f"{query:.3f}", "", "s", ""),
    ]
    if cells:
        pg = pg_sweep(work, cells)
        out.append((f"{pg['cells']}-cell sweep into an MLflow server over PostgreSQL: wall time, runs complete",
                    f"{pg['wall_s']:.0f}", f"{pg['complete']}/{pg['cells']}", "s, runs", ""))
    for r in out:
        print(r, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", type=int, default=1000, help="cells of the PostgreSQL sweep (a multiple of 8; 0 skips it)")
    args = ap.parse_args()
    ray.init(num_cpus=os.cpu_count(), log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        table = rows(Path(tmp), args.cells)
    print("\n| row | distnet | baseline | unit | ratio |\n| --- | --- | --- | --- | --- |")
    for r in table:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
