"""The MLflow UI as a user meets it after a sweep: ``latentlab ui``, then the page it prints, in
a real headless Chromium (Debian's chromium and chromium-driver; `.ci/run` installs them)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from flows.pipeline import sweep_flow

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
        reason="no browser: install Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
    ),
]
WAIT_S = 60


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    # headless, as root in a container, and nothing that reaches for the (closed) internet
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,900",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _until(driver, condition, what: str) -> None:
    deadline = time.time() + WAIT_S
    while time.time() < deadline:
        if condition(driver):
            return
        time.sleep(0.5)
    raise AssertionError(f"the page never showed {what}; it shows:\n{driver.find_element('tag name', 'body').text}")


def test_the_ui_opens_on_the_runs_table_and_the_sweep_run_plots_fid_against_f(project, tiny, browser):
    from selenium.webdriver.common.by import By

    result = sweep_flow(tiny())
    assert not result.failed
    port = _free_port()
    command = [str(Path(sys.executable).with_name("latentlab")), "ui", "--port", str(port)]
    server = subprocess.Popen(command, cwd=project, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        page = server.stdout.readline().strip()  # the page `ui` tells the user to open
        assert page.startswith(f"http://127.0.0.1:{port}/#/experiments/") and page.endswith(
            "/runs?workflowType=machine_learning"
        )
        _wait_for_server(port)

        browser.get(page)  # the runs table, with the sweep run at the top; its children under it
        sweep_name = mlflow.get_run(result.run_id).info.run_name
        _until(browser, lambda d: sweep_name in d.page_source, f"the sweep run {sweep_name}")
        assert "Token Usage" not in browser.find_element(By.TAG_NAME, "body").text  # not the GenAI overview
        row = browser.find_element(By.XPATH, f"//*[@role='row'][.//a[normalize-space()='{sweep_name}']]")
        row.find_element(By.XPATH, ".//button[contains(@data-component-id, 'runnamecellrenderer')]").click()
        _until(browser, lambda d: "eval-f1" in d.page_source and "eval-f4" in d.page_source, "the eval-f* runs")

        browser.get(page.replace("/runs?", f"/runs/{result.run_id}/model-metrics?"))
        _until(browser, lambda d: "sweep-" in d.page_source and "by_f/fid)" in d.page_source, "the by_f/fid chart")
    finally:
        server.terminate()
        server.wait(timeout=30)


def _wait_for_server(port: int) -> None:
    deadline = time.time() + WAIT_S
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"the MLflow UI never listened on port {port}")
