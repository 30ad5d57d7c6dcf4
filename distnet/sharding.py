"""Which examples each worker trains on at each step: one seeded order of the global batches,
the same on every worker, and each worker's slice of every global batch."""

from __future__ import annotations

import torch


def epoch_batches(n: int, batch: int, epoch: int, seed: int, rank: int, world: int) -> torch.Tensor:
    """This worker's example indices for every step of one epoch: [steps, batch // world].

    One seeded permutation per (seed, epoch), the same on every worker; worker r takes slice r of
    every global batch. The last partial batch is dropped so every step has the full global batch.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    steps = n // batch
    perm = torch.randperm(n, generator=g)[: steps * batch].view(steps, batch)
    local = batch // world
    return perm[:, rank * local:(rank + 1) * local]
