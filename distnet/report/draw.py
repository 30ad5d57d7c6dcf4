"""The report's figures: matplotlib drawings of what distnet.report.extract returns."""

from __future__ import annotations

import math

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only: no display on a cluster node or in CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.collections import QuadMesh  # noqa: E402
import numpy as np  # noqa: E402

from distnet import meanfield  # noqa: E402
from distnet.report.extract import Band, TrainabilityMap  # noqa: E402


# ---------------------------------------------------------------- drawing
def _panels(n: int, width: float = 4.2, height: float = 3.4):
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(width * cols, 7.0), height * rows), squeeze=False,
                             layout="constrained")  # 7 in at least: room for the title
    for ax in axes.flat[n:]:
        ax.remove()
    return fig, list(axes.flat[:n])


def _draw(ax, b: Band, label: str, log: bool, band: bool | None = None, color=None) -> None:
    (line,) = ax.plot(b.x, b.mean, marker="o" if len(b.x) < 12 else None, ms=3, label=label, color=color)
    if b.n > 1 if band is None else band:
        ax.fill_between(b.x, b.lo, b.hi, color=line.get_color(), alpha=0.2, linewidth=0)
    if log:
        ax.set_yscale("log")


def within_layer(mean: dict[int, dict[int, Band]], std: dict[int, dict[int, Band]]) -> dict[int, dict[int, Band]]:
    """Activation mean +- the activations' own standard deviation in the layer (Glorot and Bengio's
    bars), both averaged over seeds: the band is the spread of the units, not of the seeds."""
    return {d: {l: Band(b.x, b.mean, b.mean - std[d][l].mean, b.mean + std[d][l].mean, b.n)
                for l, b in layers.items()} for d, layers in mean.items()}


def layer_figure(curves: dict[int, dict[int, Band]], title: str, ylabel: str, log: bool, band: bool | None = None,
                 x: str = "epoch", line: str = "hidden layer"):
    """One panel per depth, one line per layer, x = epoch (or step)."""
    fig, axes = _panels(len(curves))
    for ax, (depth, layers) in zip(axes, curves.items()):
        many = len(layers) > 12  # a legend of dozens of layers hides the plot: a colour ramp instead
        for k, (layer, b) in enumerate(layers.items()):
            _draw(ax, b, f"{line} {layer}", log, band, color=plt.get_cmap("viridis")(k / (len(layers) - 1)) if many else None)
        n = next(iter(layers.values())).n
        ax.set(title=f"{depth} hidden layer{'s' * (depth > 1)} ({n} seed{'s' * (n > 1)})", xlabel=x,
               ylabel=ylabel)
        if many:
            ax.text(0.02, 0.02, f"{line} {min(layers)} (dark) to {max(layers)} (light)", transform=ax.transAxes,
                    fontsize=7)
        else:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(title)
    return fig


def profile_figure(profiles: dict[tuple[str, str], dict[int, Band]]):
    fig, axes = _panels(len(profiles))
    for ax, ((act, init), depths) in zip(axes, profiles.items()):
        for depth, b in depths.items():
            _draw(ax, b, f"{depth} hidden", log=True)
        ax.set(title=f"{act}, {init}", xlabel="hidden layer", ylabel="speed of learning at init")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlim(0.5, max(depths) + 0.5)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
    fig.suptitle("Gradient norm vs layer at init (bias-gradient norm, 1000 training images)")
    return fig


def accuracy_figure(grids: dict[str, tuple[list[int], list[str], np.ndarray]], eval_name: str):
    fig, axes = _panels(len(grids), width=1.6 + 1.3 * max(len(g[1]) for g in grids.values()))
    for ax, (act, (depths, inits, grid)) in zip(axes, grids.items()):
        im = ax.imshow(grid * 100, vmin=10, vmax=100, cmap="viridis", aspect="auto")  # 10 %: chance
        ax.set(title=act, xticks=range(len(inits)), yticks=range(len(depths)), ylabel="hidden layers")
        ax.set_xticklabels(inits, rotation=35, ha="right", fontsize=8)
        ax.set_yticklabels(depths)
        for i in range(len(depths)):
            for j in range(len(inits)):
                text = "-" if np.isnan(grid[i, j]) else f"{grid[i, j] * 100:.1f}"
                ax.text(j, i, text, ha="center", va="center", fontsize=7,
                        color="black" if grid[i, j] > 0.7 else "white")
    fig.colorbar(im, ax=axes, label=f"final {eval_name} accuracy (%)", shrink=0.8)
    fig.suptitle(f"Final {eval_name} accuracy, mean over seeds")
    return fig


def _edges(v: list[float]) -> np.ndarray:
    """Cell edges for a non-uniform axis: midpoints between values, half a step beyond the ends."""
    v = np.asarray(v, dtype=float)
    if len(v) == 1:
        return np.array([v[0] - 0.5, v[0] + 0.5])
    mid = (v[1:] + v[:-1]) / 2
    return np.concatenate([[2 * v[0] - mid[0]], mid, [2 * v[-1] - mid[-1]]])


def trainability_figure(m: TrainabilityMap, eval_name: str):
    """Per budget: final accuracy over (sigma_w^2, depth), and mean-field theory's 6 xi_c on top."""
    fig, axes = _panels(len(m.acc), width=5.2, height=4.2)
    x_edges, y_edges = _edges(m.sigma_w2), _edges(m.depths)
    fine = np.linspace(x_edges[0], x_edges[-1], 150)
    bound = np.array([m.bound(s) for s in fine])
    try:
        crit = meanfield.critical_sigma_w2(m.activation, m.sigma_b2)
    except ValueError:  # no order-to-chaos point for this activation and sigma_b^2
        crit = None
    for ax, (epoch, grid) in zip(axes, m.acc.items()):
        mesh = ax.pcolormesh(x_edges, y_edges, grid * 100, vmin=10, vmax=100, cmap="viridis")
        ax.plot(fine, np.minimum(bound, y_edges[-1] * 10), color="white", lw=2, label="6 $\\xi_c$ (mean field)")
        if crit is not None:
            ax.axvline(crit, color="white", ls=":", lw=1, label=f"$\\chi_1 = 1$ ($\\sigma_w^2$ = {crit:.3f})")
        ax.set(xlim=(x_edges[0], x_edges[-1]), ylim=(y_edges[0], y_edges[-1]), xlabel="$\\sigma_w^2$",
               ylabel="hidden layers", title=f"after {epoch} epoch{'s' * (epoch > 1)}")
        ax.legend(fontsize=7, loc="upper right")
    fig.colorbar(mesh, ax=axes, label=f"{eval_name} accuracy (%)", shrink=0.8)
    extra = f", {m.other}" if m.other else ""
    fig.suptitle(f"Trainability: {m.activation}, $\\sigma_b^2$ = {m.sigma_b2:.3g}{extra}, mean over seeds")
    return fig


def grad_profile_figure(m: TrainabilityMap, depth: int, profile: dict[float, Band]):
    fig, axes = _panels(1, width=6.5, height=4.2)
    ax = axes[0]
    cmap = plt.get_cmap("coolwarm")
    lo, hi = min(profile), max(profile)
    for sw, b in profile.items():
        chi = meanfield.mean_field(m.activation, sw, m.sigma_b2).chi_1
        (line,) = ax.plot(b.x, b.mean, color=cmap((sw - lo) / ((hi - lo) or 1)),
                          label=f"$\\sigma_w^2$={sw:.3g} ($\\chi_1$={chi:.3f})")
        if b.n > 1:
            ax.fill_between(b.x, b.lo, b.hi, color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set(yscale="log", xlabel="layer (1 = input side)", ylabel="|grad W| at step 0 (global batch)",
           title=f"{depth} hidden layers: gradient norm per layer at init")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, which="both")
    fig.suptitle(f"{m.activation}, $\\sigma_b^2$ = {m.sigma_b2:.3g}: vanishing (ordered), flat (critical), "
                 "exploding (chaotic)")
    return fig


def figure_counts(fig) -> dict:
    """What a figure shows, for the manifest (and the tests): panels, lines and cells per panel."""
    axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    grids = [ax.images[0] if ax.images else next((c for c in ax.collections if isinstance(c, QuadMesh)), None)
             for ax in axes]  # imshow (regular cells) or pcolormesh (cells at the values' own spacing)
    return {"panels": len(axes), "lines": [len(ax.get_lines()) for ax in axes],
            "cells": [int(np.size(g.get_array())) if g is not None else 0 for g in grids]}


