"""The shared-memory gradient all-reduce against torch.distributed's (gloo), in real processes."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import free_port
from distnet import collective


def _rank(rank: int, world: int, port: int, out: str, shape: tuple[int, int]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    grad = torch.empty(*shape)
    shm, path = collective.gradient_mean(grad, "auto")
    results = []
    for step in range(50):  # more steps than slots: the double buffer is reused many times
        g = torch.Generator().manual_seed(1000 * step + rank)
        local = torch.randn(*shape, generator=g) * (rank + 1)
        grad.copy_(local)
        ours = shm(grad).clone()
        ref = local.clone()
        dist.all_reduce(ref)
        results.append((ours, ref / world))
    dist.barrier()
    torch.save({"path": path, "results": results}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def run_ranks(world: int, shape: tuple[int, int], out: Path) -> list[dict]:
    """`world` real processes all-reducing 50 random [shape] gradients with ray.all_reduce auto."""
    mp.spawn(_rank, args=(world, free_port(), str(out), shape), nprocs=world, join=True)
    return checked(world, out)


def checked(world: int, out: Path) -> list[dict]:
    """The ranks' saved results, each step's mean equal to gloo's."""
    outs = [torch.load(out / f"rank{r}.pt") for r in range(world)]
    for step in range(50):
        for o in outs:
            ours, ref = o["results"][step]
            torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    return outs


def test_shared_memory_mean_equals_gloo_and_leaves_nothing(tmp_path):
    before = set(Path("/dev/shm").iterdir())
    world = 3
    outs = run_ranks(world, (5, 1001), tmp_path)
    assert all(o["path"] == "shared_memory" for o in outs)
    for step in range(50):
        # every rank holds the very same bits: their weights never drift apart
        assert all(torch.equal(o["results"][step][0], outs[0]["results"][step][0]) for o in outs)
    assert not {p for p in set(Path("/dev/shm").iterdir()) - before if p.name.startswith("distnet-")}


SMALL_SHM = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import test_collective as t
for shape, out in (((5, 1001), sys.argv[2]), ((100, 1001), sys.argv[3])):
    print(shape[0], t.run_ranks(2, shape, Path(out))[0]["path"], flush=True)
"""


@pytest.mark.namespaces
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="mounting a tmpfs needs root")
def test_a_small_dev_shm_falls_back_to_torch_distributed(tmp_path):
    """A 1 MiB tmpfs over /dev/shm, in a mount namespace of its own (Docker gives 64 MB; a big
    population needs hundreds): the 80 KB mapping of a small gradient fits in half of it and takes
    shared memory; the 800 KB one of a larger gradient would not, and goes through gloo, with the same
    results and no SIGBUS."""
    outs = [tmp_path / "small", tmp_path / "large"]
    for o in outs:
        o.mkdir()
    script = f"mount -t tmpfs -o size=1m distnet-test /dev/shm && exec {sys.executable} -c '{SMALL_SHM}' " \
             f"{Path(__file__).parent} {outs[0]} {outs[1]}"
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["5", "shared_memory", "100", "torch"]
    assert collective.shared_memory_bytes(torch.empty(100, 1001), 2) > 1 << 19 > \
        collective.shared_memory_bytes(torch.empty(5, 1001), 2)


ONE_RANK = """
import sys
sys.path.insert(0, sys.argv[1])
import test_collective as t
t._rank(int(sys.argv[2]), 2, int(sys.argv[3]), sys.argv[4], (5, 1001))
"""


@pytest.mark.namespaces
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="mounting a tmpfs needs root")
def test_ranks_with_a_dev_shm_each_go_through_gloo_whatever_their_hostname(tmp_path):
    """Two ranks on one host, so under one hostname, the second in a mount namespace with a /dev/shm
    of its own, as two containers or two cloned machines are: the token rank 0 leaves in its
    /dev/shm is not in rank 1's, so both take torch.distributed (matching hostnames used to send
    them into shared memory, each waiting on a file of its own until the timeout)."""
    port = free_port()

    def rank(r: int) -> list[str]:
        return [sys.executable, "-c", ONE_RANK, str(Path(__file__).parent), str(r), str(port), str(tmp_path)]

    own_shm = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               'mount -t tmpfs distnet-test /dev/shm && exec "$@"', "sh"]
    procs = [subprocess.Popen(rank(0)), subprocess.Popen(own_shm + rank(1))]
    try:
        assert [p.wait(timeout=120) for p in procs] == [0, 0]
    finally:
        for p in procs:
            p.kill()
    assert [o["path"] for o in checked(2, tmp_path)] == ["torch", "torch"]
