"""The browser tests' peers: `unitgate demo` (the gateway with its simulated hardware and
embedded broker, on free ports) and headless Debian Chromium driven by chromium-driver
through Selenium, offline (no Selenium Manager, no downloads)."""

import os
import secrets
import shutil
import urllib.request
from pathlib import Path

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait

from gateway import binary
from harness import REPO, Process, free_port, http_json, until

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SCREENSHOTS = REPO / "target" / "screenshots"
DOCS = REPO / "docs"
# How long one outcome on a page may take (the gateway polls devices and the status page
# reads every 2 s).
PAGE_WAIT = 20.0
DESKTOP = (1280, 900)
PHONE = (390, 844)


class Demo:
    """`unitgate demo` on free ports with a known admin token and a temporary data dir."""

    def __init__(self, workdir, log):
        self.dir = Path(workdir)
        self.token = secrets.token_urlsafe(24)
        self.port = free_port()
        self.sim_port = free_port()
        self.mqtt_port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.sim = f"http://127.0.0.1:{self.sim_port}"
        env = dict(os.environ, NO_COLOR="1")
        self.process = Process(
            "unitgate-demo",
            [
                binary(),
                "demo",
                "--listen", f"127.0.0.1:{self.port}",
                "--sim-listen", f"127.0.0.1:{self.sim_port}",
                "--mqtt-listen", f"127.0.0.1:{self.mqtt_port}",
                # `=`: a token may start with "-".
                f"--token={self.token}",
                "--data-dir", self.dir / "data",
            ],
            log,
            env=env,
        )

    def start(self):
        self.process.start()
        until("the demo gateway answers /healthz", lambda: self._answers(self.base + "/healthz"))
        until("hw-sim's control API answers /healthz", lambda: self._answers(self.sim + "/healthz"))
        # The gateway reaches every simulated device (keypads over OSDP, boards over Modbus,
        # the lock API) before a test presses a key.
        until("every demo device online", self._all_online, timeout=60)
        return self

    def _answers(self, url):
        assert self.process.running(), f"unitgate demo exited:\n{self.process.tail()}"
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def devices(self):
        body = self.ok("GET", "/v1/devices")
        return body["devices"] if isinstance(body, dict) else body

    def _all_online(self):
        assert self.process.running(), f"unitgate demo exited:\n{self.process.tail()}"
        devices = self.devices()
        return devices and all(d.get("online") is True for d in devices)

    def call(self, method, path, body=None):
        """(status, JSON body or None), as the demo admin."""
        return http_json(self.base + path, method, body, token=self.token)

    def ok(self, method, path, body=None):
        status, answer = self.call(method, path, body)
        assert 200 <= status < 300, f"{method} {path}: {status} {answer}"
        return answer

    def sim_call(self, method, path, body=None):
        """hw-sim's control API (no auth): (status, JSON body or None)."""
        return http_json(self.sim + path, method, body)

    def stop(self):
        return self.process.stop(grace=10)


def chromium(profile_dir):
    """Headless Debian Chromium through Debian's chromium-driver; nothing is downloaded."""
    # Selenium Manager must not look for (or fetch) a browser or driver: both are given.
    os.environ.setdefault("SE_OFFLINE", "true")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--window-size={DESKTOP[0]},{DESKTOP[1]}",
        f"--user-data-dir={profile_dir}",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(PAGE_WAIT)
    driver.set_script_timeout(PAGE_WAIT)
    return driver


def wait(driver, timeout=PAGE_WAIT):
    """A WebDriverWait polling often enough to see a 3 s gate pulse. The pages re-render
    their rows and tiles as data comes in, so an element read a moment ago may be gone:
    that is a retry, not a failure."""
    return WebDriverWait(
        driver,
        timeout,
        poll_frequency=0.05,
        ignored_exceptions=(StaleElementReferenceException,),
    )


def viewport(driver, size):
    """Sets the page's viewport (not the window) to `size` = (width, height)."""
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": size[0], "height": size[1], "deviceScaleFactor": 1, "mobile": size[0] < 600},
    )


def screenshot(driver, name):
    """Saves the whole page as target/screenshots/<name>.png; copies it to docs/ too when
    UPDATE_DOCS_SCREENSHOTS=1 (so CI does not dirty the tree)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    path.write_bytes(driver.get_screenshot_as_png())
    if os.environ.get("UPDATE_DOCS_SCREENSHOTS") == "1" and not name.startswith("failed-"):
        DOCS.mkdir(exist_ok=True)
        shutil.copyfile(path, DOCS / f"{name}.png")
    return path
