"""The named choices a config can make (weight inits, activations, losses) and what each means.

Torch-free: config validation, the sweep, `distnet list`, the report and the UI read these names
without importing torch. distnet.registry holds each choice's torch code under the same names (a
test checks the two agree), so adding a scheme is its entry here and its code there.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InitChoice:
    bias_std: float  # the bias' std when the config gives no sigma_b
    doc: str


INITS: dict[str, InitChoice] = {
    "nielsen": InitChoice(1.0, "W, b ~ N(0, 1)"),
    "nielsen_scaled": InitChoice(1.0, "W ~ N(0, 1/n_in), b ~ N(0, 1)"),
    "uniform_sqrt_n": InitChoice(0.0, "W ~ U[-1/sqrt(n_in), 1/sqrt(n_in)] (Glorot-Bengio 'standard')"),
    "xavier_normal": InitChoice(0.0, "W ~ N(0, 2/(n_in+n_out))"),
    "xavier_uniform": InitChoice(0.0, "W ~ U[-sqrt(6/(n_in+n_out)), +] (Glorot 'normalized')"),
    "he_normal": InitChoice(0.0, "W ~ N(0, 2/n_in)"),
    "he_uniform": InitChoice(0.0, "W ~ U[-sqrt(6/n_in), +]"),
    "lecun_normal": InitChoice(0.0, "W ~ N(0, 1/n_in)"),
    "orthogonal": InitChoice(0.0, "W orthogonal (QR of a Gaussian), gain 1"),
}

# name -> which units count as saturated (the act/saturated series)
ACTIVATIONS: dict[str, str] = {
    "sigmoid": "saturated: a outside (0.01, 0.99)",
    "tanh": "saturated: |a| > 0.99",
    "softsign": "saturated: |a| > 0.99",
    "relu": "saturated: a == 0",
    "leaky_relu": "saturated: z <= 0",
    "elu": "saturated: z <= 0",
    "selu": "saturated: z <= 0",
    "softplus": "saturated: slope sigmoid(z) < 0.01",
    "identity": "never saturated",
}

LOSSES: dict[str, str] = {
    "softmax_ce": "softmax output, cross-entropy",
    "sigmoid_bce": "sigmoid output, binary cross-entropy per unit (Nielsen's CrossEntropyCost)",
    "quadratic": "sigmoid output, 0.5*||a - y||^2 (Nielsen's QuadraticCost)",
}


def describe() -> str:
    """The choices as text, for `distnet list`."""
    lines = []
    for title, docs in (("inits", {k: v.doc for k, v in INITS.items()}), ("activations", ACTIVATIONS),
                        ("losses", LOSSES)):
        lines.append(f"{title}:")
        lines += [f"  {name:<16} {doc}" for name, doc in docs.items()]
    return "\n".join(lines)
