"""What the playground tests do on the page: connect, choose, drop a photo, set a field."""

from __future__ import annotations

import base64
import tempfile
import uuid

from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait
from sqlalchemy import select

from db.models import Generation


def wait(browser: WebDriver, timeout: float = 30) -> WebDriverWait:
    return WebDriverWait(browser, timeout, poll_frequency=0.1)


def text(browser: WebDriver, element_id: str) -> str:
    return browser.find_element(By.ID, element_id).text


def connect(browser: WebDriver, base: str, key: str) -> None:
    browser.get(f"{base}/playground")
    browser.find_element(By.ID, "api-key").send_keys(key)
    browser.find_element(By.ID, "connect").click()
    wait(browser).until(lambda b: b.find_element(By.ID, "app").is_displayed())
    wait(browser).until(lambda b: "credits" in text(b, "account"))
    wait(browser).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#models .card"))


def choose(browser: WebDriver, *, model: str, template: str | None) -> None:
    browser.find_element(By.CSS_SELECTOR, f"input[name=model][value='{model}']").find_element(
        By.XPATH, ".."
    ).click()
    if template:
        card = browser.find_element(By.CSS_SELECTOR, f"input[name=template][value='{template}']")
        card.find_element(By.XPATH, "..").click()


def drop_photo(browser: WebDriver, data: bytes, target: str = "drop") -> None:
    """Drag and drop, as a user's file manager would: a `drop` event carrying the file."""
    browser.execute_script(
        """
        const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], "photo.png", { type: "image/png" }));
        const target = document.getElementById(arguments[1]);
        target.dispatchEvent(new DragEvent("dragover", { dataTransfer: transfer, bubbles: true, cancelable: true }));
        target.dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true }));
        """,
        base64.b64encode(data).decode(),
        target,
    )


def set_param(browser: WebDriver, name: str, value: object) -> None:
    field = browser.find_element(By.ID, f"param-{name}")
    field.clear()
    field.send_keys(str(value))


def jobs_of(sessions, user_id: str) -> list[Generation]:
    with sessions() as s:
        return list(s.scalars(select(Generation).where(Generation.user_id == user_id)))


def a_file(data: bytes) -> str:
    path = f"{tempfile.gettempdir()}/posegen-playground-{uuid.uuid4().hex}.png"
    with open(path, "wb") as out:
        out.write(data)
    return path
