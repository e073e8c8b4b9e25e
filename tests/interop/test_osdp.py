"""The Python libosdp package as the gate keypad (OSDP PD) on a socat pty pair, in plaintext
(the gateway's install mode) and over the secure channel (the same SCBK on both sides),
with pymodbus as the board holding the gate strike: a tenant's PIN + '#' pulses the strike
and the PD is sent a green LED, a short beep and "Welcome"; a wrong PIN a red LED, a long
beep and "Invalid code", and the strike is not touched (DESIGN.md §4)."""

import secrets

import pytest
from osdp import Command, CommandLEDColor

from harness import free_port, until
from modbus_peer import ModbusPeer
from osdp_peer import KeypadPeer
from serial_pair import SerialPair

KEYPAD = "gate-1"
BOARD = "relay-1"
STRIKE = 0
PULSE_MS = 600
ADDRESS = 5  # not 0: the gateway must poll the address it was given
TENANT_PIN = "130363"  # contact c2 (gateway.py seed), tenant of u1 below


def devices_toml(board_port, line, scbk):
    lines = [
        "[[devices.relay_boards]]",
        f'id = "{BOARD}"',
        'transport = "tcp"',
        f'address = "127.0.0.1:{board_port}"',
        "coils = 8",
        "inputs = 8",
        "poll_ms = 100",
        "[[devices.keypads]]",
        f'id = "{KEYPAD}"',
        'zone = "main-gate"',
        f'port = "{line}"',
        "baud = 115200",
        f"address = {ADDRESS}",
        f'gate = {{ board = "{BOARD}", coil = {STRIKE} }}',
        f"pulse_ms = {PULSE_MS}",
    ]
    if scbk:
        lines.append(f'scbk = "{scbk.hex()}"')
    else:
        lines.append("install_mode = true")
    return "\n".join(lines) + "\n"


def start(site, secure):
    board_port = free_port()
    board = site.peer(ModbusPeer("tcp", board_port, 1, coils=8, inputs=8))
    line = site.peer(SerialPair(site.tmp / "rs485", site.logs / "socat.log"))
    scbk = secrets.token_bytes(16) if secure else None
    pad = site.peer(KeypadPeer(line.a, ADDRESS, scbk))
    gw = site.gateway(None, devices=devices_toml(board_port, line.b, scbk))
    gw.ok("POST", "/v1/units/u1/grant_access", {"tenancy_id": "t-started"})

    def keypad_online():
        pads = [d for d in gw.ok("GET", "/v1/devices") if d["id"] == KEYPAD]
        return pads and pads[0]["online"] and pads[0]

    device = until("GET /v1/devices shows the keypad online", keypad_online)
    assert device["kind"] == "keypad" and device["zone"] == "main-gate", device
    assert pad.online(), "the PD does not see the control panel"
    assert pad.secure() == secure, "secure channel state on the PD side"
    # At start the gateway switches every strike off (a pulse cut by a crash must not
    # leave a gate open): that write comes before any key press.
    until("the strike switched off at start", lambda: board.coil_writes(STRIKE))
    assert board.coil_writes(STRIKE) == [(board.coil_writes(STRIKE)[0][0], False)]
    return gw, board, pad


def decisions(gw, after, kind):
    return [e for e in gw.events_after(after) if e["type"] == kind]


@pytest.mark.parametrize("channel", ["plain", "secure"])
def test_keypad_pin_opens_gate_and_shows_outcome(hardware_site, channel):
    gw, board, pad = start(hardware_site, secure=channel == "secure")
    after = gw.last_seq()
    pad.take_commands()

    pad.press(TENANT_PIN + "#")
    shown = pad.wait_feedback("the PD gets LED, buzzer and text for the grant")
    led, buzzer, text = shown[Command.LED], shown[Command.Buzzer], shown[Command.Text]
    assert led["on_color"] == CommandLEDColor.Green, led
    assert buzzer["on_count"] > 0, buzzer
    assert text["data"] == "Welcome", text

    def pulsed():
        w = board.coil_writes(STRIKE)[1:]
        return len(w) >= 2 and w

    writes = until("the strike coil switched on then off", pulsed)
    (t_on, on), (t_off, off) = writes[0], writes[1]
    assert (on, off) == (True, False), writes
    held_ms = (t_off - t_on) * 1000
    assert PULSE_MS * 0.9 <= held_ms <= PULSE_MS + 2000, f"strike held {held_ms:.0f} ms"
    assert board.coils()[STRIKE] is False

    granted = until(
        "access.granted in the event log", lambda: decisions(gw, after, "access.granted")
    )
    assert granted[0]["data"]["contact_id"] == "c2"
    assert granted[0]["data"]["keypad"] == KEYPAD
    assert "130363" not in str(granted[0]), "the PIN leaked into the event log"

    # A wrong PIN: denied, red LED, long beep, the reason as text; no write to the strike.
    after = gw.last_seq()
    pad.press("999999#")
    shown = pad.wait_feedback("the PD gets LED, buzzer and text for the denial")
    led, buzzer, text = shown[Command.LED], shown[Command.Buzzer], shown[Command.Text]
    assert led["on_color"] == CommandLEDColor.Red, led
    assert buzzer["on_count"] > 0, buzzer
    assert text["data"] == "Invalid code", text
    denied = until("access.denied in the event log", lambda: decisions(gw, after, "access.denied"))
    assert denied[0]["data"]["reason"] == "invalid_code", denied[0]
    assert len(board.coil_writes(STRIKE)) == 3, "the strike moved for a wrong PIN"


def test_keypad_with_another_scbk_stays_offline_and_says_why(hardware_site):
    """The PD holds one key, the gateway another: the secure channel never comes up, no key
    press gets through, and GET /v1/devices names the key as the cause."""
    site = hardware_site
    board_port = free_port()
    site.peer(ModbusPeer("tcp", board_port, 1, coils=8, inputs=8))
    line = site.peer(SerialPair(site.tmp / "rs485", site.logs / "socat.log"))
    pad = site.peer(KeypadPeer(line.a, ADDRESS, secrets.token_bytes(16)))
    gw = site.gateway(None, devices=devices_toml(board_port, line.b, secrets.token_bytes(16)))

    def keypad_error():
        pad_state = [d for d in gw.ok("GET", "/v1/devices") if d["id"] == KEYPAD][0]
        assert not pad_state["online"], pad_state
        return pad_state["last_error"] and "scbk" in pad_state["last_error"] and pad_state

    state = until("the keypad reported offline with a key mismatch", keypad_error)
    assert "secure channel" in state["last_error"], state
    assert not pad.secure()
