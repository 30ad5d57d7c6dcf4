"""The per-worker training loop: plain PyTorch, read top to bottom.

Runs on every data-parallel worker (rank r of W) or alone (W = 1). Every worker holds the whole
population and the whole data set as tensors on its device; each step it takes its slice of the
global batch, backpropagates, all-reduces the one [P, T] gradient (mean), records the per-layer
gradient norms of every member on the device, and updates. Rank 0 alone evaluates and logs.
Ray never appears here: launch.py calls `train` inside a Ray Train worker.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch

from distnet import collective, data, metrics, schema
from distnet.drills import Drills
from distnet.config import Config
from distnet.model import PopulationMLP, PopulationSGD, init_theta


class Sink(Protocol):
    """Where rank 0's metrics go (MLflow and the step tables in a real run). Values are per member."""

    def log(self, step: int, values: dict[str, np.ndarray], active: np.ndarray) -> None:
        """Record the metric values[name][k] ([P] arrays) for every member k with active[k]."""

    def log_steps(self, steps: list[int], columns: dict[str, np.ndarray], active: np.ndarray) -> None:
        """Record full-resolution rows: columns[name][i, k] ([n, P] arrays) is member k's value at
        steps[i], kept where active[i, k]."""

    def progress(self, state: dict) -> None:
        """Where the training is (step, epoch, loss, accuracy), for the driver's progress line."""

    def flush(self) -> None:
        """Write what log() and log_steps() buffered; called at each checkpoint but the last (the
        sink's owner writes the rest with the outcome)."""


@dataclass(frozen=True)
class WorkerEnv:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")


def to_device(arrays: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """The arrays on the device, once: pixels stay uint8 (a quarter of float32's memory; `pixels`
    makes the floats the model sees), labels become int64."""
    return {k: torch.tensor(v, device=device, dtype=torch.uint8 if k.endswith("_x") else torch.int64)
            for k, v in arrays.items()}


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


def max_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB), for the perf/ metrics."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def diverged_members(diverged_at: torch.Tensor) -> dict[int, int]:
    """member -> step of its first non-finite gradient, for the members that diverged."""
    return {k: int(s) for k, s in enumerate(diverged_at.tolist()) if s >= 0}


@dataclass
class TrainState:
    """Where a training is: what each checkpoint holds (beside the sink's unwritten records) and
    what a training ends with. Loop.state_dict makes it, Loop.load_state_dict resumes from it."""

    theta: torch.Tensor  # [P, T] on the CPU
    velocity: torch.Tensor | None  # momentum's, on the device
    alive: torch.Tensor  # [P] bool: members not diverged
    diverged_at: torch.Tensor  # [P]: the step a member diverged at, -1 while alive
    loss_sum: torch.Tensor  # [P]: the epoch's global batch losses so far
    step: int  # steps done
    epoch: int  # the epoch under way (1-based)
    final: dict[str, np.ndarray]  # rank 0's latest epoch metrics
    rng: torch.Tensor
    interval: dict | None  # the interval statistics not yet logged (IntervalStats.state_dict)
    all_reduce: str  # which all-reduce the gradients took

    @property
    def diverged(self) -> dict[int, int]:
        return diverged_members(self.diverged_at)


def no_commit(state: TrainState, done: bool) -> None:
    """Training outside Ray: checkpoints go nowhere (metrics are still flushed at each one)."""


class Loop:
    """One training of cfg's population on one worker. The model, the optimiser and every buffer
    are built once; the step reads and writes only those fixed tensors, in place, so it runs eagerly
    or is replayed as one CUDA graph (`train.cuda_graph`), with no allocation per step either way.

    Every checkpoint interval (and at the end, done=True) every rank calls commit(state, done);
    rank 0's sink is flushed only after commit returns, so what MLflow holds is always covered by a
    committed checkpoint. After the last commit the sink keeps what it holds for its owner, who
    writes it with the runs' outcome (MlflowSink.close)."""

    def __init__(self, cfg: Config, arrays: dict[str, np.ndarray], env: WorkerEnv, sink: Sink | None,
                 commit: Callable[[TrainState, bool], None] = no_commit):
        tc, dev = cfg.train, env.device
        self.cfg, self.env, self.sink, self.commit = cfg, env, sink, commit
        d = to_device(arrays, dev)
        self.x, self.y, self.eval_y = d["train_x"], d["train_y"], d["eval_y"]
        self.probe_x, self.probe_y = pixels(self.x[: tc.probe_size], cfg.data.pixel_scale), self.y[: tc.probe_size]
        self.eval_x = pixels(d["eval_x"], cfg.data.pixel_scale)
        self.eval_prefix = schema.eval_prefix(cfg.data.split)
        self.model = PopulationMLP(cfg.sizes, cfg.model.activation, cfg.model.loss,
                                   init_theta(cfg.sizes, cfg.members).to(dev))
        self.opt = PopulationSGD(self.model, [m.lr for m in cfg.members], tc.momentum, tc.l2, len(self.x))
        self.names = metrics.step_names(len(self.model.layers)) if tc.step_norms else []
        self.steps_per_epoch = len(self.x) // tc.batch_size
        self.total_steps = min(tc.epochs * self.steps_per_epoch, tc.max_steps or tc.epochs * self.steps_per_epoch)
        # Per-step records stay on the device: [log_every, P, 2L norms] and [log_every, P, 2] batch
        # losses and accuracies, brought to the host once per log interval so the hot path never
        # waits on a host sync.
        P, S = self.model.population, self.model.n_segments
        self.norm_buf = torch.empty(tc.log_every, P, S, device=dev)
        self.batch_buf = torch.empty(tc.log_every, P, 2, device=dev)
        self.pending: list[int] = []  # global steps whose rows in the buffers are not yet on the host
        # Rank 0 reduces the per-step series to interval means and maxima for MLflow, on the device.
        self.summary = metrics.IntervalStats(metrics.interval(self.total_steps, tc.metric_points),
                                             torch.empty(P, S + 2, device=dev)) if sink and self.names else None
        self.grad_mean, self.all_reduce = collective.gradient_mean(self.model.grad, cfg.ray.all_reduce)
        # A member diverges at the first step whose all-reduced gradient has a non-finite norm (the
        # same on every rank); it is frozen there and the others go on.
        self.alive = torch.ones(P, dtype=torch.bool, device=dev)
        self.diverged_at = torch.full((P,), -1, dtype=torch.long, device=dev)
        # The epoch's sum of global batch losses: the same on every rank (so any rank's checkpoint of
        # it is right for all).
        self.loss_sum = torch.zeros(P, device=dev)
        self.step, self.epoch, self.final = 0, 1, {}
        local_batch = tc.batch_size // env.world_size
        self.idx = torch.zeros(local_batch, dtype=torch.long, device=dev)
        self.xb_u8, self.yb = self.x.new_empty(local_batch, self.x.shape[1]), self.y.new_empty(local_batch)
        self.xb = self.eval_x.new_empty(local_batch, self.x.shape[1])
        self.norms, self.batch = torch.zeros(P, S, device=dev), torch.zeros(P, 2, device=dev)  # this step's
        self.loss, self.acc = self.batch[:, 0], self.batch[:, 1]
        self.newly_diverged = torch.zeros(P, dtype=torch.bool, device=dev)
        changed = [self.model.theta, self.alive] + ([self.opt.velocity] if self.opt.velocity is not None else [])
        self.run_step = capture(self.train_step, changed) if tc.cuda_graph else self.train_step

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

    def run(self, resume: TrainState | None = None) -> TrainState:
        """Train from the start (epoch 0's metrics first: the network at init), or from `resume`'s
        exact step; return the final state (on rank 0 with the final evaluation)."""
        if resume is None:
            self.final = self.epoch_metrics(0, {}) if self.sink is not None else {}
        else:
            self.load_state_dict(resume)
        drills = Drills(self.cfg.fault, self.env.rank, self.step)
        going = self.going()
        while going:
            self.train_epoch(drills)
            self.epoch += 1
            going = self.going()  # one host sync per epoch
            ck = self.cfg.checkpoint
            if going and (ck.unit == "step" or (self.epoch - 1) % ck.every == 0):
                self.checkpoint(drills)  # (the training's last checkpoint is the one below)
        self.checkpoint(drills, done=True)
        return self.state_dict()

    def going(self) -> bool:
        return self.epoch <= self.cfg.train.epochs and self.step < self.total_steps and bool(self.alive.any())

    def train_epoch(self, drills: Drills) -> None:
        """The epoch's steps (checkpointing every `checkpoint.every` steps with unit step), then its
        metrics: the mean training loss, a member whose loss is not finite diverged."""
        tc, ck, spe = self.cfg.train, self.cfg.checkpoint, self.steps_per_epoch
        epoch_start = time.perf_counter()
        batches = data.epoch_batches(len(self.x), tc.batch_size, self.epoch, self.cfg.data.shuffle_seed,
                                     self.env.rank, self.env.world_size).to(self.env.device)
        epoch_end = min(self.epoch * spe, self.total_steps)
        while self.step < epoch_end:
            batch = batches[self.step - (self.epoch - 1) * spe]
            if self.step in drills.steps:
                drills.at_step(self.step, batch)
            self.idx.copy_(batch)
            self.run_step()
            self.diverged_at.masked_fill_(self.newly_diverged, self.step)
            self.norm_buf[len(self.pending)].copy_(self.norms)
            self.batch_buf[len(self.pending)].copy_(self.batch)
            self.pending.append(self.step)
            self.step += 1
            if len(self.pending) == tc.log_every:
                self.flush_steps()
            if ck.unit == "step" and self.step % ck.every == 0 and self.step < epoch_end:
                self.checkpoint(drills)
        self.flush_steps()
        train_loss = self.loss_sum / (epoch_end - (self.epoch - 1) * spe)
        self.diverged_at.masked_fill_(self.alive & ~torch.isfinite(train_loss), self.step - 1)
        self.alive.logical_and_(torch.isfinite(train_loss))
        if self.sink is not None:
            P = self.model.population
            self.final = self.epoch_metrics(self.epoch, {
                schema.TRAIN_LOSS: train_loss.cpu().numpy(),  # a host sync: the epoch's steps are done
                schema.EPOCH_S: np.full(P, time.perf_counter() - epoch_start),
                schema.MAX_RSS_MB: np.full(P, max_rss_mb())})
        self.loss_sum.zero_()

    def flush_steps(self) -> None:
        """Every rank: the pending steps' batch losses averaged over the ranks (one all-reduce per
        log interval, not per step) into the epoch's sum. Rank 0: every step's row to the step
        tables, the intervals they complete to MLflow."""
        if not self.pending:
            return
        n, pending, sink = len(self.pending), self.pending, self.sink
        # [n, P, 2]: each step's global batch loss and accuracy (equal local batches: the ranks' mean)
        global_batch = collective.torch_mean(self.batch_buf[:n])
        self.loss_sum.add_(global_batch[:, :, 0].sum(0))
        if sink is not None:
            div = self.diverged_at.cpu().numpy()
            if self.names:
                rows = torch.cat([self.norm_buf[:n], global_batch], 2)  # [n, P, S + 2]
                steps = torch.arange(pending[0], pending[0] + n, device=self.env.device).unsqueeze(1)
                # a diverged member's rows end at its divergence
                active = (self.diverged_at < 0) | (steps <= self.diverged_at)
                done = self.summary.add(pending[0], rows, active)
                host = rows.cpu().numpy()  # the interval's one copy of its rows to the host
                sink.log_steps(pending, {name: host[:, :, j] for j, name in enumerate(self.names)},
                               (div < 0) | (np.array(pending)[:, None] <= div))
                self.log_intervals(done, div)
                last_loss = host[-1, :, self.model.n_segments]
            else:
                last_loss = global_batch[-1, :, 0].cpu().numpy()
            sink.progress({"step": pending[-1] + 1, "total_steps": self.total_steps,
                           "loss": float(np.nanmean(last_loss))})
        pending.clear()

    def log_intervals(self, done: list, div: np.ndarray) -> None:
        for start, mean, peak in done:
            mean, peak = mean.cpu().numpy(), peak.cpu().numpy()
            values = {name: mean[:, j] for j, name in enumerate(self.names)}
            values.update({schema.max_name(name): peak[:, j] for j, name in enumerate(self.names)})
            self.sink.log(start, values, (div < 0) | (start <= div))

    def epoch_metrics(self, e: int, extra: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Rank 0: epoch e's evaluation, probe (and Jacobian) with `extra`, logged for the members
        still alive."""
        model = self.model
        values = {**extra, **metrics.probe(model, self.probe_x, self.probe_y),
                  **metrics.evaluate(model, self.eval_x, self.eval_y, self.eval_prefix)}
        if self.cfg.train.jacobian:
            values.update(metrics.jacobian(model, self.probe_x[:metrics.JACOBIAN_INPUTS]))
        active = (self.diverged_at < 0).cpu().numpy()
        self.sink.log(e, values, active)
        if active.any():
            self.sink.progress({"epoch": e, "acc": float(values[schema.acc(self.eval_prefix)][active].mean())})
        return values

    def checkpoint(self, drills: Drills, done: bool = False) -> None:
        """Commit the state (with done, the training's last), then flush rank 0's records."""
        self.flush_steps()
        if done and self.summary is not None:
            self.log_intervals(self.summary.close(), self.diverged_at.cpu().numpy())
        self.commit(self.state_dict(), done)
        drills.after_commit(self.step)
        if self.sink is not None and not done:  # the last records go with the runs' outcome: the sink's owner closes it
            drills.at_flush(self.sink, self.step)
            self.sink.flush()

    def state_dict(self) -> TrainState:
        return TrainState(theta=self.model.theta.cpu(), velocity=self.opt.velocity, alive=self.alive.cpu(),
                          diverged_at=self.diverged_at.cpu(), loss_sum=self.loss_sum.cpu(), step=self.step,
                          epoch=self.epoch, final=self.final, rng=torch.get_rng_state(),
                          interval=self.summary.state_dict() if self.summary is not None else None,
                          all_reduce=self.all_reduce)

    def load_state_dict(self, state: TrainState) -> None:
        self.model.theta.copy_(state.theta)
        if self.opt.velocity is not None:
            self.opt.velocity.copy_(state.velocity)
        self.alive.copy_(state.alive)
        self.diverged_at.copy_(state.diverged_at)
        self.loss_sum.copy_(state.loss_sum)
        self.step, self.epoch, self.final = state.step, state.epoch, state.final
        torch.set_rng_state(state.rng)
        if self.summary is not None:
            self.summary.load_state_dict(state.interval)


def train(cfg: Config, arrays: dict[str, np.ndarray], env: WorkerEnv, sink: Sink | None,
          commit: Callable[[TrainState, bool], None] = no_commit, resume: TrainState | None = None) -> TrainState:
    """Train cfg's population (Loop) and return its final state. `sink` is rank 0's; the other
    ranks pass None. `resume`: a committed state to continue from."""
    return Loop(cfg, arrays, env, sink, commit).run(resume)
