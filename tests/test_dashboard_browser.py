"""The dashboard in a real browser (Debian's chromium, driven headless through chromedriver by Selenium)
over a real fleet: the fleet service with --http, simulated devices on a real Mosquitto. An operator
opens a rollout, starts it from the page, watches wave progress change without reloading, aborts it
from the page, and sees the devices back on the previous version. Screenshots are kept under
build/test-artifacts/dashboard/."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from edgeopt.protocol import ModelRef

from conftest import run_cli
from fleet_helpers import FleetRig, sqlite_url, tuned_mosquitto

ARTIFACTS = Path(__file__).resolve().parent.parent / "build" / "test-artifacts" / "dashboard"
V1 = ModelRef("kws", "1")


def _chromium():
    try:
        from selenium import webdriver
    except ImportError:
        pytest.skip("selenium is not installed (pip install 'edgeopt[dev]')")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("the browser tests need chromium and its driver (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))


@pytest.fixture
def browser():
    b = _chromium()
    b.set_page_load_timeout(30)
    yield b
    b.quit()


@pytest.fixture
def rig(tmp_path):
    broker = tuned_mosquitto(tmp_path / "broker")
    r = FleetRig(tmp_path, broker, sqlite_url(tmp_path), 40, telemetry_interval=0.3,
                 service_options={"http": "127.0.0.1:0", "telemetry_sample_s": 0.0})
    yield r
    r.close()
    broker.stop()


def wait(browser, condition, timeout: float = 30.0, what: str = ""):
    """Until ``condition(browser)`` is truthy; an element the live refresh replaced meanwhile is looked up again."""
    from selenium.common.exceptions import (
        ElementNotInteractableException,
        NoSuchElementException,
        StaleElementReferenceException,
    )
    from selenium.webdriver.support.ui import WebDriverWait

    # the page redraws on every change the live stream reports (here about once a second): an element
    # found a moment ago may be gone, or not yet shown; look again until the condition holds
    ignored = (NoSuchElementException, StaleElementReferenceException, ElementNotInteractableException)
    return WebDriverWait(browser, timeout, poll_frequency=0.1, ignored_exceptions=ignored).until(
        lambda b: condition(b), message=what)


def text(browser, selector: str, by: str = "css selector") -> str:
    return browser.find_element(by, selector).text


def act(browser, selector: str, keys: str | None = None) -> None:
    """Click (or type into) the element ``selector`` names, looked up again if a live refresh replaced it."""
    from selenium.webdriver.common.by import By

    def attempt(b):
        el = b.find_element(By.CSS_SELECTOR, selector)
        el.send_keys(keys) if keys is not None else el.click()
        return True

    wait(browser, attempt, 10, f"to act on {selector}")


def test_an_operator_starts_watches_and_aborts_a_rollout_in_the_browser(rig, browser):
    from selenium.webdriver.common.by import By

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    url = rig.service.dashboard.url
    browser.get(url + "#/devices")
    wait(browser, lambda b: b.find_element(By.CSS_SELECTOR, "[data-testid=device-count]").text == "1–40 of 40",
         what="the devices table")
    wait(browser, lambda b: len(b.find_elements(By.CSS_SELECTOR, "table[data-testid=devices] tbody tr")) == 40)
    wait(browser, lambda b: b.find_element(By.ID, "live").text == "live", what="the live stream")
    browser.save_screenshot(str(ARTIFACTS / "devices.png"))
    # paging (the pager under the table too) and sorting by a column
    browser.get(url + "#/devices?limit=15")
    wait(browser, lambda b: b.find_element(By.CSS_SELECTOR, "[data-testid=device-count]").text == "1–15 of 40")
    act(browser, ".pager:last-of-type button:last-child")
    wait(browser, lambda b: b.find_element(By.CSS_SELECTOR, "[data-testid=device-count]").text == "16–30 of 40",
         what="the next page")
    act(browser, "th[data-sort=device]")  # sorted ascending already: now descending, from the first page
    wait(browser, lambda b: b.find_element(By.CSS_SELECTOR, "table[data-testid=devices] tbody tr").get_attribute(
        "data-device") == "sim-00039", what="the devices sorted by id, descending")

    # the operator plans a rollout with the form: 10 devices in wave 1; a long bake keeps it in wave 1
    browser.get(url + "#/rollouts")
    act(browser, "form[data-testid=create-rollout] input[name=bake]", "1h")
    act(browser, "form[data-testid=create-rollout] input[name=waves]", "25%,100%")
    act(browser, "form[data-testid=create-rollout] input[name=max_error_rate]", "lots")
    act(browser, "form[data-testid=create-rollout] input[name=id]", "r-web")
    act(browser, "form[data-testid=create-rollout] select[name=model] option[value='kws@2']")
    act(browser, "form[data-testid=create-rollout] button[type=submit]")
    wait(browser, lambda b: "--max-error-rate: parameter 'max_error_rate' must be float" in
         b.find_element(By.CSS_SELECTOR, "[data-testid=create-status]").text, what="the form's error")
    field = "form[data-testid=create-rollout] input[name=max_error_rate]"
    wait(browser, lambda b: b.find_element(By.CSS_SELECTOR, field).clear() or True)
    act(browser, field, "0.5")
    act(browser, "form[data-testid=create-rollout] button[type=submit]")
    wait(browser, lambda b: b.find_element(By.CSS_SELECTOR, "[data-testid=rollout-state]").text == "CREATED",
         what="the planned rollout")
    browser.execute_script("window.__sameDocument = true")  # gone if the page reloads
    act(browser, "button[data-action=start]")

    def wave1(b):
        return b.find_element(By.CSS_SELECTOR, ".wave[data-wave='1']")

    wait(browser, lambda b: wave1(b).get_attribute("data-success") == "10", 60, "wave 1 to reach 10 successes live")
    wait(browser, lambda b: b.find_element(By.CSS_SELECTOR, "[data-testid=rollout-state]").text == "RUNNING")
    wait(browser, lambda b: "baking" in wave1(b).text, what="the bake timer")
    assert browser.execute_script("return window.__sameDocument") is True
    # the told devices report their downloads (simulated devices take the full artifact): the page and the CLI
    wait(browser, lambda b: "by 10 device(s), 100.0% of the" in b.find_element(By.CSS_SELECTOR,
                                                                                "[data-testid=transfer]").text,
         what="the transfer line")
    transfer = run_cli("fleet", "rollout", "status", "r-web", "--db", rig.db, "--json").json()["transfer"]
    assert transfer["devices_reporting"] == 10 and transfer["deltas"] == 0 and transfer["share"] == 1.0, transfer
    table = run_cli("fleet", "rollout", "status", "r-web", "--db", rig.db).out
    assert "downloaded:" in table and "by 10 device(s), 100.0% of the" in table and "(0 by delta)" in table, table
    gate = "[data-testid=gates] tr[data-gate=max_error_rate]"  # bound, worst reported, reporting, breaking
    wait(browser, lambda b: text(b, gate).startswith("max_error_rate 0.5 0 10 0"), what="the gate's readings")
    browser.save_screenshot(str(ARTIFACTS / "rollout-running.png"))
    act(browser, "button[data-action=pause]")
    wait(browser, lambda b: b.find_element(By.CSS_SELECTOR, "[data-testid=rollout-state]").text == "PAUSED")
    act(browser, "button[data-action=resume]")
    wait(browser, lambda b: b.find_element(By.CSS_SELECTOR, "[data-testid=rollout-state]").text == "RUNNING")
    told = {d for d, a in rig.store.load_rollout("r-web")[1].items() if a.assigned_at is not None}
    assert len(told) == 10

    act(browser, "button[data-action=abort]")
    act(browser, "[data-testid=abort-reason]", "watching it in the browser test")
    act(browser, "[data-testid=abort-confirm]")
    wait(browser, lambda b: b.find_element(By.CSS_SELECTOR, "[data-testid=rollout-state]").text == "ABORTED",
         what="the rollout to show ABORTED")
    wait(browser, lambda b: "watching it in the browser test" in
         b.find_element(By.CSS_SELECTOR, "[data-testid=rollout-reason]").text, what="the abort reason")
    status, _ = rig.store.load_rollout("r-web")
    assert str(status.state) == "ABORTED"
    rig.wait_devices(lambda d: d.model == V1 and d.update.state == "IDLE", 60, "every device back on kws@1")

    # the devices page agrees: nobody left on kws@2 once the registry has the devices' states
    browser.get(url + "#/devices?model=kws@1")
    wait(browser, lambda b: b.find_element(By.CSS_SELECTOR, "[data-testid=device-count]").text == "1–40 of 40", 30,
         "all 40 devices on kws@1 in the table")
    browser.get(url + "#/rollout/r-web")
    wait(browser, lambda b: b.find_element(By.CSS_SELECTOR, "[data-testid=rollout-state]").text == "ABORTED")
    browser.save_screenshot(str(ARTIFACTS / "rollout-aborted.png"))

    # a device the rollout told: its rollout history, telemetry charts and per-stage profile
    device = sorted(told)[0]
    browser.get(url + f"#/device/{device}")
    wait(browser, lambda b: all(b.find_element(By.CSS_SELECTOR, f"[data-testid=chart-{name}] canvas").size["width"]
                                > 100 for name in ("throughput", "latency", "errors")), 30, "the three charts")
    wait(browser, lambda b: "inference" in text(b, "[data-testid=profile]"), what="the per-stage profile")
    rollouts = "//h3[text()='Rollouts']/following-sibling::table[1]"
    wait(browser, lambda b: "r-web" in text(b, rollouts, By.XPATH) and "kws@1" in text(b, rollouts, By.XPATH),
         what="its rollouts: told in r-web, previously on kws@1")
    wait(browser, lambda b: "kws@2" in text(b, "[data-testid=history]") and "kws@1" in text(b, "[data-testid=history]"),
         what="its state history: to the new version and back")
    browser.save_screenshot(str(ARTIFACTS / "device.png"))
