"""A population of P MLPs of one shape, trained as one batched network, and its SGD.

All parameters of all members live in one leaf tensor `theta` of shape [P, T] (T = parameters per
member). Layer l's weights are the view theta[:, w_off:w_off + n_in*n_out] reshaped to
[P, n_in, n_out] and its biases the next n_out columns, so:
- forward is batched matmuls over the member dimension;
- autograd writes every gradient into one [P, T] tensor: one all-reduce per step, one segmented
  reduction for every per-layer gradient norm of every member, one fused update;
- a checkpoint is one tensor.
Members differ in init scheme, init scale, seed and learning rate; they share shape, activation and
loss. A plain run is P = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distnet import registry
from distnet.config import Member

Tensor = torch.Tensor


@dataclass(frozen=True)
class Layer:
    n_in: int
    n_out: int
    w_off: int  # column of theta where W starts; b follows W

    @property
    def b_off(self) -> int:
        return self.w_off + self.n_in * self.n_out

    @property
    def end(self) -> int:
        return self.b_off + self.n_out


def make_layers(sizes: list[int]) -> list[Layer]:
    layers, off = [], 0
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers.append(Layer(n_in, n_out, off))
        off = layers[-1].end
    return layers


def init_theta(sizes: list[int], members: list[Member]) -> Tensor:
    """[P, T] float32 parameters. Member k's draw depends only on its own settings, so it is the
    same whether it trains alone or inside any population."""
    rows = []
    for m in members:
        g = torch.Generator().manual_seed(m.seed)
        parts = []
        for layer in make_layers(sizes):
            w, b = registry.init_layer(m.init, layer.n_in, layer.n_out, g, m.sigma_w, m.sigma_b)
            parts += [w.reshape(-1), b]
        rows.append(torch.cat(parts))
    return torch.stack(rows)


class PopulationMLP:
    def __init__(self, sizes: list[int], activation: str, loss: str, theta: Tensor):
        self.sizes = list(sizes)
        self.layers = make_layers(sizes)
        self.names = (activation, loss)
        assert theta.shape[1] == self.layers[-1].end, "theta does not match sizes"
        self.act = registry.ACTIVATIONS[activation]
        self.loss_fn = registry.LOSSES[loss].fn
        self.theta = theta.detach().clone().requires_grad_(True)
        dev = theta.device
        # Segment id of every column: 2l for layer l's weights, 2l+1 for its biases.
        seg = torch.empty(theta.shape[1], dtype=torch.long)
        for l, layer in enumerate(self.layers):
            seg[layer.w_off:layer.b_off] = 2 * l
            seg[layer.b_off:layer.end] = 2 * l + 1
        self.segments = seg.to(dev)
        self.weight_mask = (seg % 2 == 0).to(dev, theta.dtype)  # L2 applies to weights only

    @property
    def population(self) -> int:
        return self.theta.shape[0]

    @property
    def n_segments(self) -> int:
        return 2 * len(self.layers)

    def to(self, dtype: torch.dtype) -> "PopulationMLP":
        """The same population in another dtype (float64 for exact-arithmetic checks)."""
        return PopulationMLP(self.sizes, *self.names, self.theta.to(dtype))

    def params(self, theta: Tensor | None = None) -> list[tuple[Tensor, Tensor]]:
        """(W [P, n_in, n_out], b [P, 1, n_out]) views of theta, one pair per layer."""
        t = self.theta if theta is None else theta
        P = t.shape[0]
        return [
            (t[:, l.w_off:l.b_off].view(P, l.n_in, l.n_out), t[:, l.b_off:l.end].view(P, 1, l.n_out))
            for l in self.layers
        ]

    def forward(self, x: Tensor, keep_hidden: bool = False):
        """x [B, n_in] -> output pre-activations [P, B, n_out]; with keep_hidden, also the
        (z, a) of every hidden layer."""
        params = self.params()
        hidden = []
        w, b = params[0]
        z = torch.matmul(x, w) + b  # x is shared by all members: broadcast over P
        for w, b in params[1:]:
            a = self.act.fn(z)
            if keep_hidden:
                hidden.append((z, a))
            z = torch.baddbmm(b, a, w)
        return (z, hidden) if keep_hidden else z

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-member mean loss [P] on one batch."""
        return self.loss_fn(self.forward(x), y)

    def segment_norms(self, grad: Tensor) -> Tensor:
        """L2 norm of every layer's weight and bias gradient, every member: [P, 2L], one batched
        reduction on the device (columns w1, b1, w2, b2, ...)."""
        sq = torch.zeros(grad.shape[0], self.n_segments, dtype=grad.dtype, device=grad.device)
        return sq.index_add_(1, self.segments, grad * grad).sqrt_()


class PopulationSGD:
    """Plain SGD per member: its own learning rate; shared momentum and Nielsen-style L2
    (w <- w - lr * (g + (lambda/n) w), biases exempt)."""

    def __init__(self, model: PopulationMLP, lrs: list[float], momentum: float, l2: float, n_train: int):
        theta = model.theta
        self.model = model
        self.lr = torch.tensor(lrs, dtype=theta.dtype, device=theta.device).unsqueeze(1)
        self.momentum = momentum
        self.decay = model.weight_mask * (l2 / n_train) if l2 else None
        self.velocity = torch.zeros_like(theta) if momentum else None

    @torch.no_grad()
    def step(self, grad: Tensor, alive: Tensor) -> None:
        """Update the members with alive[k]; the others stay frozen (where, not a multiply: their
        gradient may be NaN)."""
        theta = self.model.theta
        if self.decay is not None:
            grad = grad + self.decay * theta
        if self.velocity is not None:
            grad = self.velocity.mul_(self.momentum).add_(grad)
        theta.sub_(torch.where(alive.unsqueeze(1), self.lr * grad, 0.0))
