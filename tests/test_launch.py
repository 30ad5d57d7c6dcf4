"""End to end on a real local Ray (one per test session) and a real MLflow sqlite store."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from distnet import cli, launch, metrics, steptable
from distnet.config import build_config
from distnet.model import init_theta

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"train_limit": 2560, "eval_limit": 500}  # 20 global batches of 128


def config(workers, all_reduce="auto", **train):
    return build_config({"name": f"w{workers}", "model": {"sizes": [784, 30, 30, 10], "activation": "sigmoid"},
                         "train": {"epochs": 1, "lr": 0.5, "momentum": 0.9, **train},
                         "ray": {"num_workers": workers, "cpus_per_worker": 1, "all_reduce": all_reduce}, "data": SMALL})


@pytest.fixture(scope="module")
def one_worker(ray_cluster, tmp_path_factory) -> tuple[launch.TrainingResult, str]:
    """The 1-worker training both all-reduce paths are compared with, trained once (and its store)."""
    where = tmp_path_factory.mktemp("one-worker")
    uri = f"sqlite:///{where / 'mlruns.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(where)
        return launch.run_training(config(1, max_steps=20), uri, show_progress=False), uri


@pytest.mark.parametrize("all_reduce", ["auto", "torch"])  # shared memory on one node; gloo as across nodes
def test_two_workers_follow_the_one_worker_trajectory(one_worker, tracking_uri, tmp_path, monkeypatch, all_reduce):
    monkeypatch.chdir(tmp_path)
    one, one_uri = one_worker
    two = launch.run_training(config(2, all_reduce, max_steps=20), tracking_uri, show_progress=False)
    assert one.steps == two.steps == 20
    torch.testing.assert_close(two.theta, one.theta, atol=1e-5, rtol=0)
    client = MlflowClient(tracking_uri)  # the all-reduce each took, as its runs say
    assert MlflowClient(one_uri).get_run(one.run_ids[0]).data.tags["distnet.all_reduce"] == "none"
    assert client.get_run(two.run_ids[0]).data.tags["distnet.all_reduce"] == \
        {"auto": "shared_memory", "torch": "torch"}[all_reduce]
    # the runs did move: 20 steps at lr 0.5 change the parameters well beyond the tolerance
    init = init_theta(config(1).sizes, config(1).members)
    assert (one.theta - init).abs().max() > 1e-2


def test_one_epoch_run_is_fully_recorded_in_mlflow(ray_cluster, tracking_uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = build_config({"name": "rec", "model": {"depth": 2, "width": 30, "activation": "tanh"},
                        "train": {"epochs": 1, "log_every": 7}, "ray": {"num_workers": 2}, "data": SMALL,
                        "mlflow": {"experiment": "rec-test"},
                        "population": [{"init": "xavier_normal", "seed": 1}, {"init": "he_normal", "seed": 2}]})
    result = launch.run_training(cfg, tracking_uri, show_progress=False)
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("rec-test")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted(result.run_ids) and len(runs) == 2
    for k, run_id in enumerate(result.run_ids):
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.info.run_name == f"rec/init={['xavier_normal', 'he_normal'][k]},seed={k + 1}"  # what sets it apart
        p, t = run.data.params, run.data.tags
        assert p["model.depth"] == "2" and p["model.activation"] == "tanh" and p["train.batch_size"] == "128"
        assert p["model.init"] == ["xavier_normal", "he_normal"][k] and p["seed"] == str(k + 1)
        assert (t["depth"], t["width"], t["activation"], t["init"], t["seed"]) == \
            ("2", "30", "tanh", ["xavier_normal", "he_normal"][k], str(k + 1))
        assert len(t["config_hash"]) == 12
        table = steptable.read(client, run_id)  # every step 0..19 exactly once
        np.testing.assert_array_equal(table["step"], np.arange(20))
        for name in metrics.step_names(3):  # 20 steps, up to 50 points: MLflow's intervals are single steps
            hist = sorted(client.get_metric_history(run_id, name), key=lambda m: m.step)
            assert [m.step for m in hist] == list(range(20))
            np.testing.assert_allclose([m.value for m in hist], table[name], rtol=1e-6)
            assert np.isfinite(table[name]).all() and (table[name] > 0).all()
        for name in ["test/acc", "test/loss", "speed/layer_1", "speed/layer_2", "act/saturated/layer_2"]:
            assert sorted(m.step for m in client.get_metric_history(run_id, name)) == [0, 1]
        assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1]
        art = client.download_artifacts(run_id, "config.yaml", str(tmp_path / f"a{k}"))
        assert yaml.safe_load(Path(art).read_text())["model"]["init"] == ["xavier_normal", "he_normal"][k]
        final_acc = client.get_metric_history(run_id, "test/acc")
        assert max(final_acc, key=lambda m: m.step).value == pytest.approx(result.metrics["test/acc"][k])
    assert min(result.metrics["test/acc"]) > 0.5  # 20 steps already learn something


def test_cli_train_prints_accuracy_run_id_and_ui_command(ray_cluster, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # in this process: a second one would only add its start-up
    code = cli.main(["train", str(ROOT / "configs" / "default.yaml"), "train.epochs=1", "data.train_limit=1280",
                     "data.eval_limit=500", "--address", ray_cluster])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert "epoch 1/1" in out and "final test accuracy" in out
    run_id = out.split("MLflow run ")[1].split()[0]
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    assert f"open the UI: distnet ui {run_id} --tracking-uri {uri}" in out
    assert MlflowClient(uri).get_run(run_id).info.status == "FINISHED"


def test_storage_path_is_under_distnet_storage_where_a_cluster_sets_it(tmp_path, monkeypatch):
    """A relative `ray.storage_path` lies under $DISTNET_STORAGE (the folder every node of a cluster
    reaches: the cluster files set it), else under the working directory; an absolute path or a
    bucket URI is taken as it is."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DISTNET_STORAGE", raising=False)
    relative, absolute, bucket = (build_config({"model": {"depth": 1, "width": 10}, "ray": {"storage_path": p}}) for p in
                                  ("runs", "/srv/runs", "s3://bucket/runs"))
    assert launch.storage_path(relative) == str(tmp_path / "runs")
    monkeypatch.setenv("DISTNET_STORAGE", "/mnt/shared/distnet")
    assert [launch.storage_path(c) for c in (relative, absolute, bucket)] == [
        "/mnt/shared/distnet/runs", "/srv/runs", "s3://bucket/runs"]
