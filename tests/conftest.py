"""Shared fixtures: MNIST read once, one real local Ray per test session, headless Chromium, a fresh MLflow sqlite store."""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request

import numpy as np
import pytest

from browser import chromium
from distnet import data


# What a test starts, as markers (pyproject.toml lists them): `make check` runs the tests that start
# none of these. A test that takes one of these fixtures, directly or through another, is marked by
# it; the modules that start the others say so themselves (`pytestmark`).
MARKED_BY_FIXTURE = {"ray_cluster": "ray", "browser": "browser"}


def pytest_configure(config):
    # Ray Train's controller looks at its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by
    # default), and a training's start and its end each wait for a look: 0.2 s takes 3-4 s off each
    # of the suite's many short trainings (benchmarks/trainer_floor.py: a no-op TorchTrainer 14.5 ->
    # 10.2 s with one worker, 15.4 -> 12.4 s with two). A setting users have too; every Ray, driver
    # and command the tests start inherits it from here.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


def pytest_collection_modifyitems(items):
    for item in items:
        for fixture, marker in MARKED_BY_FIXTURE.items():
            if fixture in item.fixturenames:
                item.add_marker(marker)


@pytest.fixture(scope="session")
def mnist() -> data.MNIST:
    return data.load_mnist()


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray (2 CPUs, loopback), shared by every test that needs one, ended at the end."""
    import ray  # here, not at the top: tests/test_gpu.py runs on hosts without Ray

    ray.init(num_cpus=2, log_to_driver=False, include_dashboard=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (tests/browser.py), one for each test module that opens pages."""
    yield from chromium()


@pytest.fixture
def tracking_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlruns.db'}"


class RecordingSink:
    """Collects what the worker loop logs, for in-process tests of the loop itself: MLflow values
    (NaN where a member is inactive) and step-table rows (likewise)."""

    def __init__(self):
        self.logged: list[tuple[int, dict[str, np.ndarray]]] = []
        self.steps: list[tuple[int, dict[str, np.ndarray]]] = []

    def log(self, step, values, active):
        self.logged.append((step, {k: np.where(active, v, np.nan) for k, v in values.items()}))

    def log_steps(self, steps, columns, active):
        for i, s in enumerate(steps):
            self.steps.append((s, {k: np.where(active[i], v[i], np.nan) for k, v in columns.items()}))

    def progress(self, state):
        pass

    def flush(self):
        pass

    def series(self, name: str) -> list[tuple[int, np.ndarray]]:
        return [(s, v[name]) for s, v in self.logged if name in v]


def free_port() -> int:
    # distnet.ui.free_port's twin: importing that would import MLflow, which this file keeps out
    # (tests/test_gpu.py runs on hosts with torch alone).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(url: str, headers: dict[str, str] | None = None) -> int:
    """The HTTP status a GET of `url` gets (an error status too, rather than an exception)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code
