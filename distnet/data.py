"""MNIST: find the four IDX gzip files, verify them, read them, split them.

Nothing here trains on unverified bytes: every file's decompressed content must match its SHA-256
before it is parsed. The driver reads once (`load_mnist`) and ships the uint8 arrays to the
workers (distnet.sharding orders their batches). Torch-free: the driver and the CLI read data
without it.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# SHA-256 of each file's decompressed content (the same values as ../shared/data/mnist/README.md).
FILES = {
    "train-images-idx3-ubyte.gz": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte.gz": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte.gz": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte.gz": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049
N_VALIDATION = 10_000  # Nielsen's validation set: the last 10k of the training file
GET_A_COPY = "get a verified copy with: distnet data download --dir DIR  (then --data-dir DIR or DISTNET_DATA=DIR)"
CHECKOUT = Path(__file__).resolve().parents[1]


class DataError(RuntimeError):
    """The data is missing, unreadable or not the bytes we expect. The message names the file."""


@dataclass(frozen=True)
class MNIST:
    train_x: np.ndarray  # [N, 784] uint8
    train_y: np.ndarray  # [N] int64
    test_x: np.ndarray
    test_y: np.ndarray


def candidate_dirs(data_dir: str | None = None) -> list[Path]:
    """Where MNIST is looked for, in order: --data-dir, $DISTNET_DATA, ../shared/data/mnist beside
    the checkout, ~/.cache/distnet/mnist. An explicit choice is the only candidate."""
    if data_dir:
        return [Path(data_dir)]
    if os.environ.get("DISTNET_DATA"):
        return [Path(os.environ["DISTNET_DATA"])]
    return [CHECKOUT.parent / "shared" / "data" / "mnist", Path.home() / ".cache" / "distnet" / "mnist"]


def find_data_dir(data_dir: str | None = None) -> Path:
    dirs = candidate_dirs(data_dir)
    for d in dirs:
        if d.is_dir():
            return d
    raise DataError(f"MNIST not found; looked in: {', '.join(map(str, dirs))}. {GET_A_COPY}")


def read_verified(path: Path, expected_sha256: str) -> bytes:
    """The decompressed bytes of one gzip file, refused unless their SHA-256 is the expected one."""
    try:
        raw = gzip.decompress(path.read_bytes())
    except FileNotFoundError:
        raise DataError(f"{path}: missing. {GET_A_COPY}") from None
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(
            f"{path}: refused, not a readable gzip file ({e}); expected content sha256 {expected_sha256}. {GET_A_COPY}"
        ) from None
    found = hashlib.sha256(raw).hexdigest()
    if found != expected_sha256:
        raise DataError(
            f"{path}: refused, content sha256 {found} does not match the expected {expected_sha256}. {GET_A_COPY}"
        )
    return raw


def parse_idx(raw: bytes, magic: int) -> np.ndarray:
    """IDX bytes -> uint8 array (images flattened to [N, rows*cols])."""
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataError(f"IDX magic {found}, expected {magic}")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    return data.reshape(dims[0], -1) if ndim > 1 else data


def encode_idx(array: np.ndarray, magic: int) -> bytes:
    """uint8 array -> IDX bytes; images are [N, 28, 28] or [N, 784] (stored as 28x28)."""
    ndim = magic & 0xFF
    dims = [array.shape[0], 28, 28] if ndim == 3 else [array.shape[0]]
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def load_mnist(data_dir: str | None = None) -> MNIST:
    d = find_data_dir(data_dir)

    def read(name: str, magic: int) -> np.ndarray:
        return parse_idx(read_verified(d / name, FILES[name]), magic)

    return MNIST(
        train_x=read("train-images-idx3-ubyte.gz", IMAGES_MAGIC),
        train_y=read("train-labels-idx1-ubyte.gz", LABELS_MAGIC).astype(np.int64),
        test_x=read("t10k-images-idx3-ubyte.gz", IMAGES_MAGIC),
        test_y=read("t10k-labels-idx1-ubyte.gz", LABELS_MAGIC).astype(np.int64),
    )


def select(mnist: MNIST, split: str, train_limit: int | None, eval_limit: int | None) -> dict[str, np.ndarray]:
    """Train and evaluation arrays for a split ("test": 60k/10k test; "validation": Nielsen's
    50k/10k), cut to the limits: plain data for the object store."""
    if split == "validation":
        tx, ty = mnist.train_x[:-N_VALIDATION], mnist.train_y[:-N_VALIDATION]
        ex, ey = mnist.train_x[-N_VALIDATION:], mnist.train_y[-N_VALIDATION:]
    else:
        tx, ty, ex, ey = mnist.train_x, mnist.train_y, mnist.test_x, mnist.test_y
    return {"train_x": tx[:train_limit], "train_y": ty[:train_limit], "eval_x": ex[:eval_limit], "eval_y": ey[:eval_limit]}

