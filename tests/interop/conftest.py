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

    def start_broker(self):
        self.broker = Mosquitto(
            self.tmp / "mosquitto", self.logs / "mosquitto.log", free_port(), ACL
        ).start()
        return self.broker

    def gateway(self, protocol, signed_clients=(), seed=True, name="gateway"):
        """A gateway with `protocol` (v5 | v3.1.1) on the broker; `signed_clients`:
        (id, key, operations) of signed-command clients (none: unsigned commands)."""
        mqtt = {
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
            self.tmp / name, self.logs / f"{name}.log", free_port(), mqtt, signed_clients
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
        if failed:
            for p in processes:
                print(f"\n---- {p.name}: last lines of {p.log} ----\n{p.tail()}")


@pytest.fixture
def site(request, tmp_path):
    s = Site(request, tmp_path)
    s.start_broker()
    yield s
    failed = any(
        getattr(request.node, f"report_{when}", None) is not None
        and getattr(request.node, f"report_{when}").failed
        for when in ("setup", "call")
    )
    s.teardown(failed)


@pytest.fixture(params=PROTOCOLS)
def protocol(request):
    """The MQTT version of the gateway, and of the cloud client talking to it."""
    return request.param

