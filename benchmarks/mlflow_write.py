"""MLflow metric writes into a sqlite store: distnet's `tracking.write_metrics` vs MLflow's `log_batch`.

    .venv/bin/python benchmarks/mlflow_write.py [--reps 3]

Writes what the flush of a 12-member sweep job writes at [784, 30, 10]: into each of 12 fresh runs,
469 steps x 4 per-layer norms (22.5k values in all), each way; prints the microseconds per value of
each repetition and their medians.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from mlflow.tracking import MlflowClient

from distnet import tracking


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    reps = ap.parse_args().reps
    with tempfile.TemporaryDirectory() as tmp:
        client = MlflowClient(f"sqlite:///{tmp}/bench.db")
        exp = client.create_experiment("write")
        values = [(f"grad_norm/{p}/layer_{j}", 0.1 * s, 1000 + s, s) for s in range(469) for j in (1, 2)
                  for p in ("w", "b")]
        times = {"write_metrics": [], "log_batch": []}
        for _ in range(reps):
            for name, write in (("write_metrics", tracking.write_metrics), ("log_batch", tracking._log_batches)):
                run_ids = [client.create_run(exp).info.run_id for _ in range(12)]
                start = time.perf_counter()
                for run_id in run_ids:
                    write(client, run_id, values)
                times[name].append((time.perf_counter() - start) / (12 * len(values)) * 1e6)
        for name, ts in times.items():
            print(f"{name}: {' '.join(f'{t:.1f}' for t in ts)} us/value, median {statistics.median(ts):.1f}")
        print(f"log_batch / write_metrics: {statistics.median(times['log_batch']) / statistics.median(times['write_metrics']):.1f}x")


if __name__ == "__main__":
    main()
