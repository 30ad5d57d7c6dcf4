"""The per-worker training loop: plain PyTorch, read top to bottom.

Runs on every data-parallel worker (rank r of W) or alone (W = 1). Every worker holds the whole
population and the whole data set as tensors on its device; each step it takes its slice of the
global batch, backpropagates, all-reduces the one [P, T] gradient (mean), records the per-layer
gradient norms of every member on the device, and updates. Rank 0 alone evaluates and logs.
Ray never appears here: launch.py calls `train` inside a Ray Train worker.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch

from distnet import collective, data, metrics, schema
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

    def flush(self, midway: Callable[[], None] | None = None) -> None:
        """Write what log() and log_steps() buffered; called at each checkpoint but the last (the
        sink's owner writes the rest with the outcome). `midway`, if given,
        is called once the first run's records are written (fault injection)."""


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


def _kill_due(cfg: Config, step: int, rank: int, in_flush: bool) -> bool:
    """fault.kill_at_step reached on rank fault.kill_rank (in a step, or in a flush with
    fault.kill_in_flush), and its marker file (if any) not there yet."""
    f = cfg.fault
    if f.kill_at_step is None or f.kill_rank != rank or f.kill_in_flush != in_flush:
        return False
    if (step < f.kill_at_step) if in_flush else (step != f.kill_at_step):
        return False
    return not (f.once_marker and os.path.exists(f.once_marker))


def _kill(cfg: Config) -> None:
    """SIGKILL this worker, once per marker file."""
    if cfg.fault.once_marker:
        Path(cfg.fault.once_marker).touch()
    os.kill(os.getpid(), signal.SIGKILL)


def _trace(cfg: Config, env: WorkerEnv, step: int, batch: torch.Tensor) -> None:
    """fault.trace: note the first step this attempt executes and its example indices."""
    if cfg.fault.trace:
        path = Path(cfg.fault.trace) / f"rank{env.rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "first_step": step,
                                "batch": batch.tolist()}) + "\n")


def diverged_members(diverged_at: torch.Tensor) -> dict[int, int]:
    """member -> step of its first non-finite gradient, for the members that diverged."""
    return {k: int(s) for k, s in enumerate(diverged_at.tolist()) if s >= 0}


def no_commit(state: dict, done: bool) -> None:
    """Training outside Ray: checkpoints go nowhere (metrics are still flushed at each one)."""


def train(cfg: Config, arrays: dict[str, np.ndarray], env: WorkerEnv, sink: Sink | None,
          commit: Callable[[dict, bool], None] = no_commit, resume: dict | None = None) -> dict:
    """Train cfg's population and return its final state (parameters on the CPU and, on rank 0,
    the final evaluation). `sink` is rank 0's; the other ranks pass None.

    Every checkpoint interval (and at the end, done=True) every rank calls commit(state, done);
    rank 0's sink is flushed only after commit returns, so what MLflow holds is always covered by a
    committed checkpoint. After the last commit the sink keeps what it holds for its owner, who
    writes it with the runs' outcome (MlflowSink.close). `resume` is such a state: training
    continues from its exact step.
    """
    tc, ck = cfg.train, cfg.checkpoint
    d = to_device(arrays, env.device)
    x, y = d["train_x"], d["train_y"]
    n_train = len(x)
    scale = cfg.data.pixel_scale
    probe_x, probe_y = pixels(x[: tc.probe_size], scale), y[: tc.probe_size]
    eval_x = pixels(d["eval_x"], scale)
    eval_prefix = schema.eval_prefix(cfg.data.split)

    members = cfg.members
    model = PopulationMLP(cfg.sizes, cfg.model.activation, cfg.model.loss, init_theta(cfg.sizes, members).to(env.device))
    opt = PopulationSGD(model, [m.lr for m in members], tc.momentum, tc.l2, n_train)
    names = metrics.step_names(len(model.layers)) if tc.step_norms else []
    steps_per_epoch = n_train // tc.batch_size
    total_steps = min(tc.epochs * steps_per_epoch, tc.max_steps or tc.epochs * steps_per_epoch)

    # Per-step records stay on the device: [log_every, P, 2L norms] and [log_every, P, 2] local batch
    # losses and accuracies, brought to the host once per log interval so the hot path never waits
    # on a host sync.
    P, S = model.population, model.n_segments
    norm_buf = torch.empty(tc.log_every, P, S, device=env.device)
    batch_buf = torch.empty(tc.log_every, P, 2, device=env.device)
    pending: list[int] = []  # global steps whose rows in the buffers are not yet on the host
    # Rank 0 reduces the per-step series to interval means and maxima for MLflow, on the device.
    summary = metrics.IntervalStats(metrics.interval(total_steps, tc.metric_points),
                                    torch.empty(P, S + 2, device=env.device)) if sink and names else None
    grad_mean, all_reduce = collective.gradient_mean(model.grad, cfg.ray.all_reduce)
    # A member diverges at the first step whose all-reduced gradient has a non-finite norm (the same
    # on every rank); it is frozen there and the others go on.
    alive = torch.ones(P, dtype=torch.bool, device=env.device)
    diverged_at = torch.full((P,), -1, dtype=torch.long, device=env.device)
    # The epoch's sum of global batch losses: the same on every rank (so any rank's checkpoint of it
    # is right for all).
    loss_sum = torch.zeros(P, device=env.device)
    step, epoch, final = 0, 1, {}

    # The step reads and writes only these fixed tensors (and the model's), in place, so it can run
    # eagerly or be replayed as a CUDA graph; no allocation per step either way.
    local_batch = tc.batch_size // env.world_size
    idx = torch.zeros(local_batch, dtype=torch.long, device=env.device)
    xb_u8, yb = x.new_empty(local_batch, x.shape[1]), y.new_empty(local_batch)
    xb = eval_x.new_empty(local_batch, x.shape[1])
    norms, batch = torch.zeros(P, S, device=env.device), torch.zeros(P, 2, device=env.device)  # this step's
    loss, acc = batch[:, 0], batch[:, 1]
    newly_diverged = torch.zeros(P, dtype=torch.bool, device=env.device)

    def train_step() -> None:
        pixels(torch.index_select(x, 0, idx, out=xb_u8), scale, out=xb)
        torch.index_select(y, 0, idx, out=yb)
        loss.copy_(model.loss_and_grad(xb, yb, acc if tc.step_norms else None))  # acc: a step-table column only
        grad = grad_mean(model.grad)
        if tc.step_norms:
            norms.copy_(model.segment_norms(grad))
            finite = torch.isfinite(norms).all(1)
        else:  # the divergence check still needs a finite test of the all-reduced gradient
            finite = torch.isfinite(grad).all(1)
        torch.logical_and(alive, ~finite, out=newly_diverged)
        alive.logical_and_(finite)
        opt.step(grad, alive)

    state = [model.theta, alive] + ([opt.velocity] if opt.velocity is not None else [])
    run_step = capture(train_step, state) if tc.cuda_graph else train_step

    def flush_steps():
        """Every rank: the pending steps' batch losses averaged over the ranks (one all-reduce per
        log interval, not per step) into the epoch's sum. Rank 0: every step's row to the step
        tables, the intervals they complete to MLflow."""
        if not pending:
            return
        n = len(pending)
        # [n, P, 2]: each step's global batch loss and accuracy (equal local batches: the ranks' mean)
        global_batch = collective.torch_mean(batch_buf[:n])
        loss_sum.add_(global_batch[:, :, 0].sum(0))
        if sink is not None:
            div = diverged_at.cpu().numpy()
            if names:
                rows = torch.cat([norm_buf[:n], global_batch], 2)  # [n, P, S + 2]
                steps = torch.arange(pending[0], pending[0] + n, device=env.device).unsqueeze(1)
                active = (diverged_at < 0) | (steps <= diverged_at)  # a diverged member's rows end at its divergence
                done = summary.add(pending[0], rows, active)
                host = rows.cpu().numpy()  # the interval's one copy of its rows to the host
                sink.log_steps(pending, {name: host[:, :, j] for j, name in enumerate(names)},
                               (div < 0) | (np.array(pending)[:, None] <= div))
                log_intervals(done, div)
            last_loss = host[-1, :, S] if names else global_batch[-1, :, 0].cpu().numpy()
            sink.progress({"step": pending[-1] + 1, "total_steps": total_steps, "loss": float(np.nanmean(last_loss))})
        pending.clear()

    def log_intervals(done: list, div: np.ndarray) -> None:
        for start, mean, peak in done:
            mean, peak = mean.cpu().numpy(), peak.cpu().numpy()
            values = {name: mean[:, j] for j, name in enumerate(names)}
            values.update({schema.max_name(name): peak[:, j] for j, name in enumerate(names)})
            sink.log(start, values, (div < 0) | (start <= div))

    def epoch_metrics(e: int, extra: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = {**extra, **metrics.probe(model, probe_x, probe_y),
                  **metrics.evaluate(model, eval_x, d["eval_y"], eval_prefix)}
        if tc.jacobian:
            values.update(metrics.jacobian(model, probe_x[:metrics.JACOBIAN_INPUTS]))
        active = (diverged_at < 0).cpu().numpy()
        sink.log(e, values, active)
        if active.any():
            sink.progress({"epoch": e, "acc": float(values[schema.acc(eval_prefix)][active].mean())})
        return values

    def checkpoint(done: bool = False) -> None:
        flush_steps()
        if done and summary is not None:
            log_intervals(summary.close(), diverged_at.cpu().numpy())
        commit({"theta": model.theta.cpu(), "velocity": opt.velocity, "alive": alive.cpu(),
                "diverged_at": diverged_at.cpu(), "loss_sum": loss_sum.cpu(), "step": step, "epoch": epoch,
                "final": final, "rng": torch.get_rng_state(),
                "interval": summary.state() if summary is not None else None, "all_reduce": all_reduce}, done)
        if sink is not None and not done:  # the last records go with the runs' outcome: the sink's owner closes it
            kill = _kill_due(cfg, step, env.rank, in_flush=True)
            sink.flush(midway=(lambda: _kill(cfg)) if kill else None)

    if resume is None:
        final = epoch_metrics(0, {}) if sink is not None else {}  # epoch 0: the network at init
    else:
        model.theta.copy_(resume["theta"])
        if opt.velocity is not None:
            opt.velocity.copy_(resume["velocity"])
        alive.copy_(resume["alive"])
        diverged_at.copy_(resume["diverged_at"])
        loss_sum.copy_(resume["loss_sum"])
        step, epoch, final = resume["step"], resume["epoch"], resume["final"]
        torch.set_rng_state(resume["rng"])
        if summary is not None:
            summary.load(resume["interval"])

    first_step = step
    going = epoch <= tc.epochs and step < total_steps and bool(alive.any())
    while going:
        epoch_start = time.perf_counter()
        batches = data.epoch_batches(n_train, tc.batch_size, epoch, cfg.data.shuffle_seed, env.rank, env.world_size)
        batches = batches.to(env.device)
        epoch_end = min(epoch * steps_per_epoch, total_steps)
        while step < epoch_end:
            if step == first_step:
                _trace(cfg, env, step, batches[step - (epoch - 1) * steps_per_epoch])
            if _kill_due(cfg, step, env.rank, in_flush=False):
                _kill(cfg)
            if step == cfg.fault.raise_at_step:
                raise RuntimeError(f"fault injection: fault.raise_at_step={step}")
            idx.copy_(batches[step - (epoch - 1) * steps_per_epoch])
            run_step()
            diverged_at.masked_fill_(newly_diverged, step)
            norm_buf[len(pending)].copy_(norms)
            batch_buf[len(pending)].copy_(batch)
            pending.append(step)
            step += 1
            if len(pending) == tc.log_every:
                flush_steps()
            if ck.unit == "step" and step % ck.every == 0 and step < epoch_end:
                checkpoint()
        flush_steps()
        epoch_steps = epoch_end - (epoch - 1) * steps_per_epoch
        train_loss = loss_sum / epoch_steps
        diverged_at.masked_fill_(alive & ~torch.isfinite(train_loss), step - 1)
        alive.logical_and_(torch.isfinite(train_loss))
        if sink is not None:
            loss_host = train_loss.cpu().numpy()  # a host sync: the epoch's steps are done
            final = epoch_metrics(epoch, {schema.TRAIN_LOSS: loss_host,
                                          schema.EPOCH_S: np.full(P, time.perf_counter() - epoch_start),
                                          schema.MAX_RSS_MB: np.full(P, max_rss_mb())})
        loss_sum.zero_()
        epoch += 1
        going = epoch <= tc.epochs and step < total_steps and bool(alive.any())  # one host sync per epoch
        if going and (ck.unit == "step" or (epoch - 1) % ck.every == 0):
            checkpoint()  # (the training's last checkpoint is the one below)
    checkpoint(done=True)
    # The same names as the checkpoint's state: a closing rank 0 reads either.
    return {"theta": model.theta.cpu(), "final": final, "step": step, "diverged_at": diverged_at.cpu(),
            "all_reduce": all_reduce}
