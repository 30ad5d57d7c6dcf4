"""`make bench`: distnet against its peers, same machine, one invocation; prints one markdown table.

    PYTHONPATH=benchmarks .venv/bin/python benchmarks/bench.py --reps 3

Peers: Ray Train's getting-started loop (benchmarks/ray_peer.py: TorchTrainer + DataLoader +
prepare_data_loader + prepare_model) for one training, and one Ray Tune trial per cell
(benchmarks/bench_sweep.py) for a sweep. Every number is the median of --reps repetitions; an
epoch time is the median over epochs 2.. of one training (epoch 1 includes warm-up). Epoch times
count the training steps only, on both sides: distnet's `perf/epoch_s` (rank 0, gradient norms of
every layer every step included, the epoch-end evaluation and probe excluded) and the peer's loop.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
from mlflow.tracking import MlflowClient
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from distnet import data, launch, metrics, schema, tracking
from distnet.config import build_config, merge, nest

import bench_auth
import bench_jacobian
import bench_grid
import bench_sweep
import bench_tracking
import ray_peer

ROOT = Path(__file__).resolve().parents[1]
SMALL, DEEP = [784, 30, 10], [784] + [100] * 5 + [10]
EPOCHS = 3


def median_epoch(times: list[float]) -> float:
    return statistics.median(times[1:] or times)


def distnet_run(work: Path, sizes: list[int], workers: int, overrides: dict | None = None) -> dict:
    """One `distnet train` through launch.run_training on the running Ray; its perf/ metrics."""
    raw = {"name": "bench", "model": {"sizes": sizes, "activation": "sigmoid", "init": "xavier_normal"},
           "train": {"epochs": EPOCHS, "lr": 0.5},
           "ray": {"num_workers": workers, "storage_path": str(work / "runs")}, "mlflow": {"experiment": "bench"}}
    raw = merge(raw, nest(overrides or {}))
    uri = f"sqlite:///{work / 'bench.db'}"
    result = launch.run_training(build_config(raw), uri, show_progress=False, say=lambda *_: None)
    client = MlflowClient(uri)
    run = result.run_ids[0]
    epochs = [m.value for m in sorted(client.get_metric_history(run, "perf/epoch_s"), key=lambda m: m.step)]
    rss = max(m.value for m in client.get_metric_history(run, "perf/max_rss_mb"))
    return {"epoch_s": median_epoch(epochs), "rss_mb": rss, "population": len(result.run_ids)}


def peer_run(work: Path, sizes: list[int], workers: int, data_ref) -> dict:
    config = {"sizes": sizes, "activation": "sigmoid", "init": "xavier_normal", "seed": 0, "lr": 0.5,
              "epochs": EPOCHS, "batch_size": 128, "data": [data_ref]}
    m = TorchTrainer(ray_peer.train_func, train_loop_config=config, scaling_config=ScalingConfig(num_workers=workers),
                     run_config=RunConfig(storage_path=str(work / "peer"))).fit().metrics
    return {"epoch_s": median_epoch(m["epoch_s"]), "rss_mb": m["max_rss_mb"]}


def medians(fn, reps: int) -> dict:
    runs = [fn() for _ in range(reps)]
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def startup(reps: int, work: Path) -> tuple[float, float]:
    """Seconds from the command to the first training steps: `distnet train` (the first interval
    summary of its gradient norms carries the wall-clock time it was handed over, 10 steps in) and
    the peer as a script (it reports its first step)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "benchmarks")}
    env.pop("RAY_ADDRESS", None)
    ours, theirs = [], []
    for rep in range(reps):
        db = work / f"startup{rep}.db"
        start = time.time()
        subprocess.run([sys.executable, "-m", "distnet.cli", "train", "--tracking-uri", f"sqlite:///{db}",
                        str(ROOT / "configs/default.yaml"), "train.epochs=1", "ray.num_workers=1",
                        f"ray.storage_path={work / 'runs'}"], check=True, env=env, capture_output=True)
        client = MlflowClient(f"sqlite:///{db}")
        run = client.search_runs(client.search_experiments()[0].experiment_id)[0]
        first = min(m.timestamp for m in client.get_metric_history(run.info.run_id, "grad_norm/w/layer_1"))
        ours.append(first / 1000 - start)
        start = time.time()
        out = subprocess.run([sys.executable, str(ROOT / "benchmarks/ray_peer.py"), "--epochs", "1"],
                             check=True, env=env, capture_output=True, text=True).stdout
        theirs.append(json.loads(out.strip().splitlines()[-1])["first_step_unix"] - start)
    return statistics.median(ours), statistics.median(theirs)


def mlflow_cost(work: Path, step_s: float) -> tuple[float, float]:
    """Microseconds per training step that rank 0 spends handing one member's per-step records
    ([784,30,10]: 4 gradient norms and the batch loss) to its sink, as the loop does every 10 steps,
    with their interval summaries (50 points an epoch-long run), and writing them: one epoch's step
    table part and MLflow metrics, sqlite store."""
    uri = f"sqlite:///{work / 'cost.db'}"
    cfg = build_config({"model": {"sizes": SMALL}, "ray": {"num_workers": 1}, "mlflow": {"experiment": "cost"}})
    sink = tracking.MlflowSink(uri, cfg, tracking.create_runs(uri, cfg))
    names = metrics.step_names(2)
    rows, active = np.ones((10, 1)), np.ones((10, 1), dtype=bool)
    every = metrics.interval(468, 50)
    start = time.perf_counter()
    for first in range(0, 468, 10):
        sink.log_steps(list(range(first, first + 10)), {n: rows for n in names}, active)
        if first % every == 0:
            sink.log(first, {n: rows[0] for n in names} | {schema.max_name(n): rows[0] for n in names}, active[0])
    sink.flush()
    per_step = (time.perf_counter() - start) / 468
    return per_step * 1e6, per_step / step_s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    reps, rows = args.reps, []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ours_start, peer_start = startup(reps, work)  # before this process starts its own Ray
        # 4 logical CPUs on the 2 cores, as bench_sweep needs for two Tune trials and their workers;
        # every other row runs one training at a time.
        ray.init(num_cpus=4, log_to_driver=False)
        arrays = data.select(data.load_mnist(), "test", None, None)
        data_ref = ray.put(arrays)

        def row(label, ours, theirs, unit="s/epoch", better="lower"):
            ratio = theirs / ours if better == "lower" else ours / theirs
            rows.append((label, f"{ours:.3f}", f"{theirs:.3f}", unit, f"{ratio:.2f}x"))
            print(rows[-1], flush=True)

        d = {}
        for sizes, name in ((SMALL, "[784,30,10]"), (DEEP, "[784,100x5,10]")):
            for w in (1, 2):
                d[name, w] = medians(lambda: distnet_run(work, sizes, w), reps)
                peer = medians(lambda: peer_run(work, sizes, w, data_ref), reps)
                row(f"{name}, {w} worker{'s' * (w > 1)}: distnet vs Ray getting-started loop",
                    d[name, w]["epoch_s"], peer["epoch_s"])
                if w == 1:
                    row(f"{name}, peak memory per worker (MB): distnet vs peer", d[name, 1]["rss_mb"],
                        peer["rss_mb"], "MB")
            row(f"{name}, 2 workers vs 1 worker (distnet; <= 1.3 wanted)", d[name, 2]["epoch_s"],
                d[name, 1]["epoch_s"], "s/epoch", better="higher")
        gloo = medians(lambda: distnet_run(work, SMALL, 2, {"ray.all_reduce": "torch"}), reps)
        row("[784,30,10], 2 workers: shared-memory all-reduce vs gloo (distnet both)", d["[784,30,10]", 2]["epoch_s"],
            gloo["epoch_s"])
        off = medians(lambda: distnet_run(work, SMALL, 1, {"train.step_norms": False}), reps)["epoch_s"]
        on = d["[784,30,10]", 1]["epoch_s"]
        rows.append(("[784,30,10], 1 worker: per-step gradient norms on vs off (cost, <= 5% wanted)",
                     f"{on:.3f}", f"{off:.3f}", "s/epoch", f"{(on / off - 1) * 100:+.1f}%"))
        print(rows[-1], flush=True)
        # Populations use the whole machine (one worker, 2 CPUs), the solo reference too.
        solo = None
        for P in (1, 16, 64):
            pop = [{"seed": s} for s in range(P)] if P > 1 else []
            r = medians(lambda: distnet_run(work, SMALL, 1, {"ray.cpus_per_worker": 2, "population": pop}), reps)
            rate = P / r["epoch_s"]
            solo = solo or rate
            row(f"[784,30,10], population P={P}, 1 worker of 2 CPUs: member-epochs/s vs solo", rate, solo,
                "member-epochs/s", better="higher")
        cost_us, share = mlflow_cost(work, on / 468)
        rows.append(("Step table + MLflow, 1 member's per-step records (5 values), handed over and written",
                     f"{cost_us:.0f}", "", "us/step", f"{share * 100:.1f}% of a step"))
        rows.append(("start-up, command to first step: distnet train vs peer script", f"{ours_start:.1f}",
                     f"{peer_start:.1f}", "s", f"{peer_start / ours_start:.2f}x"))
        sweeps = {"one lane": [], "two lanes": [], "tune": []}
        for _ in range(reps):
            with tempfile.TemporaryDirectory(dir=work) as sub:
                sweeps["one lane"].append(bench_sweep.run_distnet(Path(sub) / "one", lanes=1))
                sweeps["two lanes"].append(bench_sweep.run_distnet(Path(sub) / "two", lanes=2))
                sweeps["tune"].append(bench_sweep.run_tune(Path(sub), data_ref))
        tune = statistics.median(sweeps["tune"])
        for name, what in (("one lane", "1 lane of 2 CPUs"), ("two lanes", "2 lanes of 1 CPU")):
            row(f"24-cell sweep: distnet sweep ({what}) vs one Tune trial per cell, 2 at once (cells/hour)",
                24 * 3600 / statistics.median(sweeps[name]), 24 * 3600 / tune, "cells/hour", better="higher")
        rows += bench_tracking.rows(work)
        rows += bench_auth.rows(work)  # what the tracking server's login costs a request
        rows += bench_jacobian.rows()  # what train.jacobian costs an epoch
        rows += bench_grid.rows(work)  # grid scale: per-cell cost, requests per cell, a 10,530-cell sweep
    print("\n| row | distnet | peer / baseline | unit | ratio |\n| --- | --- | --- | --- | --- |")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
