"""What the tracking server's login costs: requests a second through cluster/mlflow_server.sh's
PostgreSQL-backed server without a login (MLFLOW_AUTH=none), with MLflow's basic-auth app checking
the password at every request (MLFLOW_AUTH_CACHE_TTL=0), and as the script serves it (the check
cached for 60 s per login and server worker).

    PYTHONPATH=benchmarks .venv/bin/python benchmarks/bench_auth.py [--requests 200] [--repeat 3]

Each measurement: `--requests` calls of MLflow's client from 4 threads at once (distnet's
SERVER_CONCURRENCY, as one rank 0 or the driver writes): `log_batch` of 10 metric values into runs
made beforehand, and `get_run`; the median of `--repeat` measurements. The grid-scale cost with the
login on is bench_grid.py's server rows (`--only server`), which run with it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from bench_grid import Server
from distnet import tracking

ARMS = {"no login (MLFLOW_AUTH=none)": {"auth": "none"},
        "basic auth, password checked at every request (cache TTL 0)": {"auth": "basic", "auth_cache_ttl": 0},
        "basic auth as shipped (cache TTL 60 s)": {"auth": "basic"}}


def rate(call, n: int) -> float:
    """Calls a second, `n` calls from SERVER_CONCURRENCY threads."""
    start = time.perf_counter()
    with ThreadPoolExecutor(tracking.SERVER_CONCURRENCY) as pool:
        list(pool.map(call, range(n)))
    return n / (time.perf_counter() - start)


def measure(work: Path, arm: dict, n: int, repeat: int) -> dict[str, float]:
    with Server(work, **arm) as server:
        client = MlflowClient(server.uri)
        exp = client.create_experiment("auth-bench")
        runs = [client.create_run(exp).info.run_id for _ in range(16)]
        ts = int(time.time() * 1000)

        def write(i: int) -> None:
            client.log_batch(runs[i % len(runs)], metrics=[Metric(f"m{j}", 0.5, ts, i) for j in range(10)])

        def read(i: int) -> None:
            client.get_run(runs[i % len(runs)])

        rate(write, 40)  # warm: connections, the server's caches
        return {"log_batch": statistics.median(rate(write, n) for _ in range(repeat)),
                "get_run": statistics.median(rate(read, n) for _ in range(repeat))}


def rows(work: Path, n: int = 200, repeat: int = 3) -> list[tuple]:
    """`make bench`'s rows: each arm's requests a second, and against the server without a login."""
    got = {name: measure(work, arm, n, repeat) for name, arm in ARMS.items()}
    base = got[next(iter(ARMS))]
    return [(f"tracking server, {name}: {call} from 4 threads (median of {repeat} x {n})", f"{r[call]:.0f}",
             f"{base[call]:.0f}", "requests/s", f"{r[call] / base[call]:.2f}x of no login")
            for name, r in got.items() for call in ("log_batch", "get_run")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        table = rows(Path(tmp), args.requests, args.repeat)
    print("\n| row | distnet | no login | unit | ratio |\n| --- | --- | --- | --- | --- |")
    for r in table:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
