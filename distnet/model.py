"""A population of P MLPs of one shape, trained as one batched network, and its SGD.

All parameters of all members live in one tensor `theta` of shape [P, T] (T = parameters per
member). Layer l's weights are the view theta[:, w_off:w_off + n_out*n_in] reshaped to
[P, n_out, n_in] (torch.nn.Linear's layout) and its biases the next n_out columns, so:
- forward is batched matmuls over the member dimension, feature-major: activations are
  [P, units, batch], so every matmul has the batch as its long output dimension, which MKL runs
  about twice as fast on this CPU as the [batch, units] form for MNIST's narrow layers (measured:
  784x30 by 128, 74 us vs 150 us; docs/benchmarks.md);
- backprop (written out, Nielsen ch. 2: no autograd graph, no per-parameter .grad tensors) writes
  every gradient into one [P, T] tensor: one all-reduce per step, one norm per layer segment for
  every member at once, one fused update;
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
            parts += [w.T.reshape(-1), b]  # stored [n_out, n_in]
        rows.append(torch.cat(parts))
    return torch.stack(rows)


def layer_views(layers: list[Layer], t: Tensor) -> list[tuple[Tensor, Tensor]]:
    """(W [P, n_out, n_in], b [P, n_out, 1]) views of a [P, T] tensor, one pair per layer."""
    P = t.shape[0]
    return [(t[:, l.w_off:l.b_off].view(P, l.n_out, l.n_in), t[:, l.b_off:l.end].view(P, l.n_out, 1))
            for l in layers]


class PopulationMLP:
    """theta [P, T] and its gradient buffer `grad` [P, T], with their per-layer views made once
    (every update is in place, so they stay valid; the hot loop creates no views)."""

    def __init__(self, sizes: list[int], activation: str, loss: str, theta: Tensor):
        self.sizes = list(sizes)
        self.layers = make_layers(sizes)
        self.names = (activation, loss)
        assert theta.shape[1] == self.layers[-1].end, "theta does not match sizes"
        self.act = registry.ACTIVATIONS[activation]
        self.loss_fn = registry.LOSSES[loss].fn
        self.loss_value_and_grad = registry.LOSSES[loss].value_and_grad
        self.theta = theta.detach().clone()
        self.grad = torch.zeros_like(self.theta)
        self.params, self.grads = layer_views(self.layers, self.theta), layer_views(self.layers, self.grad)
        # Column ranges of theta: w1, b1, w2, b2, ... (the order of segment_norms' columns).
        self.segments = [(a, b) for l in self.layers for a, b in ((l.w_off, l.b_off), (l.b_off, l.end))]
        mask = torch.zeros(theta.shape[1], dtype=theta.dtype)
        for l in self.layers:
            mask[l.w_off:l.b_off] = 1
        self.weight_mask = mask.to(theta.device)  # L2 applies to weights only

    @property
    def population(self) -> int:
        return self.theta.shape[0]

    @property
    def n_segments(self) -> int:
        return 2 * len(self.layers)

    def to(self, dtype: torch.dtype) -> "PopulationMLP":
        """The same population in another dtype (float64 for exact-arithmetic checks)."""
        return PopulationMLP(self.sizes, *self.names, self.theta.to(dtype))

    def forward(self, x: Tensor, keep_hidden: bool = False, theta: Tensor | None = None):
        """x [B, n_in] -> output pre-activations [P, B, n_out]; with keep_hidden, also the
        (z, a) of every hidden layer, each [P, units, B]. `theta` replaces self.theta (for
        autograd checks)."""
        params = self.params if theta is None else layer_views(self.layers, theta)
        hidden = []
        h = x.T  # [n_in, B], shared by all members: the first matmul broadcasts it over P
        for l, (w, b) in enumerate(params):
            if l:
                a = self.act.fn(z)
                if keep_hidden:
                    hidden.append((z, a))
                h = a
            z = torch.matmul(w, h).add_(b)
        z = z.transpose(1, 2)
        return (z, hidden) if keep_hidden else z

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-member mean loss [P] on one batch."""
        return self.loss_fn(self.forward(x), y)

    def loss_and_grad(self, x: Tensor, y: Tensor, acc: Tensor | None = None) -> Tensor:
        """Per-member mean loss [P] on one batch; writes d loss_k / d theta_k into self.grad, and
        each member's fraction of the batch classified right into `acc` [P] if given (a free
        by-product of the forward pass: the loop's per-step training accuracy).

        Backprop as in Nielsen ch. 2: delta_L = dC/dz_L, then for each layer from the top
        dW = delta a_in^T, db = delta summed over the batch, delta_in = (W^T delta) * act'(z_in).
        Members are independent, so one batched matmul per layer serves them all.
        """
        z, hidden = self.forward(x, keep_hidden=True)
        loss, delta = self.loss_value_and_grad(z, y)
        if acc is not None:
            acc.copy_((z.argmax(-1) == y).sum(-1)).div_(len(y))
        delta = delta.transpose(1, 2)  # [P, n_out, B], feature-major like z
        inputs = [x] + [a.transpose(1, 2) for _, a in hidden]  # [B, n_in] or [P, B, n_in]
        for l in range(len(self.layers) - 1, -1, -1):
            gw, gb = self.grads[l]
            gw.copy_(torch.matmul(delta, inputs[l]))
            torch.sum(delta, 2, keepdim=True, out=gb)
            if l:
                z_in, a_in = hidden[l - 1]
                delta = torch.bmm(self.params[l][0].transpose(1, 2), delta).mul_(self.act.grad(z_in, a_in))
        return loss

    def segment_norms(self, grad: Tensor) -> Tensor:
        """L2 norm of every layer's weight and bias gradient, every member: [P, 2L] on the device
        (columns w1, b1, w2, b2, ...), one reduction per contiguous column range of grad."""
        return torch.stack([torch.linalg.vector_norm(grad[:, a:b], dim=1) for a, b in self.segments], 1)


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

    def step(self, grad: Tensor, alive: Tensor) -> None:
        """Update the members with alive[k]; the others stay frozen. `grad` is the loop's scratch
        and is consumed. Only a frozen member's gradient can be non-finite (the loop checks every
        step), and 0 * NaN is NaN: so non-finite entries are zeroed (nan_to_num: one vectorised
        pass; `where` or a masked fill with a [P, 1] mask is 4-7x slower here) and a frozen
        member's learning rate is 0, which also keeps its momentum from moving it."""
        theta = self.model.theta
        grad.nan_to_num_(0.0, 0.0, 0.0)
        if self.decay is not None:
            grad.addcmul_(self.decay, theta)
        if self.velocity is not None:
            grad = self.velocity.mul_(self.momentum).add_(grad)
        theta.addcmul_(grad, self.lr * alive.unsqueeze(1), value=-1.0)
