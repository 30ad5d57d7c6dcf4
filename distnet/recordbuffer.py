"""Rank 0's records not yet written: pure data, which each checkpoint carries.

Per member: MLflow metric rows (key, value, timestamp in ms, step) and step-table rows (steps and
a [n, C] float32 block); for all of them the step tables' columns; and each member's first and
latest step-table row, which its gradient ratio is read from (outcome.grad_ratio). `state_dict` /
`load_state_dict` hold and restore it without any I/O; tracking.MlflowSink writes it.
"""

from __future__ import annotations

import time

import numpy as np

from distnet import schema
from distnet.outcome import NAN, grad_ratio

Row = tuple[str, float, int, int]  # a metric value: key, value, timestamp (ms), step


class StepRows:
    """One member's full-resolution rows since the last take: steps and a [n, C] float32 block."""

    def __init__(self):
        self.steps: list[np.ndarray] = []
        self.values: list[np.ndarray] = []

    def add(self, steps: np.ndarray, values: np.ndarray) -> None:
        if len(steps):
            self.steps.append(steps)
            self.values.append(values)

    def block(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(steps [n], values [n, C]) of everything added since the last clear(), or None."""
        if not self.steps:
            return None
        if len(self.steps) > 1:  # compact once: the next call is free
            self.steps, self.values = [np.concatenate(self.steps)], [np.concatenate(self.values)]
        return self.steps[0], self.values[0]

    def clear(self) -> None:
        self.steps, self.values = [], []


class RecordBuffer:
    def __init__(self, members: int):
        # Plain tuples: an MLflow Metric object per value cost ~12 us a value on the hot path.
        self.metrics: list[list[Row]] = [[] for _ in range(members)]
        self.columns: list[str] = []  # the step tables' series, fixed by the first log_steps
        self.rows = [StepRows() for _ in range(members)]
        self.first: list[tuple[int, np.ndarray] | None] = [None] * members
        self.latest: list[tuple[int, np.ndarray] | None] = [None] * members

    def log(self, step: int, values: dict[str, np.ndarray], active: np.ndarray) -> None:
        """values[name][k] at `step` for every member k with active[k]."""
        ts = int(time.time() * 1000)
        members = np.flatnonzero(active).tolist()
        for name, per_member in values.items():
            v = np.asarray(per_member, dtype=np.float64).tolist()
            for k in members:
                self.metrics[k].append((name, v[k], ts, step))

    def log_steps(self, steps: list[int], columns: dict[str, np.ndarray], active: np.ndarray) -> None:
        """columns[name][i, k] is member k's value at steps[i], kept where active[i, k]."""
        self.columns = list(columns)
        block = np.stack([np.asarray(v, dtype=np.float32) for v in columns.values()], 2)  # [n, P, C]
        steps = np.asarray(steps, dtype=np.int64)
        for k in range(len(self.rows)):
            keep = np.flatnonzero(active[:, k])
            if len(keep):
                self.rows[k].add(steps[keep], block[keep, k])
                if self.first[k] is None:
                    self.first[k] = (int(steps[keep[0]]), block[keep[0], k])
                self.latest[k] = (int(steps[keep[-1]]), block[keep[-1], k])

    def add(self, k: int, rows: list[Row]) -> None:
        """Metric rows for member k as they are, with their own steps and timestamps."""
        self.metrics[k] += rows

    def start_from(self, k: int, table: dict[str, np.ndarray]) -> None:
        """Member k's step table as MLflow holds it (a job picked up again with nothing to restore):
        its columns, and its first row, where the gradient ratios start."""
        self.columns = [c for c in table if c != "step"]
        self.first[k] = (int(table["step"][0]), np.array([table[c][0] for c in self.columns]))

    def ratios(self, k: int) -> tuple[float, float]:
        """Member k's gradient ratio at the first and the latest step of its step table."""
        if self.first[k] is None:
            return NAN, NAN
        n_layers = sum(c.startswith(schema.GRAD_NORM_W) for c in self.columns)
        return tuple(grad_ratio(dict(zip(self.columns, row[1])), n_layers) for row in (self.first[k], self.latest[k]))

    def pending(self, k: int) -> tuple[list[Row], tuple[np.ndarray, dict[str, np.ndarray]] | None]:
        """Member k's metric rows, and its step-table rows as (steps, {column: values}) or None."""
        block = self.rows[k].block()
        return self.metrics[k], None if block is None else (block[0], dict(zip(self.columns, block[1].T)))

    def clear(self, k: int) -> None:
        """Member k's pending records are written."""
        self.metrics[k] = []
        self.rows[k].clear()

    def state_dict(self) -> dict:
        return {"metrics": [list(m) for m in self.metrics], "columns": list(self.columns),
                "rows": [r.block() for r in self.rows], "first": list(self.first), "latest": list(self.latest)}

    def load_state_dict(self, state: dict) -> None:
        self.metrics = [[tuple(row) for row in m] for m in state["metrics"]]
        self.columns = list(state["columns"])
        self.rows = [StepRows() for _ in state["rows"]]
        for rows, block in zip(self.rows, state["rows"]):
            if block is not None:
                rows.add(*block)
        self.first, self.latest = list(state["first"]), list(state["latest"])
