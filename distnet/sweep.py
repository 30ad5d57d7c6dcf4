"""Grid sweeps: a base config plus axes -> cells -> populations.

A sweep file is a run config with two more sections:

    grid:                       # dotted config keys -> values; the cells are the product
      model.depth: [1, 2, 3]
      model.init: [nielsen, xavier_normal]
      seed: [0, 1, 2]
    sweep:
      pack: 16                  # at most this many cells per training (population)
      max_concurrent: 2         # trainings at once (default: what the cluster's resources allow)

Where the settings to compare are not a product (tanh at two bias variances, each with its own
critical weight variance; relu with He's), `cases` names each combination, and the grid's `case`
axis runs over them (so `case` is a tag, a summary axis and a `distnet ui --group-by` like any):

    cases:
      tanh_critical: {model.activation: tanh, model.sigma_w2: 1.761, model.sigma_b2: 0.05}
      relu_he: {model.activation: relu, model.init: he_normal}
    grid:
      model.depth: [8, 16]

A cell is one member's training and one MLflow run. Its id is a hash of its resolved config
(less name, ray and mlflow: they do not change what is trained), so a re-run recognises it. Cells
that differ only in member settings (init, gain, seed, lr) share a training: one population.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from distnet import config as C
from distnet import schema
from distnet.config import Config, ConfigError, MemberSpec
from distnet.outcome import CellOutcome

# Resolved-config keys that population members may differ in (everything else must be shared).
MEMBER_KEYS = ("seed", "model.init", "model.sigma_w", "model.sigma_b", "train.lr")


@dataclass(frozen=True)
class SweepSettings:
    pack: int = field(default=16, metadata={"min": 1, "exclusive": False})
    max_concurrent: Optional[int] = field(default=None, metadata={"min": 1, "exclusive": False})


@dataclass(frozen=True)
class Cell:
    id: str
    axes: dict[str, Any]  # the grid values that make this cell
    config: Config  # a single-member config

    @property
    def label(self) -> str:
        return label(self.axes)


def label(axes: dict[str, Any]) -> str:
    """A cell's name from its grid values: `depth=2,init=he_normal`."""
    return ",".join(f"{k.split('.')[-1]}={v}" for k, v in axes.items())


@dataclass(frozen=True)
class Sweep:
    name: str
    id: str  # hash of the base config and the grid: the parent run's identity
    grid: dict[str, list]
    settings: SweepSettings
    cells: list[Cell]


def identity(cfg: Config) -> dict:
    d = cfg.member_config(0)
    for k in ("name", "ray", "mlflow"):
        d.pop(k)
    return d


CASE_AXIS = "case"


def _cases(raw_cases: Any, grid: dict[str, list]) -> dict[str, dict]:
    """`cases` as {name: nested settings}, checked: named mappings of config keys that no grid
    axis sets too, and no population (a cell is one member)."""
    if raw_cases is None:
        return {}
    if not isinstance(raw_cases, dict) or not raw_cases:
        raise ConfigError("cases", raw_cases, "must be a non-empty mapping of case name -> {dotted.key: value}")
    if CASE_AXIS in grid:
        raise ConfigError(f"grid.{CASE_AXIS}", grid[CASE_AXIS], "is the axis the cases make: name them under cases")
    out = {}
    for name, settings in raw_cases.items():
        if not isinstance(settings, dict) or not settings:
            raise ConfigError(f"cases.{name}", settings, "must be a non-empty mapping of {dotted.key: value}")
        flat = C.flatten(settings)
        for key in flat:
            if key in grid or key == "population":
                raise ConfigError(f"cases.{name}.{key}", flat[key],
                                  "is also a grid axis: set it in one place" if key in grid
                                  else "a sweep's cells are single members: use grid axes or cases")
        out[str(name)] = C.nest(flat)
    return out


def build_sweep(raw: dict) -> Sweep:
    raw = dict(raw)
    grid = C.flatten(raw.pop("grid", None) or {})
    if not grid:
        raise ConfigError("grid", None, "a sweep needs a non-empty grid: {dotted.key: [values, ...]}")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid.{key}", values, "must be a non-empty list of values")
    cases = _cases(raw.pop("cases", None), grid)
    settings = C.build_dataclass(SweepSettings, raw.pop("sweep", None) or {}, "sweep.")
    if raw.get("population"):
        raise ConfigError("population", raw["population"], "a sweep's cells are single members: use grid axes")
    identity_of = {"grid": grid} | ({"cases": cases} if cases else {})  # (a sweep without cases: as before them)
    if cases:
        grid = {CASE_AXIS: list(cases), **grid}
    cells, seen = [], {}
    for combo in itertools.product(*grid.values()):
        axes = dict(zip(grid, combo))
        try:
            base = C.merge(raw, cases[axes[CASE_AXIS]]) if cases else raw
            cfg = C.build_config(C.merge(base, C.nest({k: v for k, v in axes.items() if k != CASE_AXIS})))
        except ConfigError as e:
            raise ConfigError(e.field, e.value, f"{e.allowed} (in grid cell {axes})") from None
        cell = Cell(C.config_hash(identity(cfg)), axes, cfg)
        if cell.id in seen:
            raise ConfigError("grid", axes, f"makes the same training as {seen[cell.id]}")
        seen[cell.id] = axes
        cells.append(cell)
    name = cells[0].config.name
    sweep_id = C.config_hash({"base": {k: v for k, v in raw.items() if k not in ("ray", "mlflow")}, **identity_of})
    return Sweep(name, sweep_id, grid, settings, cells)


def load_sweep(path: str | Path, overrides: list[str] = ()) -> Sweep:
    return build_sweep(C.read_raw(path, overrides))


def _training_key(cell: Cell) -> str:
    shared = C.flatten(identity(cell.config))
    return C.config_hash({k: v for k, v in shared.items() if k not in MEMBER_KEYS})


def packs(cells: list[Cell], pack: int) -> list[list[Cell]]:
    """Cells grouped by everything but member settings, each group cut into chunks of `pack`."""
    groups: dict[str, list[Cell]] = {}
    for c in cells:
        groups.setdefault(_training_key(c), []).append(c)
    return [g[i:i + pack] for g in groups.values() for i in range(0, len(g), pack)]


def select(cells: list[Cell], runs: Iterable, force: bool = False) -> tuple[list[Cell], list, dict[str, Any]]:
    """Which cells to train, from the runs a sweep's parent already holds (MLflow runs, tagged with
    their cell's id): (the cells to train, in grid order; the runs to delete; each finished cell's
    run by cell id). A cell with a FINISHED run is done unless `force`; every other run of a cell
    that trains (failed, interrupted, or forced) is stale: a fresh run replaces it."""
    by_cell: dict[str, list] = {}
    for run in runs:
        by_cell.setdefault(run.data.tags.get(schema.CELL_ID), []).append(run)
    todo, stale, finished = [], [], {}
    for cell in cells:
        listed = by_cell.get(cell.id, [])
        done = [r for r in listed if r.info.status == "FINISHED"]
        if done and not force:
            finished[cell.id] = done[0]
        else:
            stale += listed
            todo.append(cell)
    return todo, stale, finished


def population_config(cells: list[Cell], name: str) -> Config:
    """One training for a pack: the first cell's shared settings, one member per cell."""
    members = [c.config.members[0] for c in cells]
    specs = [MemberSpec(m.init, m.sigma_w, m.sigma_b, m.seed, m.lr) for m in members]
    return dataclasses.replace(cells[0].config, name=name, population=specs)


def summary_csv(rows: list[CellOutcome]) -> str:
    lines = ["cell,status,acc,ratio_init,ratio_end,run_id"]
    lines += [f'"{r.cell}",{r.status_text},{r.acc},{r.ratio_init},{r.ratio_end},{r.run_id}' for r in rows]
    return "\n".join(lines) + "\n"


FULL_TABLE_CELLS = 60  # past this many cells the terminal shows per-axis tables; summary.csv has every row


def summary_table(rows: list[CellOutcome], eval_name: str, cells: list[Cell]) -> str:
    """For the terminal: every cell's row for a small sweep, else the totals and, per grid axis, one
    row per value. ratio = |grad W_1| / |grad W_L| at init and at the end."""
    if len(rows) <= FULL_TABLE_CELLS:
        return cell_table(rows, eval_name)
    counts = _status_counts(rows)
    out = [f"{len(rows)} cells: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + "; every cell in summary.csv"]
    for axis in cells[0].axes:
        groups: dict = {}
        for cell, row in zip(cells, rows):
            groups.setdefault(cell.axes[axis], []).append(row)
        out += ["", axis_table(axis, groups, eval_name)]
    return "\n".join(out)


def cell_table(rows: list[CellOutcome], eval_name: str) -> str:
    width = max([len("cell")] + [len(r.cell) for r in rows])
    head = f"{'cell':<{width}}  {'status':<14} {eval_name + ' acc':>9} {'g1/gL init':>11} {'g1/gL end':>11}  run"
    out = [head, "-" * len(head)]
    for r in rows:
        out.append(f"{r.cell:<{width}}  {r.status_text:<14} {100 * r.acc:>8.2f}% "
                   f"{r.ratio_init:>11.3g} {r.ratio_end:>11.3g}  {r.run_id}")
    return "\n".join(out)


def _status_counts(rows: list[CellOutcome]) -> dict[str, int]:
    counts = {schema.FINISHED: 0, schema.DIVERGED: 0, schema.FAILED: 0}
    for r in rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    return counts


def axis_table(axis: str, groups: dict[Any, list[CellOutcome]], eval_name: str) -> str:
    """One row per value of `axis`: its cells' statuses, mean accuracy and median gradient ratios
    (over the cells that have them)."""
    width = max([len(axis)] + [len(str(v)) for v in groups])
    head = (f"{axis:<{width}}  {'cells':>6} {'finished':>8} {'diverged':>8} {'failed':>6} "
            f"{'mean ' + eval_name + ' acc':>14} {'med g1/gL init':>14} {'med g1/gL end':>14}")
    out = [head, "-" * len(head)]
    for value, rows in groups.items():
        counts = _status_counts(rows)
        with np.errstate(all="ignore"):
            acc = np.nanmean([r.acc for r in rows]) if any(np.isfinite(r.acc) for r in rows) else np.nan
            ratios = [np.nanmedian(v) if np.isfinite(v).any() else np.nan
                      for v in (np.array([getattr(r, k) for r in rows], dtype=float) for k in ("ratio_init", "ratio_end"))]
        out.append(f"{str(value):<{width}}  {len(rows):>6} {counts[schema.FINISHED]:>8} {counts[schema.DIVERGED]:>8} "
                   f"{counts[schema.FAILED]:>6} {100 * acc:>13.2f}% {ratios[0]:>14.3g} {ratios[1]:>14.3g}")
    return "\n".join(out)
