"""The torch code of each named choice a config can make: weight inits, activations, losses.

Each registry maps a name of distnet.choices (which says what it means, without torch) to a small
record of functions. Adding a scheme is an entry here and one there, never a new branch elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from distnet import choices

Tensor = torch.Tensor


# ---------------------------------------------------------------- inits
@dataclass(frozen=True)
class Init:
    """A weight draw of shape [n_in, n_out] at unit gain (the bias' std is the choice's)."""

    weight: Callable[[int, int, torch.Generator], Tensor]


def _normal(std: Callable[[int, int], float]):
    return lambda n_in, n_out, g: torch.randn(n_in, n_out, generator=g) * std(n_in, n_out)


def _uniform(bound: Callable[[int, int], float]):
    def draw(n_in, n_out, g):
        a = bound(n_in, n_out)
        return (torch.rand(n_in, n_out, generator=g) * 2 - 1) * a

    return draw


def _orthogonal(n_in, n_out, g):
    # QR of a Gaussian matrix, signs fixed so the draw is uniform over orthogonal matrices.
    a = torch.randn(max(n_in, n_out), min(n_in, n_out), generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r))
    return (q if n_in >= n_out else q.T).to(torch.float32)


INITS: dict[str, Init] = {
    "nielsen": Init(_normal(lambda i, o: 1.0)),
    "nielsen_scaled": Init(_normal(lambda i, o: 1 / math.sqrt(i))),
    "uniform_sqrt_n": Init(_uniform(lambda i, o: 1 / math.sqrt(i))),
    "xavier_normal": Init(_normal(lambda i, o: math.sqrt(2 / (i + o)))),
    "xavier_uniform": Init(_uniform(lambda i, o: math.sqrt(6 / (i + o)))),
    "he_normal": Init(_normal(lambda i, o: math.sqrt(2 / i))),
    "he_uniform": Init(_uniform(lambda i, o: math.sqrt(6 / i))),
    "lecun_normal": Init(_normal(lambda i, o: 1 / math.sqrt(i))),
    "orthogonal": Init(_orthogonal),
}


def init_layer(name: str, n_in: int, n_out: int, g: torch.Generator, sigma_w: float, sigma_b: float | None):
    """One layer's (W [n_in, n_out], b [n_out]) in float32: sigma_w scales W, sigma_b sets b's std."""
    scheme = INITS[name]
    w = scheme.weight(n_in, n_out, g) * sigma_w
    b_std = choices.INITS[name].bias_std if sigma_b is None else sigma_b
    b = torch.randn(n_out, generator=g) * b_std
    return w, b


# ---------------------------------------------------------------- activations
@dataclass(frozen=True)
class Activation:
    fn: Callable[[Tensor], Tensor]
    # da/dz, given pre-activation z and activation a = fn(z): what backprop multiplies by.
    grad: Callable[[Tensor, Tensor], Tensor]
    # Which units count as saturated, given z and a (same shape): as choices.ACTIVATIONS says.
    saturated: Callable[[Tensor, Tensor], Tensor]


def _never(z, a):
    return torch.zeros_like(a, dtype=torch.bool)


def _negative(z, a):
    return z <= 0


def _step(slope_neg):
    return lambda z, a: torch.where(z > 0, 1.0, slope_neg).to(z.dtype)


_SELU_SCALE, _SELU_ALPHA = 1.0507009873554804934193349852946, 1.6732632423543772848170429916717

ACTIVATIONS: dict[str, Activation] = {
    "sigmoid": Activation(torch.sigmoid, lambda z, a: a * (1 - a), lambda z, a: (a < 0.01) | (a > 0.99)),
    "tanh": Activation(torch.tanh, lambda z, a: 1 - a * a, lambda z, a: a.abs() > 0.99),
    "softsign": Activation(F.softsign, lambda z, a: (1 + z.abs()).reciprocal().square(), lambda z, a: a.abs() > 0.99),
    "relu": Activation(F.relu, _step(0.0), lambda z, a: a == 0),
    # The rest of the relu family: 'saturated' is the negative branch, where relu would be 0.
    "leaky_relu": Activation(F.leaky_relu, _step(0.01), _negative),  # torch's slope 0.01
    "elu": Activation(F.elu, lambda z, a: torch.where(z > 0, 1.0, a + 1), _negative),
    "selu": Activation(F.selu, lambda z, a: torch.where(z > 0, _SELU_SCALE, a + _SELU_SCALE * _SELU_ALPHA), _negative),
    # softplus' slope is sigmoid(z): saturated where it is below 0.01, as for sigmoid units.
    "softplus": Activation(F.softplus, lambda z, a: torch.sigmoid(z), lambda z, a: torch.sigmoid(z) < 0.01),
    "identity": Activation(lambda z: z, lambda z, a: torch.ones_like(z), _never),
}


def on_arrays(activation: str) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """phi(h) and phi'(h) of `activation` on float64 arrays, through the code the model runs: what
    distnet.meanfield integrates."""
    act = ACTIVATIONS[activation]

    def phi(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = torch.from_numpy(h)
        a = act.fn(t)
        return a.numpy(), act.grad(t, a).numpy()

    return phi


# ---------------------------------------------------------------- losses
# Each takes the output layer's pre-activations z [P, B, C] and integer labels y [B]. `fn` is the
# per-member loss [P], summed over output units and averaged over the batch (Nielsen's convention);
# `value_and_grad` returns it with d fn / d z [P, B, C], where backprop starts (Nielsen's output
# delta, / B), sharing the work between the two.
def _one_hot(z: Tensor, y: Tensor) -> Tensor:
    # scatter, not F.one_hot: that one checks y's range with a host sync, every step.
    return torch.zeros_like(z).scatter_(-1, y.view(1, -1, 1).expand(z.shape[0], -1, 1), 1.0)


def _softmax_ce(z: Tensor, y: Tensor) -> Tensor:
    logp = torch.log_softmax(z, dim=-1)
    return -logp.gather(-1, y.view(1, -1, 1).expand(z.shape[0], -1, 1)).squeeze(-1).mean(-1)


def _softmax_ce_vg(z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    logp, t = torch.log_softmax(z, dim=-1), _one_hot(z, y)
    return -(logp * t).sum(-1).mean(-1), logp.exp_().sub_(t).div_(z.shape[1])


def _sigmoid_bce(z: Tensor, y: Tensor) -> Tensor:
    bce = F.binary_cross_entropy_with_logits(z, _one_hot(z, y), reduction="none")
    return bce.sum(-1).mean(-1)


def _sigmoid_bce_vg(z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    t = _one_hot(z, y)
    loss = F.binary_cross_entropy_with_logits(z, t, reduction="none").sum(-1).mean(-1)
    return loss, torch.sigmoid(z).sub_(t).div_(z.shape[1])  # CrossEntropyCost.delta: a - y


def _quadratic(z: Tensor, y: Tensor) -> Tensor:
    return 0.5 * (torch.sigmoid(z) - _one_hot(z, y)).square().sum(-1).mean(-1)


def _quadratic_vg(z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    a = torch.sigmoid(z)
    err = a - _one_hot(z, y)
    loss = 0.5 * err.square().sum(-1).mean(-1)
    return loss, err.mul_(a * (1 - a)).div_(z.shape[1])  # QuadraticCost.delta: (a - y) sigma'(z)


@dataclass(frozen=True)
class Loss:
    fn: Callable[[Tensor, Tensor], Tensor]
    value_and_grad: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


LOSSES: dict[str, Loss] = {
    "softmax_ce": Loss(_softmax_ce, _softmax_ce_vg),
    "sigmoid_bce": Loss(_sigmoid_bce, _sigmoid_bce_vg),
    "quadratic": Loss(_quadratic, _quadratic_vg),
}

