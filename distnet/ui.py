"""`distnet ui`: the MLflow UI, opened on what there is to compare.

What MLflow's web UI (3.17 and 3.18) takes from where (read from its built JS, checked in headless Chromium
by tests/test_ui.py):
- The experiment page's filter and sort are URL parameters (`searchFilter`, `orderByKey`, ...), and
  so is the view mode (`compareRunsMode=CHART`). Its grouping, chart list, table columns and which
  runs the charts draw are not: they live in the browser's local storage, or in a *saved view*: an
  experiment tag `mlflow.sharedViewState.<key>` holding both halves, which the page applies when the
  URL says `viewStateShareKey=<key>` (what its own "Save view" / "Share" buttons write). So a sweep's
  link names a saved view that distnet writes with the public client (`set_experiment_tag`).
- Whether an experiment opens on the GenAI pages (traces, overview) or on the model-training ones
  follows a UI mode, `workflowType`, which defaults to GenAI whatever the experiment's
  `mlflow.experimentKind` tag says; the URL parameter `workflowType=machine_learning` sets it.
- A run's link is its metric page (`.../runs/<id>/model-metrics`), whose charts MLflow lays out
  itself, one section per metric prefix (`grad_norm/w`, ...).
"""

from __future__ import annotations

import ast
import base64
import contextlib
import itertools
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlencode

from mlflow.tracking import MlflowClient

from distnet import schema, tracking, tracking_server
from distnet.config import config_hash

WORKFLOW = {"workflowType": "machine_learning"}  # the model-training pages, not the GenAI ones
VIEW_TAG_PREFIX = "mlflow.sharedViewState."  # the UI's saved views: one experiment tag each
# The view state is stored deflated and base64'd behind this marker, the UI's own format: a
# 216-cell grid's view is 40 kB of JSON (75 charts), 2.7 kB so; an experiment tag holds 20,000 characters.
DEFLATE = "deflate;"
DEFAULT_AXES = ("model.init", "model.depth")  # what a sweep's cells are grouped by unless told
# The runs page loads a search's runs 100 at a time (in the view's order, here by name; its "Load
# more" fetches the next 100) and its charts draw only the runs loaded: a sweep's link shows at
# most this many cells, a slice of the grid where the sweep has more.
PAGE_RUNS = 100
BY_NAME = schema.tag(schema.RUN_NAME)  # the order the view lists (and the page loads) the cells in


class UIError(ValueError):
    """A selector that names no sweep or run, or a --group-by that is not one of the sweep's axes."""


def run_link(base_url: str, experiment_id: str, run_id: str) -> str:
    """A run's metric page: its per-layer gradient norms, accuracy and losses over training."""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}/model-metrics?{urlencode(WORKFLOW)}"


def sweep_link(base_url: str, experiment_id: str, view_key: str) -> str:
    """The experiment's runs page in chart view, with the saved view `view_key` applied."""
    query = urlencode({**WORKFLOW, "compareRunsMode": "CHART", "viewStateShareKey": view_key})
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


def experiments_link(base_url: str) -> str:
    return f"{base_url.rstrip('/')}/#/experiments?{urlencode(WORKFLOW)}"


@dataclass(frozen=True)
class Target:
    """What one link opens: a sweep's saved view, a run's metric page, or (neither) the experiments."""

    label: str
    experiment_id: str = ""
    run_id: str = ""
    view_key: str = ""

    def url(self, base_url: str) -> str:
        if self.view_key:
            return sweep_link(base_url, self.experiment_id, self.view_key)
        if self.run_id:
            return run_link(base_url, self.experiment_id, self.run_id)
        return experiments_link(base_url)


# ---------------------------------------------------------------- a sweep's view
def sweep_grid(parent) -> dict[str, list[str]]:
    """The sweep's grid from the parent run's `grid.*` params (`grid.model.depth` = "[1, 2]"): each
    axis (dotted config key, sorted) with its values as the cells' axis tags spell them (`str(v)`)."""
    return {k[len("grid."):]: [str(v) for v in ast.literal_eval(v)]
            for k, v in sorted(parent.data.params.items()) if k.startswith("grid.")}


def short_name(axis: str, axes: list[str]) -> str:
    """What the cells' names call an axis (`init` for model.init), unless another axis ends the same."""
    last = axis.rsplit(".", 1)[-1]
    return last if [a.rsplit(".", 1)[-1] for a in axes].count(last) == 1 else axis


def named_axis(axes: list[str], name: str, option: str, sweep_name: str) -> str:
    """The axis `name` names, as a dotted key or its last part (`init`)."""
    matches = [a for a in axes if name in (a, a.rsplit(".", 1)[-1])]
    if len(matches) != 1:
        allowed = ", ".join(a if "." not in a else f"{a} (or {a.rsplit('.', 1)[-1]})" for a in axes)
        raise UIError(f"{option} {name!r} is not an axis of sweep {sweep_name}'s grid; allowed: {allowed}")
    return matches[0]


def group_axis(axes: list[str], group_by: str | None, sweep_name: str) -> str:
    """The axis to group the cells by: `group_by` as a dotted key or its last part (`init`), else
    init, else depth, else the first axis that is not the seed."""
    if group_by is None:
        preferred = [a for a in DEFAULT_AXES if a in axes] + [a for a in axes if a != "seed"] + axes
        return preferred[0]
    return named_axis(axes, group_by, "--group-by", sweep_name)


def where_axes(grid: dict[str, list[str]], axis: str, where: list[str], sweep_name: str) -> dict[str, str]:
    """`--where AXIS=VALUE`s as {axis: value}, each checked against the grid. The group axis is not
    one to fix: its groups are what the link compares."""
    fixed = {}
    for item in where:
        name, sep, value = item.partition("=")
        if not sep:
            raise UIError(f"--where {item!r}: AXIS=VALUE expected, e.g. --where seed=0")
        a = named_axis(list(grid), name, "--where", sweep_name)
        if a == axis:
            raise UIError(f"--where {item!r}: the cells are grouped by {axis}; --group-by another axis to fix this one")
        if value not in grid[a]:
            raise UIError(f"--where {item!r}: {a} of sweep {sweep_name} is one of {', '.join(grid[a])}")
        fixed[a] = value
    return fixed


def slice_size(grid: dict[str, list[str]], fixed) -> int:
    """How many cells have the values `fixed` (axis -> value, or just the axes) of the grid."""
    return math.prod(len(values) for a, values in grid.items() if a not in fixed)


def choose_slice(grid: dict[str, list[str]], axis: str, where: dict[str, str]) -> dict[str, str]:
    """The axes to fix (axis -> value) so that the cells left fit in the runs page's charts
    (PAGE_RUNS), every group of `axis` among them: `where` (the user's), and where that leaves too
    many, the seed (seeds are replicates: one shows the comparison the others repeat), then the
    other axes whose fixing leaves the most cells that fit, fewest axes first, each at its first
    value. If nothing fits (a group axis of more values than the page), every other axis is fixed."""
    free = [a for a in grid if a != axis and a not in where and len(grid[a]) > 1]
    seeds = [a for a in free if a == "seed"]
    others = [a for a in free if a != "seed"]
    # [] first: nothing more to fix where `where` fits already.
    options = [[]] + [seeds + list(c) for n in range(len(others) + 1) for c in itertools.combinations(others, n)]
    fits = [o for o in options if slice_size(grid, [*where, *o]) <= PAGE_RUNS]
    best = max(fits, key=lambda o: slice_size(grid, [*where, *o])) if fits else free
    return {a: where.get(a, grid[a][0]) for a in grid if a in where or a in best}


def slice_label(name: str, grid: dict[str, list[str]], axis: str, fixed: dict[str, str], aggregate: bool) -> str:
    """What a sweep's link shows: the cells, by what, and which slice of how many (with the
    --where that picks another), or that the page cannot chart them all."""
    axes, shown, total = list(grid), slice_size(grid, fixed), slice_size(grid, ())
    by = f"by {axis}{', group means' if aggregate else ''}"
    if not fixed:
        label = f"sweep {name} ({total:,} cells) {by}"
    else:
        values = ", ".join(f"{short_name(a, axes)}={v}" for a, v in fixed.items())
        others = ", ".join(f"--where {short_name(a, axes)}=<one of {len(grid[a])}>" for a in fixed)
        label = f"sweep {name} {by}: {shown:,} of {total:,} cells ({values}); other slices: {others}"
    if shown > PAGE_RUNS:
        label += f"; more than the UI charts at once: it charts the first {PAGE_RUNS} by name"
    return label


def cells_filter(parent_run_id: str, fixed: dict[str, str]) -> str:
    """The search filter for a sweep's cells with the values `fixed` (each cell carries a tag per
    grid axis, named by the dotted axis): not the parent run (no curves) nor the experiment's
    other sweeps and trainings."""
    return " and ".join([schema.tag_is(schema.PARENT, parent_run_id)] + [schema.tag_is(a, v) for a, v in fixed.items()])


def _natural(key: str) -> list:
    """Sort key that puts layer_10 after layer_9."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def _line_chart(key: str, section: str, log: bool = False) -> dict:
    """One line chart of `key` against the step, in the UI's chart-config form. Every field is set:
    one left out falls back to the UI's defaults, whose smoothing draws a curve beside the data."""
    return {"uuid": f"distnet-{key}", "type": "LINE", "metricKey": key, "selectedMetricKeys": [key],
            "metricSectionId": section, "deleted": False, "isGenerated": True,
            "lineSmoothness": 0, "useGlobalLineSmoothing": False, "useGlobalXaxisKey": False,
            "xAxisKey": "step", "xAxisScaleType": "linear", "selectedXAxisMetricKey": "",
            "scaleType": "log" if log else "linear", "yAxisKey": "metric", "yAxisExpressions": [],
            "ignoreOutliers": False, "range": {}}


def chart_layout(metric_keys: set[str]) -> tuple[list[dict], list[dict]]:
    """(charts, sections): accuracy and training loss first, then the weight-gradient norm of each
    layer (log y: across depths and inits it spans decades), then every other metric in a section
    per prefix, folded. The UI adds a chart for any metric its config lacks, in an open section:
    listing them all keeps those ~60 charts of a deep grid folded until asked for."""
    # Two and three charts a row, lower than the UI's default: both sections fit on one screen.
    sections = [{"uuid": "distnet-main", "name": "accuracy and loss", "display": True, "isReordered": False,
                 "columns": 2, "cardHeight": 280},
                {"uuid": "distnet-grad", "name": "weight-gradient norm per layer (grad_norm/w)", "display": True,
                 "isReordered": False, "columns": 3, "cardHeight": 300}]
    main = [k for k in [*schema.ACC_KEYS, schema.TRAIN_LOSS] if k in metric_keys]
    grads = sorted((k for k in metric_keys if k.startswith(schema.GRAD_NORM_W)), key=_natural)
    charts = [_line_chart(k, "distnet-main") for k in main] + [_line_chart(k, "distnet-grad", log=True) for k in grads]
    for key in sorted(metric_keys - set(main) - set(grads), key=_natural):
        prefix = key.rsplit("/", 1)[0] if "/" in key else "other"
        if not any(s["name"] == prefix for s in sections):
            sections.append({"uuid": f"distnet-{prefix}", "name": prefix, "display": False, "isReordered": False})
        charts.append(_line_chart(key, f"distnet-{prefix}"))
    return charts, sections


def sweep_view(search_filter: str, axes: list[str], axis: str, metric_keys: set[str], aggregate: bool) -> dict:
    """The saved view's state (search facets and UI state, as the UI saves them) for the cells
    `search_filter` finds (cells_filter)."""
    charts, sections = chart_layout(metric_keys)
    acc = [schema.metric(k) for k in schema.ACC_KEYS if k in metric_keys]
    return {
        # Sorted by anything but the start time, the UI lists the cells flat (with it, it folds
        # children under their parent, out of the charts).
        "searchFilter": search_filter,
        "orderByKey": BY_NAME,
        "orderByAsc": True,
        "groupBy": {"aggregateFunction": "average", "groupByKeys": [{"mode": "tag", "groupByData": axis}]},
        # One line per cell (the runs table groups them); aggregate: one line per group, its
        # mean, with the min..max band.
        "useGroupedValuesInCharts": aggregate,
        "runsHiddenMode": "SHOW_ALL",  # the UI's default draws only the first 10 rows
        "selectedColumns": acc + [schema.tag(a) for a in axes] + [schema.tag(schema.STATUS)],
        "compareRunCharts": charts,
        "compareRunSections": sections,
        "isAccordionReordered": True,  # keep the section order above (the UI sorts them otherwise)
        "hideEmptyCharts": True,
    }


def save_view(client: MlflowClient, experiment_id: str, key: str, name: str, state: dict) -> None:
    """Store `state` as the experiment's saved view `key`, named `name` in the UI's Views menu."""
    blob = DEFLATE + base64.b64encode(zlib.compress(json.dumps(state).encode())).decode()
    now = int(time.time() * 1000)
    envelope = {"name": name, "createdAt": now, "updatedAt": now, "state": blob}
    tracking.retry_busy(client.set_experiment_tag, experiment_id, VIEW_TAG_PREFIX + key, json.dumps(envelope))


def sweep_target(uri: str, parent, group_by: str | None = None, aggregate: bool = False,
                 where: list[str] = ()) -> Target:
    """Write the saved view of the sweep's cells, grouped by `group_by` and sliced (`where`, then
    choose_slice) to what the UI charts at once, all checked against its grid; return its link
    target. The view key is fixed per sweep, grouping and slice: writing it again replaces it."""
    name, run_id = parent.info.run_name, parent.info.run_id
    grid = sweep_grid(parent)
    if not grid:
        raise UIError(f"run {run_id} is tagged as a sweep but has no grid.* params")
    axis = group_axis(list(grid), group_by, name)
    fixed = choose_slice(grid, axis, where_axes(grid, axis, where, name))
    search_filter = cells_filter(run_id, fixed)
    # The chart list from the runs the page loads, not from every cell: a sweep can have 10,000.
    client = MlflowClient(uri)
    shown = client.search_runs([parent.info.experiment_id], search_filter, max_results=PAGE_RUNS,
                               order_by=[f"{BY_NAME} ASC"])
    metric_keys = set().union(*(r.data.metrics for r in shown))
    key = f"distnet-{run_id}-{axis}{f'-{config_hash(fixed)}' if fixed else ''}{'-mean' if aggregate else ''}"
    label = slice_label(name, grid, axis, fixed, aggregate)
    state = sweep_view(search_filter, list(grid), axis, metric_keys, aggregate)
    save_view(client, parent.info.experiment_id, key, label, state)
    return Target(label, parent.info.experiment_id, view_key=key)


# ---------------------------------------------------------------- selectors
def find(uri: str, selector: str):
    """The MLflow run `selector` names: a sweep config file (the sweep run from it as it is), a
    sweep's name (its newest parent run), or a run id."""
    if selector.endswith((".yaml", ".yml")):
        from distnet import sweep

        sw = sweep.load_sweep(selector)
        parent = tracking.find_sweep(uri, sweep_id=sw.id)
        if parent is None:
            raise UIError(f"sweep {sw.name} ({selector}) has no runs in {uri} yet: `distnet sweep {selector}` first")
        return parent
    parent = tracking.find_sweep(uri, name=selector)
    if parent is not None:
        return parent
    try:
        return MlflowClient(uri).get_run(selector)
    except Exception as e:  # MLflow raises its own error type per store
        raise UIError(f"{selector!r} is neither a sweep config, a sweep name nor a run id in {uri}") from e


def targets(uri: str, selectors: list[str], group_by: str | None = None, aggregate: bool = False,
            where: list[str] = ()) -> list[Target]:
    """One link target per selector (a sweep's cells, or a run's metric page); with none, the
    experiments list. Sweeps' saved views are written here, before any server is started."""
    out = []
    for selector in selectors:
        run = find(uri, selector)
        if run.data.tags.get(schema.KIND) == schema.SWEEP_KIND:
            out.append(sweep_target(uri, run, group_by, aggregate, where))
        else:
            out.append(Target(f"run {run.info.run_name}", run.info.experiment_id, run_id=run.info.run_id))
    return out or [Target("experiments")]


def open_hint(uri: str, selectors: list[str]) -> list[str]:
    """What train / sweep / report print at their end: the `distnet ui` command, and where the
    store is already served over HTTP, the links themselves."""
    command = " ".join(["distnet ui", *selectors, "--tracking-uri", uri])
    lines = [f"open the UI: {command}"]
    if tracking_server.is_server(uri):  # its UI is there already
        try:
            lines += [f"  {t.label}: {t.url(uri)}" for t in targets(uri, selectors)]
        except Exception as e:  # the work is done and logged: a link that cannot be made is no failure
            lines.append(f"  (no link: {type(e).__name__}: {e})")
        if hint := tracking_server.login_hint(uri):
            lines.append(f"  {hint}")
    return lines


# ---------------------------------------------------------------- serving
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(uri: str, port: int = 0, log: Path | None = None) -> Iterator[str]:
    """The base URL of a local `mlflow server` on loopback (port `port`, or a free one) over the store
    `uri`, stopped on exit. (A server's own URI needs none: `tracking_server.is_server`.)"""
    port = port or free_port()
    log = log or Path(tempfile.mkstemp(prefix="distnet-ui-", suffix=".log")[1])
    # Without the job runner (the GenAI judges' queue, eight worker processes): browsing runs needs
    # none of it, and the server is up in a third of the time. Its own session, so that stopping it
    # stops its uvicorn worker too.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", uri, "--workers", "1"],
                              stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        tracking_server.wait_for_server(base, log=log, process=server)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
