"""The gateway under test: `unitgate run --config FILE` as a child process, with a config
generated here (temp state dir, plain HTTP on a free port, an admin token, [cloud.mqtt]
pointing at the test's broker), and an HTTP client for its API (seeding, checks)."""

import datetime
import hashlib
import json
import os
import secrets
import urllib.request
from pathlib import Path

from harness import REPO, Process, http_json, until

SITE = "site-interop"
PREFIX = f"unitgate/v1/{SITE}"


def topic(rest):
    return f"{PREFIX}/{rest}"


def binary():
    path = Path(os.environ.get("UNITGATE_BIN", "target/debug/unitgate"))
    return path if path.is_absolute() else REPO / path


def toml_str(value):
    return json.dumps(str(value))


class Gateway:
    """`mqtt` holds the [cloud.mqtt] keys (url, protocol, username, ...), None for no MQTT
    link; `clients` the [[cloud.mqtt.clients]] entries as (id, key bytes, operations);
    `devices` TOML text appended as is (the [devices] section of the hardware peers)."""

    def __init__(self, workdir, log, port, mqtt, clients=(), devices=""):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.token = secrets.token_urlsafe(24)
        lines = [
            "[site]",
            f"id = {toml_str(SITE)}",
            'name = "Interop Site"',
            'timezone = "UTC"',
            "[store]",
            f"data_dir = {toml_str(self.dir / 'data')}",
            "[api]",
            f'listen = "127.0.0.1:{port}"',
            "plain_http = true",
            "[[api.tokens]]",
            'name = "interop-admin"',
            f"sha256 = {toml_str(hashlib.sha256(self.token.encode()).hexdigest())}",
            'scopes = ["admin"]',
            "[log]",
            'level = "info"',
            'format = "human"',
        ]
        if mqtt is not None:
            lines.append("[cloud.mqtt]")
        for key, value in (mqtt or {}).items():
            if key == "password":
                pw = self.dir / "mqtt.password"
                pw.write_text(value + "\n")
                lines.append(f"password_file = {toml_str(pw)}")
            elif isinstance(value, bool):
                lines.append(f"{key} = {str(value).lower()}")
            elif isinstance(value, int):
                lines.append(f"{key} = {value}")
            else:
                lines.append(f"{key} = {toml_str(value)}")
        for client_id, key, operations in clients:
            key_file = self.dir / f"{client_id}.key"
            key_file.write_bytes(key)
            lines += [
                "[[cloud.mqtt.clients]]",
                f"id = {toml_str(client_id)}",
                f"key_file = {toml_str(key_file)}",
                f"operations = {json.dumps(list(operations))}",
            ]
        lines.append(devices)
        self.config = self.dir / "config.toml"
        self.config.write_text("\n".join(lines) + "\n")
        # NO_COLOR: the human log format would write colour codes into the log file.
        env = dict(os.environ, NO_COLOR="1")
        self.process = Process(
            "unitgate", [binary(), "run", "--config", self.config], log, env=env
        )

    def start(self):
        self.process.start()
        until("the gateway answers /healthz", self._healthy)
        return self

    def _healthy(self):
        assert self.process.running(), f"the gateway exited:\n{self.process.tail()}"
        try:
            with urllib.request.urlopen(self.base + "/healthz", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def kill9(self):
        self.process.kill9()

    def stop(self):
        return self.process.stop()

    # ---- its HTTP API, as admin ----------------------------------------------------------

    def call(self, method, path, body=None):
        """(status, JSON body or None)."""
        return http_json(self.base + path, method, body, token=self.token)

    def ok(self, method, path, body=None):
        status, answer = self.call(method, path, body)
        assert 200 <= status < 300, f"{method} {path}: {status} {answer}"
        return answer

    def unit(self, unit_id):
        return self.ok("GET", f"/v1/units/{unit_id}")

    def events_after(self, seq):
        out = []
        while True:
            page = self.ok("GET", f"/v1/events?after={seq}&limit=1000")
            if not page["events"]:
                return out
            out += page["events"]
            seq = page["next_after"]

    def last_seq(self):
        events = self.events_after(0)
        return events[-1]["seq"] if events else 0

    def seed(self):
        """Unit type `small`, units u1..u4 (available), contacts c1..c3 and tenancies
        t-future (starts in 10 days), t-started (started 9 days ago) and t-other."""
        for path, body in seed_requests():
            self.ok("PUT" if "bulk" not in path else "POST", path, body)


def today():
    return datetime.datetime.now(datetime.timezone.utc).date()


def unit_body(unit_id, name, order):
    return {
        "id": unit_id,
        "name": name,
        "unit_type": "small",
        "width": 5,
        "length": 10,
        "height": 8,
        "door_height": 7,
        "door_width": 4,
        "door_type": "roll_up",
        "access_type": "indoor",
        "standard_rate": 55.0,
        "walk_thru_order": order,
        "zones": ["main-gate"],
    }


UNITS = ["u1", "u2", "u3", "u4"]
CONTACTS = {"c1": "104729", "c2": "130363", "c3": "155921"}


def tenancies():
    d = today()
    return {
        "t-future": ("c1", d + datetime.timedelta(days=10)),
        "t-started": ("c2", d - datetime.timedelta(days=9)),
        "t-other": ("c3", d + datetime.timedelta(days=30)),
    }


def seed_requests():
    yield "/v1/unit_types/small", {"name": "Small"}
    units = [unit_body(u, u.upper(), i) for i, u in enumerate(UNITS)]
    yield "/v1/units/bulk_create", {"units": units}
    for cid, pin in CONTACTS.items():
        yield f"/v1/contacts/{cid}", {"name": f"Contact {cid}", "access_code": pin}
    for tid, (cid, start) in tenancies().items():
        yield f"/v1/tenancies/{tid}", {"contact_id": cid, "start_date": start.isoformat()}
