"""Fixtures of the interop suite: a real Mosquitto per test, the gateway binary configured
against it (MQTT 5 or 3.1.1), and cloud clients. Every process a test starts is ended at
teardown; its log stays in target/interop-logs/<test>/ and its tail is printed when the
test failed."""

import re

import pytest

from gateway import SITE, Gateway
from harness import LOGS, free_port
from mosquitto import Mosquitto
from mqtt_cloud import Cloud

PROTOCOLS = ["v5", "v3.1.1"]

# The broker's users: the gateway may only read commands and write what it publishes; the
# cloud may do anything under the site; `guest` has a valid password and may only read the
# status topic.
ACL = {
    "gateway": [
        f"topic read unitgate/v1/{SITE}/cmd/#",
        f"topic write unitgate/v1/{SITE}/reply/#",
        f"topic write unitgate/v1/{SITE}/events",
        f"topic write unitgate/v1/{SITE}/units/#",
        f"topic write unitgate/v1/{SITE}/status",
        f"topic write unitgate/v1/{SITE}/hello",
    ],
    "cloud": [f"topic readwrite unitgate/v1/{SITE}/#"],
    "guest": [f"topic read unitgate/v1/{SITE}/status"],
}


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


class Site:
    """What one test started: the broker, gateways and cloud clients, torn down together."""

    def __init__(self, request, tmp_path):
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name).strip("_")
        self.logs = LOGS / name
        self.logs.mkdir(parents=True, exist_ok=True)
        self.tmp = tmp_path
        self.broker = None
        self.gateways = []
        self.clouds = []
        # Hardware peers (pymodbus boards, libosdp keypads, socat lines): anything with
        # stop(); a `process` attribute (harness.Process) has its log shown on failure.
        self.peers = []

    def start_broker(self):
        self.broker = Mosquitto(
            self.tmp / "mosquitto", self.logs / "mosquitto.log", free_port(), ACL
        ).start()
        return self.broker

    def peer(self, peer):
        """Starts a hardware peer and stops it at teardown (in reverse order)."""
        self.peers.append(peer)
        return peer.start()

    def gateway(self, protocol, signed_clients=(), seed=True, name="gateway", devices=""):
        """A gateway with `protocol` (v5 | v3.1.1) on the broker, or without an MQTT link
        when None; `signed_clients`: (id, key, operations) of signed-command clients (none:
        unsigned commands); `devices`: its [devices] TOML."""
        mqtt = None if protocol is None else {
            "url": self.broker.url(),
            "protocol": protocol,
            "username": "gateway",
            "password": self.broker.passwords["gateway"],
            "reconnect_max_s": 1,
            "keep_alive_s": 5,
        }
        if signed_clients:
            mqtt["signed_commands"] = True
        gw = Gateway(
            self.tmp / name,
            self.logs / f"{name}.log",
            free_port(),
            mqtt,
            signed_clients,
            devices,
        )
        self.gateways.append(gw)
        gw.start()
        if seed:
            gw.seed()
        return gw

    def cloud(self, protocol, subs=(), user="cloud", persistent=False, name="cloud"):
        c = Cloud(self.broker, protocol, user, persistent=persistent, name=name)
        self.clouds.append(c)
        return c.start(subs)

    def teardown(self, failed):
        for c in self.clouds:
            try:
                c.close()
            except Exception:  # a client already gone is fine at teardown
                pass
        processes = [g.process for g in self.gateways]
        if self.broker:
            processes.append(self.broker.process)
        for p in processes:
            p.stop(grace=5)
        for peer in reversed(self.peers):
            try:
                peer.stop()
            except Exception as e:  # the others must still stop
                print(f"\n---- stopping {peer!r}: {e!r}")
            if getattr(peer, "process", None) is not None:
                processes.append(peer.process)
        if failed:
            for p in processes:
                print(f"\n---- {p.name}: last lines of {p.log} ----\n{p.tail()}")


def _failed(request):
    return any(
        getattr(request.node, f"report_{when}", None) is not None
        and getattr(request.node, f"report_{when}").failed
        for when in ("setup", "call")
    )


@pytest.fixture
def hardware_site(request, tmp_path):
    """A site without a broker: the gateway (no MQTT link) and its hardware peers."""
    s = Site(request, tmp_path)
    yield s
    s.teardown(_failed(request))


@pytest.fixture
def site(request, tmp_path):
    s = Site(request, tmp_path)
    s.start_broker()
    yield s
    s.teardown(_failed(request))


@pytest.fixture(params=PROTOCOLS)
def protocol(request):
    """The MQTT version of the gateway, and of the cloud client talking to it."""
    return request.param

