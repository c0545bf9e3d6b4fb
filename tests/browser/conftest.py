"""A real browser for the page tests: Debian's Chromium, headless, driven through its
chromedriver by Selenium (`make test` installs both when they are missing). Screenshots go to
var/screenshots/ for review."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver

from tests.services import ROOT

SCREENSHOTS = ROOT / "var" / "screenshots"


@pytest.fixture(scope="session")
def chrome_binaries() -> tuple[str, str]:
    browser = shutil.which("chromium") or "/usr/bin/chromium"
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if not (Path(browser).exists() and Path(driver).exists()):
        pytest.fail(
            "Chromium and chromedriver are missing: `apt-get install chromium chromium-driver` (make test does)"
        )
    return browser, driver


@pytest.fixture
def browser(chrome_binaries: tuple[str, str]) -> Iterator[WebDriver]:
    binary, driver_path = chrome_binaries
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1400,1400",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def screenshot(browser: WebDriver) -> Callable[[str], Path]:
    def take(name: str) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        # The whole page, not the window: its height as the page lays out.
        height = browser.execute_script("return document.documentElement.scrollHeight")
        browser.set_window_size(1400, max(900, int(height)))
        browser.execute_script("window.scrollTo(0, 0)")
        browser.save_screenshot(str(path))
        return path

    return take
