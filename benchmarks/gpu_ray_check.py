"""The Ray GPU path end to end on a GPU host: Ray Train with `ray.use_gpu=true`, NCCL and gloo through
Ray, a sweep's lanes on GPUs and MLflow's records from GPU trainings. One markdown table.

    .venv/bin/python benchmarks/gpu_ray_check.py --data-dir DIR      # after `make install-offline`
    make gpu-ray-check DATA=DIR                                      # the same

Rows (every training: `configs/default.yaml` or --config, with the overrides given, on a local Ray):
- GPU against CPU: 1 worker on a GPU (NCCL, a world of one) against 1 CPU worker, same seed;
- 2 workers sharing one GPU (`ray.gpus_per_worker=0.5 ray.backend=gloo`: gloo on CUDA tensors, as
  NCCL refuses two ranks on one device) against 1 GPU worker;
- NCCL across every GPU, where the host has several, against 1 GPU worker;
- a tiny sweep (`--seeds` x 20 cells, 1,000 by default) with `ray.use_gpu=true`, four lanes a GPU,
  into sqlite: wall time, cells a second, every cell FINISHED once.
A comparison row gives the largest difference of the final parameters, of every step-table value
(relative) and of the final accuracy, and passes within the tolerances below. Exit 1 if a row fails.

`--cpu` runs the same rows with CPU workers standing in (2 CPU workers against 1; the sweep on CPU
lanes): how tests/test_offline.py runs it from the offline bundle's venv, where no GPU is.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch
from mlflow.tracking import MlflowClient

from distnet import launch, schema, steptable, sweep, tracking
from distnet.config import load_config

ROOT = Path(__file__).resolve().parents[1]
# Float tolerance between two ways of summing the same gradients (another device, another worker
# count). Measured here: 2 CPU workers against 1 over the 1,404 steps of configs/default.yaml,
# 1.1e-6 (parameters) and 7.5e-7 (step tables); a GPU's kernels sum in other orders again.
THETA_ATOL, STEP_RTOL, ACC_PP = 1e-4, 1e-4, 0.2


@dataclass
class Row:
    check: str
    result: str
    ok: bool


def train(cfg_path: str, overrides: list[str], uri: str, data_dir: str | None) -> launch.TrainingResult:
    cfg = load_config(cfg_path, overrides)
    return launch.run_training(cfg, uri, data_dir=data_dir, show_progress=False, say=lambda *_: None)


def compare(check: str, a: launch.TrainingResult, b: launch.TrainingResult, uri: str, seconds: tuple) -> Row:
    """`a` against the reference `b`: final parameters, every step-table value, final accuracy."""
    client = MlflowClient(uri)
    ta, tb = (steptable.read(client, r.run_ids[0]) for r in (a, b))
    if not np.array_equal(ta["step"], tb["step"]):
        return Row(check, f"different steps recorded: {len(ta['step'])} vs {len(tb['step'])}", False)
    rel = max(float(np.max(np.abs(ta[k] - tb[k]) / np.maximum(np.abs(tb[k]), 1e-12))) for k in tb if k != "step")
    theta = float((a.theta.cpu() - b.theta.cpu()).abs().max())
    acc_key = schema.held_out_acc(b.metrics)
    acc = 100 * abs(a.metrics[acc_key][0] - b.metrics[acc_key][0])
    ok = a.steps == b.steps and theta <= THETA_ATOL and rel <= STEP_RTOL and acc <= ACC_PP
    return Row(check, f"{a.steps} steps; max abs diff of the parameters {theta:.2e}, max rel diff of "
                      f"{len(tb['step'])} x {len(tb) - 1} step-table values {rel:.2e}, final {acc_key} "
                      f"{100 * a.metrics[acc_key][0]:.2f}% vs {100 * b.metrics[acc_key][0]:.2f}%; "
                      f"{seconds[0]:.1f} s vs {seconds[1]:.1f} s", ok)


def sweep_row(args, uri: str, gpu: bool) -> Row:
    raw = {"name": "gpu_ray_sweep", "model": {"width": 16}, "train": {"epochs": 1, "lr": 0.1},
           "data": {"train_limit": 1280, "eval_limit": 500, "dir": args.data_dir},
           "ray": {"num_workers": 1, "use_gpu": gpu, **({"gpus_per_worker": 0.25} if gpu else {})},
           # CPU: one lane (one trainer start; a small machine's cores serve one at a time anyway)
           "mlflow": {"experiment": "gpu_ray_sweep"}, "sweep": {"pack": 100, **({} if gpu else {"max_concurrent": 1})},
           "grid": {"model.depth": args.depths, "model.activation": ["tanh", "relu"],
                    "model.init": ["xavier_normal", "he_normal"], "seed": list(range(args.seeds))}}
    sw = sweep.build_sweep(raw)
    start = time.perf_counter()
    result = launch.run_sweep(sw, uri, data_dir=args.data_dir, say=lambda *_: None)
    wall = time.perf_counter() - start
    runs = tracking.child_runs(uri, result.parent_run_id)
    by_cell = {}
    for r in runs:
        by_cell.setdefault(r.data.tags.get(schema.CELL_ID), []).append(r)
    finished = sum(1 for c in sw.cells if [r.info.status for r in by_cell.get(c.id, [])] == ["FINISHED"])
    n = len(sw.cells)
    lanes = "4 lanes a GPU" if gpu else "CPU lanes"
    return Row(f"sweep of {n} tiny cells, {lanes}, sqlite",
               f"{wall:.1f} s, {n / wall:.1f} cells/s; {finished} of {n} cells FINISHED with one run each, "
               f"{len(runs)} runs", finished == n == len(runs))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    p.add_argument("--data-dir")
    p.add_argument("--seeds", type=int, default=50, help="the sweep's seeds: 20 cells each (default 50: 1,000 cells)")
    p.add_argument("--depths", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    p.add_argument("--cpu", action="store_true", help="CPU workers standing in for GPUs (no GPU needed)")
    p.add_argument("--workdir", type=Path, help="where the store and checkpoints go (default: a new temporary folder)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the trainings' config")
    args = p.parse_args()
    gpu = not args.cpu
    if gpu and not torch.cuda.is_available():
        print(f"torch {torch.__version__} sees no CUDA device: run on a GPU host, or with --cpu", file=sys.stderr)
        return 1
    gpus = torch.cuda.device_count() if gpu else 0
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gpu_ray_check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)  # its checkpoints and store, nowhere else
    uri = f"sqlite:///{Path.cwd() / 'mlruns.db'}"
    ray.init(log_to_driver=False)
    device = (f"{gpus} x {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}" if gpu else "CPU only (--cpu)")
    print(f"\nRay GPU path: {device}; torch {torch.__version__}, ray {ray.__version__}; "
          f"tolerances: parameters {THETA_ATOL:g}, step tables {STEP_RTOL:g} relative, accuracy {ACC_PP:g} pp\n")
    print("| check | result | pass |\n| --- | --- | --- |", flush=True)
    rows, timed = [], {}

    def report(row: Row) -> None:
        # printed as it is made: a run stopped at a device's time limit still shows the rows done
        print(f"| {row.check} | {row.result} | {'yes' if row.ok else 'NO'} |", flush=True)
        rows.append(row)

    def arm(name: str, *extra: str) -> launch.TrainingResult:
        start = time.perf_counter()
        result = train(args.config, [*args.overrides, f"name={name}", *extra], uri, args.data_dir)
        timed[name] = time.perf_counter() - start
        return result

    cpu1 = arm("cpu1", "ray.num_workers=1", "ray.use_gpu=false")
    if gpu:
        gpu1 = arm("gpu1", "ray.num_workers=1", "ray.use_gpu=true")
        report(compare("1 GPU worker (NCCL, world of one) vs 1 CPU worker", gpu1, cpu1, uri,
                            (timed["gpu1"], timed["cpu1"])))
        shared = arm("shared", "ray.num_workers=2", "ray.use_gpu=true", "ray.gpus_per_worker=0.5", "ray.backend=gloo")
        report(compare("2 workers sharing 1 GPU (gloo on CUDA tensors) vs 1 GPU worker", shared, gpu1, uri,
                            (timed["shared"], timed["gpu1"])))
        if gpus > 1:
            nccl = arm("nccl", f"ray.num_workers={gpus}", "ray.use_gpu=true")
            report(compare(f"NCCL across {gpus} GPUs vs 1 GPU worker", nccl, gpu1, uri,
                                (timed["nccl"], timed["gpu1"])))
    else:
        cpu2 = arm("cpu2", "ray.num_workers=2", "ray.use_gpu=false")
        report(compare("2 CPU workers vs 1 CPU worker (standing in for the GPU rows)", cpu2, cpu1, uri,
                            (timed["cpu2"], timed["cpu1"])))
    report(sweep_row(args, uri, gpu))
    ray.shutdown()
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
