"""Headless Debian chromium for the browser tests (the dashboard's page), through selenium.

The browser is Debian's ``chromium`` and the driver Debian's ``chromedriver``, both named
explicitly, so selenium never runs selenium-manager, which would look for (and download) a
driver and a browser of its own. scripts/test installs the two packages when they are
missing; a run without them FAILS (never skips) with the command that installs them.

The :func:`browser` fixture (registered in tests/conftest.py) yields a driver whose window
is :data:`WINDOW` pixels, quit after the test whatever happens. Waiting is selenium's
``WebDriverWait`` (:func:`wait_for`, :func:`wait_for_js`), never a sleep loop.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, TypeVar

import pytest

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

#: Debian's browser and its driver (packages ``chromium`` and ``chromium-driver``).
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
#: Window (and viewport) size of the tests' browser, in CSS pixels at scale 1.
WINDOW = (1400, 1000)
#: How to get them, as the failure says.
INSTALL = ("apt-get update && apt-get install -y chromium chromium-driver "
           "(Debian's packages; scripts/test does it), and pip install selenium "
           "(setup.py's `test` extra)")

T = TypeVar("T")


class BrowserMissing(RuntimeError):
    """Chromium, its driver or selenium is not installed."""


def missing(chromium: str = CHROMIUM, chromedriver: str = CHROMEDRIVER) -> str | None:
    """Why the browser cannot start (what is missing, how to install it), or None."""
    absent = [path for path in (chromium, chromedriver) if not os.access(path, os.X_OK)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        absent.append("the Python package selenium")
    if not absent:
        return None
    return f"the browser tests need {' and '.join(absent)}: install them with {INSTALL}"


@contextlib.contextmanager
def chromium(size: tuple[int, int] = WINDOW, chromium: str = CHROMIUM,
             chromedriver: str = CHROMEDRIVER) -> Iterator[WebDriver]:
    """A headless chromium of ``size`` (width, height), quit on leaving however it is left.
    Raises :class:`BrowserMissing` if chromium, chromedriver or selenium is not installed."""
    why = missing(chromium, chromedriver)
    if why is not None:
        raise BrowserMissing(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = chromium
    width, height = size
    for argument in ("--headless=new", f"--window-size={width},{height}",
                     "--force-device-scale-factor=1", "--hide-scrollbars",
                     # CI runs as root, where chromium refuses its sandbox; the tests load
                     # only their own pages from loopback.
                     "--no-sandbox",
                     # Containers have a small /dev/shm, which crashes tabs.
                     "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                     "--disable-extensions", "--disable-background-networking"):
        options.add_argument(argument)
    # A driver path in the Service: selenium skips selenium-manager (no download).
    service = Service(executable_path=chromedriver)
    driver = webdriver.Chrome(service=service, options=options)
    try:
        set_viewport(driver, width, height)
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    """A headless chromium (:func:`chromium`), quit after the test; the test fails if it is
    not installed."""
    why = missing()
    if why is not None:
        pytest.fail(why, pytrace=False)
    with chromium() as driver:
        yield driver


def wait_for(driver: WebDriver, condition: Callable[[WebDriver], T], timeout: float = 10.0,
             what: str = "") -> T:
    """The first truthy value of ``condition(driver)``, polled by selenium's
    ``WebDriverWait``; a ``TimeoutException`` naming ``what`` after ``timeout`` seconds."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(
        condition, f"not within {timeout} s: {what or condition}")


def wait_for_js(driver: WebDriver, expression: str, timeout: float = 10.0) -> Any:
    """The first truthy value of the JavaScript ``expression`` in the page."""
    return wait_for(driver, lambda d: d.execute_script(f"return ({expression});"), timeout,
                    expression)


def set_viewport(driver: WebDriver, width: int, height: int) -> None:
    """Make the page's viewport ``width`` × ``height`` CSS pixels: headless chromium's
    window counts some height (143 px in chromium 156) that the page does not get."""
    driver.set_window_size(width, height)
    inner_width, inner_height = driver.execute_script(
        "return [window.innerWidth, window.innerHeight];")
    if (inner_width, inner_height) != (width, height):
        driver.set_window_size(2 * width - inner_width, 2 * height - inner_height)


def screenshot(driver: WebDriver, path: str | os.PathLike[str], full_page: bool = True) -> Path:
    """Save a PNG of the page to ``path`` (its folder made if needed) and return the path.

    ``full_page``: the viewport is first made as tall as the page (at its width), so the PNG
    holds all of it; it keeps that height afterwards. A page that changes its height all
    the time may still be cut: take it right after it renders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3 if full_page else 0):  # again if the page's height changed meanwhile
        width, height, page = driver.execute_script(
            "return [window.innerWidth, window.innerHeight, Math.max("
            "document.documentElement.scrollHeight, document.body ? document.body.scrollHeight"
            " : 0)];")
        if page == height:
            break
        set_viewport(driver, int(width), max(int(page), 100))
    if not driver.save_screenshot(str(path)):
        raise OSError(f"chromium did not write the screenshot {path}")
    return path
