"""The browser harness (tests/support/browser.py) works: Debian's chromium, driven through
Debian's chromedriver, loads a page that Tornado serves on loopback, runs its script, clicks
and reads the DOM back; screenshots are PNGs of the whole page. No broker is involved: the
harness is tested where its users (the dashboard's tests) are."""

from __future__ import annotations

import asyncio
import contextlib
import struct
import subprocess
import threading
from pathlib import Path
from typing import Iterator

import pytest
import tornado.httpserver
import tornado.netutil
import tornado.web

from tests.support import browser as harness
from tests.support.browser import wait_for, wait_for_js

PAGE = """<!doctype html>
<html><head><title>harness</title></head>
<body data-clicks="0">
<button id="more">more</button>
<p id="out">nothing yet</p>
<div style="height: 2400px">tall</div>
<script>
document.getElementById("more").addEventListener("click", () => {
  const clicks = Number(document.body.dataset.clicks) + 1;
  document.body.dataset.clicks = String(clicks);
  document.getElementById("out").textContent = `clicked ${clicks} times`;
});
</script>
</body></html>
"""


class Page(tornado.web.RequestHandler):
    served = 0

    def get(self) -> None:
        Page.served += 1
        self.write(PAGE)


@contextlib.contextmanager
def serving(app: tornado.web.Application) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1, a free port, from a thread of its own; yield its URL."""
    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
    port = sockets[0].getsockname()[1]
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        server = tornado.httpserver.HTTPServer(app)
        server.add_sockets(sockets)
        loop.call_soon(ready.set)
        loop.run_forever()
        server.stop()
        loop.run_until_complete(server.close_all_connections())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(10), "the page server did not start"
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture
def page_url() -> Iterator[str]:
    Page.served = 0
    with serving(tornado.web.Application([(r"/", Page)])) as url:
        yield url


def test_a_page_is_loaded_a_button_clicked_and_the_dom_read(browser, page_url):
    browser.get(page_url)
    assert Page.served == 1
    assert browser.execute_script("return [innerWidth, innerHeight];") == list(harness.WINDOW)
    button = wait_for(browser, lambda d: d.find_element("id", "more"), what="the button")
    assert browser.find_element("id", "out").text == "nothing yet"
    button.click()
    button.click()
    wait_for_js(browser, "document.body.dataset.clicks === '2'")
    assert browser.find_element("id", "out").text == "clicked 2 times"
    assert browser.find_element("css selector", "body").get_attribute("data-clicks") == "2"


def test_waiting_for_what_never_comes_times_out_naming_it(browser, page_url):
    from selenium.common.exceptions import TimeoutException

    browser.get(page_url)
    with pytest.raises(TimeoutException, match="never"):
        wait_for_js(browser, "document.body.dataset.never", timeout=0.3)


def test_a_screenshot_is_a_png_of_the_whole_page_at_the_window_s_width(browser, page_url,
                                                                      tmp_path):
    browser.get(page_url)
    path = harness.screenshot(browser, tmp_path / "shots" / "page.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    page_height = browser.execute_script("return document.documentElement.scrollHeight;")
    assert (width, height) == (harness.WINDOW[0], page_height)
    assert height > 2400


def test_it_is_debian_s_chromium_and_driver_and_selenium_manager_never_runs(monkeypatch):
    from selenium.webdriver.common.selenium_manager import SeleniumManager

    def refuse(*args, **kwargs):
        raise AssertionError("selenium-manager was asked for a driver")

    monkeypatch.setattr(SeleniumManager, "binary_paths", refuse)
    with harness.chromium() as driver:
        assert driver.service.path == harness.CHROMEDRIVER
        version = driver.capabilities["browserVersion"]
    debian = subprocess.run([harness.CHROMIUM, "--version"], capture_output=True, text=True,
                            check=True, timeout=60).stdout
    assert version in debian


def test_a_missing_browser_fails_saying_how_to_install_it(tmp_path: Path):
    absent = str(tmp_path / "chromium")
    why = harness.missing(chromium=absent)
    assert why is not None and absent in why and "apt-get" in why and "chromium-driver" in why
    with pytest.raises(harness.BrowserMissing, match="apt-get"):
        with harness.chromium(chromium=absent):
            pass
    assert harness.missing() is None
