"""Rank 0's part of a training: what it measures and where the records go.

Every rank steps; rank 0 alone also evaluates at each epoch's end (held-out accuracy and loss,
Nielsen's speed probe, activation statistics, with `train.jacobian` the Jacobian's spectrum),
reduces the per-step series to interval means and maxima, and hands all of it to its sink (MLflow
and the step tables in a real run). The loop calls the same methods on every rank: the others get
`NO_RECORDER`, which records nothing.
"""

from __future__ import annotations

import resource
import time
from typing import Protocol

import numpy as np
import torch

from distnet import metrics, schema
from distnet.config import Config
from distnet.drills import FaultHooks
from distnet.model import PopulationMLP
from distnet.progress import Progress
from distnet.stepper import pixels


class Sink(Protocol):
    """Where rank 0's metrics go (MLflow and the step tables in a real run). Values are per member."""

    def log(self, step: int, values: dict[str, np.ndarray], active: np.ndarray) -> None:
        """Record the metric values[name][k] ([P] arrays) for every member k with active[k]."""

    def log_steps(self, steps: list[int], columns: dict[str, np.ndarray], active: np.ndarray) -> None:
        """Record full-resolution rows: columns[name][i, k] ([n, P] arrays) is member k's value at
        steps[i], kept where active[i, k]."""

    def progress(self, state: Progress) -> None:
        """Where the training is (step, epoch, loss, accuracy), for the driver's progress line."""

    def flush(self) -> None:
        """Write what log() and log_steps() buffered; called at each checkpoint but the last (the
        sink's owner writes the rest with the outcome)."""

    def write(self, k: int) -> None:
        """Member k's buffered records, now (a flush member by member; the fault drills' half-written
        flush calls it)."""


def max_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB), for the perf/ metrics."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Recorder:
    """Rank 0's records of the training of `model` on `arrays` (on the device): eval_x/eval_y the
    held-out set, the first `train.probe_size` training images the probe."""

    def __init__(self, cfg: Config, model: PopulationMLP, arrays: dict[str, torch.Tensor], total_steps: int,
                 sink: Sink, drills: FaultHooks):
        tc, scale = cfg.train, cfg.data.pixel_scale
        self.cfg, self.model, self.sink, self.drills = cfg, model, sink, drills
        self.probe_x, self.probe_y = pixels(arrays["train_x"][: tc.probe_size], scale), arrays["train_y"][: tc.probe_size]
        self.eval_x, self.eval_y = pixels(arrays["eval_x"], scale), arrays["eval_y"]
        self.eval_prefix = schema.eval_prefix(cfg.data.split)
        self.total_steps = total_steps
        self.names = metrics.step_names(len(model.layers)) if tc.step_norms else []
        # The per-step series reduced to interval means and maxima for MLflow, on the device.
        P, S = model.population, model.n_segments
        self.summary = metrics.IntervalStats(metrics.interval(total_steps, tc.metric_points),
                                             torch.empty(P, S + 2, device=self.eval_x.device)) if self.names else None

    def epoch(self, e: int, diverged_at: torch.Tensor, train_loss: torch.Tensor | None = None,
              started: float | None = None) -> dict[str, np.ndarray]:
        """Epoch e's evaluation, probe (and Jacobian), logged for the members still alive; with the
        epoch's mean training loss and its start time (epoch 0, the network at init, has neither)."""
        model = self.model
        extra = {} if train_loss is None else {
            schema.TRAIN_LOSS: train_loss.cpu().numpy(),  # a host sync: the epoch's steps are done
            schema.EPOCH_S: np.full(model.population, time.perf_counter() - started),
            schema.MAX_RSS_MB: np.full(model.population, max_rss_mb())}
        values = {**extra, **metrics.probe(model, self.probe_x, self.probe_y),
                  **metrics.evaluate(model, self.eval_x, self.eval_y, self.eval_prefix)}
        if self.cfg.train.jacobian:
            values.update(metrics.jacobian(model, self.probe_x[:metrics.JACOBIAN_INPUTS]))
        active = (diverged_at < 0).cpu().numpy()
        self.sink.log(e, values, active)
        if active.any():
            self.sink.progress(Progress(epoch=e, acc=float(values[schema.acc(self.eval_prefix)][active].mean())))
        return values

    def steps(self, pending: list[int], norms: torch.Tensor, global_batch: torch.Tensor,
              diverged_at: torch.Tensor) -> None:
        """The steps `pending`, with their gradient norms [n, P, S] and global batch loss and accuracy
        [n, P, 2]: every row to the step tables, the intervals they complete to MLflow."""
        n, sink = len(pending), self.sink
        div = diverged_at.cpu().numpy()
        if self.names:
            rows = torch.cat([norms, global_batch], 2)  # [n, P, S + 2]
            steps = torch.arange(pending[0], pending[0] + n, device=rows.device).unsqueeze(1)
            # a diverged member's rows end at its divergence
            active = (diverged_at < 0) | (steps <= diverged_at)
            done = self.summary.add(pending[0], rows, active)
            host = rows.cpu().numpy()  # the interval's one copy of its rows to the host
            sink.log_steps(pending, {name: host[:, :, j] for j, name in enumerate(self.names)},
                           (div < 0) | (np.array(pending)[:, None] <= div))
            self._log_intervals(done, div)
            last_loss = host[-1, :, self.model.n_segments]
        else:
            last_loss = global_batch[-1, :, 0].cpu().numpy()
        sink.progress(Progress(step=pending[-1] + 1, total_steps=self.total_steps, loss=float(np.nanmean(last_loss))))

    def close(self, diverged_at: torch.Tensor) -> None:
        """The training's end: the last, partial interval to MLflow."""
        if self.summary is not None:
            self._log_intervals(self.summary.close(), diverged_at.cpu().numpy())

    def flush(self, step: int) -> None:
        """At a committed checkpoint (step), the records it covers to the sink's store."""
        self.drills.at_flush(self.sink, step)
        self.sink.flush()

    def _log_intervals(self, done: list, div: np.ndarray) -> None:
        for start, mean, peak in done:
            mean, peak = mean.cpu().numpy(), peak.cpu().numpy()
            values = {name: mean[:, j] for j, name in enumerate(self.names)}
            values.update({schema.max_name(name): peak[:, j] for j, name in enumerate(self.names)})
            self.sink.log(start, values, (div < 0) | (start <= div))

    def state_dict(self) -> dict | None:
        """The interval statistics not yet logged (IntervalStats.state_dict)."""
        return self.summary.state_dict() if self.summary is not None else None

    def load_state_dict(self, state: dict | None) -> None:
        if self.summary is not None:
            self.summary.load_state_dict(state)


class NoRecorder:
    """The other ranks': they step and checkpoint, and record nothing."""

    def epoch(self, e: int, diverged_at: torch.Tensor, train_loss: torch.Tensor | None = None,
              started: float | None = None) -> dict[str, np.ndarray]:
        return {}

    def steps(self, pending: list[int], norms: torch.Tensor, global_batch: torch.Tensor,
              diverged_at: torch.Tensor) -> None:
        pass

    def close(self, diverged_at: torch.Tensor) -> None:
        pass

    def flush(self, step: int) -> None:
        pass

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, state: dict | None) -> None:
        pass


NO_RECORDER = NoRecorder()
