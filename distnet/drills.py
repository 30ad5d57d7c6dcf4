"""Fault drills (`fault.*` in the config): kill a rank, raise, or trace where an attempt starts.

Drills is the loop's FaultHooks (NoDrills, the default, does nothing): `at_step` before the steps
`begin` names (no other step pays for a drill), `after_commit` on every rank after each checkpoint
commit, and `at_flush` before each flush of rank 0's records. What the fault-tolerance tests and
chaos drills check resumption, sharding and half-written records with; off by default, when `begin`
names no step and the other hooks return at once.
"""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path
from typing import Protocol

import torch

from distnet.config import FaultConfig


class MemberWriter(Protocol):
    """A sink that writes member by member (distnet.recorder.Sink)."""

    def write(self, k: int) -> None:
        """Member k's buffered records, now."""


class FaultHooks(Protocol):
    """Where the loop lets a fault in: the loop calls `begin` as an attempt starts, `at_step` before
    each step `begin` returned, `after_commit` on every rank after each checkpoint commit, and rank
    0's recorder `at_flush` before each flush of its records."""

    def begin(self, first_step: int) -> frozenset[int]: ...

    def at_step(self, step: int, batch: torch.Tensor) -> None: ...

    def after_commit(self, step: int) -> None: ...

    def at_flush(self, sink: MemberWriter, step: int) -> None: ...


class NoDrills:
    """No fault: the loop's default."""

    def begin(self, first_step: int) -> frozenset[int]:
        return frozenset()

    def at_step(self, step: int, batch: torch.Tensor) -> None:
        pass

    def after_commit(self, step: int) -> None:
        pass

    def at_flush(self, sink: MemberWriter, step: int) -> None:
        pass


NO_DRILLS = NoDrills()


class Drills:
    """The config's `fault.*` for one rank."""

    def __init__(self, fault: FaultConfig, rank: int):
        self.fault, self.rank, self.first_step = fault, rank, 0
        # This rank's kill: from which step, and where (fault.kill_in); None: not this rank's.
        self.kill_from = fault.kill_at_step if fault.kill_rank == rank else None

    def begin(self, first_step: int) -> frozenset[int]:
        """An attempt starts at `first_step`: the steps to call at_step before (no other step pays
        for a drill)."""
        self.first_step = first_step
        kill_step = self.kill_from if self.fault.kill_in == "step" else None
        return frozenset(s for s in (self.fault.raise_at_step, kill_step, first_step if self.fault.trace else None)
                         if s is not None)

    def at_step(self, step: int, batch: torch.Tensor) -> None:
        """Before `step` (one of `steps`), whose local batch is `batch`: trace the attempt's first
        step, then kill or raise where the config says."""
        f = self.fault
        if step == self.first_step and f.trace:
            path = Path(f.trace) / f"rank{self.rank}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as out:
                out.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "first_step": step,
                                      "batch": batch.tolist()}) + "\n")
        if step == self.kill_from and self._due("step", step):
            self._kill()
        if step == f.raise_at_step:
            raise RuntimeError(f"fault injection: fault.raise_at_step={step}")

    def after_commit(self, step: int) -> None:
        """After this rank's checkpoint commit at `step` (its report to Ray Train): with fault.kill_in
        commit, the first at or after kill_at_step dies before Ray Train's controller has collected
        the report, so Ray never registers that checkpoint, while rank 0 may already have flushed
        the records it covers."""
        if self._due("commit", step):
            self._kill()

    def at_flush(self, sink: MemberWriter, step: int) -> None:
        """Before a flush at `step`: with fault.kill_in flush, the first flush at or after
        kill_at_step writes the first member's records and dies before the others' (a writer that
        dies half-way through)."""
        if self._due("flush", step):
            sink.write(0)
            self._kill()

    def _due(self, where: str, step: int) -> bool:
        """This rank's kill is `where`, at or past its step, and not done before."""
        return self.fault.kill_in == where and self.kill_from is not None and step >= self.kill_from and self._armed()

    def _armed(self) -> bool:
        """Not killed before: the marker file (if any) is not there yet."""
        return not (self.fault.once_marker and os.path.exists(self.fault.once_marker))

    def _kill(self) -> None:
        """SIGKILL this worker, once per marker file."""
        if self.fault.once_marker:
            Path(self.fault.once_marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)
