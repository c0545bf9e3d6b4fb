"""The playground in headless Chromium against an API process no worker listens to (its jobs
stay queued): a cancel and its refund, a 402 shown as the API's message, a wrong key, the
history's pages. Checked against what is stored."""

from __future__ import annotations

import pytest
from selenium.webdriver.common.by import By

from posegen.client import ApiError, Client
from tests.browser.page import a_file, choose, connect, drop_photo, jobs_of, text, wait
from tests.factories import astronaut_png, ledger_kinds, png_bytes
from tests.processes import start_api

pytestmark = pytest.mark.slow
MODEL = "tiny-sd15-openpose"


@pytest.fixture(scope="module")
def quiet_api(base_env, quiet_broker_url, db_engine, process_logs):
    """The module's API process, publishing where no worker listens."""
    env = {**base_env, "POSEGEN_BROKER_URL": quiet_broker_url}
    proc, base = start_api(env, process_logs / "api-playground.log")
    yield base
    proc.stop()


def test_cancel_refunds(quiet_api, make_account, sessions, browser, screenshot):
    account = make_account(credits=3)
    connect(browser, quiet_api, account.key)
    choose(browser, model=MODEL, template=None)
    drop_photo(browser, png_bytes())
    assert browser.find_element(By.ID, "photo-preview").is_displayed()
    browser.find_element(By.CSS_SELECTOR, "input[name=pose-source][value=pose_image]").click()
    assert not browser.find_element(By.ID, "poses").is_displayed()
    browser.find_element(By.ID, "pose-photo").send_keys(a_file(astronaut_png()))
    browser.find_element(By.ID, "submit").click()
    wait(browser).until(lambda b: text(b, "job-status") == "queued")
    wait(browser).until(lambda b: "0 ahead in the queue" in text(b, "job"))
    assert "2 credits" in text(browser, "account")
    browser.find_element(By.ID, "cancel").click()
    wait(browser).until(lambda b: text(b, "job-status") == "canceled")
    wait(browser).until(lambda b: "3 credits" in text(b, "account"))
    assert not browser.find_element(By.ID, "cancel").is_displayed()
    screenshot("playground-canceled")
    [job] = jobs_of(sessions, account.user_id)
    assert job.status == "canceled" and job.pose_source == "pose_image"
    assert ledger_kinds(sessions, job.id) == {"charge": 1, "refund": 1}


def test_an_api_error_is_shown_as_its_message(
    quiet_api, make_account, sessions, browser, screenshot
):
    account = make_account(credits=0)
    with Client(quiet_api, account.key) as client, pytest.raises(ApiError) as refused:
        client.submit(png_bytes(), model_key=MODEL, pose_template_id="waving")
    connect(browser, quiet_api, account.key)
    choose(browser, model=MODEL, template="waving")
    drop_photo(browser, png_bytes())
    browser.find_element(By.ID, "submit").click()
    error = browser.find_element(By.ID, "error")
    wait(browser).until(lambda b: error.is_displayed())
    assert (
        error.text == refused.value.message
        and error.get_attribute("data-code") == "insufficient_credits"
    )
    assert browser.find_element(By.ID, "new-job").is_displayed()  # the page goes on working
    assert not browser.find_element(By.ID, "job").is_displayed()
    screenshot("playground-402")
    assert jobs_of(sessions, account.user_id) == []
    # A wrong key is an error message too, not a broken page.
    browser.find_element(By.ID, "forget").click()
    browser.find_element(By.ID, "api-key").send_keys("pk_wrong")
    browser.find_element(By.ID, "connect").click()
    wait(browser).until(
        lambda b: b.find_element(By.ID, "error").get_attribute("data-code") == "unauthorized"
    )


def test_history_pages(quiet_api, make_account, browser, screenshot):
    account = make_account(credits=10)
    with Client(quiet_api, account.key) as client:
        ids = [
            client.submit(png_bytes(), model_key=MODEL, pose_template_id="standing", seed=n)["id"]
            for n in range(7)
        ]
    newest_first = ids[::-1]
    connect(browser, quiet_api, account.key)

    def shown() -> list[str]:
        # Read in one go: the rows are replaced as a page loads.
        script = (
            "return [...document.querySelectorAll('#history-rows tr')].map((r) => r.dataset.jobId)"
        )
        return browser.execute_script(script)

    wait(browser).until(lambda b: shown() == newest_first[:5])
    assert browser.find_element(By.ID, "newer").get_attribute("disabled")
    browser.find_element(By.ID, "older").click()
    wait(browser).until(lambda b: shown() == newest_first[5:])
    assert browser.find_element(By.ID, "older").get_attribute("disabled")
    screenshot("playground-history")
    browser.find_element(By.ID, "newer").click()
    wait(browser).until(lambda b: shown() == newest_first[:5])
    browser.find_element(By.CSS_SELECTOR, f"tr[data-job-id='{ids[3]}'] button").click()
    wait(browser).until(lambda b: text(b, "job-id") == ids[3])
    assert text(browser, "job-status") == "queued"
