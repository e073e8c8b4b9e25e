"""The gateway's MQTT link against Mosquitto, with paho-mqtt clients playing the cloud
(DESIGN.md §3), for a gateway on MQTT 5 and one on MQTT 3.1.1: every operation, bad
payloads, signed commands, broker authentication, retained state and the last will, and
event delivery across broker and gateway restarts."""

import json
import re

from gateway import CONTACTS, SITE, UNITS, tenancies, topic, unit_body
from harness import REPO, until
from mqtt_cloud import Cloud, envelope, new_key, sign, wait_online


def operations_in_source():
    """The operations the gateway accepts (`OPERATIONS` in src/cloud/dispatch.rs), so an
    operation added there without a test here fails this suite."""
    text = (REPO / "src/cloud/dispatch.rs").read_text()
    block = re.search(r"pub const OPERATIONS: &\[&str\] = &\[(.*?)\];", text, re.S)
    return set(re.findall(r'"([a-z_]+)"', block.group(1)))


def assert_ok(reply, request_id):
    """`{"request_id", "ok": true, "result"}` and nothing else; returns the result."""
    assert set(reply) == {"request_id", "ok", "result"}, reply
    assert reply["ok"] is True, reply
    assert reply["request_id"] == request_id, reply
    return reply["result"]


def assert_error(reply, code, request_id=None):
    """`{"request_id", "ok": false, "error": {"code", "message", "details", "request_id"}}`
    with `code`; returns the error object."""
    assert set(reply) == {"request_id", "ok", "error"}, reply
    assert reply["ok"] is False, reply
    e = reply["error"]
    assert e["code"] == code, reply
    assert isinstance(e["message"], str) and e["message"], reply
    assert isinstance(e["details"], list), reply
    for d in e["details"]:
        assert isinstance(d["field"], str) and isinstance(d["message"], str), reply
    assert isinstance(e["request_id"], str) and e["request_id"], reply
    if request_id is not None:
        assert reply["request_id"] == request_id, reply
        assert e["request_id"] == request_id, reply
    return e


def snapshot_body():
    """The whole replica as the seed made it, plus unit u5."""
    units = [dict(unit_body(u, u.upper(), i), status="available") for i, u in enumerate(UNITS)]
    units.append(dict(unit_body("u5", "U5", 5), status="available"))
    return {
        "unit_types": [{"id": "small", "name": "Small"}],
        "units": units,
        "contacts": [
            {"id": c, "name": f"Contact {c}", "access_code": pin} for c, pin in CONTACTS.items()
        ],
        "tenancies": [
            {"id": t, "contact_id": c, "start_date": start.isoformat()}
            for t, (c, start) in tenancies().items()
        ],
        "allocations": [],
    }


# ---- 1. every operation ------------------------------------------------------------------


def test_every_operation_answers_in_the_contract_shape(site, protocol):
    gw = site.gateway(protocol)
    # MQTT 5 replies come on the cloud's response topic (under reply/), 3.1.1 ones on
    # reply/{request_id}.
    cloud = site.cloud(protocol, [topic("status"), topic("reply/#")])
    wait_online(cloud)
    covered = set()

    def ok(operation, body):
        covered.add(operation)
        return assert_ok(cloud.command(operation, body), body["request_id"])

    # The cloud's initial sync: the whole replica, applied as a diff.
    body = dict(snapshot_body(), request_id="op-snapshot")
    result = ok("snapshot", body)
    assert result["snapshot"]["units"]["created"] == 1, result
    assert gw.unit("u5")["unit"]["status"] == "available"

    # Upserts from the cloud.
    result = ok("upsert_unit_type", {"request_id": "op-1", "id": "big", "name": "Big"})
    assert result["unit_type"]["id"] == "big", result
    reply = cloud.command(
        "upsert_contact",
        {"request_id": "op-2", "id": "c9", "name": "Nine", "access_code": "987654"},
    )
    covered.add("upsert_contact")
    assert assert_ok(reply, "op-2")["contact"]["id"] == "c9"
    assert "987654" not in json.dumps(reply), "the PIN never comes back"
    start = tenancies()["t-started"][1].isoformat()
    body = {"request_id": "op-3", "id": "t9", "contact_id": "c9", "start_date": start}
    assert ok("upsert_tenancy", body)["tenancy"]["id"] == "t9"

    # Units.
    new = {k: v for k, v in unit_body("x", "N1,N2", 9).items() if k != "id"}
    result = ok("create_units", {"request_id": "op-4", "unit": new})
    assert sorted(u["name"] for u in result["units"]) == ["N1", "N2"], result
    result = ok("bulk_create_units", {"request_id": "op-5", "units": [unit_body("u6", "U6", 6)]})
    assert [u["id"] for u in result["units"]] == ["u6"], result
    result = ok("update_unit", {"request_id": "op-6", "unit_id": "u6", "unit": {"floor": 2}})
    assert result["unit"]["floor"] == 2, result
    ok("bulk_update_units", {"request_id": "op-7", "units": [{"id": "u6", "floor": 3}]})
    assert gw.unit("u6")["unit"]["floor"] == 3

    # Allocations: the unit really changes, as the HTTP API shows it.
    result = ok("grant_access", {"request_id": "op-8", "unit_id": "u1", "tenancy_id": "t9"})
    assert result["unit"]["status"] == "occupied", result
    assert gw.unit("u1")["unit"]["status"] == "occupied"
    result = ok("overlock", {"request_id": "op-9", "contact_id": "c9"})
    assert [u["status"] for u in result["units"]] == ["overlocked"], result
    result = ok("remove_overlock", {"request_id": "op-10", "contact_id": "c9"})
    assert [u["status"] for u in result["units"]] == ["occupied"], result
    ok("payment_failed", {"request_id": "op-11", "contact_id": "c9"})
    result = ok("reserve", {"request_id": "op-12", "unit_id": "u2", "tenancy_id": "t-future"})
    assert result["unit"]["status"] == "reserved", result
    result = ok("deallocate", {"request_id": "op-13", "unit_id": "u2"})
    assert result["unit"]["status"] == "available", result
    result = ok("set_status", {"request_id": "op-14", "unit_id": "u3", "status": "unavailable"})
    assert result["unit"]["status"] == "unavailable", result

    # Reads.
    assert ok("get_unit", {"request_id": "op-15", "unit_id": "u1"}) == gw.unit("u1")
    result = ok("list_units", {"request_id": "op-16", "status": "available", "limit": 2})
    assert len(result["units"]) == 2, result
    assert {u["status"] for u in result["units"]} == {"available"}, result
    pagination = result["meta"]["pagination"]
    assert pagination["per_page"] == 2 and pagination["current_page"] == 1, result
    assert pagination["total_entries"] == 6, result  # u2, u4, u5, u6, N1, N2
    result = ok("list_available_units", {"request_id": "op-17"})
    assert len(result["units"]) == 6, result
    result = ok("events", {"request_id": "op-18", "after": 0, "limit": 5})
    assert [e["seq"] for e in result["events"]] == [1, 2, 3, 4, 5], result
    for e in result["events"]:
        assert {"seq", "id", "type", "occurred_at", "site_id", "data"} <= set(e), e
        assert e["site_id"] == SITE, e
    assert result["next_after"] == 5, result
    assert ok("devices", {"request_id": "op-19"}) == [], "this site has no devices"
    result = ok("status", {"request_id": "op-20"})
    assert result["site_id"] == SITE, result

    # Idempotency: the same request id answers the first result and changes nothing.
    before = gw.last_seq()
    again = ok("grant_access", {"request_id": "op-8", "unit_id": "u1", "tenancy_id": "t9"})
    assert again["unit"]["status"] == "occupied"
    assert gw.last_seq() == before

    # Refusals, in the contract's error shape with the request's id.
    reply = cloud.command("drop_tables", {"request_id": "err-1"})
    assert_error(reply, "unknown_operation", "err-1")
    reply = cloud.command("get_unit", {"request_id": "err-2", "unit_id": "nope"})
    assert_error(reply, "not_found", "err-2")
    body = {"request_id": "err-3", "unit_id": "u1", "tenancy_id": "t-future"}
    assert_error(cloud.command("reserve", body), "invalid_transition", "err-3")
    reply = cloud.command("reserve", {"request_id": "err-4", "unit_id": "u2"})
    e = assert_error(reply, "validation_error", "err-4")
    assert [d["field"] for d in e["details"]] == ["tenancy_id"], e
    reply = cloud.command("get_unit", {"request_id": "err-5"})
    e = assert_error(reply, "validation_error", "err-5")
    assert [d["field"] for d in e["details"]] == ["unit_id"], e

    assert covered == operations_in_source(), "operations without an interop test: " + ", ".join(
        sorted(operations_in_source() - covered)
    )


# ---- 2. bad payloads ---------------------------------------------------------------------


def test_bad_payloads_get_error_replies_and_the_gateway_goes_on(site, protocol):
    gw = site.gateway(protocol)
    cloud = site.cloud(protocol, [topic("status"), topic("reply/#")])
    wait_online(cloud)
    before = gw.last_seq()
    oversized = json.dumps(
        {"request_id": "bad-big", "unit_id": "u1", "tenancy_id": "t-started", "pad": "x" * 300_000}
    ).encode()

    # Refusals that carry a usable request id: answered on either protocol.
    cases = [
        ("reserve", b'{"request_id": "bad-1", "unit_id": "u2", "tenancy_id": 5}', "bad-1",
         "validation_error", "tenancy_id"),
        ("get_unit", b'{"request_id": "bad-2", "unit_id": ["u1"]}', "bad-2",
         "validation_error", "unit_id"),
        ("list_units", b'{"request_id": "bad-3", "status": {"in": ["available"]}}', "bad-3",
         "validation_error", "status"),
        ("update_unit", b'{"request_id": "bad-4", "unit_id": "u1", "unit": {"width": "wide"}}',
         "bad-4", "validation_error", None),
        ("grant_access", oversized, "bad-big", "payload_too_large", None),
    ]
    for operation, payload, rid, code, field in cases:
        e = assert_error(cloud.call(operation, payload, rid), code, rid)
        if field:
            assert field in [d["field"] for d in e["details"]], e

    # Unreadable commands: with an MQTT 5 response topic they are answered; on 3.1.1 there
    # is no address to answer (the request id is inside what cannot be read), so only the
    # next good command shows the gateway went on.
    unreadable = [
        (b'{"request_id": "bad-5", ', "malformed_json"),
        (b"", "malformed_json"),
        (b"\xff\xfe\x00", "malformed_json"),
        (b"[1, 2]", "validation_error"),
        (b'{"request_id": 7, "unit_id": "u1"}', "validation_error"),
        (b'"just a string"', "validation_error"),
    ]
    for payload, code in unreadable:
        if protocol == "v5":
            assert_error(cloud.call("reserve", payload, "unknown"), code)
        else:
            cloud.publish(topic("cmd/reserve"), payload)

    reply = cloud.command("get_unit", {"request_id": "good-1", "unit_id": "u1"})
    assert assert_ok(reply, "good-1")["unit"]["status"] == "available"
    assert gw.last_seq() == before, "no bad command changed anything"
    replies = {m.topic.rsplit("/", 1)[1] for m in cloud.seen if "/reply/" in m.topic}
    if protocol != "v5":
        assert replies == {"bad-1", "bad-2", "bad-3", "bad-4", "bad-big", "good-1"}, replies


# ---- 3. signed commands --------------------------------------------------------------------


def test_signed_commands_checked_by_an_independent_hmac(site, protocol):
    full, narrow = new_key(), new_key()
    gw = site.gateway(
        protocol,
        signed_clients=[("ops", full, ["*"]), ("reader", narrow, ["get_unit", "list_units"])],
    )
    cloud = site.cloud(protocol, [topic("status"), topic("reply/#")])
    wait_online(cloud)

    def send(operation, rid, request, client="ops", nonce=1, key=full, mac_op=None):
        mac = sign(key, mac_op or operation, nonce, request)
        return cloud.call(operation, envelope(client, nonce, mac, request), rid)

    # Good: the request's own bytes, odd spacing and key order kept, are what is signed.
    req = b'{"unit_id":"u1",   "request_id": "s-1" ,"tenancy_id":"t-started"}'
    good = send("grant_access", "s-1", req, nonce=1)
    assert assert_ok(good, "s-1")["unit"]["status"] == "occupied"

    # Bad signatures: another key, an unknown client, a MAC over another operation, a
    # request changed after signing: all unauthorized, nothing changes.
    req = b'{"request_id": "s-2", "unit_id": "u1"}'
    assert_error(send("deallocate", "s-2", req, nonce=2, key=new_key()), "unauthorized", "s-2")
    assert_error(send("deallocate", "s-2", req, client="ghost", nonce=2), "unauthorized", "s-2")
    assert_error(send("deallocate", "s-2", req, nonce=2, mac_op="get_unit"), "unauthorized")
    mac = sign(full, "deallocate", 2, req)
    tampered = envelope("ops", 2, mac, req.replace(b"u1", b"u2"))
    assert_error(cloud.call("deallocate", tampered, "s-2"), "unauthorized", "s-2")
    assert gw.unit("u1")["unit"]["status"] == "occupied"

    # Replayed: the very same message again is refused, not answered from the idempotency
    # store; and a new request under a used nonce too.
    req = b'{"unit_id":"u1",   "request_id": "s-1" ,"tenancy_id":"t-started"}'
    assert_error(send("grant_access", "s-1", req, nonce=1), "replayed", "s-1")
    req = b'{"request_id": "s-3", "unit_id": "u1"}'
    assert_error(send("get_unit", "s-3", req, nonce=1), "replayed", "s-3")

    # Stale: the nonce window is 63 below the client's highest (README): 100 taken, then 30
    # (never used, too old) refused, 90 (never used, inside the window) taken once.
    assert_ok(send("get_unit", "s-4", b'{"request_id": "s-4", "unit_id": "u1"}', nonce=100), "s-4")
    req = b'{"request_id": "s-5", "unit_id": "u1"}'
    assert_error(send("get_unit", "s-5", req, nonce=30), "replayed", "s-5")
    assert_ok(send("get_unit", "s-5", req, nonce=90), "s-5")
    assert_error(send("get_unit", "s-5", req, nonce=90), "replayed", "s-5")

    # Permissions: the reader may read, not deallocate; its nonces are its own.
    req = b'{"request_id": "s-6", "unit_id": "u1"}'
    e = assert_error(send("deallocate", "s-6", req, "reader", 1, narrow), "forbidden", "s-6")
    assert "reader" in e["message"], e
    req = b'{"request_id": "s-7", "unit_id": "u1"}'
    assert_ok(send("get_unit", "s-7", req, "reader", 2, narrow), "s-7")
    assert gw.unit("u1")["unit"]["status"] == "occupied"

    # Not an envelope: an unsigned command is refused.
    reply = cloud.command("get_unit", {"request_id": "s-8", "unit_id": "u1"})
    assert_error(reply, "bad_request", "s-8")


# ---- 4. broker authentication ------------------------------------------------------------


def test_the_broker_refuses_unknown_users_and_guests_cannot_command(site, protocol):
    gw = site.gateway(protocol)
    for user, password in [("cloud", ""), ("cloud", "wrong-password"), ("nobody", "x")]:
        code = Cloud(site.broker, protocol, user, password).try_connect()
        assert code.is_failure, f"{user}/{password!r} was let in: {code}"

    # A user of the broker with no right to the command topics: its command never reaches
    # the gateway (MQTT 5 is told so in the PUBACK). Mosquitto grants its subscription to
    # the events but delivers none of them (its ACL says read status only).
    guest = site.cloud(protocol, [topic("status"), topic("events")], user="guest", name="guest")
    wait_online(guest)
    mid = guest.publish(topic("cmd/deallocate"), b'{"request_id": "guest-1", "unit_id": "u1"}')
    if protocol == "v5":
        assert guest.pubacks[mid].is_failure, guest.pubacks[mid]

    cloud = site.cloud(protocol, [topic("reply/#"), topic("events")])
    body = {"request_id": "c-1", "unit_id": "u1", "tenancy_id": "t-started"}
    assert assert_ok(cloud.command("grant_access", body), "c-1")["unit"]["status"] == "occupied"
    cloud.next("the grant's event", lambda m: m.topic == topic("events"))
    # One more round trip through the broker, after which the guest would have the event.
    assert_ok(cloud.command("get_unit", {"request_id": "c-2", "unit_id": "u1"}), "c-2")
    assert not [m for m in guest.seen if m.topic == topic("events")], "the guest read events"
    assert not [m for m in cloud.seen if m.topic.endswith("/guest-1")], "the guest was answered"
    assert gw.unit("u1")["unit"]["status"] == "occupied"


# ---- 5. retained state and the last will -------------------------------------------------


def other(protocol):
    return "v3.1.1" if protocol == "v5" else "v5"


def retained(cloud, topics):
    """The first message on each of `topics` (a fresh subscription's retained ones)."""
    got = {}

    def all_came():
        for m in cloud.drain():
            got.setdefault(m.topic, m)
        return set(topics) <= set(got)

    until(f"retained messages on {sorted(topics)}", all_came)
    return got


def test_retained_state_and_the_last_will_seen_by_an_independent_subscriber(site, protocol):
    gw = site.gateway(protocol)
    cloud = site.cloud(protocol, [topic("status"), topic("units/+"), topic("reply/#")])
    wait_online(cloud)

    # Changes over MQTT and over HTTP; the last one of each unit is what must be retained.
    body = {"request_id": "r-1", "unit_id": "u1", "tenancy_id": "t-started"}
    assert_ok(cloud.command("grant_access", body), "r-1")
    gw.ok("POST", "/v1/contacts/c2/overlock")
    gw.ok("POST", "/v1/units/u2/reserve", {"tenancy_id": "t-future"})
    gw.ok("POST", "/v1/units/u3/set_status", {"status": "unavailable"})
    for unit, status in [("u1", "overlocked"), ("u2", "reserved"), ("u3", "unavailable")]:
        cloud.next(
            f"{unit} {status}",
            lambda m: m.topic == topic(f"units/{unit}") and m.json()["unit"]["status"] == status,
        )

    # A subscriber of the other protocol version, arriving after the changes.
    late = site.cloud(other(protocol), [topic("status"), topic("units/+")], name="late")
    units = [topic(f"units/{u}") for u in UNITS]
    got = retained(late, [topic("status"), *units])
    assert got[topic("status")].payload == b"online" and got[topic("status")].retain
    for u in UNITS:
        m = got[topic(f"units/{u}")]
        assert m.retain, m
        assert m.json() == gw.unit(u), f"retained {u} differs from GET /v1/units/{u}"

    # kill -9: the broker publishes the gateway's will, retained.
    gw.kill9()
    late.next("offline will", lambda m: m.topic == topic("status") and m.payload == b"offline")
    later = site.cloud(protocol, [topic("status")], name="later")
    m = later.next("retained status", lambda m: m.topic == topic("status"))
    assert (m.payload, m.retain) == (b"offline", True)

    # Back: online again, and the unit states unchanged.
    gw.start()
    late.next("online again", lambda m: m.topic == topic("status") and m.payload == b"online")
    latest = site.cloud(protocol, [topic("status"), topic("units/+")], name="latest")
    got = retained(latest, [topic("status"), *units])
    assert got[topic("status")].payload == b"online"
    assert got[topic("units/u1")].json()["unit"]["status"] == "overlocked"


# ---- 6. events ---------------------------------------------------------------------------


def events_until(cloud, after, last, may_repeat_to):
    """Collects events after `after` up to `last`: in seq order with no gap; a seq seen
    again is allowed only if <= `may_repeat_to` (sent before a reconnect). Returns the
    repeats."""
    want, repeats = after + 1, []
    while want <= last:
        e = cloud.next(f"event {want} of {last}", lambda m: m.topic == topic("events")).json()
        assert e["site_id"] == SITE, e
        if e["seq"] < want:
            assert e["seq"] <= may_repeat_to, f"seq {e['seq']} repeated after {want - 1}"
            repeats.append(e["seq"])
            continue
        assert e["seq"] == want, f"expected seq {want}, got {e['seq']}: out of order or lost"
        want += 1
    return repeats


def link(gw):
    return gw.ok("GET", "/v1/status")["link"]["mqtt"]


def delivered(gw):
    return link(gw)["delivered_seq"]


def allocate_all(gw, op):
    for u in UNITS:
        body = {"tenancy_id": "t-started"} if op == "grant_access" else {}
        gw.ok("POST", f"/v1/units/{u}/{op}", body)


def test_events_in_order_across_a_broker_restart_and_a_gateway_kill(site, protocol):
    gw = site.gateway(protocol, seed=False)
    # The cloud's subscriber keeps its session (and its queued QoS 1 events) while away.
    cloud = site.cloud(
        protocol, [topic("events"), topic("hello"), topic("status")], persistent=True
    )
    wait_online(cloud)
    gw.seed()
    allocate_all(gw, "grant_access")
    first = gw.last_seq()
    events_until(cloud, 0, first, may_repeat_to=0)
    until("all events acknowledged", lambda: delivered(gw) == first)

    # Mosquitto stops (cleanly: it keeps sessions); changes go on meanwhile; it comes back
    # on the same port and everything arrives, in order.
    site.broker.stop()
    until("the gateway sees the link down", lambda: not link(gw)["connected"])
    allocate_all(gw, "deallocate")
    second = gw.last_seq()
    assert second == first + 2 * len(UNITS), "deallocate writes two events per unit"
    site.broker.start()
    cloud.subscribed()
    repeats = events_until(cloud, first, second, may_repeat_to=first)
    until("all events acknowledged", lambda: delivered(gw) == second)

    # kill -9 with events not yet delivered (the broker is down while they are made), then
    # the gateway restarts: it says where it stands and drains from its cursor.
    site.broker.stop()
    allocate_all(gw, "grant_access")
    third = gw.last_seq()
    gw.kill9()
    site.broker.start()
    cloud.subscribed()
    gw.start()
    # Messages the cloud had not acknowledged yet when the broker stopped come again with
    # DUP set (QoS 1), an older hello among them: it is skipped.
    hello = cloud.next(
        "the restarted gateway's hello",
        lambda m: m.topic == topic("hello") and m.json()["last_event_seq"] == third,
    ).json()
    assert hello == {"site_id": SITE, "last_event_seq": third, "delivered_seq": second}, hello
    repeats += events_until(cloud, second, third, may_repeat_to=second)
    until("all events acknowledged", lambda: delivered(gw) == third)
    print(f"events 1..{third}; repeated across reconnects: {repeats}")
