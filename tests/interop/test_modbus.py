"""pymodbus as the relay board, over Modbus TCP and Modbus RTU (a socat pty pair): the
overlock relays follow DESIGN.md §4 (coil on unless the unit is occupied), read from
pymodbus's own datastore; a door sensor input set in pymodbus reaches the gateway's event
log as `door.alarm` when the unit is not occupied."""

import pytest

from harness import free_port, until
from modbus_peer import ModbusPeer
from serial_pair import SerialPair

BOARD = "relay-1"
COILS = 8
INPUTS = 8
# Unit -> its overlock relay coil and its door sensor input. Coil 0 and input 0 are left
# unbound: nothing may switch them.
RELAY = {"u1": 1, "u2": 2, "u3": 3}
DOOR = {"u1": 1, "u2": 2}


def board_toml(transport, where, unit_id):
    lines = [
        "[[devices.relay_boards]]",
        f'id = "{BOARD}"',
        f'transport = "{transport}"',
        f"unit_id = {unit_id}",
        f"coils = {COILS}",
        f"inputs = {INPUTS}",
        "timeout_ms = 500",
        "poll_ms = 100",
    ]
    if transport == "tcp":
        lines.append(f'address = "{where}"')
    else:
        lines += [f'port = "{where}"', "baud = 115200"]
    return "\n".join(lines) + "\n"


def start(site, transport):
    """pymodbus on `transport`, the gateway with one board at it, units bound."""
    unit_id = 17  # not the default 1: the gateway must address the board it was told to
    if transport == "tcp":
        port = free_port()
        board = site.peer(ModbusPeer("tcp", port, unit_id, coils=16, inputs=16))
        where = f"127.0.0.1:{port}"
    else:
        line = site.peer(SerialPair(site.tmp / "rs485", site.logs / "socat.log"))
        board = site.peer(ModbusPeer("rtu", line.a, unit_id, coils=16, inputs=16))
        where = line.b
    gw = site.gateway(None, devices=board_toml(transport, where, unit_id))
    for unit, coil in RELAY.items():
        binding = {"lock": {"kind": "relay", "board": BOARD, "coil": coil}}
        if unit in DOOR:
            binding["door_sensor"] = {"board": BOARD, "input": DOOR[unit]}
        gw.ok("PATCH", f"/v1/units/{unit}", {"unit": binding})
    return gw, board


def expect_coils(board, on, what):
    """Waits until pymodbus holds exactly the coils `on` switched on."""
    want = [i in on for i in range(COILS)]
    seen = []

    def matches():
        seen[:] = [board.coils()[:COILS]]
        return seen[0] == want

    try:
        until(what, matches)
    except AssertionError as e:
        raise AssertionError(f"{e}: coils {seen}, want {want}") from None
    assert not any(board.coils()[COILS:]), "a coil beyond the configured count moved"


@pytest.mark.parametrize("transport", ["tcp", "rtu"])
def test_overlock_relays_follow_unit_status(hardware_site, transport):
    gw, board = start(hardware_site, transport)
    # §4: available / reserved / unavailable -> relay on.
    expect_coils(board, {1, 2, 3}, "every bound unit is free: its overlock relay on")

    gw.ok("POST", "/v1/units/u1/grant_access", {"tenancy_id": "t-started"})
    gw.ok("POST", "/v1/units/u2/reserve", {"tenancy_id": "t-future"})
    expect_coils(board, {2, 3}, "u1 occupied: relay 1 off; u2 reserved: relay 2 on")

    answer = gw.ok("POST", "/v1/contacts/c2/overlock")
    assert [u["id"] for u in answer["units"]] == ["u1"]
    assert gw.unit("u1")["unit"]["status"] == "overlocked"
    expect_coils(board, {1, 2, 3}, "u1 overlocked: relay 1 on")

    gw.ok("POST", "/v1/contacts/c2/remove_overlock")
    assert gw.unit("u1")["unit"]["status"] == "occupied"
    expect_coils(board, {2, 3}, "overlock removed: relay 1 off again")

    gw.ok("POST", "/v1/units/u1/deallocate", {})
    expect_coils(board, {1, 2, 3}, "u1 deallocated: relay 1 on")

    devices = {d["id"]: d for d in gw.ok("GET", "/v1/devices")}
    assert devices[BOARD]["kind"] == "relay_board"
    assert devices[BOARD]["online"] is True, devices[BOARD]


@pytest.mark.parametrize("transport", ["tcp", "rtu"])
def test_door_sensor_input_raises_door_alarm(hardware_site, transport):
    gw, board = start(hardware_site, transport)
    gw.ok("POST", "/v1/units/u1/grant_access", {"tenancy_id": "t-started"})
    expect_coils(board, {2, 3}, "u1 occupied")
    after = gw.last_seq()

    # The occupied unit's door first, then the free unit's: a poll that sees input 2 on
    # sees input 1 on as well, so when u2's alarm is logged u1's door has been judged too.
    board.set_input(DOOR["u1"], True)
    board.set_input(DOOR["u2"], True)

    def alarms():
        return [e for e in gw.events_after(after) if e["type"] == "door.alarm"]

    found = until("door.alarm for u2's door in GET /v1/events", alarms)
    assert len(found) == 1, found
    data = found[0]["data"]
    assert data["unit_id"] == "u2"
    assert data["status"] == "available"
    assert data["board"] == BOARD and data["input"] == DOOR["u2"]
