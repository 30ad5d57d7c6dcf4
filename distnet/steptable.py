"""Every step of the per-step series, kept as Parquet under each run's artifact path `step_metrics/`.

MLflow's metric store holds interval summaries sized for its UI (metrics.IntervalStats); the full
resolution lives here: per member run, one Parquet part per flush (the steps between two
checkpoints), with a `step` column and one float32 column per series, named as the MLflow keys
(`grad_norm/w/layer_1`, ..., `train/batch_loss`, `train/batch_acc`). The values are the float32 numbers the loop
computed, bit for bit.

A part is named by its first and last step. Flushes happen at checkpoints, whose steps are fixed by
the config, so a part written again after a restart (the same steps, recomputed to the same values)
has the same name and replaces the old one: every step is in exactly one part.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from mlflow.tracking import MlflowClient

ARTIFACT_DIR = "step_metrics"


def part_name(first: int, last: int) -> str:
    return f"steps-{first:09d}-{last:09d}.parquet"


def write_part(folder: Path, steps: np.ndarray, columns: dict[str, np.ndarray]) -> Path:
    """One part, `steps` [n] and each column [n], as a file in `folder` (the caller uploads it to the
    run's `step_metrics/`); returns its path."""
    table = pa.table({"step": pa.array(np.asarray(steps, dtype=np.int64)),
                      **{k: pa.array(np.asarray(v, dtype=np.float32)) for k, v in columns.items()}})
    path = Path(folder) / part_name(int(steps[0]), int(steps[-1]))
    # Byte-stream split + zstd: the encoding suited to float columns; the step column is a run of
    # integers, dictionary-encoded.
    pq.write_table(table, path, compression="zstd", use_dictionary=["step"], use_byte_stream_split=list(columns))
    return path


def read(client: MlflowClient, run_id: str) -> dict[str, np.ndarray]:
    """A run's whole step table, in step order: {"step": int64 [n], key: float32 [n], ...}; empty
    if the run has none (trained with train.step_norms false, or not yet flushed)."""
    parts = sorted(a.path for a in client.list_artifacts(run_id, ARTIFACT_DIR) if a.path.endswith(".parquet"))
    if not parts:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(client.download_artifacts(run_id, ARTIFACT_DIR, tmp))
        table = pa.concat_tables([pq.read_table(local / Path(p).name) for p in parts])
    return {name: table.column(name).to_numpy() for name in table.column_names}
