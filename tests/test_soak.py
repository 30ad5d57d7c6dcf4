"""The soak's short version (tests/faults.py; `make soak` is the long one): every kind of fault once,
a few seconds apart and shorter than the soak's, on a cluster of two worker hosts and the tracking
server on PostgreSQL, during a 20-cell sweep; then the whole store is checked (faults.check) and
nothing the cluster started is left."""

import random

import pytest

import faults
from testcluster import namespaced_cluster

pytestmark = [pytest.mark.namespaces, pytest.mark.ray, pytest.mark.server]


def test_every_kind_of_fault_once_mid_sweep_loses_nothing(tmp_path, monkeypatch):
    with namespaced_cluster(workers=2, head_cpus=0, artifacts_mib=256) as c:
        for key, value in {**c.login, "MLFLOW_TRACKING_URI": c.mlflow}.items():  # this process's MLflow clients
            monkeypatch.setenv(key, value)
        done = faults.sweep_round(c, tmp_path, "soak-short", seeds=10,
                                  faults={"rng": random.Random(7), "gap": (3.0, 5.0), "scale": 0.3, "once": True})
    print(faults.table(done.faults))  # with -rP: what each fault cost
    faults.dump(done.faults, tmp_path / "faults.jsonl")
    assert sorted(f.kind for f in done.faults) == sorted(faults.KINDS), done.faults
    assert done.errors == [] and done.reruns == 0
    assert done.starts == 2  # the first run and the one after the driver's kill
    assert faults.left_behind(c) == []
