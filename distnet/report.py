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

The per-group figures (and init_profile's panels) are drawn for at most GROUP_FIGURES (activation,
init) groups, spread over the grid (report.md names them; `--all-figures` draws every group); the
heatmaps and the tables cover every cell. A sweep's runs are read from its listing and its cell
records (cellrecords), run by run only where records are missing.

Extraction (MLflow -> arrays) and drawing are separate functions so the numbers behind every
figure can be tested on their own.
"""

from __future__ import annotations

import contextlib
import gc
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only: no display on a cluster node or in CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.collections import QuadMesh  # noqa: E402
import numpy as np  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from distnet import cellrecords, choices, isometry, meanfield, schema, steptable, tracking  # noqa: E402


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
    steps: dict[str, np.ndarray] = field(default_factory=dict)  # its step table's STEP_COLUMNS
    variant: str = ""  # the other settings that vary between the runs, e.g. "train.batch_size=10"
    sigma_w2: float = 1.0  # the weight gain squared and the bias variance (the scheme's when not set)
    sigma_b2: float = 0.0
    case: str = ""  # its sweep's case (sweep.py's `cases`), if any

    @property
    def group(self) -> tuple[str, str]:
        """(activation, init and variant): what one figure panel set or heatmap column shows."""
        return self.activation, f"{self.init} {self.variant}".strip()

    @property
    def acc_series(self) -> dict[int, float]:
        """Accuracy by epoch: on the test set, or on the validation set where the run used one."""
        key = schema.held_out_acc(self.series)
        return self.series[key] if key else {}


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


def _param(key: str, value: str | None) -> str:
    """key=value; a gain as the variance mean-field theory is written in (sigma_w^2=1.76, not 1.3266...)."""
    if key in ("model.sigma_w", "model.sigma_b") and value not in (None, "None"):
        return f"{key.split('.')[1]}^2={float(value) ** 2:.4g}"
    return f"{key}={value}"


def variants(mlflow_runs: list) -> list[str]:
    """Per run, the params outside AXES whose values differ between the runs, as "key=value"."""
    keys = set().union(*(r.data.params for r in mlflow_runs)) - AXES
    varying = sorted(k for k in keys if len({r.data.params.get(k) for r in mlflow_runs}) > 1)
    return [" ".join(_param(k, r.data.params.get(k)) for k in varying) for r in mlflow_runs]


def _variances(params: dict) -> tuple[float, float]:
    """(sigma_w^2, sigma_b^2) of a run: its gains squared, the init scheme's bias std when unset."""
    sigma_b = params.get("model.sigma_b", "None")
    bias = choices.INITS[params["model.init"]].bias_std if sigma_b == "None" else float(sigma_b)
    return float(params.get("model.sigma_w", 1.0)) ** 2, bias ** 2


# A cell's records that the report reads: its epoch series and its step table's STEP_COLUMNS.
RECORD_PREFIXES = (tuple(schema.layer(s, "") for s in schema.LAYER_SERIES) + schema.ACC_KEYS + (schema.JACOBIAN,)
                   + tuple(cellrecords.STEP_PREFIX + c for c in cellrecords.STEP_COLUMNS))


def _listed(r, variant: str) -> tuple[Run, list[str]]:
    """A listed run's cell, from its tags, params and latest metrics, and the series keys to read."""
    tags, latest = r.data.tags, r.data.metrics
    depth = int(tags["depth"])
    acc_key = schema.held_out_acc(latest) or schema.acc("val")
    run = Run(r.info.run_id, tags["activation"], tags["init"], depth, int(tags["seed"]),
              schema.run_status(tags, r.info.status), latest.get(acc_key, math.nan), variant=variant,
              case=tags.get(schema.CASE, ""))
    if "model.init" in r.data.params:
        run.sigma_w2, run.sigma_b2 = _variances(r.data.params)
    keys = [schema.layer(s, l) for l in range(1, depth + 1) for s in schema.LAYER_SERIES] + [acc_key]
    if schema.jacobian("spread") in latest:  # trained with train.jacobian
        keys += [schema.jacobian(m) for m in isometry.MOMENTS + ("q_in",)]
        keys += [schema.quantile_name(p) for p in schema.JACOBIAN_QUANTILES]
    return run, keys


def _from_records(run: Run, keys: list[str], record: dict[str, tuple[np.ndarray, np.ndarray]]) -> Run:
    """Series and step columns from the cell's records, in the types the run's own reads give."""
    empty = (np.array([], np.int64), np.array([]))
    for key in keys:
        steps, values = record.get(key, empty)
        run.series[key] = dict(zip(steps.tolist(), values.tolist()))
    columns = {k[len(cellrecords.STEP_PREFIX):]: v for k, v in record.items() if k.startswith(cellrecords.STEP_PREFIX)}
    if columns:  # the step table's float32 values, exactly (the records widened them to float64)
        run.steps = {"step": columns[schema.grad_norm("w", 1)][0].copy()} | {k: v.astype(np.float32)
                                                                         for k, (_, v) in columns.items()}
    return run


def _from_run(client: MlflowClient, run: Run, keys: list[str]) -> Run:
    """Series and step columns read from the run itself: a request per key, and its step table."""
    for key in keys:
        run.series[key] = {m.step: tracking.unstored(m.value)
                           for m in client.get_metric_history(run.run_id, key)}
    table = steptable.read(client, run.run_id)
    run.steps = {k: v for k, v in table.items() if k == "step" or k.startswith(cellrecords.STEP_COLUMNS)}
    return run


def read_runs(uri: str, mlflow_runs: list, parent: str | None = None) -> list[Run]:
    """Each listed run's cell, epoch series of every hidden layer and step-table weight-gradient
    norms: from the sweep `parent`'s cell records, and for the runs they lack (a job resumed after
    a restart, a sweep recorded before there were records, plain run ids) from the run itself,
    SERVER_CONCURRENCY at once through a server. Either way gives the same Run."""
    client = MlflowClient(uri)
    listed = {r.info.run_id: _listed(r, variant) for r, variant in zip(mlflow_runs, variants(mlflow_runs))}
    out = {}
    if parent is not None:
        for run_id, record in cellrecords.read(client, parent, RECORD_PREFIXES):
            if run_id in listed:  # records of runs since deleted (cells re-run) are left
                out[run_id] = _from_records(*listed[run_id], record)
    missing = [cell for run_id, cell in listed.items() if run_id not in out]
    for run in tracking.concurrent(uri, lambda cell: _from_run(client, *cell), missing):
        out[run.run_id] = run
    if not out:
        raise ReportError("no runs to report on")
    return [out[run_id] for run_id in listed]


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
