"""One SGD step of the population, on every rank: forward, backward, the gradient all-reduce, the
per-layer gradient norms, the divergence check and the update.

Everything the step reads and writes is built once, and the step works in place on it, so it runs
eagerly or is replayed as one CUDA graph (`train.cuda_graph`), with no allocation per step either
way. What a step leaves behind for the loop: `norms` and `batch` (this step's per-member gradient
norms, and its local batch loss and accuracy) and `newly_diverged`.
"""

from __future__ import annotations

from typing import Callable

import torch

from distnet import collective
from distnet.config import Config
from distnet.model import PopulationMLP, PopulationSGD


def pixels(x: torch.Tensor, scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 pixels -> float32 x/scale (bit for bit what converting first and dividing gives)."""
    return torch.div(x, scale, out=out)


def capture(step: Callable[[], None], state: list[torch.Tensor]) -> Callable[[], None]:
    """`step` captured as one CUDA graph; returns its replay. Capture needs a few warm-up calls on a
    side stream first; they train, so `state` (what a step changes) is put back afterwards."""
    saved = [t.clone() for t in state]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    for t, s in zip(state, saved):
        t.copy_(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # records the kernels without running them
        step()
    return graph.replay


class Stepper:
    """The step of `model` on this rank's slice of each global batch of (x, y), x as uint8 pixels.
    A member diverges at the first step whose all-reduced gradient has a non-finite norm (the same
    on every rank): `alive` turns false there, its parameters are frozen, the others go on."""

    def __init__(self, cfg: Config, model: PopulationMLP, x: torch.Tensor, y: torch.Tensor, local_batch: int):
        tc, dev = cfg.train, x.device
        self.cfg, self.model, self.x, self.y = cfg, model, x, y
        self.opt = PopulationSGD(model, [m.lr for m in cfg.members], tc.momentum, tc.l2, len(x))
        self.grad_mean, self.all_reduce = collective.gradient_mean(model.grad, cfg.ray.all_reduce)
        P, S = model.population, model.n_segments
        self.alive = torch.ones(P, dtype=torch.bool, device=dev)
        self.newly_diverged = torch.zeros(P, dtype=torch.bool, device=dev)
        self.idx = torch.zeros(local_batch, dtype=torch.long, device=dev)
        self.xb_u8, self.yb = x.new_empty(local_batch, x.shape[1]), y.new_empty(local_batch)
        self.xb = torch.empty(local_batch, x.shape[1], device=dev)
        self.norms, self.batch = torch.zeros(P, S, device=dev), torch.zeros(P, 2, device=dev)  # this step's
        self.loss, self.acc = self.batch[:, 0], self.batch[:, 1]
        changed = [model.theta, self.alive] + ([self.opt.velocity] if self.opt.velocity is not None else [])
        self.run = capture(self.train_step, changed) if tc.cuda_graph else self.train_step

    def __call__(self, batch: torch.Tensor) -> None:
        """One step on `batch`, this rank's example indices."""
        self.idx.copy_(batch)
        self.run()

    def train_step(self) -> None:
        """One step on the batch `idx` holds: forward, backward, all-reduce, norms, update."""
        tc, model = self.cfg.train, self.model
        pixels(torch.index_select(self.x, 0, self.idx, out=self.xb_u8), self.cfg.data.pixel_scale, out=self.xb)
        torch.index_select(self.y, 0, self.idx, out=self.yb)
        # acc: a step-table column only
        self.loss.copy_(model.loss_and_grad(self.xb, self.yb, self.acc if tc.step_norms else None))
        grad = self.grad_mean(model.grad)
        if tc.step_norms:
            self.norms.copy_(model.segment_norms(grad))
            finite = torch.isfinite(self.norms).all(1)
        else:  # the divergence check still needs a finite test of the all-reduced gradient
            finite = torch.isfinite(grad).all(1)
        torch.logical_and(self.alive, ~finite, out=self.newly_diverged)
        self.alive.logical_and_(finite)
        self.opt.step(grad, self.alive)
