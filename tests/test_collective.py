"""The shared-memory gradient all-reduce against torch.distributed's (gloo), in real processes."""

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distnet import collective


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    grad = torch.empty(5, 1001)
    shm = collective.gradient_mean(grad, "auto")
    results = []
    for step in range(50):  # more steps than slots: the double buffer is reused many times
        g = torch.Generator().manual_seed(1000 * step + rank)
        local = torch.randn(5, 1001, generator=g) * (rank + 1)
        grad.copy_(local)
        ours = shm(grad).clone()
        ref = local.clone()
        dist.all_reduce(ref)
        results.append((ours, ref / world))
    dist.barrier()
    torch.save({"kind": type(shm).__name__, "results": results}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_shared_memory_mean_equals_gloo_and_leaves_nothing(tmp_path):
    before = set(Path("/dev/shm").iterdir())
    world = 3
    mp.spawn(_rank, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    outs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    assert all(o["kind"] == "SharedMemoryMean" for o in outs)
    for step in range(50):
        for o in outs:
            ours, ref = o["results"][step]
            torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
        # every rank holds the very same bits: their weights never drift apart
        assert all(torch.equal(o["results"][step][0], outs[0]["results"][step][0]) for o in outs)
    assert not {p for p in set(Path("/dev/shm").iterdir()) - before if p.name.startswith("distnet-")}
