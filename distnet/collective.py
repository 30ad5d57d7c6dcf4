"""The per-step gradient all-reduce (mean over the data-parallel workers).

torch.distributed does it in general (NCCL on GPUs, gloo across nodes). Between CPU workers on one
node, gloo's latency dominates a small MLP's step: on the 2-core development VM an all-reduce of
24k floats takes about 1 ms whatever its size (the waiting process sleeps in the kernel and its vCPU
is slow to wake), three times the step itself. So there, workers meet in shared memory instead:
each writes its gradient into its own slot of a file in /dev/shm, publishes a step counter, polls
the others' counters (spinning, yielding the CPU when oversubscribed), and sums the slots in rank
order. Every rank adds the same numbers in the same order, so all ranks keep bit-identical weights.
Measured in docs/benchmarks.md.

Slots are double-buffered by step parity: before a rank writes step k+2 into a slot, it has seen
every rank publish step k+1, which each did only after reading all of step k.
"""

from __future__ import annotations

import os
import platform
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

SHM_DIR = Path("/dev/shm")
LINE = 16  # int32 counters one 64-byte cache line apart, so ranks never write the same line
TIMEOUT_S = 600.0  # a peer that stops arriving for this long has died; its failure is Ray's to handle


def _group() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def torch_mean(t: torch.Tensor) -> torch.Tensor:
    """torch.distributed all-reduce, then / world size; the identity alone (no group, or one rank)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t.div_(dist.get_world_size())
    return t


def shared_memory_bytes(like: torch.Tensor, world: int) -> int:
    """What SharedMemoryMean maps in /dev/shm for `like` across `world` ranks: counters and two slots
    per rank."""
    return (world * LINE + 2 * world * like.numel()) * like.element_size()


def shared_memory_possible(like: torch.Tensor) -> bool:
    """CPU tensors, x86-64 (its store ordering is what makes publish-after-write safe from Python),
    every rank seeing the same /dev/shm, and room there. Rank 0 writes a random token into a file
    in its /dev/shm and every rank must read it back: hostnames prove nothing (cloned machines, or
    containers, share them while each has a /dev/shm of its own). A tmpfs is sized at mount time
    (Docker gives 64 MB) and writing past its end kills the writer with SIGBUS, so the mapping must
    fit in what is free, with half of it left to everything else; rank 0 decides for all."""
    if like.device.type != "cpu" or platform.machine().lower() not in ("x86_64", "amd64") or not SHM_DIR.is_dir():
        return False
    token = [None]
    if dist.get_rank() == 0:
        st = os.statvfs(SHM_DIR)
        if shared_memory_bytes(like, dist.get_world_size()) <= st.f_bavail * st.f_frsize // 2:
            mine = uuid.uuid4().hex
            try:
                (SHM_DIR / f"distnet-probe-{mine}").write_text(mine)
                token[0] = mine
            except OSError:  # a read-only /dev/shm
                pass
    dist.broadcast_object_list(token, src=0)
    if token[0] is None:
        return False
    probe = SHM_DIR / f"distnet-probe-{token[0]}"
    try:
        seen = probe.read_text() == token[0]
    except OSError:
        seen = False
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, seen)  # also: every rank has looked before the file goes
    if dist.get_rank() == 0:
        probe.unlink()
    return all(everyone)


class SharedMemoryMean:
    """In-place mean of one fixed [P, T] float tensor across the ranks of one node."""

    def __init__(self, like: torch.Tensor):
        self.rank, self.world = _group()
        n = like.numel()
        name = [f"distnet-allreduce-{uuid.uuid4().hex}" if self.rank == 0 else None]
        dist.broadcast_object_list(name, src=0)
        path = SHM_DIR / name[0]
        header = self.world * LINE
        mem = torch.from_file(str(path), shared=True, size=header + 2 * self.world * n, dtype=like.dtype)
        dist.barrier()  # every rank has mapped the file: its name can go (the mapping stays)
        if self.rank == 0:
            path.unlink()
        self.counters = mem[:header].view(torch.int32)[:: LINE * like.element_size() // 4]
        self.slots = mem[header:].view(2, self.world, n)
        self.step = 0
        # Taking a lock is a locked instruction: a full fence, so the slot's bytes (even those of a
        # large copy done with non-temporal stores) are out before the counter says they are.
        self.fence = threading.Lock()

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        self.step += 1
        slots = self.slots[self.step % 2]
        slots[self.rank].copy_(t.view(-1))
        with self.fence:
            pass
        self.counters[self.rank] = self.step  # x86 keeps ordinary stores in order
        self._wait()
        flat = t.view(-1)
        flat.copy_(slots[0])
        for r in range(1, self.world):
            flat.add_(slots[r])
        return t.div_(self.world)

    def _wait(self) -> None:
        spins, deadline = 0, None
        while min(self.counters.tolist()) < self.step:
            spins += 1
            if spins > 1000:  # more workers than cores: let the others run
                os.sched_yield()
                deadline = deadline or time.monotonic() + TIMEOUT_S
                if time.monotonic() > deadline:
                    raise RuntimeError(f"shared-memory all-reduce: ranks {self._missing()} did not reach "
                                       f"step {self.step} within {TIMEOUT_S:.0f} s")

    def _missing(self) -> list[int]:
        return [r for r, c in enumerate(self.counters.tolist()) if c < self.step]


def gradient_mean(grad: torch.Tensor, mode: str) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """The all-reduce (mean) for `grad`'s buffer and the name of the path it takes: "none" (one
    rank), "shared_memory" or "torch" (torch.distributed). `mode` is ray.all_reduce ("auto": shared
    memory where possible, else torch.distributed; "torch": torch.distributed always)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return (lambda t: t), "none"
    if mode == "auto" and shared_memory_possible(grad):
        return SharedMemoryMean(grad), "shared_memory"
    return torch_mean, "torch"
