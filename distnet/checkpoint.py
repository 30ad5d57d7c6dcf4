"""A lane's checkpoints in Ray Train's storage: what one holds and how it is written and read.

Every rank reports each checkpoint to Ray Train (the same number of reports on every rank); rank 0
alone writes its files: meta.json (which job of the lane, its step, done or not) and state.pt (the
loop's state and rank 0's records not yet in MLflow), so a restarted worker loses and repeats
nothing.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import ray.train
import torch
from ray.train import Checkpoint

from distnet import tracking, worker


@dataclass
class Saved:
    """What a lane's checkpoint holds beside its meta.json (which job, done or not): the loop's
    state and rank 0's records not yet in MLflow (MlflowSink.state_dict)."""

    loop: worker.TrainState
    records: dict


def committer(rank: int, seq: int, sink: tracking.MlflowSink | None):
    """worker.train's commit: report a checkpoint to Ray Train (every rank must call report the
    same number of times; rank 0 alone writes one). It carries the loop state and rank 0's metrics
    not yet in MLflow, so a restarted worker loses and repeats nothing."""

    def commit(state: worker.TrainState, done: bool) -> None:
        if rank != 0:
            ray.train.report({}, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(Saved(state, sink.state_dict()), Path(tmp) / "state.pt")
            (Path(tmp) / "meta.json").write_text(json.dumps({"seq": seq, "done": done, "step": state.step}))
            ray.train.report({"seq": seq, "step": state.step, "done": done}, checkpoint=Checkpoint.from_directory(tmp))

    return commit


def load(ckpt: Checkpoint) -> tuple[dict, Saved]:
    with ckpt.as_directory() as d:
        return json.loads((Path(d) / "meta.json").read_text()), torch.load(Path(d) / "state.pt", weights_only=False)
