"""The report itself: which groups get figures, the figures written, report.md, and the artifacts
logged to the sweep's parent run."""

from __future__ import annotations

import contextlib
import gc
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a cluster node or in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from distnet import isometry, meanfield, schema  # noqa: E402
from distnet.report.draw import (accuracy_figure, figure_counts, grad_profile_figure, layer_figure,  # noqa: E402
                                 profile_figure, trainability_figure, within_layer)
from distnet.report.extract import (TRAINED, TrainabilityMap, accuracy_grid, cell_table,  # noqa: E402
                                    init_grad_profile, init_profile, init_table, layer_curves, per_layer_factor,
                                    step_curves, trainability_maps)
from distnet.report.runs import Run, find_runs, read_runs  # noqa: E402


# ---------------------------------------------------------------- the report
def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in s)


def _fmt(x: float, pct: bool = True) -> str:
    return "-" if math.isnan(x) else (f"{x * 100:.2f}" if pct else f"{x:.3g}")


# Per-(activation, init) groups whose figures (speed_, saturation_, activation_, grad_norm_ and a
# panel of init_profile) are drawn by default. A group's four figures, a panel per depth, take about
# 5 s of CPU to draw here: the 81 groups of a 9 x 9 grid took 7 minutes, in a report meant to finish
# in 2 at 10,000 cells where listing the cells takes 15 to 60 s. Nine groups, with the heatmaps and
# tables, take 50 s, and on a 9 x 9 grid they are one group per activation and per init. The
# accuracy heatmaps and the tables cover every cell whatever this is.
GROUP_FIGURES = 9


def drawn_groups(runs: list[Run], limit: int | None) -> list[tuple[str, str]]:
    """The groups whose figures are drawn: all of them, or past `limit` that many evenly spaced in
    (activation, init) order."""
    groups = sorted({r.group for r in runs})
    if limit is None or len(groups) <= limit:
        return groups
    return [groups[i] for i in np.linspace(0, len(groups) - 1, limit).round().astype(int)]


def figures(runs: list[Run], groups: list[tuple[str, str]], maps: list[TrainabilityMap], arms: list[isometry.Arm],
            eval_name: str):
    """(file name, figure) of each figure, one at a time: the per-group ones for `groups` only."""
    drawn = set(groups)
    shown = [r for r in runs if r.group in drawn]
    speed, saturation = layer_curves(shown, schema.SPEED), layer_curves(shown, schema.SATURATED)
    act_mean, act_std = layer_curves(shown, schema.ACT_MEAN), layer_curves(shown, schema.ACT_STD)
    for (act, init), curves in speed.items():
        g, name = (act, init), f"{_slug(act)}_{_slug(init)}.png"
        yield f"speed_{name}", layer_figure(
            curves, f"Speed of learning: {act}, {init}", "bias-gradient norm (probe)", log=True)
        yield f"saturation_{name}", layer_figure(
            saturation[g], f"Saturated units: {act}, {init}", "fraction saturated", log=False)
        yield f"activation_{name}", layer_figure(
            within_layer(act_mean[g], act_std[g]), f"Activations, mean +- std over units: {act}, {init}",
            "activation (probe images)", log=False, band=True)
    for (act, init), curves in step_curves(shown).items():
        yield f"grad_norm_{_slug(act)}_{_slug(init)}.png", layer_figure(
            curves, f"Weight-gradient norm at every step: {act}, {init}", "|grad W| (global batch)", log=True,
            x="step", line="layer")
    profiles = {g: p for g, p in init_profile(shown).items() if p}
    if profiles:
        yield "init_profile.png", profile_figure(profiles)
    yield "accuracy.png", accuracy_figure(accuracy_grid(runs), eval_name)
    for m in maps:
        name = _slug(f"{m.activation}_{m.sigma_b2:g}{'_' + m.other if m.other else ''}")
        yield f"trainability_{name}.png", trainability_figure(m, eval_name)
        depth, profile = init_grad_profile(m)
        if profile:
            yield f"meanfield_grad_profile_{name}.png", grad_profile_figure(m, depth, profile)
    if arms:
        yield from isometry.figures(arms)


def write_report(runs: list[Run], out: Path, title: str, group_figures: int | None = GROUP_FIGURES) -> dict[str, dict]:
    """Every figure (the per-group ones for at most `group_figures` groups, None: all) and report.md
    into `out`; returns the manifest {file: figure_counts}."""
    out.mkdir(parents=True, exist_ok=True)
    eval_name = "test" if any(schema.acc("test") in r.series for r in runs) else "validation"
    groups, maps, arms = drawn_groups(runs, group_figures), trainability_maps(runs), isometry.arms(runs)
    manifest = {}
    for name, fig in figures(runs, groups, maps, arms, eval_name):  # each saved and closed before the next is made
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
    for m in maps:
        lines += trainability_lines(m)
    if arms:
        lines += isometry.lines(arms, eval_name)
    lines += ["", "## Figures", ""] + capped_lines(runs, groups) + [f"![{name}]({name})" for name in manifest]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return manifest


def capped_lines(runs: list[Run], groups: list[tuple[str, str]]) -> list[str]:
    """report.md's word on the groups left undrawn, if any: which were drawn and how to draw all."""
    n = len({r.group for r in runs})
    if len(groups) == n:
        return []
    return [f"Per-group figures (speed, saturation, activation, grad_norm, init_profile panels) for {len(groups)} "
            f"of the {n} (activation, init) groups, evenly spaced in that order: "
            + ", ".join(f"{act} {init}" for act, init in groups) + ". The accuracy heatmaps and the tables "
            "cover every cell; `distnet report ... --all-figures` draws every group.", ""]


def trainability_lines(m: TrainabilityMap) -> list[str]:
    """report.md's section on one map: agreement with depth < 6 xi_c per budget, the cells that
    disagree, and the per-layer gradient factor at init against chi_1."""
    extra = f", {m.other}" if m.other else ""
    lines = ["", f"## Trainability vs mean-field theory: {m.activation}, sigma_b^2 = {m.sigma_b2:.3g}{extra}", "",
             f"A cell trains when its accuracy is above {TRAINED:.0%}; theory (Schoenholz et al. 2017) says it "
             "trains when its depth is below 6 xi_c (`distnet meanfield`).", "",
             "| sigma_w^2 | chi_1 | xi_c | 6 xi_c |", "| --- | --- | --- | --- |"]
    for sw in m.sigma_w2:
        mf = meanfield.mean_field(m.activation, sw, m.sigma_b2)
        lines.append(f"| {sw:.4g} | {mf.chi_1:.4f} | {mf.xi_c:.4g} | {mf.max_depth:.4g} |")
    lines += ["", "| after epoch | cells | agree with theory | fraction |", "| --- | --- | --- | --- |"]
    disagree = {}
    for epoch in m.acc:
        agree, n, wrong = m.agreement(epoch)
        lines.append(f"| {epoch} | {n} | {agree} | {agree / n:.3f} |")
        disagree[epoch] = wrong
    for epoch, wrong in disagree.items():
        if wrong:
            lines += ["", f"Cells that disagree after epoch {epoch}:", "",
                      "| sigma_w^2 | depth | seed | accuracy | 6 xi_c | status |", "| --- | --- | --- | --- | --- | --- |"]
            lines += [f"| {w['sigma_w2']:.4g} | {w['depth']} | {w['seed']} | {_fmt(w['acc'])} | {w['bound']:.4g} | "
                      f"{w['status']} |" for w in wrong]
    depth, profile = init_grad_profile(m)
    if profile:
        lines += ["", f"Weight-gradient norm at step 0, {depth} hidden layers: layer 1's over the output layer's, and the "
                  "squared norm's growth factor per layer towards the input (a fit over the hidden layers) against "
                  "chi_1.", "",
                  "| sigma_w^2 | layer 1 / output layer | factor per layer (squared norm) | chi_1 |", "| --- | --- | --- | --- |"]
        for sw, b in profile.items():
            lines.append(f"| {sw:.4g} | {b.mean[0] / b.mean[-1]:.3g} | {per_layer_factor(b):.4f} | "
                         f"{meanfield.mean_field(m.activation, sw, m.sigma_b2).chi_1:.4f} |")
    return lines


@contextlib.contextmanager
def gc_paused():
    """Python's cyclic garbage collector off while a sweep is read: listing it builds about 120
    objects per cell (the store's rows, then MLflow's entities) and each full collection walks every
    one of them again; at 10,530 cells that was 25 of the listing's 37 s of CPU here (from a sqlite
    store), for the same peak memory."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def report(uri: str, selector: list[str], out: Path, all_figures: bool = False) -> tuple[dict[str, dict], str | None]:
    """`distnet report`: the files in `out`, also logged under `report/` of the sweep's parent run;
    the per-group figures for GROUP_FIGURES groups unless `all_figures`."""
    with gc_paused():
        mlflow_runs, parent, title = find_runs(uri, selector)
        runs = read_runs(uri, mlflow_runs, parent)
        del mlflow_runs  # the listing (every run's latest metrics, params, tags): freed before drawing
    manifest = write_report(runs, out, title, None if all_figures else GROUP_FIGURES)
    if parent is not None:
        MlflowClient(uri).log_artifacts(parent, str(out), "report")
    return manifest, parent
