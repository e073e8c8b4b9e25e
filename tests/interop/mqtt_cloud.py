"""The cloud side of the MQTT link, written from DESIGN.md §3 only (none of the gateway's
code): a paho-mqtt client in MQTT 5 or 3.1.1 that sends commands and collects what the
broker delivers, and the HMAC signing of commands."""

import hashlib
import hmac
import itertools
import json
import queue
import secrets
import time
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway import topic
from harness import WAIT


@dataclass
class Msg:
    topic: str
    payload: bytes
    retain: bool
    correlation: bytes | None

    def json(self):
        return json.loads(self.payload)


class Cloud:
    """An MQTT client of the test's broker. `persistent`: a session the broker keeps (and
    queues QoS 1 messages for) while the client is away, e.g. across a broker restart."""

    _ids = itertools.count(1)

    def __init__(self, broker, protocol, user, password=None, persistent=False, name="cloud"):
        self.v5 = protocol == "v5"
        self.port = broker.port
        self.persistent = persistent
        self.client_id = f"{name}-{secrets.token_hex(4)}"
        self.inbox = topic(f"reply/inbox-{self.client_id}")
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311,
            clean_session=None if self.v5 else not persistent,
        )
        if password is None:
            password = broker.passwords.get(user)
        self.client.username_pw_set(user, password)
        self.client.reconnect_delay_set(min_delay=1, max_delay=1)
        self.messages = queue.Queue()
        # Every message ever received, in order (next() consumes `messages` only).
        self.seen = []
        self.connacks = queue.Queue()
        self.subacks = queue.Queue()
        self.pubacks = {}
        self.subs = []
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda c, u, mid, codes, props: self.subacks.put(codes)
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish

    # ---- paho callbacks (its network thread) --------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.connacks.put(reason_code)
        if not reason_code.is_failure and self.subs:
            client.subscribe([(s, 1) for s in self.subs])

    def _on_message(self, client, userdata, m):
        corr = getattr(m.properties, "CorrelationData", None) if m.properties else None
        msg = Msg(m.topic, m.payload, bool(m.retain), corr)
        self.seen.append(msg)
        self.messages.put(msg)

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        self.pubacks[mid] = reason_code

    # ---- connecting -----------------------------------------------------------------------

    def start(self, subs=()):
        """Connects, subscribes to `subs` (QoS 1) and waits for the SUBACK."""
        self.subs = list(subs)
        props = None
        if self.v5 and self.persistent:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 600
        self.client.connect(
            "127.0.0.1",
            self.port,
            keepalive=10,
            clean_start=not self.persistent if self.v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
            properties=props,
        )
        self.client.loop_start()
        code = self.connacks.get(timeout=WAIT)
        assert not code.is_failure, f"{self.client_id}: connection refused: {code}"
        if self.subs:
            self.subscribed()
        return self

    def try_connect(self):
        """Connects once and returns the CONNACK's reason code (then disconnects)."""
        self.client.reconnect_delay_set(min_delay=60, max_delay=60)
        self.client.connect("127.0.0.1", self.port, keepalive=10)
        self.client.loop_start()
        try:
            return self.connacks.get(timeout=WAIT)
        finally:
            self.close()

    def subscribed(self):
        """Waits for the SUBACK of the next (re)connection; every subscription granted."""
        codes = self.subacks.get(timeout=WAIT)
        assert all(not c.is_failure for c in codes), f"subscription refused: {codes}"

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()

    # ---- messages -------------------------------------------------------------------------

    def publish(self, topic_, payload, response_topic=None, correlation=None):
        """Publishes at QoS 1 and waits until the broker acknowledged it; returns the mid."""
        props = None
        if response_topic is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = response_topic
            props.CorrelationData = correlation
        info = self.client.publish(topic_, payload, qos=1, properties=props)
        info.wait_for_publish(timeout=WAIT)
        assert info.is_published(), f"{topic_}: no PUBACK within {WAIT} s"
        return info.mid

    def next(self, what, pred=lambda m: True, timeout=WAIT):
        """The next message that satisfies `pred` (others are dropped), within `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.client_id}: no {what} within {timeout} s")
            try:
                m = self.messages.get(timeout=left)
            except queue.Empty:
                continue
            if pred(m):
                return m

    def drain(self):
        """Every message received so far."""
        out = []
        while True:
            try:
                out.append(self.messages.get_nowait())
            except queue.Empty:
                return out

    def call(self, operation, payload, request_id, response_topic=True):
        """Sends raw `payload` to cmd/{operation} and returns the reply as JSON.
        MQTT 5 (with `response_topic`): on our response topic with fresh correlation data;
        otherwise on reply/{request_id}, which `start` must have subscribed to."""
        if self.v5 and response_topic:
            corr = f"corr-{request_id}-{next(self._ids)}".encode()
            self.publish(topic(f"cmd/{operation}"), payload, self.inbox, corr)
            m = self.next(
                f"reply to {operation} {request_id!r}",
                lambda m: m.topic == self.inbox and m.correlation == corr,
            )
        else:
            self.publish(topic(f"cmd/{operation}"), payload)
            want = topic(f"reply/{request_id}")
            m = self.next(f"reply to {operation} {request_id!r}", lambda m: m.topic == want)
        assert not m.retain, "replies are not retained"
        return m.json()

    def command(self, operation, body, **kw):
        return self.call(operation, json.dumps(body).encode(), body["request_id"], **kw)

    def reply_subscriptions(self):
        """What `start` must subscribe to for replies."""
        return [self.inbox] if self.v5 else [topic("reply/+")]


# ---- signed commands (DESIGN.md §3 as the README words it) ----------------------------------


def sign(key, operation, nonce, request):
    """hex(HMAC-SHA256(key, operation "\\n" nonce "\\n" request bytes as sent))."""
    msg = operation.encode() + b"\n" + str(nonce).encode() + b"\n" + request
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def envelope(client_id, nonce, mac, request):
    """The signed command: the request object's bytes are embedded exactly as signed."""
    head = json.dumps({"client_id": client_id, "nonce": nonce, "hmac": mac})
    return head[:-1].encode() + b', "request": ' + request + b"}"


def wait_online(cloud):
    """Waits for `online` on the status topic (retained, or published on connect)."""
    return cloud.next(
        "status online", lambda m: m.topic == topic("status") and m.payload == b"online"
    )


def new_key():
    """A client key as a key_file holds it: 64 hex characters, no newline."""
    return secrets.token_hex(32).encode()
