"""The per-worker training loop: plain PyTorch, read top to bottom.

Runs on every data-parallel worker (rank r of W) or alone (W = 1). Every worker holds the whole
population and the whole data set as tensors on its device. The loop composes three parts that
own their state: the Stepper (every rank: forward, backward, the all-reduce of the one [P, T]
gradient, per-layer gradient norms, divergence check, update), rank 0's Recorder (evaluation,
probe, interval statistics, the sink; NO_RECORDER elsewhere) and the fault drills. `train` builds
them. Ray never appears here: launch.py calls `train` inside a Ray Train worker.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from distnet import collective, sharding
from distnet.config import Config
from distnet.drills import NO_DRILLS, Drills, FaultHooks
from distnet.model import PopulationMLP, init_theta
from distnet.recorder import NO_RECORDER, NoRecorder, Recorder, Sink
from distnet.stepper import Stepper


@dataclass(frozen=True)
class WorkerEnv:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")


def to_device(arrays: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """The arrays on the device, once: pixels stay uint8 (a quarter of float32's memory; the
    stepper and the recorder make the floats the model sees), labels become int64."""
    return {k: torch.tensor(v, device=device, dtype=torch.uint8 if k.endswith("_x") else torch.int64)
            for k, v in arrays.items()}


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
    """One training of cfg's population on one worker: epochs of steps, checkpoints, and what every
    rank keeps between steps (divergence steps, the epoch's loss sum, the per-step records not yet
    on the host).

    Every checkpoint interval (and at the end, done=True) every rank calls commit(state, done);
    rank 0's records are flushed only after commit returns, so what MLflow holds is always covered
    by a committed checkpoint. After the last commit the sink keeps what it holds for its owner, who
    writes it with the runs' outcome (MlflowSink.close)."""

    def __init__(self, cfg: Config, env: WorkerEnv, stepper: Stepper, recorder: Recorder | NoRecorder = NO_RECORDER,
                 commit: Callable[[TrainState, bool], None] = no_commit, drills: FaultHooks = NO_DRILLS):
        tc, dev = cfg.train, env.device
        self.cfg, self.env, self.stepper, self.recorder, self.commit, self.drills = cfg, env, stepper, recorder, commit, drills
        self.n_examples = len(stepper.x)
        self.steps_per_epoch = self.n_examples // tc.batch_size
        self.total_steps = total_steps(cfg, self.n_examples)
        # Per-step records stay on the device: [log_every, P, 2L norms] and [log_every, P, 2] batch
        # losses and accuracies, brought to the host once per log interval so the hot path never
        # waits on a host sync.
        P, S = stepper.model.population, stepper.model.n_segments
        self.norm_buf = torch.empty(tc.log_every, P, S, device=dev)
        self.batch_buf = torch.empty(tc.log_every, P, 2, device=dev)
        self.pending: list[int] = []  # global steps whose rows in the buffers are not yet on the host
        self.diverged_at = torch.full((P,), -1, dtype=torch.long, device=dev)  # -1 while alive
        # The epoch's sum of global batch losses: the same on every rank (so any rank's checkpoint of
        # it is right for all).
        self.loss_sum = torch.zeros(P, device=dev)
        self.step, self.epoch, self.final = 0, 1, {}

    def run(self, resume: TrainState | None = None) -> TrainState:
        """Train from the start (epoch 0's metrics first: the network at init), or from `resume`'s
        exact step; return the final state (on rank 0 with the final evaluation)."""
        if resume is None:
            self.final = self.recorder.epoch(0, self.diverged_at)
        else:
            self.load_state_dict(resume)
        drill_steps = self.drills.begin(self.step)
        going = self.going()
        while going:
            self.train_epoch(drill_steps)
            self.epoch += 1
            going = self.going()  # one host sync per epoch
            ck = self.cfg.checkpoint
            if going and (ck.unit == "step" or (self.epoch - 1) % ck.every == 0):
                self.checkpoint()  # (the training's last checkpoint is the one below)
        self.checkpoint(done=True)
        return self.state_dict()

    def going(self) -> bool:
        return self.epoch <= self.cfg.train.epochs and self.step < self.total_steps and bool(self.stepper.alive.any())

    def train_epoch(self, drill_steps: frozenset[int]) -> None:
        """The epoch's steps (checkpointing every `checkpoint.every` steps with unit step), then its
        metrics: the mean training loss, a member whose loss is not finite diverged."""
        tc, ck, spe, alive = self.cfg.train, self.cfg.checkpoint, self.steps_per_epoch, self.stepper.alive
        started = time.perf_counter()
        batches = sharding.epoch_batches(self.n_examples, tc.batch_size, self.epoch, self.cfg.data.shuffle_seed,
                                         self.env.rank, self.env.world_size).to(self.env.device)
        epoch_end = min(self.epoch * spe, self.total_steps)
        while self.step < epoch_end:
            batch = batches[self.step - (self.epoch - 1) * spe]
            if self.step in drill_steps:
                self.drills.at_step(self.step, batch)
            self.stepper(batch)
            self.diverged_at.masked_fill_(self.stepper.newly_diverged, self.step)
            self.norm_buf[len(self.pending)].copy_(self.stepper.norms)
            self.batch_buf[len(self.pending)].copy_(self.stepper.batch)
            self.pending.append(self.step)
            self.step += 1
            if len(self.pending) == tc.log_every:
                self.flush_steps()
            if ck.unit == "step" and self.step % ck.every == 0 and self.step < epoch_end:
                self.checkpoint()
        self.flush_steps()
        train_loss = self.loss_sum / (epoch_end - (self.epoch - 1) * spe)
        self.diverged_at.masked_fill_(alive & ~torch.isfinite(train_loss), self.step - 1)
        alive.logical_and_(torch.isfinite(train_loss))
        self.final = self.recorder.epoch(self.epoch, self.diverged_at, train_loss, started)
        self.loss_sum.zero_()

    def flush_steps(self) -> None:
        """The pending steps' batch losses averaged over the ranks (one all-reduce per log interval,
        not per step) into the epoch's sum, and their rows to the recorder."""
        if not self.pending:
            return
        n = len(self.pending)
        # [n, P, 2]: each step's global batch loss and accuracy (equal local batches: the ranks' mean)
        global_batch = collective.torch_mean(self.batch_buf[:n])
        self.loss_sum.add_(global_batch[:, :, 0].sum(0))
        self.recorder.steps(self.pending, self.norm_buf[:n], global_batch, self.diverged_at)
        self.pending.clear()

    def checkpoint(self, done: bool = False) -> None:
        """Commit the state (with done, the training's last), then flush rank 0's records."""
        self.flush_steps()
        if done:
            self.recorder.close(self.diverged_at)
        self.commit(self.state_dict(), done)
        self.drills.after_commit(self.step)
        if not done:  # the last records go with the runs' outcome: the sink's owner closes it
            self.recorder.flush(self.step)

    def state_dict(self) -> TrainState:
        stepper = self.stepper
        return TrainState(theta=stepper.model.theta.cpu(), velocity=stepper.opt.velocity, alive=stepper.alive.cpu(),
                          diverged_at=self.diverged_at.cpu(), loss_sum=self.loss_sum.cpu(), step=self.step,
                          epoch=self.epoch, final=self.final, rng=torch.get_rng_state(),
                          interval=self.recorder.state_dict(), all_reduce=stepper.all_reduce)

    def load_state_dict(self, state: TrainState) -> None:
        stepper = self.stepper
        stepper.model.theta.copy_(state.theta)
        if stepper.opt.velocity is not None:
            stepper.opt.velocity.copy_(state.velocity)
        stepper.alive.copy_(state.alive)
        self.diverged_at.copy_(state.diverged_at)
        self.loss_sum.copy_(state.loss_sum)
        self.step, self.epoch, self.final = state.step, state.epoch, state.final
        torch.set_rng_state(state.rng)
        self.recorder.load_state_dict(state.interval)


def total_steps(cfg: Config, n_examples: int) -> int:
    """The training's length: its epochs of whole global batches, cut at `train.max_steps`."""
    per_epoch = cfg.train.epochs * (n_examples // cfg.train.batch_size)
    return min(per_epoch, cfg.train.max_steps or per_epoch)


def train(cfg: Config, arrays: dict[str, np.ndarray], env: WorkerEnv, sink: Sink | None,
          commit: Callable[[TrainState, bool], None] = no_commit, resume: TrainState | None = None) -> TrainState:
    """Train cfg's population and return its final state: the loop composed of its parts. `sink` is
    rank 0's; the other ranks pass None. `resume`: a committed state to continue from."""
    d = to_device(arrays, env.device)
    model = PopulationMLP(cfg.sizes, cfg.model.activation, cfg.model.loss, init_theta(cfg.sizes, cfg.members).to(env.device))
    stepper = Stepper(cfg, model, d["train_x"], d["train_y"], cfg.train.batch_size // env.world_size)
    drills = Drills(cfg.fault, env.rank)
    recorder = NO_RECORDER if sink is None else Recorder(cfg, model, d, total_steps(cfg, len(d["train_x"])), sink, drills)
    return Loop(cfg, env, stepper, recorder, commit, drills).run(resume)
