"""/docs (Swagger UI) and /redoc render in a browser that reaches nothing but the API: every
script and style, and the schema, come from the API's own origin (the pages were blank where
the browser could not reach the CDN FastAPI loads them from by default)."""

from __future__ import annotations

import pytest
from selenium.webdriver.common.by import By

from tests.browser.page import wait

pytestmark = pytest.mark.slow

# What a page needs to work: its scripts, styles and what they fetch (the schema). ReDoc's
# sidebar also shows Redocly's logo from their CDN; a browser that cannot reach it shows the
# rest all the same (the browser fixture reaches nothing but loopback).
NEEDED = """return performance.getEntriesByType('resource')
  .filter((e) => ['script', 'link', 'css', 'fetch', 'xmlhttprequest'].includes(e.initiatorType))
  .map((e) => e.name)"""


def test_swagger_ui_and_redoc_render_from_the_api_alone(live_api, browser, screenshot):
    browser.get(f"{live_api}/docs")
    wait(browser).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".opblock")) >= 10)
    assert "POST" in browser.find_element(By.CSS_SELECTOR, ".opblock-post").text
    loaded = browser.execute_script(NEEDED)
    assert loaded and all(url.startswith(live_api) for url in loaded), loaded
    screenshot("docs-swagger")

    browser.get(f"{live_api}/redoc")
    wait(browser).until(lambda b: "Submit Generation" in b.find_element(By.TAG_NAME, "body").text)
    loaded = browser.execute_script(NEEDED)
    assert loaded and all(url.startswith(live_api) for url in loaded), loaded
    screenshot("docs-redoc")
