"""A real browser for the tests: Debian's headless Chromium, driven by selenium through its chromedriver.

``./dev test`` installs ``chromium`` and ``chromium-driver`` with apt-get when they are missing; a
machine without Chromium skips the browser tests (and says why), a Chromium without its driver fails.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = (
    "--headless",
    "--no-sandbox",  # as root, and in containers without user namespaces
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # nothing but the page under test talks to the network: no updates, sync or field trials
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    """A fresh headless Chromium (its own profile in ``tmp_path``), quit after the test."""
    if not CHROMIUM.exists():
        pytest.skip(
            f"no Chromium installed ({CHROMIUM} is missing): ./dev test installs Debian's chromium "
            "and chromium-driver with apt-get"
        )
    if not CHROMEDRIVER.exists():
        pytest.fail(f"{CHROMIUM} is installed but not its driver {CHROMEDRIVER}: apt-get install chromium-driver")
    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console, for failures
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


def console(driver: WebDriver) -> str:
    """What the page logged to its console (errors of scripts included), one line per message."""
    entries: list[dict[str, Any]] = driver.get_log("browser")
    return "\n".join(f"{e.get('level')}: {e.get('message')}" for e in entries)
