"""The two small actors a driver shares with its trainers: the job queue of the lanes and the board
rank 0 posts its progress to.

This module imports nothing but Ray, and the queue holds references to jobs rather than the jobs
themselves (a job's config would import torch through the registry): an actor's process imports
the module of its class and unpickles its arguments, so these actors start in a fraction of a
second instead of the 3 s that importing torch, Ray Train and MLflow takes on a small machine, on
the critical path of every training's start-up.
"""

from __future__ import annotations

from collections import deque

import ray


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Rank 0 posts its progress here; the driver polls it for the progress line."""

    def __init__(self):
        self.state: dict = {}

    def update(self, state: dict) -> None:
        self.state.update(state)

    def get(self) -> dict:
        return self.state


@ray.remote(num_cpus=0)
class JobQueue:
    """Hands jobs to lanes: each entry is (reference to the job, the job's MLflow run ids). Every rank
    of a lane asks for its lane's n-th job and gets the same reference; rank 0 marks it done. A job
    taken and not done is in flight: what a failed trainer was on."""

    def __init__(self, entries: list[tuple[ray.ObjectRef, list[str]]]):
        self.waiting = deque(entries)
        self.taken: dict[tuple[int, int], ray.ObjectRef | None] = {}
        self.in_flight: dict[int, tuple[int, list[str]]] = {}  # lane -> (seq, run ids)
        self.outcomes: list[dict] = []

    def take(self, lane: int, seq: int) -> ray.ObjectRef | None:
        if (lane, seq) not in self.taken:
            ref, run_ids = self.waiting.popleft() if self.waiting else (None, None)
            self.taken[(lane, seq)] = ref
            if ref is not None:
                self.in_flight[lane] = (seq, run_ids)
        return self.taken[(lane, seq)]

    def done(self, lane: int, seq: int, outcome: dict) -> None:
        """Idempotent: a restarted lane may report a job it had finished before dying."""
        if lane in self.in_flight and self.in_flight[lane][0] == seq:
            _, run_ids = self.in_flight.pop(lane)
            self.outcomes.append({"cells": len(run_ids), **outcome})

    def fail_in_flight(self, lane: int, error: str) -> list[str] | None:
        """The lane's trainer died: its job counts as failed (its run ids are returned); the lane's
        next trainer starts afresh at sequence 0, so its old (lane, seq) answers are forgotten."""
        self.taken = {k: v for k, v in self.taken.items() if k[0] != lane}
        if lane not in self.in_flight:
            return None
        _, run_ids = self.in_flight.pop(lane)
        self.outcomes.append({"cells": len(run_ids), "error": error})
        return run_ids

    def status(self) -> dict:
        return {"waiting": len(self.waiting), "outcomes": list(self.outcomes),
                "running": sum(len(ids) for _, ids in self.in_flight.values())}
