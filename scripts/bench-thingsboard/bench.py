"""unitgate side by side with ThingsBoard IoT Gateway (issue 9): the same job done by both
gateways in the same run, against the same Mosquitto and the same Modbus TCP relay board.

The job: a cloud command over MQTT → a coil written on the relay board.
- unitgate: `unitgate/v1/{site}/cmd/grant_access` (the unit's overlock coil goes off) and
  `cmd/deallocate` (on), DESIGN.md §3/§4, on one unit bound to coil UG_COIL.
- ThingsBoard IoT Gateway (PyPI thingsboard-gateway, its Modbus connector): a device RPC on
  `v1/gateway/rpc` {"device", "data": {"id", "method": "setCoil", "params": true|false}}, the
  connector's rpc entry writing coil TB_COIL with function code 5.
Mosquitto plays the ThingsBoard server's MQTT side for the gateway: this driver answers the
gateway's `getSessionLimits` request (no rate limits) and sends the RPCs, as ThingsBoard would.
The relay board is hw-sim's Modbus TCP board; it stamps every coil change with CLOCK_MONOTONIC
(`t_ns` on its control API's /events NDJSON stream), the clock `time.monotonic_ns()` reads.

A sample: t0 = monotonic_ns() just before the publish; t1 = the board's t_ns of the coil
change. Commands go one at a time, interleaved (unitgate, ThingsBoard, unitgate, ...); each
after the previous one has settled (the gateway's reply seen, and for unitgate its device
queue empty per GET /v1/devices), so a sample is one command's latency. Both gateways poll the
board's 8 inputs every 250 ms meanwhile (unitgate's default poll_ms; the door sensors are the
reason a gateway polls a relay board) and ThingsBoard reports them ON_CHANGE.

Baseline on the same disk in the same run: after each pair of commands, one bare SQLite
commit (one-row transaction, WAL, synchronous=FULL, as unitgate's store); unitgate commits a
command before its coil moves, so on a busy disk its latency follows this figure.

Footprint, from /proc of each gateway's process (and its children): VmRSS sampled every
100 ms (max) and utime+stime over (a) 10 s idle with both connected and polling, (b) the timed
run. A wrong answer fails the run: a command answered with an error, no coil change within 5 s,
a change to the wrong state or of a coil nobody asked to change.

Prints a table and one JSON line (the only stdout line starting with `{`). Sizes: BENCH_TB_OPS
commands per gateway [300], BENCH_TB_IDLE_S [10]. Binaries: UNITGATE_BIN, HW_SIM_BIN.
Every process's log is in a temporary directory, kept when the run fails or BENCH_TB_KEEP=1.
"""

import hashlib
import http.client
import json
import os
import platform
import queue
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from importlib import metadata
from pathlib import Path

import paho.mqtt.client as mqtt

REPO = Path(__file__).resolve().parents[2]
OPS = int(os.environ.get("BENCH_TB_OPS", "300"))
IDLE_S = float(os.environ.get("BENCH_TB_IDLE_S", "10"))
WARMUP = 10
CHANGE_WITHIN = 5.0
SETTLE_WITHIN = 5.0
START_WITHIN = 30.0
POLL_MS = 250
SITE = "site-bench"
BOARD = "relay-tcp"
UG_COIL = 1
TB_COIL = 17
UNIT = "u-1"
TENANCY = "t-bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def until(what, check, timeout, poll=0.01):
    deadline = time.monotonic() + timeout
    while True:
        v = check()
        if v:
            return v
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout} s (last: {v!r})")
        time.sleep(poll)


def port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class Child:
    """A child process with its output in a log file, stopped by SIGTERM then SIGKILL."""

    def __init__(self, name, argv, log_path, cwd=None, env=None):
        self.name = name
        self.log = log_path
        with open(log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [str(a) for a in argv], stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, cwd=cwd, env=env)

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc.poll() is None

    def check(self):
        if not self.alive():
            tail = Path(self.log).read_text(errors="replace").splitlines()[-30:]
            raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n" + "\n".join(tail))

    def stop(self, grace=10.0):
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


# ---- /proc footprint ----------------------------------------------------------------------

def tree(pid):
    """pid and its descendants (ThingsBoard's gateway could start helpers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def cpu_ticks(pid):
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except OSError:
            pass
    return total


def cpu_by_thread(pid):
    """{thread name: (utime, stime) ticks} over the process tree."""
    out = {}
    for p in tree(pid):
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tids:
            try:
                with open(f"/proc/{p}/task/{t}/stat") as f:
                    raw = f.read()
            except OSError:
                continue
            name = raw[raw.index("(") + 1:raw.rindex(")")]
            fields = raw.rsplit(")", 1)[1].split()
            u, s = out.get(name, (0, 0))
            out[name] = (u + int(fields[11]), s + int(fields[12]))
    return out


def rss_bytes(pid):
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * PAGE
        except OSError:
            pass
    return total


def threads(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


class Footprint:
    """CPU (utime+stime) and RSS (VmRSS sampled every 100 ms) of some processes over a window."""

    def __init__(self, pids):
        self.pids = pids
        self.max_rss = {n: 0 for n in pids}
        self._stop = threading.Event()

    def __enter__(self):
        self.t0 = time.monotonic()
        self.cpu0 = {n: cpu_ticks(p) for n, p in self.pids.items()}
        self.threads0 = {n: cpu_by_thread(p) for n, p in self.pids.items()}
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        for n, p in self.pids.items():
            self.max_rss[n] = max(self.max_rss[n], rss_bytes(p))

    def _run(self):
        while not self._stop.wait(0.1):
            self._sample()

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()
        self.wall = time.monotonic() - self.t0
        self.cpu_s = {n: (cpu_ticks(p) - self.cpu0[n]) / CLK_TCK for n, p in self.pids.items()}
        self.end_rss = {n: rss_bytes(p) for n, p in self.pids.items()}
        self.by_thread = {}
        for n, p in self.pids.items():
            now, before = cpu_by_thread(p), self.threads0[n]
            diff = {}
            for name, (u, s) in now.items():
                u0, s0 = before.get(name, (0, 0))
                if u - u0 or s - s0:
                    diff[name] = {"user_s": round((u - u0) / CLK_TCK, 2),
                                  "sys_s": round((s - s0) / CLK_TCK, 2)}
            self.by_thread[n] = diff

    def json(self, name):
        return {
            "wall_s": round(self.wall, 2),
            "cpu_s": round(self.cpu_s[name], 2),
            "cpu_pct_of_core": round(100 * self.cpu_s[name] / self.wall, 2),
            "rss_max_mb": round(self.max_rss[name] / 1e6, 1),
            "rss_end_mb": round(self.end_rss[name] / 1e6, 1),
            # Threads of one name summed (threads that ended in the window are missing).
            "cpu_by_thread": self.by_thread[name],
        }


# ---- the relay board's observations -------------------------------------------------------

class Observations:
    """hw-sim's /events NDJSON stream for the board, read on a thread into a queue."""

    def __init__(self, control_port):
        self.q = queue.Queue()
        # Frames the board received (both gateways' polls and writes).
        self.frames = 0
        self.conn = http.client.HTTPConnection("127.0.0.1", control_port, timeout=None)
        self.conn.request("GET", f"/events?device={BOARD}")
        self.res = self.conn.getresponse()
        assert self.res.status == 200, f"hw-sim /events: {self.res.status}"
        first = json.loads(self.res.readline())
        assert first["kind"] == "subscribed", first
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        try:
            for line in self.res:
                o = json.loads(line)
                if o["kind"] == "frame_received":
                    # hw-sim reports polls at most once a second, with the count since its
                    # last report (all functions together).
                    self.frames += o["data"].get("count", 1)
                elif o["kind"] in ("coil_changed", "lagged"):
                    self.q.put(o)
        except (OSError, ValueError):
            pass

    def coil_change(self, coil, on, deadline):
        """The observation of `coil` changing to `on`; any other coil change fails."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"coil {coil} -> {on}: no change within {CHANGE_WITHIN} s")
            try:
                o = self.q.get(timeout=left)
            except queue.Empty:
                continue
            if o["kind"] == "lagged":
                raise RuntimeError(f"hw-sim observation stream lagged: {o}")
            d = o["data"]
            if d["coil"] == coil and d["on"] == on:
                return o
            raise RuntimeError(f"unexpected change {d} while waiting for coil {coil} -> {on}")

    def expect_still(self):
        try:
            o = self.q.get_nowait()
        except queue.Empty:
            return
        raise RuntimeError(f"unexpected coil change between commands: {o}")


# ---- the cloud (MQTT) ---------------------------------------------------------------------

class Cloud:
    """One paho client playing both clouds: unitgate's and the ThingsBoard server's MQTT side."""

    def __init__(self, port):
        self.msgs = {"ug_reply": queue.Queue(), "ug_status": queue.Queue(),
                     "tb_reply": queue.Queue(), "tb_connect": queue.Queue()}
        self.limits_answered = threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-cloud",
                             protocol=mqtt.MQTTv5)
        self.c.on_message = self._on_message
        connected = threading.Event()
        self.c.on_connect = lambda *a: connected.set()
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        until("cloud client connected", connected.is_set, 10)
        subacks = queue.Queue()
        self.c.on_subscribe = lambda *a: subacks.put(a)
        self.c.subscribe([
            (f"unitgate/v1/{SITE}/reply/+", 1),
            (f"unitgate/v1/{SITE}/status", 1),
            ("v1/gateway/rpc", 1),
            ("v1/gateway/connect", 1),
            ("v1/devices/me/rpc/request/+", 1),
        ])
        subacks.get(timeout=10)

    def _on_message(self, client, userdata, m):
        if m.topic == f"unitgate/v1/{SITE}/status":
            # Published after the gateway's SUBSCRIBE to its commands, on the same connection.
            self.msgs["ug_status"].put(m.payload.decode(errors="replace"))
            return
        try:
            body = json.loads(m.payload)
        except ValueError:
            return
        if m.topic.startswith(f"unitgate/v1/{SITE}/reply/"):
            self.msgs["ug_reply"].put(body)
        elif m.topic == "v1/gateway/rpc":
            # Our own requests come back too (we subscribe to the topic we publish on).
            if isinstance(body.get("data"), dict) and "method" not in body["data"]:
                self.msgs["tb_reply"].put(body)
        elif m.topic == "v1/gateway/connect":
            self.msgs["tb_connect"].put(body)
        elif m.topic.startswith("v1/devices/me/rpc/request/"):
            # What ThingsBoard answers a gateway that asks for its session limits: none.
            if body.get("method") == "getSessionLimits":
                rid = m.topic.rsplit("/", 1)[1]
                none = {"messages": "0:0,", "telemetryMessages": "0:0,", "telemetryDataPoints": "0:0,"}
                self.c.publish(f"v1/devices/me/rpc/response/{rid}", json.dumps(
                    {"rateLimits": none, "gatewayRateLimits": none,
                     "maxInflightMessages": 100, "maxPayloadSize": 65536}), qos=1)
                self.limits_answered.set()

    def publish(self, topic, payload):
        self.c.publish(topic, payload, qos=1)

    def next(self, kind, match, timeout):
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"no {kind} matching within {timeout} s")
            try:
                body = self.msgs[kind].get(timeout=left)
            except queue.Empty:
                continue
            if match(body):
                return body

    def close(self):
        self.c.loop_stop()
        self.c.disconnect()


# ---- the two gateways ---------------------------------------------------------------------

class Unitgate:
    def __init__(self, work, binary, broker_port, board_addr):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.token = secrets.token_urlsafe(24)
        d = work / "unitgate"
        d.mkdir()
        (d / "config.toml").write_text(f"""
[site]
id = "{SITE}"
name = "Bench Site"
timezone = "UTC"
[store]
data_dir = "{d / 'data'}"
[api]
listen = "127.0.0.1:{self.port}"
plain_http = true
[[api.tokens]]
name = "bench"
sha256 = "{hashlib.sha256(self.token.encode()).hexdigest()}"
scopes = ["admin"]
[log]
level = "info"
format = "json"
[cloud.mqtt]
url = "mqtt://127.0.0.1:{broker_port}"
protocol = "v5"
[[devices.relay_boards]]
id = "{BOARD}"
transport = "tcp"
address = "{board_addr}"
unit_id = 1
coils = 32
inputs = 8
poll_ms = {POLL_MS}
""")
        self.child = Child("unitgate", [binary, "run", "--config", d / "config.toml"],
                           work / "unitgate.log", env=dict(os.environ, NO_COLOR="1"))
        until("unitgate answers /healthz", self._healthy, START_WITHIN)

    def _healthy(self):
        self.child.check()
        try:
            with urllib.request.urlopen(self.base + "/healthz", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def ok(self, method, path, body=None):
        status, answer = self.call(method, path, body)
        assert 200 <= status < 300, f"{method} {path}: {status} {answer}"
        return answer

    def seed(self):
        """One unit on coil UG_COIL (available: overlock coil on), a contact and a tenancy."""
        self.ok("PUT", "/v1/unit_types/small", {"name": "Small"})
        self.ok("POST", "/v1/units", {"unit": {
            "id": UNIT, "name": "B001", "unit_type": "small", "width": 5, "length": 5,
            "height": 8, "door_height": 7, "door_width": 4, "door_type": "roll_up",
            "access_type": "indoor", "standard_rate": 50.0, "walk_thru_order": 1,
            "zones": ["main-gate"], "lock": {"kind": "relay", "board": BOARD, "coil": UG_COIL}}})
        self.ok("PUT", "/v1/contacts/c-bench", {"name": "Bench Tenant", "access_code": "24681357"})
        self.ok("PUT", f"/v1/tenancies/{TENANCY}",
                {"contact_id": "c-bench", "start_date": "2020-01-01"})

    settle_gets = 0

    def settled(self):
        """The board online with nothing queued (every change delivered and recorded)."""
        self.settle_gets += 1
        for d in self.ok("GET", "/v1/devices"):
            if d["id"] == BOARD:
                return d["online"] and d["queue_depth"] == 0
        return False


def tb_configs(conf, broker_port, board_host, board_port):
    (conf / "tb_gateway.json").write_text(json.dumps({
        "thingsboard": {
            "host": "127.0.0.1", "port": broker_port,
            "remoteShell": False, "remoteConfiguration": False, "latencyDebugMode": False,
            "statistics": {"enable": False, "statsSendPeriodInSeconds": 3600,
                           "customStatsSendPeriodInSeconds": 3600},
            "deviceFiltering": {"enable": False},
            "checkConnectorsConfigurationInSeconds": 3600,
            "handleDeviceRenaming": False,
            "security": {"type": "accessToken", "accessToken": "bench-gateway-token"},
            "qos": 1,
            "reportStrategy": {"type": "ON_CHANGE"},
            "checkingDeviceActivity": {"checkDeviceInactivity": False},
        },
        "storage": {"type": "memory", "read_records_count": 100, "max_records_count": 100000},
        "grpc": {"enabled": False},
        "connectors": [{"type": "modbus", "name": "Modbus", "configuration": "modbus.json"}],
    }, indent=1))
    (conf / "modbus.json").write_text(json.dumps({"master": {"slaves": [{
        "host": board_host, "port": board_port, "type": "tcp", "method": "socket",
        "unitId": 1, "deviceName": BOARD, "deviceType": "relay_board",
        "timeout": 5, "byteOrder": "BIG", "wordOrder": "BIG", "retries": 1,
        "retryOnEmpty": True, "retryOnInvalid": True, "pollPeriod": POLL_MS,
        "connectAttemptTimeMs": 500, "connectAttemptCount": 5, "waitAfterFailedAttemptsMs": 1000,
        "attributes": [],
        "timeseries": [{"tag": "doors", "type": "bits", "address": 0, "objectsCount": 8,
                        "functionCode": 2}],
        "attributeUpdates": [],
        "rpc": [{"tag": "setCoil", "type": "bits", "address": TB_COIL, "objectsCount": 1,
                 "functionCode": 5},
                # Read-only: the readiness probe.
                {"tag": "getCoil", "type": "bits", "address": TB_COIL, "objectsCount": 1,
                 "functionCode": 1}],
    }]}}, indent=1))
    # The logging setup it ships (INFO to ./logs/*.log and stdout), as unitgate logs at info.
    shipped = Path(metadata.distribution("thingsboard-gateway").locate_file(
        "thingsboard_gateway/config/logs.json"))
    shutil.copy(shipped, conf / "logs.json")


class BareCommit:
    """The durable-commit baseline on the same disk, timed between the gateways' commands:
    one-row transactions into SQLite with unitgate's pragmas (WAL, synchronous=FULL)."""

    def __init__(self, path):
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL").fetchone()
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")

    def once(self):
        t0 = time.monotonic_ns()
        self.db.execute("BEGIN")
        self.db.execute("INSERT INTO t (body) VALUES (?)", ("x" * 200,))
        self.db.execute("COMMIT")
        return time.monotonic_ns() - t0


# ---- the run ------------------------------------------------------------------------------

def percentile(ns, q):
    s = sorted(ns)
    rank = min(max(int(-(-q * len(s) // 1)), 1), len(s))
    return s[rank - 1] / 1e6


def series(ns):
    return {"n": len(ns), "p50_ms": round(percentile(ns, 0.50), 3),
            "p99_ms": round(percentile(ns, 0.99), 3), "max_ms": round(max(ns) / 1e6, 3),
            "min_ms": round(min(ns) / 1e6, 3), "mean_ms": round(sum(ns) / len(ns) / 1e6, 3),
            "over_10ms": sum(1 for n in ns if n > 10_000_000)}


def main():
    ug_bin = Path(os.environ.get("UNITGATE_BIN", REPO / "target/dist/unitgate"))
    sim_bin = Path(os.environ.get("HW_SIM_BIN", REPO / "target/release/hw-sim"))
    tb_bin = Path(sys.executable).parent / "thingsboard-gateway"
    work = Path(tempfile.mkdtemp(prefix="bench-tb-", dir=os.environ.get("BENCH_TB_TMP")))
    children = []
    cloud = None
    try:
        # Mosquitto, anonymous on loopback (the gateway authenticates by an access token as
        # its MQTT user name, which Mosquitto then ignores).
        mport = free_port()
        (work / "mosquitto.conf").write_text(
            f"listener {mport} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n"
            "user root\nlog_dest stderr\nlog_type error\nlog_type warning\n")
        children.append(Child("mosquitto", ["/usr/sbin/mosquitto", "-c", work / "mosquitto.conf"],
                              work / "mosquitto.log"))
        until("mosquitto listening", lambda: children[-1].check() or port_open(mport), 10)

        # The relay board (hw-sim, Modbus TCP, 3 ms answer delay as config/sim.toml).
        cport = free_port()
        (work / "site.toml").write_text(f"""
[[devices.relay_boards]]
id = "{BOARD}"
transport = "tcp"
address = "127.0.0.1:0"
unit_id = 1
coils = 32
inputs = 8
response_delay_ms = 3
""")
        sim = Child("hw-sim", [sim_bin, "serve", "-c", work / "site.toml", "--listen",
                               f"127.0.0.1:{cport}"], work / "hw-sim.log")
        children.append(sim)
        until("hw-sim control API", lambda: sim.check() or port_open(cport), 10)
        with urllib.request.urlopen(f"http://127.0.0.1:{cport}/devices", timeout=5) as r:
            board_addr = next(d for d in json.load(r) if d["id"] == BOARD)["address"]["address"]
        host, bport = board_addr.rsplit(":", 1)
        obs = Observations(cport)
        cloud = Cloud(mport)

        # unitgate, seeded; its unit starts available (coil on).
        ug = Unitgate(work, ug_bin, mport, board_addr)
        children.append(ug.child)
        ug.seed()
        obs.coil_change(UG_COIL, True, time.monotonic() + CHANGE_WITHIN)
        until("unitgate settled after seeding", ug.settled, SETTLE_WITHIN)
        cloud.next("ug_status", lambda s: s == "online", START_WITHIN)

        # ThingsBoard IoT Gateway, in its own directory (it writes ./logs and its state there).
        tbdir = work / "thingsboard"
        (tbdir / "config").mkdir(parents=True)
        (tbdir / "logs").mkdir()
        tb_configs(tbdir / "config", mport, host, int(bport))
        tb = Child("thingsboard-gateway", [tb_bin], work / "thingsboard.log", cwd=tbdir,
                   env=dict(os.environ, TB_GW_CONFIG_DIR=str(tbdir / "config")))
        children.append(tb)
        until("ThingsBoard gateway asked for its session limits",
              lambda: tb.check() or cloud.limits_answered.is_set(), START_WITHIN)
        cloud.next("tb_connect", lambda b: b.get("device") == BOARD, START_WITHIN)
        # It takes RPCs once its core has started, a moment after it says the device is
        # connected (one sent before is lost): probe with a read until one is answered.
        rid = iter(range(1, 10**9))

        def tb_answers():
            tb.check()
            k = next(rid)
            cloud.publish("v1/gateway/rpc", json.dumps(
                {"device": BOARD, "data": {"id": k, "method": "getCoil", "params": None}}))
            try:
                return cloud.next("tb_reply", lambda b: b.get("id") == k, 1.0)
            except RuntimeError:
                return None

        until("ThingsBoard gateway answers an RPC", tb_answers, START_WITHIN)
        log("bench: both gateways up")

        # Warm-up, then idle footprint with both connected and polling the board.
        ug_on, tb_on = True, False
        ug_ns, tb_ns, commit_ns = [], [], []
        bare = BareCommit(work / "baseline.db")

        def ug_command():
            nonlocal ug_on
            k = next(rid)
            op, body = ("grant_access", {"tenancy_id": TENANCY}) if ug_on else ("deallocate", {})
            payload = json.dumps({"request_id": f"r-{k}", "unit_id": UNIT, **body})
            t0 = time.monotonic_ns()
            cloud.publish(f"unitgate/v1/{SITE}/cmd/{op}", payload)
            seen = obs.coil_change(UG_COIL, not ug_on, time.monotonic() + CHANGE_WITHIN)
            reply = cloud.next("ug_reply", lambda b: b.get("request_id") == f"r-{k}", CHANGE_WITHIN)
            if reply.get("ok") is not True:
                raise RuntimeError(f"unitgate {op}: {reply}")
            ug_on = not ug_on
            # Between samples, not in one; each GET costs unitgate some CPU (counted below).
            until("unitgate settled", ug.settled, SETTLE_WITHIN, poll=0.005)
            return seen["t_ns"] - t0

        def tb_command():
            nonlocal tb_on
            k = next(rid)
            payload = json.dumps({"device": BOARD, "data": {"id": k, "method": "setCoil",
                                                            "params": not tb_on}})
            t0 = time.monotonic_ns()
            cloud.publish("v1/gateway/rpc", payload)
            seen = obs.coil_change(TB_COIL, not tb_on, time.monotonic() + CHANGE_WITHIN)
            reply = cloud.next("tb_reply", lambda b: b.get("id") == k, CHANGE_WITHIN)
            if "error" in json.dumps(reply["data"]).lower():
                raise RuntimeError(f"ThingsBoard gateway setCoil: {reply}")
            tb_on = not tb_on
            return seen["t_ns"] - t0

        for _ in range(WARMUP):
            ug_command()
            tb_command()
        obs.expect_still()
        pids = {"unitgate": ug.child.pid, "thingsboard": tb.pid}
        log(f"bench: idle {IDLE_S:.0f} s")
        frames0 = obs.frames
        with Footprint(pids) as idle:
            time.sleep(IDLE_S)  # the measurement window itself, not a wait for an outcome
        idle_frames_per_s = round((obs.frames - frames0) / idle.wall, 1)
        obs.expect_still()

        log(f"bench: {OPS} commands per gateway, interleaved")
        load_before = os.getloadavg()
        ug.settle_gets = 0
        with Footprint(pids) as run:
            for i in range(OPS):
                ug_ns.append(ug_command())
                tb_ns.append(tb_command())
                commit_ns.append(bare.once())
                obs.expect_still()
                if (i + 1) % 50 == 0:
                    log(f"bench: {i + 1}/{OPS}")
        for c in (ug.child, tb, sim, children[0]):
            c.check()
        thread_counts = {n: threads(p) for n, p in pids.items()}
        machine = {"load_avg_1m_before": round(load_before[0], 2),
                   "load_avg_1m_after": round(os.getloadavg()[0], 2),
                   "unitgate_settle_gets": ug.settle_gets,
                   "board_frames_per_s_idle": idle_frames_per_s}

        versions = {
            "unitgate": subprocess.run([ug_bin, "--version"], capture_output=True,
                                       text=True).stdout.strip(),
            "thingsboard-gateway": metadata.version("thingsboard-gateway"),
            "pymodbus": metadata.version("pymodbus"),
            "python": platform.python_version(),
            "mosquitto": subprocess.run(["/usr/sbin/mosquitto", "-h"], capture_output=True,
                                        text=True).stdout.splitlines()[0],
        }
        # Mosquitto echoes the gateway's RPC replies back to it (it subscribes to the topic it
        # answers on; ThingsBoard's own MQTT transport would not): it logs each as a failed
        # request. Counted, so the CPU figure can be read with it in mind.
        tb_errors = Path(tb.log).read_text(errors="replace").count("|ERROR|")
        ug_errors = Path(ug.child.log).read_text(errors="replace").count('"level":"ERROR"')
        machine["bare_commit"] = series(commit_ns)
        report(ug_ns, tb_ns, idle, run, thread_counts, versions, ug_bin,
               {"unitgate": ug_errors, "thingsboard": tb_errors}, machine)
    except Exception:
        log(f"bench: FAILED; logs kept in {work}")
        raise
    finally:
        if cloud is not None:
            cloud.close()
        for c in reversed(children):
            c.stop()
    if os.environ.get("BENCH_TB_KEEP") == "1":
        log(f"bench: logs kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


def report(ug_ns, tb_ns, idle, run, thread_counts, versions, ug_bin, errors, machine):
    ug, tb = series(ug_ns), series(tb_ns)
    fi = {n: idle.json(n) for n in ("unitgate", "thingsboard")}
    fr = {n: run.json(n) for n in ("unitgate", "thingsboard")}
    for n in fr:
        fr[n]["cpu_ms_per_command"] = round(1000 * run.cpu_s[n] / len(ug_ns), 2)
        # What the commands cost beyond idling (polling, timers) for as long as the run took.
        above = run.cpu_s[n] - idle.cpu_s[n] * run.wall / idle.wall
        fr[n]["cpu_ms_per_command_above_idle"] = round(1000 * above / len(ug_ns), 2)

    def ratio(a, b):
        return round(a / b, 1) if b else None

    rows = [
        ("command → coil p50 (ms)", ug["p50_ms"], tb["p50_ms"]),
        ("command → coil p99 (ms)", ug["p99_ms"], tb["p99_ms"]),
        ("command → coil max (ms)", ug["max_ms"], tb["max_ms"]),
        ("samples over 10 ms", ug["over_10ms"], tb["over_10ms"]),
        ("idle RSS max (MB)", fi["unitgate"]["rss_max_mb"], fi["thingsboard"]["rss_max_mb"]),
        ("idle CPU (% of a core)", fi["unitgate"]["cpu_pct_of_core"],
         fi["thingsboard"]["cpu_pct_of_core"]),
        ("run RSS max (MB)", fr["unitgate"]["rss_max_mb"], fr["thingsboard"]["rss_max_mb"]),
        ("run CPU (% of a core)", fr["unitgate"]["cpu_pct_of_core"],
         fr["thingsboard"]["cpu_pct_of_core"]),
        ("run CPU per command (ms)", fr["unitgate"]["cpu_ms_per_command"],
         fr["thingsboard"]["cpu_ms_per_command"]),
        ("  of which above idle (ms)", fr["unitgate"]["cpu_ms_per_command_above_idle"],
         fr["thingsboard"]["cpu_ms_per_command_above_idle"]),
        ("threads", thread_counts["unitgate"], thread_counts["thingsboard"]),
        ("ERROR lines in its log", errors["unitgate"], errors["thingsboard"]),
    ]
    print(f"\nunitgate vs ThingsBoard IoT Gateway {versions['thingsboard-gateway']}: "
          f"cloud command over MQTT → coil on the same Modbus TCP board, N={len(ug_ns)} each, "
          f"interleaved; idle window {idle.wall:.1f} s, run {run.wall:.1f} s")
    print(f"{'':30} {'unitgate':>12} {'ThingsBoard':>12} {'TB/unitgate':>12}")
    for name, a, b in rows:
        r = ratio(b, a)
        print(f"{name:30} {a:>12} {b:>12} {'n/a' if r is None else f'{r}x':>12}")
    c = machine["bare_commit"]
    print(f"baseline, same disk, same run: bare SQLite one-row commit (WAL, synchronous=FULL) "
          f"p50 {c['p50_ms']} ms, p99 {c['p99_ms']} ms (unitgate's command commits before the "
          f"coil moves)")
    print(f"unitgate binary: {ug_bin}; {versions}; {machine}")
    print(json.dumps({
        "bench": "peer_thingsboard",
        "ops": len(ug_ns),
        "poll_ms": POLL_MS,
        "unitgate": {"command_to_coil": ug, "idle": fi["unitgate"], "run": fr["unitgate"],
                     "threads": thread_counts["unitgate"]},
        "thingsboard": {"command_to_coil": tb, "idle": fi["thingsboard"],
                        "run": fr["thingsboard"], "threads": thread_counts["thingsboard"]},
        "ratio_tb_over_unitgate": {
            "p50": ratio(tb["p50_ms"], ug["p50_ms"]), "p99": ratio(tb["p99_ms"], ug["p99_ms"]),
            "idle_rss": ratio(fi["thingsboard"]["rss_max_mb"], fi["unitgate"]["rss_max_mb"]),
            "idle_cpu": ratio(fi["thingsboard"]["cpu_pct_of_core"],
                              fi["unitgate"]["cpu_pct_of_core"]),
            "run_rss": ratio(fr["thingsboard"]["rss_max_mb"], fr["unitgate"]["rss_max_mb"]),
            "run_cpu": ratio(fr["thingsboard"]["cpu_s"], fr["unitgate"]["cpu_s"]),
        },
        "log_error_lines": errors,
        "machine": machine,
        "versions": versions,
        "unitgate_bin": str(ug_bin),
    }))


if __name__ == "__main__":
    main()
