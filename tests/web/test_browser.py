"""The console in a real headless Chromium (Debian's, through chromedriver), as an operator uses it: find a parked
saga from the overview, open it, see the marked graph, retry it with a reason, watch it finish with the operator's
name in the timeline. Screenshots go to the test's folder (and to docs/screenshots with SAGAS_UPDATE_SCREENSHOTS=1).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.wait import WebDriverWait

from sagas.engine.ports import HistoryRecord, UnitOfWork
from sagas.engine.state import HistoryEntry, SagaStatus
from tests.conftest import service_url
from tests.web.live import Live, live_stack
from tests.web.served import TOKENS, Stack, alice

DOCS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
KEPT = {"console-overview.png", "console-saga.png"}  # the two the README shows


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Live]:
    with live_stack(f"sqlite+aiosqlite:///{tmp_path / 'sagas.db'}", tmp_path, open_reads=True) as server:
        yield server


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    chromium = service_url("SAGAS_TEST_CHROMIUM")
    driver_path = service_url("SAGAS_TEST_CHROMEDRIVER")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1000",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_page_load_timeout(30)
    driver.implicitly_wait(10)  # find_element waits for what the next page shows
    try:
        yield driver
    finally:
        driver.quit()


def shot(browser: WebDriver, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    browser.save_screenshot(str(path))
    if os.environ.get("SAGAS_UPDATE_SCREENSHOTS") == "1" and name in KEPT:
        DOCS.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, DOCS / name)
    return path


def click_through(browser: WebDriver, element: WebElement) -> None:
    """Click a link or submit button and wait until the page it leads to has replaced this one."""
    element.click()

    def gone(_: WebDriver) -> bool:
        try:
            element.is_enabled()
        except WebDriverException:
            # StaleElementReference, or, mid-navigation, chromedriver's "Node with given id does not belong to the
            # document": either way the old page is gone.
            return True
        return False

    WebDriverWait(browser, 20).until(gone)


def sign_in(browser: WebDriver, live: Live) -> None:
    browser.get(f"{live.url}/login")
    browser.find_element(By.ID, "token").send_keys(TOKENS["alice"])
    click_through(browser, browser.find_element(By.ID, "sign-in"))
    assert browser.find_element(By.ID, "operator").text == "alice"


def wait_for(check: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError("the page never showed it")


def test_an_operator_finds_a_parked_saga_and_retries_it(live: Live, browser: WebDriver, tmp_path: Path) -> None:
    """From the overview to a retried saga: the graph marks where it is parked, the retry asks to confirm, and the
    timeline ends with the saga compensated and alice's retry in it."""
    saga_id = live.run(Stack.parked)
    live.served.switch.refund_broken = False
    sign_in(browser, live)
    browser.get(live.url + "/")
    shot(browser, tmp_path, "console-overview.png")
    click_through(browser, browser.find_element(By.CSS_SELECTOR, f'a[href="/sagas/{saga_id}"]'))
    assert browser.find_element(By.ID, "status").text == "failed"
    assert "refund gateway down" in browser.find_element(By.ID, "reason").text
    failed = browser.find_elements(By.CSS_SELECTOR, "#graph g.node.failed")
    assert {g.get_attribute("data-node") for g in failed} == {"c1", "s2"}  # charge's refund, and ship
    assert browser.find_elements(By.CSS_SELECTOR, '#graph g[data-node="s0"].done')
    shot(browser, tmp_path, "console-saga.png")
    browser.find_element(By.ID, "retry-reason").send_keys("refund gateway is back")
    click_through(browser, browser.find_element(By.ID, "retry"))
    assert browser.find_element(By.ID, "confirm-reason").text == "refund gateway is back"
    click_through(browser, browser.find_element(By.ID, "confirm"))

    def compensated() -> bool:
        browser.refresh()
        return browser.find_element(By.ID, "status").text == "compensated"

    wait_for(compensated)
    timeline = browser.find_element(By.ID, "history").text
    assert "operator.retry" in timeline
    assert "alice" in timeline
    assert "refund gateway is back" in timeline
    shot(browser, tmp_path, "console-retried.png")


def test_an_action_without_signing_in_is_refused(live: Live, browser: WebDriver) -> None:
    """With reads open on loopback a saga's page shows without a token, but its retry is refused."""
    saga_id = live.run(Stack.parked)
    browser.get(f"{live.url}/sagas/{saga_id}")
    browser.find_element(By.ID, "retry-reason").send_keys("no token")
    click_through(browser, browser.find_element(By.ID, "retry"))
    assert "sign in" in browser.find_element(By.ID, "error").text
    browser.get(f"{live.url}/sagas/{saga_id}")
    assert browser.find_element(By.ID, "status").text == "failed"


def test_a_script_in_the_input_is_shown_as_text(live: Live, browser: WebDriver) -> None:
    """A saga whose input holds a `<script>` shows it as text; the script never runs."""
    async def start(served: Stack) -> str:
        order = {"order_id": "<script>document.title='pwned'</script>", "amount": 1}
        response = await served.client.post("/api/sagas", headers=alice(), json={"definition": "order", "input": order})
        return str(response.json()["id"])

    saga_id = live.run(start)
    browser.get(f"{live.url}/sagas/{saga_id}")
    assert "<script>document.title='pwned'</script>" in browser.find_element(By.ID, "input").text
    assert browser.title != "pwned"
    browser.implicitly_wait(0)
    assert not browser.find_elements(By.CSS_SELECTOR, "main script")


def test_a_saga_with_20000_history_entries_opens_paged(live: Live, browser: WebDriver) -> None:
    """A 20,000-entry history opens fast: its first page of 200, and the next page a click away."""
    async def long_saga(served: Stack) -> str:
        response = await served.client.post("/api/sagas", headers=alice(),
                                            json={"definition": "order", "input": {"order_id": "o-long", "amount": 1}})
        saga_id = str(response.json()["id"])
        assert (await served.settled(saga_id)).status is SagaStatus.COMPLETED
        records = [HistoryRecord(saga_id, HistoryEntry(at=time.time(), type="step.retry_scheduled", step="charge",
                                                       attempt=n, detail={"delay": 1.5, "reason": f"try {n}"}))
                   for n in range(20_000)]
        await served.store.commit(UnitOfWork(history=records))
        return saga_id

    saga_id = live.run(long_saga)
    began = time.monotonic()
    browser.get(f"{live.url}/sagas/{saga_id}")
    rows = browser.find_elements(By.CSS_SELECTOR, "#history tbody tr")
    opened = time.monotonic() - began
    assert len(rows) == 200
    assert opened < 10, f"the page took {opened:.1f} s"
    click_through(browser, browser.find_element(By.ID, "history-next"))
    assert "after=" in browser.current_url
    assert len(browser.find_elements(By.CSS_SELECTOR, "#history tbody tr")) == 200
