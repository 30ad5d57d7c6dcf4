"""The MLflow UI comparison, checked in a real browser: a finished tiny sweep served by a real
`mlflow server` on loopback, opened in headless Chromium (Debian's chromium + chromedriver, driven by
selenium). `make test` installs the browser where apt-get can. Without one this test fails, unless
DISTNET_NO_BROWSER=1 says the machine cannot have a browser (then it is skipped, saying so)."""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from distnet import launch, sweep

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
NO_BROWSER = os.environ.get("DISTNET_NO_BROWSER") == "1"
pytestmark = pytest.mark.skipif(NO_BROWSER, reason="DISTNET_NO_BROWSER=1: this machine opted out of the browser test")
SHOTS = os.environ.get("DISTNET_SCREENSHOTS")  # where to keep the screenshots (docs/ when refreshed by hand)


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert CHROMIUM and CHROMEDRIVER, ("chromium and chromedriver are not installed (`make test` installs "
                                       "Debian's where it can); set DISTNET_NO_BROWSER=1 to opt out on purpose")

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--window-size=1600,1000"]:
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


@pytest.fixture
def served_sweep(ray_cluster, tmp_path, monkeypatch):
    """A finished 2 x 2 sweep (activation as a one-value axis, so every name carries it) behind a
    real MLflow server."""
    monkeypatch.chdir(tmp_path)
    db = f"sqlite:///{tmp_path / 'mlruns.db'}"
    sw = sweep.build_sweep({"name": "ui", "model": {"width": 20}, "train": {"epochs": 2},
                            "data": {"train_limit": 1280, "eval_limit": 300}, "ray": {"num_workers": 1},
                            "mlflow": {"experiment": "ui"},
                            "grid": {"model.depth": [1, 2], "model.init": ["xavier_normal", "he_normal"],
                                     "model.activation": ["tanh"]}})
    result = launch.run_sweep(sw, db, say=lambda *_: None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
                               "--port", str(port), "--backend-store-uri", db, "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                exp = MlflowClient(url).get_experiment_by_name("ui")
                break
            except Exception:
                time.sleep(0.5)
        yield url, exp.experiment_id, sw, result
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def wait_text(driver, texts, timeout=90):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(lambda d: all(t in d.find_element(By.TAG_NAME, "body").text for t in texts))


def shot(driver, tmp_path, name):
    path = Path(SHOTS or tmp_path) / name
    driver.save_screenshot(str(path))
    return path


def test_runs_table_lists_cells_and_grad_norm_chart_renders(served_sweep, browser, tmp_path):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    url, exp_id, sw, result = served_sweep
    browser.get(f"{url}/#/experiments/{exp_id}/runs")
    # The sweep's parent run, its cells collapsed under it: expand it (the table re-renders while it
    # loads, so look the button up afresh until a click takes).
    expand = (By.CSS_SELECTOR, f"[row-id='{result.parent_run_id}'] button[data-component-id*='runnamecellrenderer']")
    WebDriverWait(browser, 90, ignored_exceptions=[StaleElementReferenceException]).until(
        EC.element_to_be_clickable(expand)).click()
    labels = [f"ui/{c.label}" for c in sw.cells]
    assert all("depth=" in l and "init=" in l and "activation=tanh" in l for l in labels)
    wait_text(browser, labels)
    assert shot(browser, tmp_path, "mlflow-ui-runs.png").stat().st_size > 10_000

    run_id = result.rows[0]["run_id"]
    browser.get(f"{url}/#/experiments/{exp_id}/runs/{run_id}/model-metrics")
    wait_text(browser, ["grad_norm/w", "grad_norm/b", "speed", "layer_1"])
    WebDriverWait(browser, 60, ignored_exceptions=[StaleElementReferenceException]).until(
        EC.element_to_be_clickable((By.CSS_SELECTOR, "input[placeholder='Search metric charts']"))).send_keys("grad_norm")
    # Once the filter applies only grad_norm charts are left, and plotly drew a real line in them.
    WebDriverWait(browser, 60, ignored_exceptions=[StaleElementReferenceException]).until(lambda d: (
        "act/mean" not in d.find_element(By.TAG_NAME, "body").text
        and "grad_norm/w" in d.find_element(By.TAG_NAME, "body").text
        and any(len(p.get_attribute("d") or "") > 20 for p in d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot path.js-line"))))
    time.sleep(1)  # let the last chart finish drawing before the screenshot
    assert shot(browser, tmp_path, "mlflow-ui-grad-norms.png").stat().st_size > 10_000
