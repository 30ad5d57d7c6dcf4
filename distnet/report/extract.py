"""The report's numbers: curves, bands over seeds, grids and tables, from `Run`s; every figure
draws what these return, so each number can be tested on its own."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from distnet import meanfield, schema
from distnet.report.runs import Run


@dataclass
class Band:
    """Seed statistics of one curve: x, the mean over seeds, and the min..max band."""

    x: np.ndarray
    mean: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    n: int  # seeds



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
    out = {}
    for g, depths in by_group(runs).items():
        curves = {depth: {l: band([r.series.get(schema.layer(metric, l), {}) for r in cell]) for l in range(1, depth + 1)}
                  for depth, cell in depths.items() if depth > 0}
        curves = {d: layers for d, layers in curves.items() if any(len(b.x) for b in layers.values())}
        if curves:  # runs without the probe's series (filled by hand, or another tool's) draw nothing
            out[g] = curves
    return out


def step_curves(runs: list[Run]) -> dict[tuple[str, str], dict[int, dict[int, Band]]]:
    """(activation, init) -> depth -> layer (1 .. depth + 1) -> Band over seeds of the weight-gradient
    norm at every step, from the step tables (runs without one are left out)."""
    out = {}
    for g, depths in by_group(runs).items():
        curves = {}
        for depth, cell in depths.items():
            cell = [r for r in cell if r.steps]
            if cell:
                curves[depth] = {l: band([dict(zip(r.steps["step"].tolist(), r.steps[schema.grad_norm("w", l)].tolist()))
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
            per_seed = [{l: r.series[schema.layer(schema.SPEED, l)][0] for l in range(1, depth + 1)
                         if 0 in r.series[schema.layer(schema.SPEED, l)]} for r in cell]
            b = band(per_seed)
            if len(b.x):
                out[g][depth] = b
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
            at_init = np.array([[r.series[schema.layer(schema.SPEED, l)].get(0, math.nan) for l in range(1, depth + 1)]
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


# Init schemes whose unit-gain weight variance is 1 / n_in: with them, sigma_w^2 is mean-field
# theory's sigma_w^2 exactly (W ~ N(0, sigma_w^2 / n_in)).
MEANFIELD_INITS = ("lecun_normal", "nielsen_scaled")
TRAINED = 0.5  # a cell "trains" when its final accuracy is above this (chance is 0.1)


@dataclass
class TrainabilityMap:
    """Accuracy over (depth, sigma_w^2) at some epochs (the budgets), for one activation and sigma_b^2."""

    activation: str
    sigma_b2: float
    other: str  # the settings besides sigma_w^2 that vary between the runs ("" in a plain map)
    depths: list[int]
    sigma_w2: list[float]
    acc: dict[int, np.ndarray]  # epoch -> [depth, sigma_w^2] mean accuracy over seeds (nan: none)
    runs: list[Run]

    def bound(self, sigma_w2: float) -> float:
        return meanfield.mean_field(self.activation, sigma_w2, self.sigma_b2).max_depth

    def agreement(self, epoch: int) -> tuple[int, int, list[dict]]:
        """(cells whose outcome, accuracy > TRAINED after `epoch` epochs, agrees with depth < 6 xi_c;
        cells; the ones that disagree). Every run (seed) is a cell of its own."""
        bounds = {s: self.bound(s) for s in self.sigma_w2}
        agree, wrong = 0, []
        for r in self.runs:
            acc = r.acc_series.get(epoch, math.nan)
            trained, predicted = acc > TRAINED, r.depth < bounds[r.sigma_w2]
            if trained == predicted:
                agree += 1
            else:
                wrong.append({"sigma_w2": r.sigma_w2, "depth": r.depth, "seed": r.seed, "acc": acc,
                              "bound": bounds[r.sigma_w2], "status": r.status})
        return agree, len(self.runs), wrong


def trainability_maps(runs: list[Run]) -> list[TrainabilityMap]:
    """One map per (activation, sigma_b^2) among runs whose init is mean-field's and whose sigma_w^2
    varies; budgets: after the first epoch and after the last."""
    groups: dict[tuple, list[Run]] = defaultdict(list)
    for r in runs:
        if r.init in MEANFIELD_INITS:
            other = " ".join(v for v in r.variant.split() if not v.startswith(("sigma_w^2=", "sigma_b^2=")))
            groups[(r.activation, r.sigma_b2, other)].append(r)
    out = []
    for (act, sb2, other), cell_runs in sorted(groups.items()):
        sigmas, depths = sorted({r.sigma_w2 for r in cell_runs}), sorted({r.depth for r in cell_runs})
        if len(sigmas) < 2:
            continue
        series = [r.acc_series for r in cell_runs]
        last = max((max(s) for s in series if s), default=0)
        acc = {}
        for epoch in sorted({1, last} - {0}):
            grid = np.full((len(depths), len(sigmas)), np.nan)
            for i, d in enumerate(depths):
                for j, sw in enumerate(sigmas):
                    vals = [s[epoch] for r, s in zip(cell_runs, series) if r.depth == d and r.sigma_w2 == sw
                            and epoch in s]
                    if vals:
                        grid[i, j] = float(np.mean(vals))
            acc[epoch] = grid
        out.append(TrainabilityMap(act, sb2, other, depths, sigmas, acc, cell_runs))
    return out


def init_grad_profile(m: TrainabilityMap) -> tuple[int, dict[float, Band]]:
    """The deepest network's weight-gradient norm at step 0 vs layer (1 .. depth + 1), per sigma_w^2,
    over seeds, from the step tables: vanishing, flat or exploding with depth."""
    depth = max((r.depth for r in m.runs if r.steps), default=None)
    if depth is None:  # trained with train.step_norms false: no step tables to draw from
        return 0, {}
    out = {}
    for sw in m.sigma_w2:
        cell = [r for r in m.runs if r.depth == depth and r.sigma_w2 == sw and r.steps]
        if cell:
            out[sw] = band([{l: float(r.steps[schema.grad_norm("w", l)][0]) for l in range(1, depth + 2)}
                            for r in cell])
    return depth, out


def per_layer_factor(b: Band) -> float:
    """The squared gradient norm's growth factor per layer towards the input, from the least-squares
    slope of log |grad W_l| against l over the hidden layers' weights (the first and the output
    layer have other fan-ins and are left out). Mean-field theory says chi_1: the backpropagated
    error's variance is multiplied by chi_1 at every layer (Schoenholz et al. 2017, eq. 17)."""
    x, y = b.x[1:-1], np.log(b.mean[1:-1])
    return float(np.exp(-2 * np.polyfit(x, y, 1)[0]))


