"""Dynamical isometry in a report (Pennington, Schoenholz and Ganguli 2017; Saxe et al. 2014): the
spectrum of the hidden stack's Jacobian that runs with `train.jacobian` measured, against what
`meanfield.jacobian_spectrum` predicts, and how fast each net learned.

An arm is one case at one depth (its seeds together); a run's case is its sweep's `case` tag
(configs/isometry.yaml), else its activation, init and variant. Learning speed is the number of steps
until the training accuracy, the mean of `train/batch_acc` over WINDOW consecutive steps of the step
table, first reaches THRESHOLD. Extraction and drawing are separate, as in distnet.report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np

from distnet import meanfield, schema

THRESHOLD = 0.8  # training accuracy (a net of any depth in configs/isometry.yaml gets past it, or not for long)
WINDOW = 20  # steps: 2,560 images at batch 128, so one lucky batch does not count
# The inits whose ensemble the prediction knows, each drawing W with variance sigma_w^2 / n_in: with
# them the run's gain squared is mean-field theory's sigma_w^2. Runs with other inits get no prediction.
WEIGHTS = {"lecun_normal": "gaussian", "orthogonal": "orthogonal"}
# The figures' log axes start here: a squared singular value below it is an exact zero of a
# rank-deficient J (ReLU's dead units: about half of them), and a spread below it is an isometry.
FLOOR = 1e-12


def steps_to_accuracy(acc: np.ndarray, threshold: float = THRESHOLD, window: int = WINDOW) -> int | None:
    """The number of steps trained when the mean batch accuracy of the last `window` steps first
    reaches `threshold` (acc[i]: step i's batch, scored before its update); None if it never does."""
    if len(acc) < window:
        return None
    means = np.convolve(np.asarray(acc, dtype=np.float64), np.ones(window) / window, "valid")
    hit = np.flatnonzero(means >= threshold)
    return int(hit[0]) + window if len(hit) else None


def rank_correlation(x: list[float], y: list[float]) -> float:
    """Spearman's rho: the Pearson correlation of the ranks (ties get their mean rank; inf ranks last)."""

    def ranks(v):
        v = np.asarray(v, dtype=np.float64)
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(1, len(v) + 1)
        for value in np.unique(v):
            r[v == value] = r[v == value].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    return float(np.corrcoef(rx, ry)[0, 1])


@dataclass
class Arm:
    case: str
    family: tuple[str, float, float]  # (activation, sigma_w^2, sigma_b^2): the same chi_1 and q*
    weights: str | None  # the ensemble ("gaussian", "orthogonal"); None: an init the prediction does not know
    depth: int
    predicted: meanfield.Spectrum | None  # of the depth - 1 square layers past the first, every layer at q*
    from_data: meanfield.Spectrum | None  # the same from the inputs' length (jacobian/q_in at init), the transient in
    measured: dict[int, dict[str, float]]  # epoch -> moment -> mean over seeds
    quantiles: dict[int, np.ndarray]  # epoch -> the JACOBIAN_QUANTILES' geometric mean over seeds
    steps: list[int | None]  # per seed: steps to THRESHOLD
    budget: int  # the steps each seed trained (the least of them)
    acc: float  # final test (or validation) accuracy, mean over seeds

    @property
    def speed(self) -> float:
        """Mean steps to THRESHOLD over the seeds; inf if a seed never got there."""
        return math.inf if None in self.steps or not self.steps else float(np.mean(self.steps))


def case_of(run) -> str:
    return run.case or " ".join(run.group)


def arms(runs: list) -> list[Arm]:
    """One Arm per (case, depth) among the runs that measured the spectrum, by case name, then depth."""
    groups: dict[tuple[str, int], list] = {}
    for r in runs:
        if r.series.get(schema.jacobian("spread")):
            groups.setdefault((case_of(r), r.depth), []).append(r)
    out = []
    for (case, depth), cell in sorted(groups.items()):
        r0 = cell[0]
        weights = WEIGHTS.get(r0.init)
        predicted = from_data = None
        if weights:
            predicted = meanfield.jacobian_spectrum(r0.activation, r0.sigma_w2, r0.sigma_b2, depth - 1, weights)
            if all(0 in r.series.get(schema.jacobian(schema.JACOBIAN_Q_IN), {}) for r in cell):
                q_in = float(np.mean([r.series[schema.jacobian(schema.JACOBIAN_Q_IN)][0] for r in cell]))
                from_data = meanfield.jacobian_spectrum(r0.activation, r0.sigma_w2, r0.sigma_b2, depth - 1, weights,
                                                        q_in)
        epochs = sorted(set.intersection(*(set(r.series[schema.jacobian("spread")]) for r in cell)))
        measured = {e: {m: float(np.mean([r.series[schema.jacobian(m)][e] for r in cell])) for m in schema.JACOBIAN_MOMENTS}
                    for e in epochs}
        # geometric means: the quantiles span decades (an exact zero, ReLU's, counted as 1e-300)
        quantiles = {e: np.exp(np.mean([[math.log(max(r.series[schema.quantile_name(p)][e], 1e-300))
                                          for p in schema.JACOBIAN_QUANTILES] for r in cell], axis=0))
                     for e in epochs}
        accs = [r.steps.get(schema.BATCH_ACC, np.array([])) for r in cell]
        out.append(Arm(case, (r0.activation, r0.sigma_w2, r0.sigma_b2), weights, depth, predicted, from_data,
                       measured, quantiles,
                       [steps_to_accuracy(a, THRESHOLD, WINDOW) for a in accs], min(len(a) for a in accs),
                       float(np.mean([r.acc for r in cell]))))
    return out


def correlations(found: list[Arm]) -> dict[str, float]:
    """Spearman's rho between the predicted spread and the steps to THRESHOLD (a seed that never got
    there ranks slowest): per depth, and over every arm."""
    known = [a for a in found if a.predicted is not None]
    out = {}
    for depth in sorted({a.depth for a in known}):
        at = [a for a in known if a.depth == depth]
        if len(at) > 2:
            out[f"depth {depth}"] = rank_correlation([a.predicted.spread for a in at], [a.speed for a in at])
    if len(known) > 2:
        out["all"] = rank_correlation([a.predicted.spread for a in known], [a.speed for a in known])
    return out


def ensemble_pairs(found: list[Arm]) -> list[tuple[Arm, Arm]]:
    """(Gaussian, orthogonal) arms of one family at one depth: the same activation, chi_1 and q*, so
    the theory's only difference between them is the spread (orthogonal: smaller)."""
    by = {(a.family, a.depth, a.weights): a for a in found}
    return [(a, by[(a.family, a.depth, "orthogonal")]) for a in found
            if a.weights == "gaussian" and (a.family, a.depth, "orthogonal") in by]


# ---------------------------------------------------------------- drawing
def _style(found: list[Arm]) -> dict[str, dict]:
    """A colour per family, solid for Gaussian weights, dashed for orthogonal."""
    families = list(dict.fromkeys(a.family for a in found))
    colors = plt.get_cmap("tab10")
    return {a.case: {"color": colors(families.index(a.family) % 10), "ls": "--" if a.weights == "orthogonal" else "-"}
            for a in found}


def spectra_figure(found: list[Arm]):
    """At init, per depth: each case's spectrum as its distribution function (the quantiles, those
    below FLOOR at the left edge), with the predicted mean (from the inputs' length where known) as a
    tick on the top axis line."""
    depths = sorted({a.depth for a in found})
    style = _style(found)
    fig, axes = plt.subplots(1, len(depths), figsize=(max(4.2 * len(depths), 7.0), 3.8), squeeze=False,
                             layout="constrained")  # 7 in at least: room for the title
    for ax, depth in zip(axes[0], depths):
        for a in (a for a in found if a.depth == depth and 0 in a.quantiles):
            (line,) = ax.plot(np.maximum(a.quantiles[0], FLOOR), np.array(schema.JACOBIAN_QUANTILES) / 100,
                              marker="o", ms=2, label=a.case, **style[a.case])
            if a.predicted is not None:
                ax.plot([(a.from_data or a.predicted).mean], [1.02], marker="v", color=line.get_color(), clip_on=False)
        ax.set(xscale="log", ylim=(0, 1.05), xlim=(FLOOR / 2, None), title=f"{depth} hidden layers, at init",
               xlabel=f"squared singular value of J (< {FLOOR:g}: at the edge)", ylabel="fraction below")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=6)
    fig.suptitle("The hidden stack's Jacobian spectrum at init (triangles: predicted mean)")
    return fig


def moments_figure(found: list[Arm]):
    """Measured (at init, mean over seeds) against predicted spread and mean, one point per arm: filled
    at q* (the papers' prediction), crosses from the inputs' length."""
    known = [a for a in found if a.predicted is not None and 0 in a.measured]
    style = _style(found)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), squeeze=False, layout="constrained")
    for ax, moment in zip(axes[0], ("spread", "mean")):
        for a in known:
            ax.plot(max(getattr(a.predicted, moment), 1e-3), max(a.measured[0][moment], 1e-3), marker="o", ls="none",
                    color=style[a.case]["color"], fillstyle="none" if style[a.case]["ls"] == "--" else "full",
                    ms=3 + math.log2(a.depth), label=a.case if a.depth == known[0].depth else None)
            if a.from_data is not None:
                ax.plot(max(getattr(a.from_data, moment), 1e-3), max(a.measured[0][moment], 1e-3), marker="x", ls="none",
                        color=style[a.case]["color"], ms=3 + math.log2(a.depth))
        shown = [getattr(p, moment) for a in known for p in (a.predicted, a.from_data) if p is not None]
        lo = max(min(shown + [a.measured[0][moment] for a in known]), 1e-3)
        hi = max(shown + [a.measured[0][moment] for a in known])
        ax.plot([lo, hi], [lo, hi], color="gray", lw=0.8)
        ax.set(xscale="log", yscale="log", xlabel=f"predicted {moment} (0 drawn at 1e-3)", ylabel=f"measured {moment}",
               title=f"{moment} at init (o: at q*, x: from q_in; size: depth)")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=6)
    return fig


def speed_figure(found: list[Arm], rho: dict[str, float]):
    """Steps to THRESHOLD against depth per case, and against the predicted spread per arm."""
    style = _style(found)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), squeeze=False, layout="constrained")
    budget = max(a.budget for a in found)
    for case in dict.fromkeys(a.case for a in found):
        at = [a for a in found if a.case == case]
        axes[0][0].plot([a.depth for a in at], [min(a.speed, budget) for a in at], marker="o", label=case,
                        **style[case])
    axes[0][0].axhline(budget, color="gray", lw=0.8, ls=":")
    axes[0][0].set(xscale="log", yscale="log", xlabel="hidden layers", ylabel=f"steps to {THRESHOLD:.0%} training accuracy",
                   title=f"learning speed (at the dotted line: not reached in {budget} steps)")
    axes[0][0].legend(fontsize=6)
    for a in (a for a in found if a.predicted is not None):
        axes[0][1].plot(max(a.predicted.spread, 1e-3), min(a.speed, budget), marker="o", ls="none",
                        color=style[a.case]["color"], fillstyle="none" if style[a.case]["ls"] == "--" else "full",
                        ms=3 + math.log2(a.depth))
    axes[0][1].set(xscale="log", yscale="log", xlabel="predicted spread at init (0 drawn at 1e-3)",
                   ylabel=f"steps to {THRESHOLD:.0%}", title=f"Spearman rho over all arms: {rho.get('all', math.nan):.2f}")
    for ax in axes[0]:
        ax.grid(alpha=0.3, which="both")
    return fig


def figures(found: list[Arm]):
    rho = correlations(found)
    yield "isometry_spectra.png", spectra_figure(found)
    if any(a.predicted is not None for a in found):
        yield "isometry_moments.png", moments_figure(found)
    yield "isometry_speed.png", speed_figure(found, rho)


def lines(found: list[Arm], eval_name: str) -> list[str]:
    """report.md's section: per arm, the spectrum predicted and measured at init and at the end, the
    steps to THRESHOLD and the final accuracy; then the rank correlations."""
    out = ["", "## Dynamical isometry: the Jacobian's spectrum and the speed of learning", "",
           "J is the hidden stack's input-output Jacobian past the first hidden layer (depth - 1 square layers, "
           f"`metrics.jacobian`); spread = variance / mean^2 of its squared singular values. Predicted: "
           "`meanfield.jacobian_spectrum` (Pennington et al. 2017) with every layer at q*, and (\"from q_in\") layer by "
           "layer from the length of the first hidden layer's pre-activations on the probe images (`jacobian/q_in`). "
           "Steps: until the training accuracy (the "
           f"batch accuracy over {WINDOW} steps) first reaches {THRESHOLD:.0%}, mean over seeds (`>` N: a seed "
           "did not in its N steps).", "",
           "| case | hidden layers | predicted mean, at q* / from q_in | measured mean | predicted spread, at q* / from "
           f"q_in | measured spread (init) | spread at the end | steps to {THRESHOLD:.0%} | per seed | {eval_name} accuracy |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for a in found:
        init, end = a.measured.get(0, {}), a.measured[max(a.measured)] if a.measured else {}
        pm = " / ".join(f"{p.mean:.3g}" for p in (a.predicted, a.from_data) if p is not None) or "-"
        ps = " / ".join(f"{p.spread:.3g}" for p in (a.predicted, a.from_data) if p is not None) or "-"
        speed = _steps(a)
        seeds = ", ".join("-" if s is None else str(s) for s in a.steps)
        out.append(f"| {a.case} | {a.depth} | {pm} | {init.get('mean', math.nan):.3g} | {ps} | "
                   f"{init.get('spread', math.nan):.3g} | {end.get('spread', math.nan):.3g} | {speed} | {seeds} | "
                   f"{100 * a.acc:.2f} |")
    rho = correlations(found)
    if rho:
        out += ["", "Spearman's rank correlation between the predicted spread and the steps to "
                f"{THRESHOLD:.0%} (1: the spread orders the learning speed exactly):", "",
                "| arms | rho |", "| --- | --- |"] + [f"| {k} | {v:.3f} |" for k, v in rho.items()]
    pairs = ensemble_pairs(found)
    if pairs:
        faster = sum(o.speed < g.speed for g, o in pairs)
        out += ["", f"Gaussian against orthogonal weights, the same family and depth (only the spread differs): "
                f"orthogonal reached {THRESHOLD:.0%} first in {faster} of {len(pairs)} pairs.", "",
                "| family (activation, sigma_w^2, sigma_b^2) | hidden layers | steps, Gaussian | steps, orthogonal |",
                "| --- | --- | --- | --- |"]
        out += [f"| {g.family[0]}, {g.family[1]:.4g}, {g.family[2]:.3g} | {g.depth} | {_steps(g)} | {_steps(o)} |"
                for g, o in pairs]
    return out


def _steps(a: Arm) -> str:
    return f"> {a.budget}" if math.isinf(a.speed) else f"{a.speed:.0f}"
