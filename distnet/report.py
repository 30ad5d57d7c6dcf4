"""`distnet report`: read a sweep's runs (or any runs) from MLflow, draw the figures the project
exists for, write them with a Markdown report, and log both as artifacts of the sweep's parent run.

Figures (matplotlib, log y where the quantity spans decades; seeds are averaged, the band is the
min..max over seeds):
- speed_<activation>_<init>.png: Nielsen's speed of learning (hidden-layer bias-gradient norm on
  the probe set) vs epoch, one panel per depth, one line per hidden layer;
- init_profile.png: that norm at init (epoch 0) vs hidden-layer index, one panel per
  activation x init, one line per depth;
- accuracy.png: final test (or validation) accuracy, depth x init heatmap, one panel per activation;
- saturation_<activation>_<init>.png: fraction of saturated units per hidden layer vs epoch, one
  panel per depth, one line per hidden layer;
- activation_<activation>_<init>.png: each hidden layer's activation mean vs epoch, the band its
  units' standard deviation (Glorot and Bengio's figure 2);
- grad_norm_<activation>_<init>.png: every layer's weight-gradient norm at every step, from the
  runs' step tables (steptable), one panel per depth, one line per layer.

Extraction (MLflow -> arrays) and drawing are separate functions so the numbers behind every
figure can be tested on their own.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only: no display on a cluster node or in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from distnet import steptable, tracking  # noqa: E402


class ReportError(ValueError):
    """Nothing to report on: an unknown sweep name or run id, or runs without metrics."""


@dataclass
class Run:
    """One member run as the report sees it: its cell and its epoch-indexed series."""

    run_id: str
    activation: str
    init: str
    depth: int
    seed: int
    status: str
    acc: float  # final test (or validation) accuracy; nan if never evaluated
    series: dict[str, dict[int, float]] = field(default_factory=dict)  # metric -> {epoch: value}
    steps: dict[str, np.ndarray] = field(default_factory=dict)  # its step table's weight-norm columns
    variant: str = ""  # the other settings that vary between the runs, e.g. "train.batch_size=10"

    @property
    def group(self) -> tuple[str, str]:
        """(activation, init and variant): what one figure panel set or heatmap column shows."""
        return self.activation, f"{self.init} {self.variant}".strip()


@dataclass
class Band:
    """Seed statistics of one curve: x, the mean over seeds, and the min..max band."""

    x: np.ndarray
    mean: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    n: int  # seeds


# ---------------------------------------------------------------- selecting and reading runs
def find_runs(uri: str, selector: list[str]) -> tuple[list, str | None, str]:
    """`selector` is a sweep name (its newest parent run) or run ids. Returns the MLflow runs,
    the parent run id (None for run ids) and a title."""
    client = MlflowClient(uri)
    if len(selector) == 1:
        name = selector[0]
        found = tracking.find_sweep(uri, name=name)
        if found is not None:
            parent = found.info.run_id
            return tracking.child_runs(uri, parent), parent, name
    runs = []
    for run_id in selector:
        try:
            runs.append(client.get_run(run_id))
        except Exception as e:  # MLflow raises its own error type per store
            raise ReportError(f"{run_id!r} is neither a sweep name nor a run id in {uri}") from e
    return runs, None, ", ".join(selector)


# Params the report shows as axes of its own (or that follow from them): not part of a variant.
AXES = {"seed", "model.depth", "model.sizes", "model.init", "model.activation", "name"}


def variants(mlflow_runs: list) -> list[str]:
    """Per run, the params outside AXES whose values differ between the runs, as "key=value"."""
    keys = set().union(*(r.data.params for r in mlflow_runs)) - AXES
    varying = sorted(k for k in keys if len({r.data.params.get(k) for r in mlflow_runs}) > 1)
    return [" ".join(f"{k}={r.data.params.get(k)}" for k in varying) for r in mlflow_runs]


def read_runs(uri: str, mlflow_runs: list) -> list[Run]:
    """The cells' tags and the epoch-indexed series of every hidden layer."""
    client = MlflowClient(uri)
    out = []
    for r, variant in zip(mlflow_runs, variants(mlflow_runs)):
        tags, metrics = r.data.tags, r.data.metrics
        depth = int(tags["depth"])
        acc_key = "test/acc" if "test/acc" in metrics else "val/acc"
        run = Run(r.info.run_id, tags["activation"], tags["init"], depth, int(tags["seed"]),
                  tags.get("distnet.status") or r.info.status.lower(), metrics.get(acc_key, math.nan),
                  variant=variant)
        for layer in range(1, depth + 1):
            for key in (f"speed/layer_{layer}", f"act/saturated/layer_{layer}", f"act/mean/layer_{layer}",
                        f"act/std/layer_{layer}"):
                run.series[key] = {m.step: m.value for m in client.get_metric_history(r.info.run_id, key)}
        run.series[acc_key] = {m.step: m.value for m in client.get_metric_history(r.info.run_id, acc_key)}
        table = steptable.read(client, r.info.run_id)
        run.steps = {k: v for k, v in table.items() if k == "step" or k.startswith("grad_norm/w/")}
        out.append(run)
    if not out:
        raise ReportError("no runs to report on")
    return out


# ---------------------------------------------------------------- extraction
def band(curves: list[dict[int, float]]) -> Band:
    """Seed band over the x values every curve has (a diverged seed's series ends early)."""
    xs = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    y = np.array([[c[x] for x in xs] for c in curves], dtype=float).reshape(len(curves), len(xs))
    return Band(np.array(xs), y.mean(0), y.min(0), y.max(0), len(curves))


def by_group(runs: list[Run]) -> dict[tuple[str, str], dict[int, list[Run]]]:
    """(activation, init) -> depth -> the runs (seeds) of that cell."""
    out: dict = defaultdict(lambda: defaultdict(list))
    for r in runs:
        out[r.group][r.depth].append(r)
    return {g: dict(sorted(d.items())) for g, d in sorted(out.items())}


def layer_curves(runs: list[Run], metric: str) -> dict[tuple[str, str], dict[int, dict[int, Band]]]:
    """(activation, init) -> depth -> hidden layer -> Band of `metric` ('speed' or
    'act/saturated') over epochs."""
    return {g: {depth: {l: band([r.series[f"{metric}/layer_{l}"] for r in cell]) for l in range(1, depth + 1)}
                for depth, cell in depths.items() if depth > 0}
            for g, depths in by_group(runs).items()}


def step_curves(runs: list[Run]) -> dict[tuple[str, str], dict[int, dict[int, Band]]]:
    """(activation, init) -> depth -> layer (1 .. depth + 1) -> Band over seeds of the weight-gradient
    norm at every step, from the step tables (runs without one are left out)."""
    out = {}
    for g, depths in by_group(runs).items():
        curves = {}
        for depth, cell in depths.items():
            cell = [r for r in cell if r.steps]
            if cell:
                curves[depth] = {l: band([dict(zip(r.steps["step"].tolist(), r.steps[f"grad_norm/w/layer_{l}"].tolist()))
                                          for r in cell]) for l in range(1, depth + 2)}
        if curves:
            out[g] = curves
    return out


def init_profile(runs: list[Run]) -> dict[tuple[str, str], dict[int, Band]]:
    """(activation, init) -> depth -> Band of the speed of learning at epoch 0 over layer index."""
    out = {}
    for g, depths in by_group(runs).items():
        out[g] = {}
        for depth, cell in depths.items():
            if depth == 0:
                continue
            per_seed = [{l: r.series[f"speed/layer_{l}"][0] for l in range(1, depth + 1)
                         if 0 in r.series[f"speed/layer_{l}"]} for r in cell]
            out[g][depth] = band(per_seed)
    return out


def accuracy_grid(runs: list[Run]) -> dict[str, tuple[list[int], list[str], np.ndarray]]:
    """activation -> (depths, inits (with their variant), [depth, init] mean final accuracy over
    seeds; nan if none)."""
    out = {}
    for act in sorted({r.activation for r in runs}):
        mine = [r for r in runs if r.activation == act]
        depths, inits = sorted({r.depth for r in mine}), sorted({r.group[1] for r in mine})
        grid = np.full((len(depths), len(inits)), np.nan)
        for i, d in enumerate(depths):
            for j, init in enumerate(inits):
                accs = [r.acc for r in mine if r.depth == d and r.group[1] == init and not math.isnan(r.acc)]
                if accs:
                    grid[i, j] = float(np.mean(accs))
        out[act] = (depths, inits, grid)
    return out


def init_table(runs: list[Run]) -> list[dict]:
    """Per cell: the speed of learning of each hidden layer at init (epoch 0) as mean and sample
    std over seeds, and the mean over seeds of each seed's layer-1 / last-hidden-layer ratio."""
    rows = []
    for (act, init), depths in by_group(runs).items():
        for depth, cell in depths.items():
            at_init = np.array([[r.series[f"speed/layer_{l}"].get(0, math.nan) for l in range(1, depth + 1)]
                                for r in cell])  # [seeds, layers]
            if depth == 0 or np.isnan(at_init).all():
                continue
            rows.append({"activation": act, "init": init, "depth": depth, "seeds": len(cell),
                         "mean": at_init.mean(0), "std": at_init.std(0, ddof=1) if len(cell) > 1 else None,
                         "ratio": float(np.mean(at_init[:, 0] / at_init[:, -1]))})
    return rows


def cell_table(runs: list[Run]) -> list[dict]:
    """One row per cell (seeds pooled): accuracy mean, std, min, max, and run statuses."""
    rows = []
    for (act, init), depths in by_group(runs).items():
        for depth, cell in depths.items():
            accs = np.array([r.acc for r in cell if not math.isnan(r.acc)])
            statuses = defaultdict(int)
            for r in cell:
                statuses[r.status] += 1
            rows.append({"activation": act, "init": init, "depth": depth, "seeds": len(cell),
                         "acc_mean": accs.mean() if len(accs) else math.nan,
                         "acc_std": accs.std(ddof=1) if len(accs) > 1 else math.nan,
                         "acc_min": accs.min() if len(accs) else math.nan,
                         "acc_max": accs.max() if len(accs) else math.nan,
                         "status": ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))})
    return rows


# ---------------------------------------------------------------- drawing
def _panels(n: int, width: float = 4.2, height: float = 3.4):
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(width * cols, 7.0), height * rows), squeeze=False,
                             layout="constrained")  # 7 in at least: room for the title
    for ax in axes.flat[n:]:
        ax.remove()
    return fig, list(axes.flat[:n])


def _draw(ax, b: Band, label: str, log: bool, band: bool | None = None) -> None:
    (line,) = ax.plot(b.x, b.mean, marker="o" if len(b.x) < 12 else None, ms=3, label=label)
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
        for layer, b in layers.items():
            _draw(ax, b, f"{line} {layer}", log, band)
        n = next(iter(layers.values())).n
        ax.set(title=f"{depth} hidden layer{'s' * (depth > 1)} ({n} seed{'s' * (n > 1)})", xlabel=x,
               ylabel=ylabel)
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


def figure_counts(fig) -> dict:
    """What a figure shows, for the manifest (and the tests): panels, lines and cells per panel."""
    axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    return {"panels": len(axes), "lines": [len(ax.get_lines()) for ax in axes],
            "cells": [int(np.size(ax.images[0].get_array())) if ax.images else 0 for ax in axes]}


# ---------------------------------------------------------------- the report
def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in s)


def _fmt(x: float, pct: bool = True) -> str:
    return "-" if math.isnan(x) else (f"{x * 100:.2f}" if pct else f"{x:.3g}")


def write_report(runs: list[Run], out: Path, title: str) -> dict[str, dict]:
    """Every figure and report.md into `out`; returns the manifest {file: figure_counts}."""
    out.mkdir(parents=True, exist_ok=True)
    eval_name = "test" if any("test/acc" in r.series for r in runs) else "validation"
    figures = {}
    speed, saturation = layer_curves(runs, "speed"), layer_curves(runs, "act/saturated")
    act_mean, act_std = layer_curves(runs, "act/mean"), layer_curves(runs, "act/std")
    for (act, init), curves in speed.items():
        g, name = (act, init), f"{_slug(act)}_{_slug(init)}.png"
        figures[f"speed_{name}"] = layer_figure(
            curves, f"Speed of learning: {act}, {init}", "bias-gradient norm (probe)", log=True)
        figures[f"saturation_{name}"] = layer_figure(
            saturation[g], f"Saturated units: {act}, {init}", "fraction saturated", log=False)
        figures[f"activation_{name}"] = layer_figure(
            within_layer(act_mean[g], act_std[g]), f"Activations, mean +- std over units: {act}, {init}",
            "activation (probe images)", log=False, band=True)
    for (act, init), curves in step_curves(runs).items():
        figures[f"grad_norm_{_slug(act)}_{_slug(init)}.png"] = layer_figure(
            curves, f"Weight-gradient norm at every step: {act}, {init}", "|grad W| (global batch)", log=True,
            x="step", line="layer")
    profiles = {g: p for g, p in init_profile(runs).items() if p}
    if profiles:
        figures["init_profile.png"] = profile_figure(profiles)
    figures["accuracy.png"] = accuracy_figure(accuracy_grid(runs), eval_name)
    manifest = {}
    for name, fig in figures.items():
        manifest[name] = figure_counts(fig)
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
    rows = cell_table(runs)
    lines = [f"# distnet report: {title}", "",
             f"{len(runs)} runs in {len(rows)} cells; accuracy is the final {eval_name} accuracy (%), "
             "statistics over seeds.", "",
             "| activation | init | hidden layers | seeds | mean | std | min | max | runs |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['activation']} | {r['init']} | {r['depth']} | {r['seeds']} | {_fmt(r['acc_mean'])} | "
              f"{_fmt(r['acc_std'])} | {_fmt(r['acc_min'])} | {_fmt(r['acc_max'])} | {r['status']} |" for r in rows]
    speeds = init_table(runs)
    if speeds:
        lines += ["", "## Speed of learning at init", "",
                  "Bias-gradient norm of each hidden layer on the probe images at epoch 0, mean (and sample "
                  "std) over seeds; ratio: layer 1 / last hidden layer, averaged over seeds.", "",
                  "| activation | init | hidden layers | seeds | per layer, 1 to last | ratio |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in speeds:
            per_layer = ", ".join(f"{m:.3g}" + ("" if r["std"] is None else f" ± {sd:.2g}")
                                  for m, sd in zip(r["mean"], r["std"] if r["std"] is not None else r["mean"]))
            lines.append(f"| {r['activation']} | {r['init']} | {r['depth']} | {r['seeds']} | {per_layer} | "
                         f"{r['ratio']:.3g} |")
    lines += ["", "## Figures", ""] + [f"![{name}]({name})" for name in manifest]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return manifest


def report(uri: str, selector: list[str], out: Path) -> tuple[dict[str, dict], str | None]:
    """`distnet report`: the files in `out`, also logged under `report/` of the sweep's parent run."""
    mlflow_runs, parent, title = find_runs(uri, selector)
    manifest = write_report(read_runs(uri, mlflow_runs), out, title)
    if parent is not None:
        MlflowClient(uri).log_artifacts(parent, str(out), "report")
    return manifest, parent
