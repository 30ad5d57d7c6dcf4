"""distnet.results against mlflow.search_runs over the same cells: every column both have, value for
value (tests/test_report.py, and benchmarks/bench_results.py on a 10,000-cell sweep)."""

from __future__ import annotations

import math

import pandas as pd

from distnet import frames, tracking


def assert_same_as_listed(cells: pd.DataFrame, listed: pd.DataFrame) -> int:
    """Each value of `cells` (distnet.results) in a column that `listed` (mlflow.search_runs) has too
    equals it: a tag as the string MLflow keeps, a metric to the last bit (MLflow's stand-in for an
    infinity undone); a value missing on one side is missing on the other (a column MLflow does not
    have at all, where no run has that tag or metric, is missing for every cell). Returns how many
    values were compared."""
    listed = listed.set_index("run_id")
    assert sorted(cells["run_id"]) == sorted(listed.index)
    compared = 0
    for column, theirs in frames.listing_columns(cells).items():
        if column == "run_id":
            continue
        for run_id, ours in zip(cells["run_id"], cells[column]):
            other = listed.at[run_id, theirs] if theirs in listed else None
            if theirs.startswith("tags."):
                if column == "diverged_at":  # a tag only where the cell diverged
                    ours = None if pd.isna(ours) else str(ours)
                else:  # an axis: a None in the grid (as NA in an int column) is the tag "None"
                    ours = "None" if ours is None or ours is pd.NA else str(ours)
                assert ours == (other if isinstance(other, str) else None), (run_id, column, ours, other)
            else:
                other = math.nan if other is None or pd.isna(other) else tracking.unstored(float(other))
                assert ours == other or (math.isnan(ours) and math.isnan(other)), (run_id, column, ours, other)
            compared += 1
    return compared
