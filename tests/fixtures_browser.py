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

    def text(self, selector: str) -> str:
        return str(self._one(selector).text)

    def attributes(self, selector: str, name: str) -> list[str]:
        return [str(e.get_attribute(name)) for e in self._all(selector)]

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
