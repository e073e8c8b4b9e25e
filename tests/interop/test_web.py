"""The technician web views in a real browser (issue 10): hw-sim's page of the simulated site
and the gateway's /status page, both served by `unitgate demo`, driven by headless Debian
Chromium. Screenshots at desktop and phone width go to target/screenshots/ (and to docs/
with UPDATE_DOCS_SCREENSHOTS=1).

The demo site (src/demo.rs, config/sim.toml): contact c-NN has PIN 100000 + 7*NN and unit
u-ANN (smart lock lock-ANN) behind gate-1 (zone main-gate), whose strike is coil 0 of the
board gate-relays. `unitgate demo`'s simulated devices listen on fixed ports
(config/sim.toml), so one demo runs for the whole module."""

import json
import re

import pytest
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.common.action_chains import ActionChains

from harness import LOGS
from web import DESKTOP, PHONE, Demo, chromium, screenshot, viewport, wait

GATE_KEYPAD = "gate-1"
GATE_BOARD, GATE_COIL = "gate-relays", 0
WELCOME = "Welcome"
SEE_OFFICE = "Please see office"
# The device a test knocks offline: the other gate's keypad, which no other test uses.
FAULTED = "gate-2"


def KEYBOARD_KEY(i):  # noqa: N802 (a table)
    """Enter for even keys, Space for odd ones: both activate a focused button."""
    return Keys.ENTER if i % 2 == 0 else Keys.SPACE


def pin(n):
    return str(100000 + 7 * n)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    logs = LOGS / "test_web"
    logs.mkdir(parents=True, exist_ok=True)
    d = Demo(tmp_path_factory.mktemp("demo"), logs / "unitgate-demo.log")
    try:
        d.start()
    except BaseException:
        d.stop()
        print(f"\n---- unitgate demo: last lines of {d.process.log} ----\n{d.process.tail()}")
        raise
    yield d
    d.stop()


@pytest.fixture
def browser(request, demo, tmp_path):
    driver = chromium(tmp_path / "chromium-profile")
    yield driver
    failed = any(
        getattr(request.node, f"report_{w}", None) is not None
        and getattr(request.node, f"report_{w}").failed
        for w in ("setup", "call")
    )
    if failed:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
        try:
            print(f"\n---- failure screenshot: {screenshot(driver, f'failed-{name}')}")
            print(f"---- page: {driver.current_url}\n{driver.page_source[:4000]}")
        except Exception as e:  # the browser may be gone
            print(f"\n---- no failure screenshot: {e!r}")
        print(f"\n---- unitgate demo: last lines of its log ----\n{demo.process.tail(40)}")
    driver.quit()


# ---- the hw-sim page ---------------------------------------------------------------------


def open_sim(driver, demo):
    driver.get(demo.sim + "/")
    try:
        wait(driver).until(
            lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-live") == "connected"
        )
    except TimeoutException:
        live = driver.find_element(By.TAG_NAME, "body").get_attribute("data-live")
        raise AssertionError(f"hw-sim page: body data-live is {live!r}, not 'connected'")


def key_button(driver, keypad, k):
    return driver.find_element(
        By.CSS_SELECTOR, f'[data-keypad="{keypad}"] button[aria-label="{keypad} key {k}"]'
    )


def keypad_text(driver, keypad):
    return driver.find_element(
        By.CSS_SELECTOR, f'[data-keypad="{keypad}"] [data-role="keypad-text"]'
    ).text


def type_pin(driver, keypad, code):
    for k in code + "#":
        key_button(driver, keypad, k).click()


def coil(driver, board, n):
    return driver.find_element(By.CSS_SELECTOR, f'[data-board="{board}"] [data-coil="{n}"]')


def wait_text(driver, keypad, text):
    try:
        wait(driver).until(lambda d: text in keypad_text(d, keypad))
    except TimeoutException:
        raise AssertionError(
            f"keypad {keypad}: text {keypad_text(driver, keypad)!r}, never {text!r}"
        )


def unit_tile(driver, unit_id):
    """The tile of the demo unit `unit_id` (u-A02): named by the unit, its name or its lock."""
    short = unit_id.removeprefix("u-")
    sel = ", ".join(
        f'[data-unit="{n}"]' for n in (unit_id, short, f"lock-{short}")
    )
    tiles = driver.find_elements(By.CSS_SELECTOR, sel)
    assert tiles, f"no unit tile matching {sel}"
    return tiles[0]


def test_a_valid_pin_on_the_sim_keypad_pulses_the_gate_and_says_welcome(demo, browser):
    open_sim(browser, demo)
    assert coil(browser, GATE_BOARD, GATE_COIL).get_attribute("data-on") == "false"
    type_pin(browser, GATE_KEYPAD, pin(1))
    # The strike is pulsed (3 s): on, then off again.
    try:
        wait(browser).until(
            lambda d: coil(d, GATE_BOARD, GATE_COIL).get_attribute("data-on") == "true"
        )
    except TimeoutException:
        raise AssertionError(f"{GATE_BOARD} coil {GATE_COIL} never went on")
    wait_text(browser, GATE_KEYPAD, WELCOME)
    wait(browser).until(
        lambda d: coil(d, GATE_BOARD, GATE_COIL).get_attribute("data-on") == "false"
    )


def test_an_overlocked_tenant_is_refused_and_the_unit_shows_overlocked(demo, browser):
    open_sim(browser, demo)
    assert unit_tile(browser, "u-A02").get_attribute("data-state") != "overlocked"
    units = demo.ok("POST", "/v1/contacts/c-02/overlock")
    assert any(
        (u.get("id") if isinstance(u, dict) else u) == "u-A02" for u in units["units"]
    ), units
    try:
        wait(browser).until(
            lambda d: unit_tile(d, "u-A02").get_attribute("data-state") == "overlocked"
        )
    except TimeoutException:
        t = unit_tile(browser, "u-A02")
        raise AssertionError(
            "u-A02's tile never overlocked: "
            + str({a: t.get_attribute(a) for a in ("data-unit", "data-state", "data-lock", "data-overlock")})
        )
    # Block A units are on smart locks (no overlock coil): the lock itself is overlocked.
    assert unit_tile(browser, "u-A02").get_attribute("data-lock") == "overlocked"
    type_pin(browser, GATE_KEYPAD, pin(2))
    wait_text(browser, GATE_KEYPAD, SEE_OFFICE)
    assert coil(browser, GATE_BOARD, GATE_COIL).get_attribute("data-on") == "false"


def test_the_sim_keypad_works_from_the_keyboard(demo, browser):
    open_sim(browser, demo)
    seq = 0
    while True:  # the last event so far
        page = demo.ok("GET", f"/v1/events?after={seq}&limit=1000")
        if not page["events"]:
            break
        seq = page["next_after"]
    code = pin(3)
    for i, k in enumerate(code + "#"):
        button = key_button(browser, GATE_KEYPAD, k)
        browser.execute_script("arguments[0].focus()", button)
        assert browser.switch_to.active_element == button, f"key {k} takes no focus"
        # Enter for some keys, Space for the others: both activate a button.
        ActionChains(browser).send_keys(KEYBOARD_KEY(i)).perform()
    wait_text(browser, GATE_KEYPAD, WELCOME)

    def granted_c03():
        page = demo.ok("GET", f"/v1/events?after={seq}&limit=1000")
        texts = [json.dumps(e) for e in page["events"]]
        return [t for t in texts if "access.granted" in t and ("c-03" in t or "u-A03" in t)]

    try:
        wait(browser).until(lambda d: granted_c03())
    except TimeoutException:
        raise AssertionError("no access.granted event for c-03 (u-A03) after the keyboard PIN")


# ---- the gateway's /status page ----------------------------------------------------------


def open_status(driver, demo, token):
    driver.get(demo.base + "/status")
    form = wait(driver).until(lambda d: d.find_element(By.ID, "login"))
    wait(driver).until(lambda d: form.is_displayed())
    label = driver.find_element(By.CSS_SELECTOR, 'label[for="token"]')
    assert label.text.strip() == "Access token", label.text
    field = driver.find_element(By.ID, "token")
    assert field.get_attribute("type") == "password"
    field.send_keys(token)
    submit = form.find_element(By.CSS_SELECTOR, 'button[type="submit"], input[type="submit"]')
    assert "Show status" in (submit.text or submit.get_attribute("value")), submit.text
    submit.click()


def loaded(driver):
    return driver.find_element(By.TAG_NAME, "main").get_attribute("data-loaded") == "true"


def device_online(driver, device):
    rows = driver.find_elements(By.CSS_SELECTOR, f'tr[data-device="{device}"]')
    return rows[0].get_attribute("data-online") if rows else None


def fault_switch(driver, device):
    return driver.find_element(
        By.CSS_SELECTOR, f'[data-fault-device="{device}"][data-fault-kind="offline"]'
    )


def fault_on(el):
    if el.get_attribute("type") == "checkbox":
        return el.is_selected()
    return el.get_attribute("aria-pressed") == "true"


def test_a_wrong_token_shows_the_login_error_and_no_data(demo, browser):
    open_status(browser, demo, "not-the-token")
    err = '[data-role="login-error"]'
    try:
        wait(browser).until(
            lambda d: (t := d.find_element(By.CSS_SELECTOR, err).text.strip())
            and "Checking" not in t
        )
    except TimeoutException:
        raise AssertionError("no login error for a wrong token")
    assert not loaded(browser)
    assert browser.find_elements(By.CSS_SELECTOR, "tr[data-device]") == []
    assert browser.find_element(By.ID, "login").is_displayed()


def test_a_faulted_device_goes_offline_on_the_status_page_and_back(demo, browser):
    open_status(browser, demo, demo.token)
    wait(browser).until(loaded)
    wait(browser).until(lambda d: device_online(d, FAULTED) == "true")
    status_tab = browser.current_window_handle
    browser.switch_to.new_window("tab")
    open_sim(browser, demo)
    sim_tab = browser.current_window_handle
    switch = fault_switch(browser, FAULTED)
    assert not fault_on(switch)
    try:
        switch.click()
        wait(browser).until(lambda d: fault_on(fault_switch(d, FAULTED)))
        browser.switch_to.window(status_tab)
        try:
            wait(browser, 30).until(lambda d: device_online(d, FAULTED) == "false")
        except TimeoutException:
            raise AssertionError(
                f"{FAULTED}: data-online {device_online(browser, FAULTED)!r} with the fault on"
            )
    finally:
        browser.switch_to.window(sim_tab)
        switch = fault_switch(browser, FAULTED)
        if fault_on(switch):
            switch.click()
        wait(browser).until(lambda d: not fault_on(fault_switch(d, FAULTED)))
    browser.switch_to.window(status_tab)
    try:
        # The gateway retries a lost keypad with a capped backoff (2 s doubling to 60 s,
        # src/devices/osdp.rs): back online within that cap plus a rebuild.
        wait(browser, 75).until(lambda d: device_online(d, FAULTED) == "true")
    except TimeoutException:
        raise AssertionError(f"{FAULTED} never came back online on the status page")


# ---- screenshots -------------------------------------------------------------------------


SIZES = pytest.mark.parametrize("size,width", [(DESKTOP, "desktop"), (PHONE, "phone")])


def scrolls_sideways(driver):
    """Whether the page as a whole scrolls horizontally (a table may scroll inside itself)."""
    return driver.execute_script(
        "return document.documentElement.scrollWidth > window.innerWidth + 1"
    )


@SIZES
def test_screenshots_of_the_sim_page(demo, browser, size, width):
    viewport(browser, size)
    open_sim(browser, demo)
    wait(browser).until(lambda d: d.find_elements(By.CSS_SELECTOR, "[data-keypad]"))
    wait(browser).until(lambda d: d.find_elements(By.CSS_SELECTOR, "[data-unit]"))
    screenshot(browser, f"hw-sim-{width}")
    assert not scrolls_sideways(browser), f"the hw-sim page scrolls sideways at {size}"


@SIZES
def test_screenshots_of_the_status_page(demo, browser, size, width):
    viewport(browser, size)
    open_status(browser, demo, demo.token)
    wait(browser).until(loaded)
    wait(browser).until(lambda d: d.find_elements(By.CSS_SELECTOR, "tr[data-device]"))
    wait(browser).until(lambda d: d.find_elements(By.CSS_SELECTOR, "[data-status-count]"))
    screenshot(browser, f"status-{width}")
    assert not scrolls_sideways(browser), f"the status page scrolls sideways at {size}"
