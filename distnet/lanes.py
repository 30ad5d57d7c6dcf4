"""The two small actors a driver shares with its trainers: the job queue of the lanes and the board
rank 0 posts its progress to.

This module imports nothing but Ray, the record's names (distnet.schema), the cells' outcomes
(distnet.outcome) and the progress record (distnet.progress), and the queue holds
references to jobs rather than the jobs themselves (a job's config would import torch through the
registry): an actor's process imports the module of its class and unpickles its arguments, so these
actors start in a fraction of a second instead of the 3 s that importing torch, Ray Train and MLflow
takes on a small machine, on the critical path of every training's start-up.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import Callable

import ray

from distnet import schema
from distnet.outcome import CellOutcome
from distnet.progress import Progress


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Rank 0 posts its progress here; the driver polls it for the progress line."""

    def __init__(self):
        self.state = Progress()

    def update(self, update: Progress) -> None:
        self.state = self.state.merged(update)

    def get(self) -> Progress:
        return self.state


@ray.remote(num_cpus=0)
class JobQueue:
    """Hands jobs to lanes: each entry is (reference to the job, the job's MLflow run ids). Every rank
    of a lane asks for its lane's n-th job and gets the same reference; rank 0 marks it done with
    its cells' summary rows. A job taken and not done is in flight: what a failed trainer was on.

    The driver puts jobs in as it creates their runs and closes the queue after the last, so the
    lanes train while later jobs are being made. Both sides wait here (an async actor: a waiting
    call holds no thread): `take` until there is a job or the queue is closed, `put` while `ahead`
    jobs are already waiting (the runs of a killed driver's sweep are then few, not thousands)."""

    def __init__(self, entries: list[tuple[ray.ObjectRef, list[str]]] = (), ahead: int = 0):
        self.waiting = deque(entries)
        self.ahead = ahead or len(self.waiting) or 1
        self.closed = bool(entries)  # a queue made with its jobs takes no more
        self.changed = asyncio.Condition()
        # (lane, seq) -> the job it got (None: no more) and the ranks that have taken it
        self.taken: dict[tuple[int, int], tuple[ray.ObjectRef | None, set[int]]] = {}
        self.in_flight: dict[int, tuple[int, ray.ObjectRef, list[str]]] = {}  # lane -> (seq, job, run ids)
        self.outcomes: list[dict] = []  # per job: its cells, and its error or how many diverged
        self.rows: list[CellOutcome] = []  # every cell trained or failed
        self.waits: dict[int, str] = {}  # lane -> what its rank 0 waits for (space.Full), for the driver

    async def put(self, entry: tuple[ray.ObjectRef, list[str]]) -> None:
        async with self.changed:
            await self.changed.wait_for(lambda: len(self.waiting) < self.ahead)
            self.waiting.append(entry)
            self.changed.notify_all()

    async def close(self) -> None:
        async with self.changed:
            self.closed = True
            self.changed.notify_all()

    async def take(self, lane: int, seq: int, rank: int) -> tuple[ray.ObjectRef | None, bool]:
        """The lane's seq-th job (None: no more), and whether this rank took it before: then Ray
        Train restarted the lane's group inside that job, from a checkpoint or, where Ray had not
        registered the group's first one, from the job's start, while its runs may already hold
        what rank 0 wrote."""
        async with self.changed:
            if (lane, seq) not in self.taken:
                await self.changed.wait_for(lambda: self.waiting or self.closed)
                ref, run_ids = self.waiting.popleft() if self.waiting else (None, None)
                self.taken[(lane, seq)] = ref, set()
                if ref is not None:
                    self.in_flight[lane] = (seq, ref, run_ids)
                self.changed.notify_all()
            ref, takers = self.taken[(lane, seq)]
            again = rank in takers
            takers.add(rank)
            return ref, again

    def done(self, lane: int, seq: int, rows: list[CellOutcome]) -> None:
        """Idempotent: a restarted lane may report a job it had finished before dying."""
        if lane in self.in_flight and self.in_flight[lane][0] == seq:
            _, _, run_ids = self.in_flight.pop(lane)
            self.outcomes.append({"cells": len(run_ids), "diverged": sum(r.status == schema.DIVERGED for r in rows)})
            self.rows += rows

    def fail_in_flight(self, lane: int, error: str) -> tuple[ray.ObjectRef, list[str]] | None:
        """The lane's trainer died: its job counts as failed (the job and its run ids are returned);
        the lane's next trainer starts afresh at sequence 0, so its old (lane, seq) answers and
        takers are forgotten."""
        self.taken = {k: v for k, v in self.taken.items() if k[0] != lane}
        if lane not in self.in_flight:
            return None
        _, ref, run_ids = self.in_flight.pop(lane)
        self.outcomes.append({"cells": len(run_ids), "error": error})
        self.rows += [CellOutcome.failed(run_id, error) for run_id in run_ids]
        return ref, run_ids

    def wait(self, lane: int, what: str | None) -> None:
        """The lane's rank 0 waits for `what` (None: no longer)."""
        if what is None:
            self.waits.pop(lane, None)
        else:
            self.waits[lane] = what

    def waiting_for(self) -> dict[int, str]:
        return self.waits

    def status(self) -> dict:
        """Counts of cells: done, diverged, failed, running; and whether more jobs may come."""
        failed = sum(o["cells"] for o in self.outcomes if "error" in o)
        diverged = sum(o.get("diverged", 0) for o in self.outcomes)
        return {"done": sum(o["cells"] for o in self.outcomes) - failed - diverged, "diverged": diverged,
                "failed": failed, "running": sum(len(ids) for _, _, ids in self.in_flight.values()),
                "more": bool(self.waiting) or not self.closed}

    def results(self) -> list[CellOutcome]:
        """The outcome of every cell trained (MlflowSink.close's) or failed."""
        return self.rows


class LaneWaits:
    """The driver's watch on what the lanes' rank 0s wait for (JobQueue.wait: a full disk), while
    they train: says when one starts waiting and when it went on. Without it a sweep whose records
    cannot be written would just stop making progress, unexplained."""

    def __init__(self, queue: ray.actor.ActorHandle, say: Callable[[str], None], every: float = 1.0):
        self.queue, self.say, self.every = queue, say, every
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        shown: dict[int, str] = {}
        while not self.stop.wait(self.every):
            try:
                now = ray.get(self.queue.waiting_for.remote())
            except Exception:  # a dying cluster must not kill the driver's bookkeeping
                return
            for lane, what in now.items():
                if shown.get(lane) != what:
                    self.say(f"lane {lane}: {what}")
            for lane in shown.keys() - now.keys():
                self.say(f"lane {lane}: room again; its records went in and it trains on")
            shown = now

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
