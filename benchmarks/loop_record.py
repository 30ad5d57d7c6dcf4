"""Everything the training loop logs and returns, for an exact comparison of two versions of it
(a refactor must not change one bit):

    PYTHONPATH=<old tree> .venv/bin/python benchmarks/loop_record.py /tmp/old.pkl
    PYTHONPATH=<new tree> .venv/bin/python benchmarks/loop_record.py /tmp/new.pkl
    .venv/bin/python benchmarks/loop_record.py --compare /tmp/old.pkl /tmp/new.pkl

Three configs (a population whose member 1 diverges, with momentum, step checkpoints and the
Jacobian; no step norms; L2, the quadratic loss and a step cap), each trained with a sink that keeps
every call in order (metrics, step rows, progress, flushes, commits), then resumed from its second
checkpoint in a fresh loop, and trained again without a sink (the other ranks' path). The perf/
metrics (wall time, memory) are left out of the comparison.
"""

from __future__ import annotations

import argparse
import dataclasses
import pickle

import numpy as np
import torch

from distnet import data, worker
from distnet.config import build_config

CONFIGS = {
    "pop-diverge-jac": {"model": {"sizes": [784, 30, 30, 10], "activation": "relu"},
                        "train": {"epochs": 2, "momentum": 0.9, "log_every": 3, "metric_points": 7, "jacobian": True},
                        "checkpoint": {"every": 5, "unit": "step"},
                        "population": [{"seed": 0, "lr": 0.1}, {"seed": 1, "lr": 1e4}]},
    "no-step-norms": {"model": {"sizes": [784, 20, 10], "activation": "sigmoid"},
                      "train": {"epochs": 2, "step_norms": False}, "checkpoint": {"every": 1}},
    "l2-epochs": {"model": {"sizes": [784, 20, 20, 10], "activation": "tanh", "loss": "quadratic"},
                  "train": {"epochs": 3, "l2": 0.01, "max_steps": 25, "log_every": 4}},
}


class Calls:
    """A sink that keeps every call, in order, with copies of what it was given."""

    def __init__(self):
        self.events = []

    def log(self, step, values, active):
        self.events.append(("log", step, {k: np.array(v) for k, v in values.items()}, np.array(active)))

    def log_steps(self, steps, columns, active):
        self.events.append(("steps", list(steps), {k: np.array(v) for k, v in columns.items()}, np.array(active)))

    def progress(self, state):
        # a Progress, or the dict an older loop posted: what was posted, either way
        posted = dataclasses.asdict(state) if dataclasses.is_dataclass(state) else dict(state)
        self.events.append(("progress", {k: v for k, v in posted.items() if v is not None}))

    def flush(self):
        self.events.append(("flush",))

    def write(self, k):
        self.events.append(("write", k))


def record(path: str) -> None:
    arrays = data.select(data.load_mnist(), "test", 1280, 300)
    out = {}
    for name, raw in CONFIGS.items():
        cfg = build_config({"data": {"train_limit": 1280, "eval_limit": 300}, **raw})
        calls, commits = Calls(), []

        def commit(state, done, calls=calls, commits=commits):
            calls.events.append(("commit", state.step, done))
            commits.append(pickle.loads(pickle.dumps(state)))

        state = worker.train(cfg, arrays, worker.WorkerEnv(), calls, commit)
        out[name] = {"events": calls.events, "theta": state.theta, "final": state.final, "diverged": state.diverged,
                     "commits": [(c.step, c.epoch, c.theta, c.loss_sum, c.interval) for c in commits]}
        if len(commits) > 2:
            again = Calls()
            state = worker.train(cfg, arrays, worker.WorkerEnv(), again,
                                 lambda s, d: again.events.append(("commit", s.step, d)), commits[1])
            out[name + "/resumed"] = {"events": again.events, "theta": state.theta, "final": state.final}
        state = worker.train(cfg, arrays, worker.WorkerEnv(), None)
        out[name + "/no sink"] = {"theta": state.theta, "final": state.final}
    with open(path, "wb") as f:
        pickle.dump(out, f)
    print(f"recorded {', '.join(out)} into {path}")


def same(a, b, path: str = "") -> None:
    """Exactly equal, NaN where NaN; the perf/ metrics left out."""
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a.nan_to_num(nan=1234.5), b.nan_to_num(nan=1234.5)), path
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), path
    elif isinstance(a, dict):
        assert list(a) == list(b), (path, list(a), list(b))
        for k in a:
            if not str(k).startswith("perf/"):
                same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), (path, len(a), len(b))
        for i, (u, v) in enumerate(zip(a, b)):
            same(u, v, f"{path}[{i}]")
    elif isinstance(a, float) and np.isnan(a):
        assert np.isnan(b), path
    else:
        assert a == b, (path, a, b)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--compare", action="store_true")
    args = ap.parse_args()
    if args.compare:
        old, new = (pickle.load(open(p, "rb")) for p in args.files)
        same(old, new)
        print(f"identical: {', '.join(old)}")
    else:
        record(args.files[0])


if __name__ == "__main__":
    main()
