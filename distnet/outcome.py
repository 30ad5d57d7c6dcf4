"""How a cell ended: one typed record, made in one place each way a cell can end.

A sweep's summary (summary.csv, the terminal table), the lanes' counts and the driver's exit code
read a `CellOutcome`; nothing takes a status string apart. It is built from a finished training
(`trained`: what rank 0 computed as it closed the run), from a listed run (`listed`: a cell that a
rerun skips) or from a failure (`failed`: the lane's trainer died on the cell's job).

Imports nothing heavier than numpy: the lanes' queue actor unpickles these (distnet.lanes).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping

import numpy as np

from distnet import schema

NAN = float("nan")


def grad_ratio(row: Mapping[str, float], n_layers: int) -> float:
    """|grad W_1| / |grad W_L| of one step-table row (column -> value) of a net with `n_layers`
    weight layers, in float64: nan where the row has no gradient norms (train.step_norms off),
    and for a diverged row's inf / inf."""
    first, last = row.get(schema.grad_norm("w", 1)), row.get(schema.grad_norm("w", n_layers))
    if first is None or last is None:
        return NAN
    with np.errstate(all="ignore"):
        return float(np.float64(first) / np.float64(last))


@dataclass(frozen=True)
class CellOutcome:
    run_id: str
    status: str  # schema.FINISHED, DIVERGED or FAILED; MLflow's own (lower case) for a run never closed
    diverged_at: int | None = None  # the step of its first non-finite gradient
    acc: float = NAN  # the final held-out accuracy
    ratio_init: float = NAN  # grad_ratio at the first and the last row of its step table
    ratio_end: float = NAN
    error: str = ""  # why it failed
    cell: str = ""  # the cell's label in its sweep (the driver's, which knows the grid)

    @classmethod
    def trained(cls, run_id: str, diverged_at: int | None, acc: float, ratios: tuple[float, float]) -> CellOutcome:
        status = schema.FINISHED if diverged_at is None else schema.DIVERGED
        return cls(run_id, status, diverged_at, acc, *ratios)

    @classmethod
    def failed(cls, run_id: str, error: str) -> CellOutcome:
        return cls(run_id, schema.FAILED, error=error)

    @classmethod
    def listed(cls, run, ratios: tuple[float, float], acc_key: str) -> CellOutcome:
        """A listed run (MLflow's Run): its tags, final metrics and the ratios `ratios`."""
        tags = run.data.tags
        step = tags.get(schema.DIVERGED_STEP)
        return cls(run.info.run_id, schema.run_status(tags, run.info.status), int(step) if step is not None else None,
                   run.data.metrics.get(acc_key, NAN), *ratios, error=tags.get(schema.ERROR, ""))

    def of_cell(self, label: str) -> CellOutcome:
        return replace(self, cell=label)

    @property
    def status_text(self) -> str:
        """As summary.csv and the terminal table write it: `diverged@12` for a cell that diverged."""
        return f"{self.status}@{self.diverged_at}" if self.status == schema.DIVERGED else self.status
