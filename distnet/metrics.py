"""What the project exists to show: per-layer gradient norms, Nielsen's speed-of-learning probe,
activation statistics, accuracy. Functions of a model and data; they return [P]-shaped arrays keyed
by the metric names the MLflow UI groups on (`grad_norm/w/layer_1`, `speed/layer_1`, ...).
Layers are numbered from 1 (input -> first hidden) to L (last hidden -> output)."""

from __future__ import annotations

import numpy as np
import torch

from distnet.model import PopulationMLP

EVAL_CHUNK = 2000  # bounds the [P, chunk, width] activations of a large population


def grad_norm_names(n_layers: int) -> list[str]:
    """Names of the columns of PopulationMLP.segment_norms, in order."""
    return [f"grad_norm/{kind}/layer_{l}" for l in range(1, n_layers + 1) for kind in ("w", "b")]


def evaluate(model: PopulationMLP, x: torch.Tensor, y: torch.Tensor, prefix: str) -> dict[str, np.ndarray]:
    """Accuracy and mean loss of every member on (x, y)."""
    correct = torch.zeros(model.population, device=x.device)
    loss = torch.zeros(model.population, device=x.device, dtype=torch.float64)
    for i in range(0, len(x), EVAL_CHUNK):
        xb, yb = x[i:i + EVAL_CHUNK], y[i:i + EVAL_CHUNK]
        z = model.forward(xb)
        correct += (z.argmax(-1) == yb).sum(-1)
        loss += model.loss_fn(z, yb).double() * len(xb)
    return {f"{prefix}/acc": (correct / len(x)).cpu().numpy(), f"{prefix}/loss": (loss / len(x)).cpu().numpy()}


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
        out[f"speed/layer_{l}"] = norms[:, 2 * (l - 1) + 1]
        out[f"act/mean/layer_{l}"] = flat_a.mean(1)
        out[f"act/std/layer_{l}"] = flat_a.std(1)
        out[f"act/saturated/layer_{l}"] = model.act.saturated(z, a).reshape(a.shape[0], -1).float().mean(1)
    return {k: v.cpu().numpy() for k, v in out.items()}
