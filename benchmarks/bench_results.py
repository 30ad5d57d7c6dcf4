"""A sweep as a DataFrame: `distnet.results` against `mlflow.search_runs` over the same cells.

    PYTHONPATH=benchmarks:tests .venv/bin/python benchmarks/bench_results.py [--cells 10530] [--store sqlite|server|both] [--repeat 3]

The sweep is bench_grid's big grid of tiny cells (depths 1-10 x 9 inits x 9 activations x seeds,
5 steps a cell, packs of 64), trained here into a fresh store: a sqlite file, and/or
cluster/mlflow_server.sh's server on PostgreSQL (its login in the environment, as on a cluster).
Each read runs in a process of its own, the two readers alternately, --repeat times: the wall time
of the call alone (imports aside, and MLflow's store set up first: a store's first use imports and
configures MLflow's SQLAlchemy models, 1.1 s here, in either reader), and the process's peak RSS
during it above its RSS before it.
Then the two frames are compared value for value on every column both have (tests/listing.py).
Prints one markdown table (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import ray
from mlflow.tracking import MlflowClient

from bench_grid import Server, big_sweep, timed
from listing import assert_same_as_listed

# One read in a fresh process: argv = reader, sweep name, parent run id, experiment id, where to
# leave the frame. Prints {"s": seconds of the call, "mb": peak RSS during it above the RSS before it}.
READ = """
import json, sys, time
import mlflow, pandas
import distnet.frames
reader, name, parent, exp, out = sys.argv[1:]
def kb(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":"))
mlflow.MlflowClient().search_experiments(max_results=1)  # MLflow's store up (its lazy imports: 1.1 s here)
open("/proc/self/clear_refs", "w").write("5")  # the peak RSS (VmHWM) reset: what the read adds
base = kb("VmRSS")
start = time.perf_counter()
if reader == "distnet.results":
    frame = distnet.frames.results(name)
else:
    frame = mlflow.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'")
seconds = time.perf_counter() - start
mb = (kb("VmHWM") - base) / 1024
frame.to_pickle(out)
print(json.dumps({"s": seconds, "mb": mb}))
"""
READERS = ("distnet.results", "mlflow.search_runs")


def read(reader: str, uri: str, name: str, parent: str, exp: str, out: Path) -> dict:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    proc = subprocess.run([sys.executable, "-c", READ, reader, name, parent, exp, str(out)], env=env,
                          capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def store_rows(store: str, uri: str, work: Path, cells: int, repeat: int) -> list[tuple]:
    work.mkdir(parents=True)
    os.chdir(work)  # a sqlite store's artifacts go under the working directory
    sw = big_sweep(work, cells)
    _, wall, result = timed(sw, uri)
    print(f"{store}: {len(sw.cells)} cells trained in {wall:.0f} s", flush=True)
    exp = MlflowClient(uri).get_run(result.parent_run_id).info.experiment_id
    runs: dict[str, list[dict]] = {r: [] for r in READERS}
    for _ in range(repeat):
        for r in READERS:
            runs[r].append(read(r, uri, sw.name, result.parent_run_id, exp, work / f"{r}.pkl"))
    ours, theirs = (pd.read_pickle(work / f"{r}.pkl") for r in READERS)
    compared = assert_same_as_listed(ours, theirs)
    sources = ours["source"].value_counts().to_dict()
    med = {r: {k: statistics.median(x[k] for x in runs[r]) for k in ("s", "mb")} for r in READERS}
    ratio = med[READERS[1]]["s"] / med[READERS[0]]["s"]
    n = len(sw.cells)
    return [
        (f"{store}: {n} cells as a DataFrame, wall time (median of {repeat})", f"{med[READERS[0]]['s']:.2f}",
         f"{med[READERS[1]]['s']:.2f}", "s", f"{ratio:.0f}x"),
        (f"{store}: peak memory of the read (process RSS above what it was before)", f"{med[READERS[0]]['mb']:.0f}",
         f"{med[READERS[1]]['mb']:.0f}", "MB", ""),
        (f"{store}: rows x columns", f"{len(ours)} x {ours.shape[1]}", f"{len(theirs)} x {theirs.shape[1]}", "", ""),
        (f"{store}: values equal in the columns both have", f"{compared} of {compared}", "", "values", ""),
        (f"{store}: rows read from", ", ".join(f"{k} {v}" for k, v in sources.items() if v), "", "", ""),
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", type=int, default=10530, help="cells of the grid (810 per seed)")
    ap.add_argument("--store", choices=["sqlite", "server", "both"], default="both")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    ray.init(num_cpus=os.cpu_count(), log_to_driver=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.store in ("sqlite", "both"):
            rows += store_rows("sqlite", f"sqlite:///{work / 'mlruns.db'}", work / "sqlite", args.cells, args.repeat)
        if args.store in ("server", "both"):
            with Server(work) as server:
                rows += store_rows("server", server.uri, work / "server", args.cells, args.repeat)
    print("\n| row | distnet.results | mlflow.search_runs | unit | ratio |\n| --- | --- | --- | --- | --- |")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
