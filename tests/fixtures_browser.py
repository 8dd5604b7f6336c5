"""A real headless Chromium (Debian's chromium + chromium-driver) driven by Selenium.

scripts/bootstrap --test installs both. Where they are missing, a test using ``browser``
is skipped with that reason, except on CI (CI=true), where a missing browser fails: the
browser tests must run there.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run")


class Browser:
    """The few things the console tests do with a page, by CSS selector."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver

    def get(self, url: str) -> None:
        self.driver.get(url)

    def title(self) -> str:
        return str(self.driver.title)

    def source(self) -> str:
        return str(self.driver.page_source)

    def _one(self, selector: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, selector)

    def _all(self, selector: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return list(self.driver.find_elements(By.CSS_SELECTOR, selector))

    def fill(self, selector: str, text: str) -> None:
        self._one(selector).send_keys(text)

    def click(self, selector: str) -> None:
        self._one(selector).click()

    def wait_for(self, selector: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not self._all(selector):
            if time.monotonic() > deadline:
                raise AssertionError(f"{selector} never appeared on {self.driver.current_url}:"
                                     f"\n{self.source()[:2000]}")
            time.sleep(0.05)

    def _settled(self, read: Any) -> Any:
        """``read()``, again while a page that reloads itself (meta refresh) replaces the
        elements it found."""
        from selenium.common.exceptions import (
            NoSuchElementException,
            StaleElementReferenceException,
        )

        for _ in range(50):
            try:
                return read()
            except (StaleElementReferenceException, NoSuchElementException):
                time.sleep(0.05)
        return read()

    def text(self, selector: str) -> str:
        return str(self._settled(lambda: self._one(selector).text))

    def attributes(self, selector: str, name: str) -> list[str]:
        return list(self._settled(
            lambda: [str(e.get_attribute(name)) for e in self._all(selector)]))

    def script(self, code: str, *args: Any) -> Any:
        return self.driver.execute_script(code, *args)

    def tab(self, times: int = 1) -> dict[str, str]:
        """Press Tab; what has the focus then: its tag, id, text and outline style."""
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.keys import Keys

        for _ in range(times):
            ActionChains(self.driver).send_keys(Keys.TAB).perform()
        return dict(self.script(
            "const e = document.activeElement, s = getComputedStyle(e);"
            "return {tag: e.tagName.toLowerCase(), id: e.id, text: e.textContent.trim(),"
            "outline: s.outlineStyle + ' ' + s.outlineWidth};"))

    def unlabelled_inputs(self) -> list[str]:
        """Visible form controls without a label (label[for], a wrapping label, aria-*)."""
        return list(self.script(
            "return [...document.querySelectorAll('input, select, textarea, button')]"
            ".filter(e => e.type !== 'hidden')"
            ".filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')"
            " && !e.getAttribute('aria-labelledby') && !(e.tagName === 'BUTTON' &&"
            " e.textContent.trim()))"
            ".map(e => e.outerHTML);"))

    def overflow(self) -> int:
        """How many CSS pixels the page is wider than the viewport (0: it fits)."""
        return int(self.script("return document.documentElement.scrollWidth - "
                               "document.documentElement.clientWidth;"))

    def viewport(self, width: int, height: int) -> None:
        self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600})

    def css_color(self, selector: str) -> str:
        return str(self._one(selector).value_of_css_property("background-color"))

    def screenshot(self, path: Path, *, width: int, height: int) -> None:
        """A PNG of the page at ``width``, as tall as its content (at least ``height``)."""
        def viewport(tall: int) -> None:
            self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
                "width": width, "height": tall, "deviceScaleFactor": 1,
                "mobile": width < 600})

        viewport(height)
        full = int(self.driver.execute_script(
            "return document.documentElement.scrollHeight") or height)
        viewport(min(max(height, full), 4000))
        self.driver.save_screenshot(str(path))
        self.driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


@pytest.fixture
def browser() -> Iterator[Browser]:
    """Headless Chromium with a fresh profile, closed after the test."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    if missing:
        why = (f"{' and '.join(missing)} missing: install Debian's chromium and "
               "chromium-driver (scripts/bootstrap --test does)")
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="pgvault-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument("--window-size=1280,800")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield Browser(driver)
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
