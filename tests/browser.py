"""Headless Chromium (Debian's chromium + chromedriver, driven by selenium) for the MLflow UI tests:
opening a page and reading off it what a user looks for. `make test` installs the browser where
apt-get can. Without one the browser tests fail, unless DISTNET_NO_BROWSER=1 says the machine
cannot have a browser (then they are skipped, saying so)."""

from __future__ import annotations

import base64
import os
import shutil

import pytest

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
NO_BROWSER = os.environ.get("DISTNET_NO_BROWSER") == "1"


def chromium():
    """A headless Chromium for the test (a generator, for a fixture), quit at the end."""
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


def log_in(driver, user: str, password: str) -> None:
    """What a person's browser does once they typed the login into its basic-auth prompt: send it
    with every request from then on. (A login in the URL does not do: the UI's own requests would
    carry it, and the browser refuses those.)"""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {token}"}})


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


def training_pages(text: str) -> bool:
    """The model-training side of the UI, not its GenAI one (whose menu lists Observability,
    Sessions, Judges, ... and whose experiment page opens on a traces overview)."""
    return "Model registry" in text and not {"Observability", "Detect Issues"} & set(text.splitlines())


def charts_each_layers_gradient_norm(driver, run_url: str, layers: int) -> None:
    """Opens a cell's run page and waits until it charts grad_norm/w of each of its `layers` weight
    matrices, each chart with a real line, as a user finds them by the charts' search box."""
    from selenium.webdriver.common.by import By

    driver.get(run_url)
    wait(driver, lambda d: "grad_norm/w" in body(d) and "Model metrics" in body(d))
    wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, "input[placeholder='Search metric charts']")).send_keys("grad_norm/w")

    def drawn_layers(driver):
        # Once the filter applies only the grad_norm/w section is left: a chart per layer.
        text = body(driver)
        plots = driver.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")
        lines = [p for p in plots if any(len(l.get_attribute("d") or "") > 20
                                         for l in p.find_elements(By.CSS_SELECTOR, "path.js-line"))]
        return ("act/mean" not in text and all(f"layer_{i}" in text for i in range(1, layers + 1))
                and len(lines) == layers)

    wait(driver, drawn_layers, timeout=60)
