"""The MLflow UI comparison as a user meets it: a finished tiny sweep (2 depths x 3 inits), and one
of more cells (136) than the UI charts at once, served by a real `distnet ui` (a real `mlflow server`
on loopback), the links it prints opened in headless Chromium (Debian's chromium + chromedriver,
driven by selenium), and checked for what a user would look for on screen. `make test` installs the browser where apt-get can. Without one the browser
tests fail, unless DISTNET_NO_BROWSER=1 says the machine cannot have a browser (then they are
skipped, saying so). DISTNET_SCREENSHOTS=docs/img refreshes the README's screenshots."""

import base64
import contextlib
import json
import os
import re
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

import distnet
from browser import body, charts_each_layers_gradient_norm, close_assistant, training_pages, wait
from distnet import cli, launch, sweep, ui

# Where to keep the screenshots (docs/img when refreshed by hand), resolved before a fixture moves the cwd.
SHOTS = os.environ.get("DISTNET_SCREENSHOTS") and Path(os.environ["DISTNET_SCREENSHOTS"]).resolve()
# `distnet ui` processes run the distnet under test, wherever the cwd (a fixture's tmp directory)
# and whichever checkout is installed.
CLI_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(distnet.__file__).parents[1]),
                                                                    os.environ.get("PYTHONPATH")]))}
INITS = ["xavier_normal", "he_normal", "lecun_normal"]
# One lane for each sweep (max_concurrent 1): on this 2-core machine a second trainer's start costs
# more than its share of tiny jobs saves (the 6-cell sweep 21 -> 12.5 s, the 136-cell one 23 ->
# 17.5 s, medians of two paired runs); concurrency is tested in tests/test_sweep.py.
SWEEP = {"name": "ui", "model": {"width": 20}, "train": {"epochs": 2}, "data": {"train_limit": 1280, "eval_limit": 300},
         "ray": {"num_workers": 1}, "mlflow": {"experiment": "ui"}, "sweep": {"max_concurrent": 1},
         "grid": {"model.depth": [1, 2], "model.init": INITS, "model.activation": ["tanh"]}}
# 4 inits x 2 depths x 17 seeds: 136 cells, 2 trainings of 68. Init first in the grid, so in the
# cells' names: the first 100 by name (what the UI loads) hold 34 + 34 + 32 cells of three inits and
# none of the fourth, so a link to every cell would chart three groups of four.
BIG_INITS = ["he_normal", "lecun_normal", "orthogonal", "xavier_normal"]
BIG = {"name": "big", "model": {"width": 8}, "train": {"epochs": 1, "log_every": 2},
       "data": {"train_limit": 640, "eval_limit": 100}, "ray": {"num_workers": 1}, "mlflow": {"experiment": "big"},
       "sweep": {"pack": 68, "max_concurrent": 1}, "grid": {"model.init": BIG_INITS, "model.depth": [1, 2], "seed": list(range(17))}}


def trained(tmp_path_factory, name: str, spec: dict):
    """A sweep of `spec` trained into a fresh store in a folder of its own, the working directory
    while it is used: yields (tracking URI, sweep, result)."""
    tmp = tmp_path_factory.mktemp(name)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        db = f"sqlite:///{tmp / 'mlruns.db'}"
        sw = sweep.build_sweep(spec)
        yield db, sw, launch.run_sweep(sw, db, say=lambda *_: None)


@pytest.fixture(scope="module")
def finished_sweep(ray_cluster, tmp_path_factory):
    """A finished 2 x 3 sweep (activation as a one-value axis, so every name carries it)."""
    yield from trained(tmp_path_factory, "ui", SWEEP)


@contextlib.contextmanager
def distnet_ui(*args):
    """`distnet ui ARGS` running: what it printed by the time its server is up and every link
    printed. It stops (and stops its server) on SIGTERM."""
    proc = subprocess.Popen([sys.executable, "-m", "distnet.cli", "ui", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=CLI_ENV)
    printed = []
    try:
        for line in proc.stdout:
            printed.append(line)
            if "Ctrl-C stops it" in line:
                break
        yield "".join(printed)
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0, "".join(printed)


def sweep_links(printed: str) -> dict[str, str]:
    """label -> link of each sweep link printed."""
    return dict(re.findall(r"^(sweep .*?): (http://\S+)$", printed, re.M))


@pytest.fixture(scope="module")
def links(finished_sweep):
    """`distnet ui <sweep> <run>` running: the links it printed, by kind."""
    db, sw, result = finished_sweep
    deep = next(r.run_id for r in result.rows if r.cell.startswith("depth=2,"))
    with distnet_ui("ui", deep, "--tracking-uri", db) as printed:
        urls = re.findall(r"^(sweep|run) .*?: (http://\S+)$", printed, re.M)
        assert len(urls) == 2, printed
        yield dict(urls) | {"run_id": deep}


@pytest.fixture(scope="module")
def big_sweep(ray_cluster, tmp_path_factory):
    """A finished sweep of 136 cells (BIG): its tracking URI."""
    for db, _, result in trained(tmp_path_factory, "ui-big", BIG):
        assert len(result.rows) == 136 and not result.failed
        yield db


@pytest.fixture(scope="module")
def big_links(big_sweep):
    """`distnet ui big` running (label -> link), and with `--where depth=2` against its server (a
    server's URI: nothing more is started, the link is printed)."""
    with distnet_ui("big", "--tracking-uri", big_sweep) as printed:
        (default,) = sweep_links(printed).items()
        server = default[1].split("/#/")[0]
        where = subprocess.run([sys.executable, "-m", "distnet.cli", "ui", "big", "--where", "depth=2",
                                "--tracking-uri", server], capture_output=True, text=True, timeout=120, env=CLI_ENV)
        assert where.returncode == 0, where.stdout + where.stderr
        yield sweep_links(printed) | sweep_links(where.stdout)


def shot(driver, tmp_path, name):
    time.sleep(1)  # let the last chart finish drawing
    path = Path(SHOTS or tmp_path) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
    return path


# Per chart card of the runs page's chart view: its title and the runs (trace names) whose line
# has at least one point: what a user reads off the chart and its legend.
CHART_CARDS = """return [...document.querySelectorAll('[data-testid="experiment-view-compare-runs-card"]')].map(card => {
  const plot = card.querySelector('.js-plotly-plot');
  const traces = (plot && plot.data) || [];
  const drawn = traces.filter(t => (t.y || []).some(v => Number.isFinite(v))).map(t => t.name);
  return [card.innerText.split('\\n')[0].trim(), [...new Set(drawn)]];
});"""


def test_sweep_link_names_a_saved_view_of_the_cells(finished_sweep, tmp_path):
    """No browser: the link `distnet ui` makes for a sweep, and the saved view it writes (what the
    browser test below sees applied)."""
    db, sw, result = finished_sweep
    (target,) = ui.targets(db, ["ui"])
    exp_id = MlflowClient(db).get_run(result.parent_run_id).info.experiment_id
    url = target.url("http://127.0.0.1:5000")
    assert url.startswith(f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs?")
    assert "workflowType=machine_learning" in url and "compareRunsMode=CHART" in url
    key = url.split("viewStateShareKey=")[1]
    tag = MlflowClient(db).get_experiment(exp_id).tags[ui.VIEW_TAG_PREFIX + key]
    envelope = json.loads(tag)
    assert envelope["name"] == "sweep ui (6 cells) by model.init"
    state = json.loads(zlib.decompress(base64.b64decode(envelope["state"].removeprefix(ui.DEFLATE))))
    assert state["searchFilter"] == f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'"
    assert state["groupBy"]["groupByKeys"] == [{"mode": "tag", "groupByData": "model.init"}]
    shown = [c["metricKey"] for c in state["compareRunCharts"] if c["metricSectionId"] in ("distnet-main", "distnet-grad")]
    assert shown == ["test/acc", "train/loss", "grad_norm/w/layer_1", "grad_norm/w/layer_2", "grad_norm/w/layer_3"]
    # The sweep's config file and its parent run id name it too.
    config = tmp_path / "ui.yaml"
    config.write_text(yaml.safe_dump(SWEEP))
    assert ui.find(db, str(config)).info.run_id == ui.find(db, result.parent_run_id).info.run_id == result.parent_run_id


def test_group_by_must_be_a_grid_axis(finished_sweep, capsys):
    db, _, result = finished_sweep
    assert ui.group_axis(["model.depth", "model.init", "seed"], "depth", "s") == "model.depth"
    assert ui.group_axis(["model.depth", "seed"], None, "s") == "model.depth"
    assert cli.main(["ui", result.parent_run_id, "--group-by", "width", "--tracking-uri", db]) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "--group-by 'width' is not an axis of sweep ui's grid" in err
    assert "model.activation (or activation), model.depth (or depth), model.init (or init)" in err
    assert cli.main(["ui", "no-such-sweep", "--tracking-uri", db]) == cli.EXIT_BAD_INPUT
    assert "neither a sweep config, a sweep name nor a run id" in capsys.readouterr().err


def test_commands_print_the_links_where_the_store_is_a_server(finished_sweep, links):
    """What train / sweep / report print at their end when they log to an MLflow server: the
    `distnet ui` command and the links themselves, the same ones `distnet ui` prints."""
    _, _, result = finished_sweep
    server = links["sweep"].split("/#/")[0]
    lines = ui.open_hint(server, [result.parent_run_id, links["run_id"]])
    assert lines[0] == f"open the UI: distnet ui {result.parent_run_id} {links['run_id']} --tracking-uri {server}"
    assert lines[1] == f"  sweep ui (6 cells) by model.init: {links['sweep']}"
    assert lines[2].endswith(f": {links['run']}")


def wait_charted(driver, cells: set[str]) -> dict[str, list[str]]:
    """The chart cards (title -> runs drawn) once test/acc and the first layer's norm draw a line
    per cell of `cells`."""

    def charted(driver):
        cards = dict(driver.execute_script(CHART_CARDS))
        return cards if cells <= set(cards.get("test/acc", [])) and cells <= set(cards.get("grad_norm/w/layer_1", [])) else None

    return wait(driver, charted)


def test_sweep_link_charts_every_cell_grouped_by_init(finished_sweep, links, browser, tmp_path):
    db, sw, result = finished_sweep
    browser.get(links["sweep"])
    cells = {f"ui/{c.label}" for c in sw.cells}
    assert len(cells) == 6 and all("depth=" in c and "init=" in c for c in cells)
    cards = wait_charted(browser, cells)  # a line per cell in test/acc and in the first layer's norm
    # Only the cells: the sweep's parent run (named "ui") has no line, and no other run has one.
    assert set(cards["test/acc"]) == cells and set(cards["train/loss"]) == cells
    text = body(browser)
    assert "Group by: model.init" in text and all(f"Group: {init}" in text for init in INITS)
    assert "6 matching runs" in text
    assert training_pages(text)
    close_assistant(browser)
    assert shot(browser, tmp_path, "mlflow-ui-sweep.png").stat().st_size > 10_000


def test_run_link_shows_each_layers_gradient_norm(links, browser, tmp_path):
    charts_each_layers_gradient_norm(browser, links["run"], layers=3)  # the depth-2 cell: 3 weight matrices
    assert training_pages(body(browser))
    close_assistant(browser)
    assert shot(browser, tmp_path, "mlflow-ui-run.png").stat().st_size > 10_000


# ---------------------------------------------------------------- a sweep larger than the UI charts
TEN_K = {"model.activation": [f"act{i}" for i in range(9)], "model.depth": [str(d) for d in range(1, 11)],
         "model.init": [f"init{i}" for i in range(9)], "seed": [str(s) for s in range(13)]}


def test_slice_of_a_large_grid_fits_the_page_with_every_group():
    """10,530 cells grouped by init: the seed fixed, then the axis whose fixing leaves the most
    cells that still fit (activation: 90, not depth: 81); the user's --where first."""
    fixed = ui.choose_slice(TEN_K, "model.init", {})
    assert fixed == {"model.activation": "act0", "seed": "0"} and ui.slice_size(TEN_K, fixed) == 90
    assert ui.slice_label("grid10k", TEN_K, "model.init", fixed, False) == (
        "sweep grid10k by model.init: 90 of 10,530 cells (activation=act0, seed=0); "
        "other slices: --where activation=<one of 9>, --where seed=<one of 13>")
    assert ui.choose_slice(TEN_K, "model.init", {"model.depth": "3"}) == {"model.depth": "3", "seed": "0"}
    assert ui.choose_slice(TEN_K, "model.depth", {"seed": "4"}) == {"model.activation": "act0", "seed": "4"}
    assert ui.choose_slice(TEN_K, "model.init", {"model.depth": "3", "seed": "2"}) == {"model.depth": "3", "seed": "2"}
    # A small grid is not sliced; a group axis of more values than the page is, as far as it goes, and says so.
    assert ui.choose_slice({"model.init": ["a", "b"], "seed": ["0", "1"]}, "model.init", {}) == {}
    wide = {"train.lr": [str(i) for i in range(150)], "seed": ["0", "1"]}
    fixed = ui.choose_slice(wide, "train.lr", {})
    assert fixed == {"seed": "0"} and ui.slice_label("lr", wide, "train.lr", fixed, True).endswith(
        "by train.lr, group means: 150 of 300 cells (seed=0); other slices: --where seed=<one of 2>; "
        "more than the UI charts at once: it charts the first 100 by name")


def view_state(db: str, url: str) -> tuple[str, dict]:
    """The saved view a sweep link names: its name and state."""
    client = MlflowClient(db)
    exp_id = url.split("/experiments/")[1].split("/")[0]
    envelope = json.loads(client.get_experiment(exp_id).tags[ui.VIEW_TAG_PREFIX + url.split("viewStateShareKey=")[1]])
    return envelope["name"], json.loads(zlib.decompress(base64.b64decode(envelope["state"].removeprefix(ui.DEFLATE))))


def test_large_sweep_views_are_slices(big_sweep):
    """No browser: each slice its own saved view, filtered by the cells' axis tags, its charts from
    the slice's runs (depth 1: two weight matrices)."""
    base = "http://127.0.0.1:5000"
    parent = ui.find(big_sweep, "big").info.run_id
    views = {w: view_state(big_sweep, ui.targets(big_sweep, ["big"], where=w)[0].url(base))
             for w in ((), ("depth=1",), ("seed=3", "model.depth=1"))}
    assert [name for name, _ in views.values()] == [
        "sweep big by model.init: 8 of 136 cells (seed=0); other slices: --where seed=<one of 17>",
        "sweep big by model.init: 68 of 136 cells (depth=1); other slices: --where depth=<one of 2>",
        "sweep big by model.init: 4 of 136 cells (depth=1, seed=3); other slices: --where depth=<one of 2>, "
        "--where seed=<one of 17>"]
    filters = [state["searchFilter"] for _, state in views.values()]
    assert filters == [f"tags.`mlflow.parentRunId` = '{parent}' and tags.`seed` = '0'",
                       f"tags.`mlflow.parentRunId` = '{parent}' and tags.`model.depth` = '1'",
                       f"tags.`mlflow.parentRunId` = '{parent}' and tags.`model.depth` = '1' and tags.`seed` = '3'"]
    grads = [[c["metricKey"] for c in state["compareRunCharts"] if c["metricSectionId"] == "distnet-grad"]
             for _, state in views.values()]
    assert grads == [[f"grad_norm/w/layer_{i}" for i in (1, 2, 3)]] + [[f"grad_norm/w/layer_{i}" for i in (1, 2)]] * 2
    # --aggregate on a slice: its own view, group means.
    (mean,) = ui.targets(big_sweep, ["big"], aggregate=True)
    name, state = view_state(big_sweep, mean.url(base))
    assert name.startswith("sweep big by model.init, group means: 8 of 136 cells (seed=0)")
    assert state["useGroupedValuesInCharts"] and state["searchFilter"] == filters[0]
    keys = {ui.targets(big_sweep, ["big"], where=w, aggregate=a)[0].view_key
            for w in ([], ["depth=1"], ["depth=2"]) for a in (False, True)}
    assert len(keys) == 6


def test_where_must_name_an_axis_and_one_of_its_values(big_sweep, capsys):
    def refused(*where):
        args = [a for w in where for a in ("--where", w)]
        assert cli.main(["ui", "big", *args, "--tracking-uri", big_sweep]) == cli.EXIT_BAD_INPUT
        return capsys.readouterr().err

    assert "--where 'width' is not an axis of sweep big's grid; allowed: model.depth (or depth), " \
           "model.init (or init), seed" in refused("width=8")
    assert "--where 'seed=17': seed of sweep big is one of 0, 1, 2," in refused("depth=1", "seed=17")
    assert "--where 'init=he_normal': the cells are grouped by model.init; --group-by another axis" in refused("init=he_normal")
    assert "--where 'seed': AXIS=VALUE expected" in refused("seed")


def test_large_sweep_link_charts_a_slice_with_every_group(big_links, browser):
    """The link `distnet ui big` prints: the 8 cells of seed 0, every init a group, and says so."""
    label, url = next((label, url) for label, url in big_links.items() if "(seed=0)" in label)
    assert label == "sweep big by model.init: 8 of 136 cells (seed=0); other slices: --where seed=<one of 17>"
    browser.get(url)
    cells = {f"big/init={i},depth={d},seed=0" for i in BIG_INITS for d in (1, 2)}
    cards = wait_charted(browser, cells)
    assert set(cards["test/acc"]) == cells
    text = body(browser)
    assert "Group by: model.init" in text and all(f"Group: {init}" in text for init in BIG_INITS)
    assert "8 matching runs" in text


def test_where_link_charts_the_slice_asked_for(big_links, browser):
    """`--where depth=2`: 68 cells, which fit: every seed of every init at depth 2."""
    label, url = next((label, url) for label, url in big_links.items() if "(depth=2)" in label)
    assert label == "sweep big by model.init: 68 of 136 cells (depth=2); other slices: --where depth=<one of 2>"
    browser.get(url)
    cells = {f"big/init={i},depth=2,seed={s}" for i in BIG_INITS for s in range(17)}
    cards = wait_charted(browser, cells)
    assert set(cards["test/acc"]) == cells
    text = body(browser)
    assert all(f"Group: {init}" in text for init in BIG_INITS) and "68 matching runs" in text
