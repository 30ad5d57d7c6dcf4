"""The GPU path on any CUDA host: data resident on the GPU, CUDA-graph replay, divergence under replay,
torch.distributed on CUDA tensors. Needs only torch, numpy and pyyaml (no Ray, no MLflow, not even
pytest), so it runs where distnet's full environment cannot be installed:

    .venv/bin/python -m pytest tests/test_gpu.py                 # skipped without CUDA
    DISTNET_REQUIRE_GPU=1 python3 tests/test_gpu.py              # a bare host: fails without CUDA
    make gpu-check                                               # this, then the GPU benchmark table

MNIST is found as everywhere (`DISTNET_DATA`, `../shared/data/mnist`, `~/.cache/distnet/mnist`).
Every check runs 20 steps of SGD with momentum 0.9 on real MNIST, in process.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a bare checkout, distnet not installed

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from distnet import data, metrics, worker  # noqa: E402
from distnet.config import build_config  # noqa: E402

REQUIRE = os.environ.get("DISTNET_REQUIRE_GPU") == "1"
SIZES = [784, 30, 30, 10]
LIMITS = (2560, 500)  # 20 global batches of 128


class Skip(Exception):
    """No CUDA and none required: the check does not apply here."""


def needs_cuda() -> None:
    if torch.cuda.is_available():
        return
    if REQUIRE:
        raise AssertionError(f"DISTNET_REQUIRE_GPU=1 but torch {torch.__version__} sees no CUDA device")
    if __name__ == "__main__":  # run as a script (main below), with or without pytest installed
        raise Skip("needs CUDA")
    import pytest

    pytest.skip("needs CUDA")


@lru_cache(maxsize=1)
def arrays() -> dict[str, np.ndarray]:
    return data.select(data.load_mnist(), "test", *LIMITS)


def config(cuda: bool, graph: bool = False, workers: int = 1, population=None, **train):
    return build_config({
        "model": {"sizes": SIZES, "activation": "relu", "init": "he_normal"},
        "train": {"epochs": 1, "lr": 0.05, "momentum": 0.9, "log_every": 5, "cuda_graph": graph, **train},
        "ray": {"num_workers": workers, "use_gpu": cuda}, "data": {"train_limit": LIMITS[0], "eval_limit": LIMITS[1]},
        "population": population or [{"seed": 0}, {"seed": 1, "init": "xavier_normal", "lr": 0.1}]})


class Rows:
    """Keeps the per-step rows the loop hands over: {name: [steps, P]} (NaN where inactive)."""

    def __init__(self):
        self.rows: dict[str, list] = {}

    def log(self, step, values, active):
        pass

    def log_steps(self, steps, columns, active):
        for name, v in columns.items():
            self.rows.setdefault(name, []).append(np.where(active, v, np.nan))

    def progress(self, state):
        pass

    def flush(self):
        pass

    def table(self) -> dict[str, np.ndarray]:
        return {k: np.concatenate(v) for k, v in self.rows.items()}


def train(cfg, device: str) -> tuple[dict, dict[str, np.ndarray]]:
    rows = Rows()
    out = worker.train(cfg, arrays(), worker.WorkerEnv(device=torch.device(device)), rows)
    return out, rows.table()


def assert_same(a: tuple, b: tuple, rtol: float) -> None:
    """Parameters, divergence and every per-step record of two trainings."""
    (out_a, rows_a), (out_b, rows_b) = a, b
    torch.testing.assert_close(out_a.theta, out_b.theta, rtol=rtol, atol=rtol * 1e-1)
    assert torch.equal(out_a.diverged_at, out_b.diverged_at)
    assert set(rows_a) == set(rows_b) == set(metrics.step_names(len(SIZES) - 1))
    for name in rows_a:
        np.testing.assert_allclose(rows_a[name], rows_b[name], rtol=rtol, err_msg=name)


def test_cuda_eager_equals_cpu():
    needs_cuda()
    cpu = train(config(False), "cpu")
    cuda = train(config(True), "cuda")
    assert cuda[0].step == 20
    assert_same(cuda, cpu, rtol=1e-5)
    assert (cpu[0].theta - worker.init_theta(SIZES, config(False).members)).abs().max() > 1e-2  # it trained


def test_cuda_graph_equals_eager_and_warmup_leaves_no_trace():
    needs_cuda()
    eager = train(config(True), "cuda")
    graph = train(config(True, graph=True), "cuda")
    assert_same(graph, eager, rtol=1e-6)
    # One step: a warm-up that trained (the capture runs three) would show at once.
    one_eager = train(config(True, max_steps=1), "cuda")
    one_graph = train(config(True, graph=True, max_steps=1), "cuda")
    assert_same(one_graph, one_eager, rtol=1e-6)


def test_diverged_member_is_frozen_under_graph_replay_as_in_eager_mode():
    needs_cuda()
    population = [{"seed": 0}, {"seed": 1, "lr": 1e4}]  # member 1 diverges within a few steps
    eager = train(config(True, population=population), "cuda")
    graph = train(config(True, graph=True, population=population), "cuda")
    diverged = worker.diverged_members(eager[0].diverged_at)
    assert list(diverged) == [1] and diverged[1] < 15
    assert_same(graph, eager, rtol=1e-6)
    assert torch.isfinite(graph[0].theta).all()  # frozen where it diverged, not NaN
    assert np.isnan(graph[1]["grad_norm/w/layer_1"][diverged[1] + 1:, 1]).all()  # its rows end there


def h2d_copies(cfg) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        worker.train(cfg, arrays(), worker.WorkerEnv(device=torch.device("cuda")), Rows())
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if "HtoD" in e.key)


def test_data_stays_on_the_gpu():
    """Host-to-device copies do not grow with the number of steps: the data set is copied once, each
    epoch's batch order once, and every step gathers on the device."""
    needs_cuda()
    short, long = h2d_copies(config(True, max_steps=5)), h2d_copies(config(True))  # 5 vs 20 steps
    assert long == short, (short, long)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, out: str) -> None:
    gpus = torch.cuda.device_count()
    device = torch.device("cuda", rank % gpus)
    torch.cuda.set_device(device)
    # NCCL needs a GPU per rank; with one GPU both ranks share it through gloo, which all-reduces
    # CUDA tensors too.
    dist.init_process_group("nccl" if gpus >= world else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world)
    try:
        result = worker.train(config(True, workers=world), arrays(), worker.WorkerEnv(rank, world, device), None)
        if rank == 0:
            torch.save(result.theta, out)
    finally:
        dist.destroy_process_group()


def test_two_process_distributed_run_equals_one_process():
    needs_cuda()
    one = train(config(True), "cuda")[0].theta
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "theta.pt")
        mp.spawn(_rank, args=(2, free_port(), out), nprocs=2, join=True)
        two = torch.load(out)
    torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-6)


BLOCK_RAY_AND_MLFLOW = """
import importlib.abc, runpy, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ray", "mlflow"):
            raise ImportError(f"{name} is not available on this host")

sys.meta_path.insert(0, Block())
runpy.run_path(sys.argv[1], run_name="imported")  # the module's imports, not its checks
print("imported without ray or mlflow")
"""


def test_gpu_checks_need_only_torch_numpy_and_yaml():
    """Runs everywhere (CI has no GPU): this module and distnet.worker import with Ray and MLflow
    unimportable; on a host without CUDA the script skips every check, and fails them all when a
    GPU is required, so `make gpu-check` cannot pass on a machine that has none."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "DISTNET_REQUIRE_GPU"}
    proc = subprocess.run([sys.executable, "-c", BLOCK_RAY_AND_MLFLOW, __file__], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "imported without ray or mlflow" in proc.stdout, proc.stderr[-2000:]
    if torch.cuda.is_available():
        return  # the checks above run for real here
    script = [sys.executable, __file__]
    skipped = subprocess.run(script, env=env, capture_output=True, text=True, timeout=300)
    assert skipped.returncode == 0 and skipped.stdout.count("SKIP test_") == 5, skipped.stdout + skipped.stderr
    required = subprocess.run(script, env={**env, "DISTNET_REQUIRE_GPU": "1"}, capture_output=True, text=True,
                              timeout=300)
    assert required.returncode == 1 and required.stdout.count("FAIL test_") == 5, required.stdout


def main() -> int:
    """Without pytest: run every check, print one line each; non-zero exit if any failed."""
    failed = 0
    checks = [(n, f) for n, f in globals().items() if n.startswith("test_") and callable(f)
              and n != "test_gpu_checks_need_only_torch_numpy_and_yaml"]  # that one runs the script
    for name, fn in checks:
        try:
            fn()
            print(f"PASS {name}", flush=True)
        except Skip as e:
            print(f"SKIP {name}: {e}", flush=True)
        except Exception as e:  # report every check, then fail
            failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
    if torch.cuda.is_available():
        print(f"device {torch.cuda.get_device_name()} torch {torch.__version__} CUDA {torch.version.cuda}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
