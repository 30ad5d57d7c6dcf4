"""The MLflow UI comparison as a user meets it: a finished tiny sweep (2 depths x 3 inits) served by
a real `distnet ui` (a real `mlflow server` on loopback), the links it prints opened in headless
Chromium (Debian's chromium + chromedriver, driven by selenium), and checked for what a user would
look for on screen. `make test` installs the browser where apt-get can. Without one the browser
tests fail, unless DISTNET_NO_BROWSER=1 says the machine cannot have a browser (then they are
skipped, saying so). DISTNET_SCREENSHOTS=docs/img refreshes the README's screenshots."""

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from distnet import cli, launch, sweep, ui

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
NO_BROWSER = os.environ.get("DISTNET_NO_BROWSER") == "1"
# Where to keep the screenshots (docs/img when refreshed by hand), resolved before a fixture moves the cwd.
SHOTS = os.environ.get("DISTNET_SCREENSHOTS") and Path(os.environ["DISTNET_SCREENSHOTS"]).resolve()
INITS = ["xavier_normal", "he_normal", "lecun_normal"]
SWEEP = {"name": "ui", "model": {"width": 20}, "train": {"epochs": 2}, "data": {"train_limit": 1280, "eval_limit": 300},
         "ray": {"num_workers": 1}, "mlflow": {"experiment": "ui"},
         "grid": {"model.depth": [1, 2], "model.init": INITS, "model.activation": ["tanh"]}}


@pytest.fixture(scope="module")
def finished_sweep(ray_cluster, tmp_path_factory):
    """A finished 2 x 3 sweep (activation as a one-value axis, so every name carries it)."""
    tmp = tmp_path_factory.mktemp("ui")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        db = f"sqlite:///{tmp / 'mlruns.db'}"
        sw = sweep.build_sweep(SWEEP)
        result = launch.run_sweep(sw, db, say=lambda *_: None)
        yield db, sw, result


@pytest.fixture(scope="module")
def links(finished_sweep):
    """`distnet ui <sweep> <run>` running: the links it printed, by kind. It stops (and stops its
    server) on SIGTERM."""
    db, sw, result = finished_sweep
    deep = next(r["run_id"] for r in result.rows if r["cell"].startswith("depth=2,"))
    proc = subprocess.Popen([sys.executable, "-m", "distnet.cli", "ui", "ui", deep, "--tracking-uri", db],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    printed = []
    try:
        for line in proc.stdout:  # until the server is up and every link printed
            printed.append(line)
            if "Ctrl-C stops it" in line:
                break
        urls = re.findall(r"^(sweep|run) .*?: (http://\S+)$", "".join(printed), re.M)
        assert len(urls) == 2, "".join(printed)
        yield dict(urls) | {"run_id": deep}
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0, "".join(printed)


@pytest.fixture(scope="module")
def browser():
    if NO_BROWSER:
        pytest.skip("DISTNET_NO_BROWSER=1: this machine opted out of the browser test")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert CHROMIUM and CHROMEDRIVER, ("chromium and chromedriver are not installed (`make test` installs "
                                       "Debian's where it can); set DISTNET_NO_BROWSER=1 to opt out on purpose")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--window-size=1600,1300"]:
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def body(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body").text


def wait(driver, check, timeout=90):
    """Until check(driver) is truthy; returns it."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, ignored_exceptions=[StaleElementReferenceException]).until(check)


def close_assistant(driver):
    """The assistant panel MLflow opens beside every page (a user closes it once)."""
    from selenium.webdriver.common.by import By

    for button in driver.find_elements(By.CSS_SELECTOR, "[data-component-id='mlflow.assistant.chat_panel.close']"):
        button.click()


def shot(driver, tmp_path, name):
    time.sleep(1)  # let the last chart finish drawing
    path = Path(SHOTS or tmp_path) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
    return path


def training_pages(text: str) -> bool:
    """The model-training side of the UI, not its GenAI one (whose menu lists Observability,
    Sessions, Judges, ... and whose experiment page opens on a traces overview)."""
    return "Model registry" in text and not {"Observability", "Detect Issues"} & set(text.splitlines())


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
    assert state["searchFilter"] == f"tags.mlflow.parentRunId = '{result.parent_run_id}'"
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


def test_sweep_link_charts_every_cell_grouped_by_init(finished_sweep, links, browser, tmp_path):
    db, sw, result = finished_sweep
    browser.get(links["sweep"])
    cells = {f"ui/{c.label}" for c in sw.cells}
    assert len(cells) == 6 and all("depth=" in c and "init=" in c for c in cells)

    def charted(driver):
        cards = dict(driver.execute_script(CHART_CARDS))
        return cards if cells <= set(cards.get("test/acc", [])) and cells <= set(cards.get("grad_norm/w/layer_1", [])) else None

    cards = wait(browser, charted)  # a line per cell in test/acc and in the first layer's norm
    # Only the cells: the sweep's parent run (named "ui") has no line, and no other run has one.
    assert set(cards["test/acc"]) == cells and set(cards["train/loss"]) == cells
    text = body(browser)
    assert "Group by: model.init" in text and all(f"Group: {init}" in text for init in INITS)
    assert "6 matching runs" in text
    assert training_pages(text)
    close_assistant(browser)
    assert shot(browser, tmp_path, "mlflow-ui-sweep.png").stat().st_size > 10_000


def test_run_link_shows_each_layers_gradient_norm(links, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(links["run"])
    wait(browser, lambda d: "grad_norm/w" in body(d) and "Model metrics" in body(d))
    wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "input[placeholder='Search metric charts']")).send_keys("grad_norm/w")

    def drawn_layers(driver):
        # Once the filter applies only the grad_norm/w section is left: a chart per layer of the
        # depth-2 cell (3 weight matrices), each with a real line.
        text = body(driver)
        plots = driver.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")
        lines = [p for p in plots if any(len(l.get_attribute("d") or "") > 20
                                         for l in p.find_elements(By.CSS_SELECTOR, "path.js-line"))]
        return "act/mean" not in text and all(f"layer_{i}" in text for i in (1, 2, 3)) and len(lines) == 3

    wait(browser, drawn_layers, timeout=60)
    assert training_pages(body(browser))
    close_assistant(browser)
    assert shot(browser, tmp_path, "mlflow-ui-run.png").stat().st_size > 10_000
