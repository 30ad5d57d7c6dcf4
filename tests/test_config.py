import subprocess
import sys
from pathlib import Path

import pytest

from distnet.config import ConfigError, build_config, load_config

ROOT = Path(__file__).resolve().parents[1]


def error_of(raw: dict) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        build_config(raw)
    return e.value


def test_default_config_resolves():
    cfg = load_config(ROOT / "configs" / "default.yaml")
    assert cfg.sizes == [784, 30, 10] and cfg.model.depth == 1 and cfg.model.width == 30
    assert cfg.ray.num_workers == 2 and cfg.train.batch_size == 128
    assert len(cfg.members) == 1 and cfg.members[0].lr == cfg.train.lr


def test_overrides_are_typed_and_depth_width_build_sizes():
    cfg = load_config(ROOT / "configs" / "default.yaml",
                      ["model.sizes=null", "model.depth=4", "model.width=20", "train.lr=0.25", "ray.num_workers=4"])
    assert cfg.sizes == [784, 20, 20, 20, 20, 10]
    assert cfg.train.lr == 0.25 and cfg.ray.num_workers == 4


def test_unknown_key_names_field_and_allowed_keys():
    e = error_of({"model": {"sizes": [784, 10], "activaton": "tanh"}})
    assert e.field == "model.activaton"
    assert "activation" in str(e) and "init" in str(e)


def test_unknown_top_level_key():
    e = error_of({"model": {"sizes": [784, 10]}, "trian": {}})
    assert e.field == "trian" and "train" in str(e)


def test_wrong_type_names_field_and_type():
    e = error_of({"model": {"sizes": [784, 10]}, "train": {"epochs": "three"}})
    assert e.field == "train.epochs" and "'three'" in str(e) and "integer" in str(e)


@pytest.mark.parametrize("field,value,expected", [
    ("init", "glorot", "xavier_uniform"),
    ("activation", "swish", "leaky_relu"),
    ("loss", "hinge", "sigmoid_bce"),
])
def test_unknown_registry_name_lists_allowed(field, value, expected):
    e = error_of({"model": {"sizes": [784, 10], field: value}})
    assert e.field == f"model.{field}" and repr(value) in str(e) and expected in str(e)


def test_unknown_member_init():
    e = error_of({"model": {"sizes": [784, 10]}, "population": [{"init": "he_normal"}, {"init": "bogus"}]})
    assert e.field == "population[1].init" and "he_normal" in str(e)


def test_cuda_graph_is_refused_on_cpu_and_accepted_on_gpu():
    e = error_of({"model": {"sizes": [784, 10]}, "train": {"cuda_graph": True}})
    assert e.field == "train.cuda_graph" and "ray.use_gpu: true" in str(e)
    assert build_config({"model": {"sizes": [784, 10]}, "train": {"cuda_graph": True},
                         "ray": {"use_gpu": True}}).train.cuda_graph


def test_fault_drill_places_are_named_and_a_flush_kill_is_rank_0s():
    e = error_of({"model": {"sizes": [784, 10]}, "fault": {"kill_in": "save"}})
    assert e.field == "fault.kill_in" and "step, flush, commit" in str(e)
    e = error_of({"model": {"sizes": [784, 10]}, "ray": {"num_workers": 2},
                  "fault": {"kill_at_step": 3, "kill_rank": 1, "kill_in": "flush"}})
    assert e.field == "fault.kill_rank" and "rank 0 alone writes" in str(e)
    assert build_config({"model": {"sizes": [784, 10]}, "ray": {"num_workers": 2},
                         "fault": {"kill_at_step": 3, "kill_rank": 1, "kill_in": "commit"}}).fault.kill_in == "commit"


def test_batch_not_divisible_by_workers():
    e = error_of({"model": {"sizes": [784, 10]}, "ray": {"num_workers": 3}})
    assert e.field == "ray.num_workers" and "train.batch_size=128" in str(e)
    assert "1, 2, 4, 8, 16, 32, 64, 128" in str(e)


@pytest.mark.parametrize("lr", [0, -0.1])
def test_non_positive_lr(lr):
    e = error_of({"model": {"sizes": [784, 10]}, "train": {"lr": lr}})
    assert e.field == "train.lr" and "> 0" in str(e)


def test_bad_sizes_and_inconsistent_depth():
    assert error_of({"model": {"sizes": [100, 10]}}).field == "model.sizes"
    assert error_of({"model": {"sizes": [784, 30, 10], "depth": 2}}).field == "model.depth"
    assert error_of({"model": {}}).field == "model.sizes"


def test_nielsen_mode_fills_and_refuses_contradictions():
    cfg = build_config({"nielsen": True, "model": {"depth": 1, "width": 30}})
    assert (cfg.model.activation, cfg.model.loss, cfg.data.pixel_scale, cfg.model.init) == \
        ("sigmoid", "sigmoid_bce", 256.0, "nielsen_scaled")
    e = error_of({"nielsen": True, "model": {"depth": 1, "width": 30, "activation": "relu"}})
    assert e.field == "model.activation" and "sigmoid" in str(e)


def test_population_members_inherit_run_values():
    cfg = build_config({"seed": 7, "model": {"sizes": [784, 10], "init": "he_normal"}, "train": {"lr": 0.3},
                        "population": [{}, {"init": "orthogonal", "lr": 0.1, "seed": 3}]})
    a, b = cfg.members
    assert (a.init, a.lr, a.seed) == ("he_normal", 0.3, 7)
    assert (b.init, b.lr, b.seed) == ("orthogonal", 0.1, 3)
    assert cfg.member_config(1)["model"]["init"] == "orthogonal" and "population" not in cfg.member_config(1)


def test_cli_bad_config_exits_2_and_starts_nothing(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  sizes: [784, 30, 10]\n  init: glorot\n")
    proc = subprocess.run([sys.executable, "-m", "distnet.cli", "train", str(bad)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "model.init" in proc.stderr and "'glorot'" in proc.stderr and "xavier_normal" in proc.stderr
    assert not (tmp_path / "mlruns.db").exists() and not (tmp_path / "distnet_runs").exists()
    assert "Ray" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_overrides_go_before_between_or_after_the_options(command):
    from distnet import cli

    orders = [
        [command, "c.yaml", "train.epochs=1", "model.depth=3", "--tracking-uri", "sqlite:///x.db", "--data-dir", "d"],
        [command, "c.yaml", "--tracking-uri", "sqlite:///x.db", "train.epochs=1", "--data-dir", "d", "model.depth=3"],
        [command, "--tracking-uri", "sqlite:///x.db", "--data-dir", "d", "c.yaml", "train.epochs=1", "model.depth=3"],
        [command, "c.yaml", "--tracking-uri", "sqlite:///x.db", "--data-dir", "d", "train.epochs=1", "model.depth=3"],
    ]
    for argv in orders:
        args = cli.parse_args(argv)
        assert (args.config, args.overrides, args.tracking_uri, args.data_dir) == \
            ("c.yaml", ["train.epochs=1", "model.depth=3"], "sqlite:///x.db", "d"), argv
    # the last of two overrides of one key wins, wherever they are
    assert cli.parse_args([command, "c.yaml", "train.lr=1", "--data-dir", "d", "train.lr=2"]).overrides == \
        ["train.lr=1", "train.lr=2"]


def test_unknown_options_are_still_refused(capsys):
    from distnet import cli

    for argv in (["train", "c.yaml", "--tracking-url", "x"], ["train", "c.yaml", "--data-dir", "d", "notakeyvalue"],
                 ["list", "x=1"]):
        with pytest.raises(SystemExit) as e:
            cli.parse_args(argv)
        assert e.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.parametrize("ray,field,says", [
    ({"backend": "nccl"}, "ray.backend", "NCCL needs GPU workers"),
    ({"gpus_per_worker": 0.5}, "ray.gpus_per_worker", "GPU workers only"),
    ({"use_gpu": True, "gpus_per_worker": 2}, "ray.gpus_per_worker", "must be in (0, 1]"),
    ({"use_gpu": True, "num_workers": 2, "gpus_per_worker": 0.5}, "ray.backend", "NCCL refuses two ranks on one device"),
    ({"use_gpu": True, "num_workers": 2, "gpus_per_worker": 0.5, "backend": "nccl"}, "ray.backend", "set ray.backend: gloo"),
    ({"backend": "mpi"}, "ray.backend", "auto, nccl, gloo"),
])
def test_gpu_shares_and_backends_that_cannot_run_are_refused(ray, field, says):
    e = error_of({"model": {"sizes": [784, 10]}, "ray": ray})
    assert e.field == field and says in str(e)


def test_workers_sharing_a_gpu_through_gloo_and_one_worker_on_a_share_are_taken():
    from distnet import launch  # Ray's scaling and torch configs, as the trainers get them

    shared = build_config({"model": {"sizes": [784, 10]},
                           "ray": {"use_gpu": True, "num_workers": 2, "gpus_per_worker": 0.5, "backend": "gloo"}})
    assert launch.scaling_config(shared).resources_per_worker == {"CPU": 1.0, "GPU": 0.5}
    assert launch.torch_config(shared).backend == "gloo"
    quarter = build_config({"model": {"sizes": [784, 10]}, "ray": {"use_gpu": True, "num_workers": 1, "gpus_per_worker": 0.25}})
    assert launch.scaling_config(quarter).resources_per_worker == {"CPU": 1.0, "GPU": 0.25}
    assert launch.torch_config(quarter).backend is None  # Ray Train's own choice: NCCL on GPUs
    cpu = build_config({"model": {"sizes": [784, 10]}})
    assert launch.scaling_config(cpu).resources_per_worker == {"CPU": 1.0} and not launch.scaling_config(cpu).use_gpu
