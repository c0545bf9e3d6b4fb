"""The playground in headless Chromium against a real API process and a real worker: a whole
job on the tiny model (photo, template, parameters, progress, the result beside its pose,
download, history, balance), checked against what is stored."""

from __future__ import annotations

import pytest
from selenium.webdriver.common.by import By

from tests.browser.page import choose, connect, drop_photo, jobs_of, set_param, text, wait
from tests.factories import astronaut_png, ledger_kinds

pytestmark = pytest.mark.slow
MODEL = "tiny-sd15-openpose"


def test_a_whole_job(live_api, gpu_worker, make_account, sessions, browser, screenshot, tmp_path):
    account = make_account(credits=5)
    connect(browser, live_api, account.key)
    assert "5 credits" in text(browser, "account") and "free" in text(browser, "account")
    models = browser.find_elements(By.CSS_SELECTOR, "#models .card")
    soon = [m for m in models if "coming soon" in m.text]
    assert soon and all("disabled" in m.get_attribute("class") for m in soon)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#poses canvas.skeleton")) == 5

    choose(browser, model=MODEL, template="waving")
    photo = tmp_path / "astronaut.png"
    photo.write_bytes(astronaut_png())
    browser.find_element(By.ID, "photo").send_keys(str(photo))
    assert browser.find_element(By.ID, "photo-preview").is_displayed()
    set_param(browser, "num_inference_steps", 4)
    set_param(browser, "seed", 1234)
    browser.find_element(By.ID, "submit").click()

    wait(browser, 120).until(lambda b: text(b, "job-status") == "completed", gpu_worker.tail())
    # The page shows the status, then fetches the pose and the outputs before it shows them.
    [output] = wait(browser).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#job-outputs img"))
    wait(browser).until(
        lambda b: b.execute_script("return arguments[0].naturalWidth", output) == 128
    )
    link = browser.find_element(By.CSS_SELECTOR, "#job-outputs a")
    job_id = text(browser, "job-id")
    assert link.get_attribute("download") == f"{job_id}-0.png"
    assert link.get_attribute("href").startswith("blob:")
    pose = browser.find_element(By.ID, "job-pose-box")
    assert pose.is_displayed() and pose.find_elements(By.CSS_SELECTOR, "canvas, img")
    assert float(browser.find_element(By.ID, "job-progress").get_attribute("value")) == 3.0
    wait(browser).until(lambda b: "4 credits" in text(b, "account"))
    wait(browser).until(lambda b: "completed" in text(b, "history-rows"))
    screenshot("playground-completed")

    [job] = jobs_of(sessions, account.user_id)
    assert job.id == job_id and job.status == "completed" and job.pose_source == "template"
    assert job.params["seed"] == 1234 and job.params["num_inference_steps"] == 4
    assert ledger_kinds(sessions, job.id) == {"charge": 1}
    # The key stays with the tab: a reload connects by itself.
    browser.refresh()
    wait(browser).until(lambda b: "4 credits" in text(b, "account"))


def test_previews_show_while_the_job_runs(live_api, gpu_worker, make_account, browser, screenshot):
    account = make_account(credits=5)
    connect(browser, live_api, account.key)
    # The form is built from the schema: the server's preview field is there as a checkbox.
    preview = browser.find_element(By.ID, "param-preview")
    assert preview.get_attribute("type") == "checkbox"
    choose(browser, model="tiny-sdxl-openpose", template="t-pose")
    drop_photo(browser, astronaut_png())
    set_param(browser, "num_inference_steps", 30)
    set_param(browser, "strength", 1)
    preview.click()
    browser.find_element(By.ID, "submit").click()
    box = browser.find_element(By.ID, "job-preview-box")
    wait(browser, 120).until(lambda b: box.is_displayed() or text(b, "job-status") == "completed")
    assert box.is_displayed(), "the job ended before a preview was shown"
    image = browser.find_element(By.ID, "job-preview")
    wait(browser).until(lambda b: b.execute_script("return arguments[0].naturalWidth", image) > 0)
    screenshot("playground-preview")
    wait(browser, 120).until(lambda b: text(b, "job-status") == "completed", gpu_worker.tail())
    assert not box.is_displayed()  # the result replaces the preview
