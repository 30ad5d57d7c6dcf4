"""Mean-field signal propagation through a deep random network (Poole et al. 2016, "Exponential
expressivity in deep neural networks through transient chaos"; Schoenholz et al. 2017, "Deep
information propagation").

A network with weights W_ij ~ N(0, sigma_w^2 / n_in), biases b_i ~ N(0, sigma_b^2) and activation
phi, in the limit of wide layers: every pre-activation h is Gaussian over the draw, and

    q^l  = sigma_w^2 E[phi(sqrt(q^{l-1}) z)^2] + sigma_b^2             length map, fixed point q*
    c^l  = (sigma_w^2 E[phi(u1) phi(u2)] + sigma_b^2) / q*             correlation map, fixed point c*
           u1 = sqrt(q*) z1,  u2 = sqrt(q*) (c^{l-1} z1 + sqrt(1 - c^{l-1}^2) z2)
    chi_1 = sigma_w^2 E[phi'(sqrt(q*) z)^2]                            slope of the c-map at c = 1
    chi_c = sigma_w^2 E[phi'(u1) phi'(u2)] at c = c*                   slope at the stable fixed point
    xi_c  = -1 / ln chi_c                                              depth scale of correlations

with z, z1, z2 independent standard normals. chi_1 < 1: ordered (c* = 1, inputs become alike and
gradients vanish by chi_1 per layer); chi_1 > 1: chaotic (c* < 1, gradients explode); xi_c diverges
at chi_1 = 1. Schoenholz et al. find that a network trains only if its depth is below about 6 xi_c.

Expectations are Gauss-Hermite sums over the activation registry's own phi and phi', so every
registered activation can be put through the maps (the ones with kinks, relu, converge more slowly in
the number of nodes; the even node count puts none on relu's kink at 0).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from distnet import choices

NODES = 100  # Gauss-Hermite nodes per dimension (a 100 x 100 grid for the correlation map)
# A length map that leaves these bounds has no finite, non-zero fixed point (relu away from
# sigma_w^2 = 2 at sigma_b^2 = 0): q* is reported as inf or 0, and chi is evaluated at the last q,
# which for a positively homogeneous phi (relu) is the same at every scale.
Q_MAX, Q_MIN = 1e12, 1e-200


@dataclass(frozen=True)
class MeanField:
    activation: str
    sigma_w2: float
    sigma_b2: float
    q_star: float
    c_star: float
    chi_1: float
    chi_c: float

    @property
    def xi_c(self) -> float:
        """Correlation depth scale: inf at the critical point (chi_c = 1), and wherever c = 1 is not
        stable (relu above sigma_w^2 = 2 at sigma_b^2 = 0, whose length grows without bound)."""
        return math.inf if self.chi_c >= 1 else -1.0 / math.log(self.chi_c)

    @property
    def max_depth(self) -> float:
        """Schoenholz et al.'s trainability bound, 6 xi_c."""
        return 6 * self.xi_c

    @property
    def phase(self) -> str:
        return "ordered" if self.chi_1 < 1 else "chaotic" if self.chi_1 > 1 else "critical"


class Gauss:
    """Standard-normal expectations of the activation: E[f(z)] = sum_i w_i f(z_i)."""

    def __init__(self, activation: str, nodes: int = NODES):
        if activation not in choices.ACTIVATIONS:
            raise ValueError(f"activation {activation!r}: allowed {', '.join(choices.ACTIVATIONS)}")
        # torch (the registry's code) is imported once a mean field is computed, so the report and the
        # CLI, which import this module, load without it.
        from distnet import registry

        z, w = np.polynomial.hermite_e.hermegauss(nodes)  # weight exp(-z^2/2): normalise to N(0, 1)
        self.z, self.w = z, w / math.sqrt(2 * math.pi)
        self.phi = registry.on_arrays(activation)  # phi(h), phi'(h) on float64 arrays

    def q_next(self, q: float, sigma_w2: float, sigma_b2: float) -> float:
        a, _ = self.phi(math.sqrt(q) * self.z)
        return sigma_w2 * float(self.w @ a**2) + sigma_b2

    def pair(self, q: float, c: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """phi and phi' at u1 [n, 1] (it depends on z1 only) and at u2 [n, n] on the 2-D node grid."""
        s = math.sqrt(q)
        z1, z2 = self.z[:, None], self.z[None, :]
        a1, d1 = self.phi(s * z1)
        a2, d2 = self.phi(s * (c * z1 + math.sqrt(max(0.0, 1 - c * c)) * z2))
        return a1, d1, a2, d2

    def slope_moments(self, q: float) -> tuple[float, float]:
        """E[phi'(h)^2] and E[phi'(h)^4] for h ~ N(0, q)."""
        _, d = self.phi(math.sqrt(q) * self.z)
        return float(self.w @ d**2), float(self.w @ d**4)

    def mean2(self, f: np.ndarray) -> float:
        return float(self.w @ f @ self.w)


def length_fixed_point(g: Gauss, sigma_w2: float, sigma_b2: float, tol: float = 1e-13) -> tuple[float, float]:
    """(q*, the q at which to evaluate slopes): iterate the length map from q = 1."""
    q = 1.0
    for _ in range(10_000):
        nxt = g.q_next(q, sigma_w2, sigma_b2)
        if nxt > Q_MAX:
            return math.inf, q
        if nxt < Q_MIN:
            return 0.0, q
        if abs(nxt - q) <= tol * q:
            return nxt, nxt
        q = nxt
    return q, q  # still moving after 10k layers: a marginal point (relu near sigma_w^2 = 2)


def c_map(g: Gauss, q: float, c: float, sigma_w2: float, sigma_b2: float) -> float:
    """The next layer's correlation: its covariance over its length (q itself at the fixed point)."""
    a1, _, a2, _ = g.pair(q, c)
    return (sigma_w2 * g.mean2(a1 * a2) + sigma_b2) / g.q_next(q, sigma_w2, sigma_b2)


def bisect(f, lo: float, hi: float, steps: int = 50) -> float:
    """The root of an increasing f between lo (f <= 0) and hi (f > 0), to (hi - lo) / 2^steps."""
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) <= 0 else (lo, mid)
    return (lo + hi) / 2


@functools.lru_cache(maxsize=4096)  # a report asks for the same few points from its map, table and figures
def mean_field(activation: str, sigma_w2: float, sigma_b2: float, nodes: int = NODES) -> MeanField:
    """q*, c*, chi_1, chi_c of one (activation, sigma_w^2, sigma_b^2)."""
    if sigma_w2 <= 0 or sigma_b2 < 0:
        raise ValueError(f"need sigma_w^2 > 0 and sigma_b^2 >= 0, got {sigma_w2}, {sigma_b2}")
    g = Gauss(activation, nodes)
    q_star, q = length_fixed_point(g, sigma_w2, sigma_b2)
    chi_1 = sigma_w2 * g.slope_moments(q)[0]
    c_star = 1.0
    if chi_1 > 1:
        # c = 1 is unstable: the stable c* < 1 is the root of c_map(c) - c below 1 (the map is
        # increasing in c with c_map(-1) >= -1, and it lies under the diagonal just below 1).
        top = 1.0 - 1e-9
        if c_map(g, q, top, sigma_w2, sigma_b2) < top:
            c_star = bisect(lambda c: c - c_map(g, q, c, sigma_w2, sigma_b2), -1.0, top)
    _, d1, _, d2 = g.pair(q, c_star)
    chi_c = sigma_w2 * g.mean2(d1 * d2)
    return MeanField(activation, sigma_w2, sigma_b2, q_star, c_star, chi_1, chi_c)


def critical_sigma_w2(activation: str, sigma_b2: float, lo: float = 0.5, hi: float = 8.0) -> float:
    """The sigma_w^2 at which chi_1 = 1 (order to chaos), by bisection (chi_1 grows with sigma_w^2)."""
    f = lambda s: mean_field(activation, s, sigma_b2).chi_1 - 1  # noqa: E731
    if f(lo) > 0 or f(hi) < 0:
        raise ValueError(f"{activation}: chi_1 = 1 is not between sigma_w^2 = {lo} and {hi}")
    return bisect(f, lo, hi)


# The spread (variance over mean squared) of the eigenvalues of W W^T for one layer's weights at
# large width: Marchenko-Pastur at aspect ratio 1 for i.i.d. Gaussian entries; none for orthogonal W.
WEIGHT_SPREAD = {"gaussian": 1.0, "orthogonal": 0.0}


@dataclass(frozen=True)
class Spectrum:
    """The predicted moments of the squared singular values of the hidden stack's input-output
    Jacobian J = D_L W_L ... D_1 W_1 (L square layers, D_l = diag phi'(h^l), every h^l at q*): their
    mean, and their variance over the mean squared."""

    mean: float
    spread: float


def jacobian_spectrum(activation: str, sigma_w2: float, sigma_b2: float, depth: int, weights: str,
                      q_in: float | None = None) -> Spectrum:
    """Pennington, Schoenholz and Ganguli 2017 ("Resurrecting the sigmoid ... dynamical isometry"),
    by free probability: J J^T's S-transform is the product of its layers' (those of D_l^2 and of
    W_l W_l^T, freely independent at large width), and a product's first S-coefficient is the sum
    of its factors', so spreads add: spread = L (mu_2 / mu_1^2 - 1 + WEIGHT_SPREAD[weights]), with
    mu_k = E[phi'(h)^2k] at q*. The mean is chi_1^L (chi_1 = sigma_w^2 mu_1). Orthogonal weights
    remove the Marchenko-Pastur term, so at chi_1 = 1 a linear net with them is an exact isometry and
    a ReLU net still spreads by L.

    With `q_in`, the length of the pre-activations that feed the first of the L layers (a real
    input's, not q*), each layer's slopes are taken where the length map has carried it: q^{l+1} =
    length map of q^l. The mean is then the product of the layers' chi, the spread the sum of their
    terms (each layer's own S-coefficient). Near q* it is the formula above; far from it (MNIST's
    first hidden layer against a small q*) the first layers' transient stays in the mean at any
    depth (docs/results.md, section 7)."""
    if weights not in WEIGHT_SPREAD:
        raise ValueError(f"weights {weights!r}: allowed {', '.join(WEIGHT_SPREAD)}")
    g = Gauss(activation)
    if q_in is None:
        _, q = length_fixed_point(g, sigma_w2, sigma_b2)  # q*, or where the map left its bounds (as mean_field)
        mu1, mu2 = g.slope_moments(q)
        return Spectrum((sigma_w2 * mu1) ** depth, depth * (mu2 / mu1**2 - 1 + WEIGHT_SPREAD[weights]))
    mean, spread, q = 1.0, 0.0, q_in
    for _ in range(depth):
        q = g.q_next(q, sigma_w2, sigma_b2)
        mu1, mu2 = g.slope_moments(q)
        mean *= sigma_w2 * mu1
        spread += mu2 / mu1**2 - 1 + WEIGHT_SPREAD[weights]
    return Spectrum(mean, spread)


def table(rows: list[MeanField]) -> str:
    head = f"{'sigma_w^2':>9} {'sigma_b^2':>9} {'q*':>10} {'c*':>8} {'chi_1':>8} {'xi_c':>9} {'6 xi_c':>9}  phase"
    out = [head, "-" * len(head)]
    for m in rows:
        out.append(f"{m.sigma_w2:>9.4g} {m.sigma_b2:>9.4g} {m.q_star:>10.4g} {m.c_star:>8.4f} {m.chi_1:>8.4f} "
                   f"{m.xi_c:>9.4g} {m.max_depth:>9.4g}  {m.phase}")
    return "\n".join(out)
