"""The soak (`make soak`): sweeps of a few hundred small cells on the namespaced test cluster (a Ray
head, two worker hosts, the tracking server on PostgreSQL: tests/testcluster.py) under a fault every
15-30 s from a seeded generator (tests/faults.py: seven kinds), sweep after sweep until the time is
up; each sweep is then checked whole (every cell FINISHED once with one run, nothing RUNNING, every
value as its training computes it without a fault, distnet.results as MLflow lists it). First the
same sweep once without faults, for its wall time. Prints markdown tables; exit 1 on a finding.
Needs root, ip and unshare, as the cluster tests do.

    PYTHONPATH=tests:benchmarks .venv/bin/python benchmarks/soak.py --minutes 30 --seed 0
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import traceback
from pathlib import Path

import faults
from testcluster import namespaced_cluster


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30,
                   help="minutes of sweeping under faults, the checks between sweeps not counted (the last sweep then ends)")
    p.add_argument("--seed", type=int, default=0, help="the fault generator's seed")
    p.add_argument("--seeds", type=int, default=150, help="a sweep's seeds: 2 cells each (default 300 cells)")
    p.add_argument("--workdir", type=Path, help="where sweeps, checkpoints and the fault log go (default: a new temporary folder)")
    args = p.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="soak-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    rounds, finding, baseline = [], None, None
    with namespaced_cluster(workers=2, head_cpus=0, artifacts_mib=1024) as c:
        os.environ.update({**c.login, "MLFLOW_TRACKING_URI": c.mlflow})  # this process's MLflow clients (the checks)
        try:
            baseline = faults.sweep_round(c, work, "soak-0", args.seeds, None, say=print)
            print(f"without faults: {baseline.cells} cells in {baseline.wall:.0f} s", flush=True)
            # Faults come only while a sweep runs: the checks between sweeps do not count.
            while sum(r.wall for r in rounds) < args.minutes * 60:
                done = faults.sweep_round(c, work, f"soak-{len(rounds) + 1}", args.seeds, {"rng": rng}, say=print)
                rounds.append(done)
                print(f"{done.name}: {done.cells} cells in {done.wall:.0f} s under {len(done.faults)} faults; "
                      f"checked", flush=True)
        except Exception:
            finding = traceback.format_exc()
    left = faults.left_behind(c)
    every = [f for r in rounds for f in r.faults]
    faults.dump(every, work / "faults.jsonl")
    print(f"\nSoak: seed {args.seed}, {args.minutes:g} minutes of faults, sweeps of {2 * args.seeds} cells; "
          f"fault log {work / 'faults.jsonl'}\n")
    print("| sweep | cells | wall (s) | faults | command runs | reruns after an error | all checked |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")
    for r in ([baseline] if baseline else []) + rounds:
        print(f"| {r.name} | {r.cells} | {r.wall:.0f} | {len(r.faults)} | {r.starts} | {r.reruns} | yes |")
    print()
    print(faults.table(every))
    errors = [e for r in rounds for e in r.errors]
    print(f"\nfaults that could not be applied: {errors or 'none'}; left behind: {left or 'nothing'}")
    if finding:
        print(f"\nFINDING:\n{finding}")
    return 1 if finding or left or errors or any(r.reruns for r in rounds) else 0


if __name__ == "__main__":
    sys.exit(main())
