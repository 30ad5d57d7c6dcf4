"""What the project exists to show: per-layer gradient norms, Nielsen's speed-of-learning probe,
activation statistics, accuracy. Functions of a model and data; they return [P]-shaped arrays keyed
by the record's names (distnet.schema: `grad_norm/w/layer_1`, `speed/layer_1`, ...), which the MLflow
UI groups on."""

from __future__ import annotations

import math

import numpy as np
import torch

from distnet import schema
from distnet.model import PopulationMLP

EVAL_CHUNK = 2000  # bounds the [P, chunk, width] activations of a large population


def grad_norm_names(n_layers: int) -> list[str]:
    """Names of the columns of PopulationMLP.segment_norms, in order."""
    return [schema.grad_norm(kind, l) for l in range(1, n_layers + 1) for kind in ("w", "b")]


def step_names(n_layers: int) -> list[str]:
    """The per-step series: every layer's gradient norms, then the batch loss and accuracy. Their
    step tables hold every step; MLflow holds each one's interval mean under this name and its max under
    schema.max_name(name)."""
    return grad_norm_names(n_layers) + [schema.BATCH_LOSS, schema.BATCH_ACC]


def interval(total_steps: int, points: int) -> int:
    """Steps per MLflow point of a per-step series: at most `points` points whatever the length."""
    return max(1, math.ceil(total_steps / points))


class IntervalStats:
    """Mean and max of per-step records [P, C] over fixed intervals of `every` steps (steps
    [j*every, (j+1)*every)), reduced on the records' device. The mean shows the trend, the max keeps a
    one-step spike visible. A member's interval covers only its active steps (a diverged member's
    rows end at its divergence), so each summary is exactly that of the member's step-table rows."""

    def __init__(self, every: int, like: torch.Tensor):
        self.every = every
        self.sum = torch.zeros_like(like, dtype=torch.float64)
        self.max = torch.full_like(like, -math.inf)
        self.count = torch.zeros(like.shape[0], 1, dtype=torch.float64, device=like.device)
        self.start, self.n = 0, 0

    def add(self, first_step: int, rows: torch.Tensor, active: torch.Tensor) -> list[tuple]:
        """Take rows [n, P, C] of steps first_step, first_step + 1, ... and which members they count
        for, active [n, P]; return the intervals they complete as (first step, mean [P, C], max [P, C])."""
        done, i = [], 0
        while i < len(rows):
            step = first_step + i
            if self.n == 0:
                self.start = step
            take = min(len(rows) - i, self.every - step % self.every)
            keep = active[i:i + take].unsqueeze(2)
            chunk = rows[i:i + take]
            self.sum.add_(chunk.where(keep, 0).sum(0, dtype=torch.float64))
            # NaN propagates through maximum: a non-finite step shows in its interval.
            torch.maximum(self.max, chunk.where(keep, -math.inf).amax(0), out=self.max)
            self.count.add_(keep.sum(0))
            self.n += take
            i += take
            if (step + take) % self.every == 0:
                done.append(self._take())
        return done

    def close(self) -> list[tuple]:
        """The last, partial interval of a training that ends inside one."""
        return [self._take()] if self.n else []

    def _take(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        out = (self.start, (self.sum / self.count).to(self.max.dtype), self.max.clone())
        self.sum.zero_()
        self.max.fill_(-math.inf)
        self.count.zero_()
        self.n = 0
        return out

    def state_dict(self) -> dict:
        return {"sum": self.sum.cpu(), "max": self.max.cpu(), "count": self.count.cpu(), "start": self.start,
                "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        for name in ("sum", "max", "count"):
            getattr(self, name).copy_(state[name])
        self.start, self.n = state["start"], state["n"]


def evaluate(model: PopulationMLP, x: torch.Tensor, y: torch.Tensor, prefix: str) -> dict[str, np.ndarray]:
    """Accuracy and mean loss of every member on (x, y)."""
    correct = torch.zeros(model.population, device=x.device)
    loss = torch.zeros(model.population, device=x.device, dtype=torch.float64)
    for i in range(0, len(x), EVAL_CHUNK):
        xb, yb = x[i:i + EVAL_CHUNK], y[i:i + EVAL_CHUNK]
        z = model.forward(xb)
        correct += (z.argmax(-1) == yb).sum(-1)
        loss += model.loss_fn(z, yb).double() * len(xb)
    return {schema.acc(prefix): (correct / len(x)).cpu().numpy(), schema.loss(prefix): (loss / len(x)).cpu().numpy()}


JACOBIAN_INPUTS = 8  # the first probe images: the spectrum is averaged over these inputs


def jacobian(model: PopulationMLP, x: torch.Tensor) -> dict[str, np.ndarray]:
    """The spectrum of the hidden stack's input-output Jacobian, J = D_L W_L ... D_2 W_2 (from the
    first hidden layer's output to the last's: the square product of Pennington et al. 2017,
    D_l = diag phi'(z_l)), at each image of x: its squared singular values' mean, variance over mean
    squared (`spread`) and maximum, averaged over the images, and the schema.JACOBIAN_QUANTILES of all the
    images' squared singular values together, per member; and `jacobian/q_in`, the mean square of the
    first hidden layer's pre-activations on those images (the length that feeds J: where mean-field
    theory starts its layers, meanfield.jacobian_spectrum's q_in). In float64, one image at
    a time ([P, n, n] each); L - 1 batched n x n products an image, so off by default
    (`train.jacobian`). Nothing for a net with one hidden layer (no square part)."""
    if len(model.layers) < 3:
        return {}
    with torch.no_grad():
        _, hidden = model.forward(x, keep_hidden=True)
        q_in = hidden[0][0].double().square().mean((1, 2)).cpu().numpy()  # z^1 [P, n, B]
        slopes = [model.act.grad(z, a).double() for z, a in hidden[1:]]  # D_2 .. D_L, [P, n, B] each
        weights = [w.double() for w, _ in model.params[1:-1]]  # W_2 .. W_L, [P, n, n]
        moments, spectra = [], []
        for i in range(len(x)):
            jac = slopes[0][:, :, i, None] * weights[0]
            for w, d in zip(weights[1:], slopes[1:]):
                jac = d[:, :, i, None] * (w @ jac)
            sq = torch.linalg.svdvals(jac) ** 2  # [P, n]
            m1 = sq.mean(1)
            moments.append(torch.stack([m1, (sq**2).mean(1) / m1**2 - 1, sq.max(1).values], 1))
            spectra.append(sq)
        mean, spread, peak = torch.stack(moments).mean(0).T.cpu().numpy()
        levels = torch.tensor(schema.JACOBIAN_QUANTILES, dtype=torch.float64, device=x.device) / 100
        quantiles = torch.quantile(torch.cat(spectra, 1), levels, dim=1).cpu().numpy()  # [Q, P]
    return {**{schema.jacobian(m): v for m, v in zip(schema.JACOBIAN_MOMENTS, (mean, spread, peak))},
            schema.jacobian(schema.JACOBIAN_Q_IN): q_in,
            **{schema.quantile_name(pct): q for pct, q in zip(schema.JACOBIAN_QUANTILES, quantiles)}}


def probe(model: PopulationMLP, x: torch.Tensor, y: torch.Tensor) -> dict[str, np.ndarray]:
    """Nielsen's speed of learning (generate_gradient.py): the norm of each hidden layer's bias
    gradient averaged over a fixed probe set, plus each hidden layer's activation mean, std and
    fraction saturated on the same images."""
    model.loss_and_grad(x, y)  # overwrites model.grad: the probe runs between steps
    norms = model.segment_norms(model.grad)  # [P, 2L]; hidden layer l's bias is column 2(l-1)+1
    _, hidden = model.forward(x, keep_hidden=True)
    out = {}
    for l, (z, a) in enumerate(hidden, start=1):
        flat_a = a.reshape(a.shape[0], -1)
        out[schema.layer(schema.SPEED, l)] = norms[:, 2 * (l - 1) + 1]
        out[schema.layer(schema.ACT_MEAN, l)] = flat_a.mean(1)
        out[schema.layer(schema.ACT_STD, l)] = flat_a.std(1)
        out[schema.layer(schema.SATURATED, l)] = model.act.saturated(z, a).reshape(a.shape[0], -1).float().mean(1)
    return {k: v.cpu().numpy() for k, v in out.items()}
