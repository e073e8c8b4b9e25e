"""Driver for scripts/profile-command.sh: bench-thingsboard's unitgate half (Mosquitto, hw-sim's
Modbus TCP relay board, one unit on a coil), without ThingsBoard, for counting instructions.

Reads PROF_OPS (cloud commands, as bench.py: grant_access/deallocate alternately, each waited
for: the coil change on the board and the reply), PROF_SETTLE (1: after each command poll
GET /v1/devices until settled, as bench.py does; 0: no polls), PROF_GETS (extra GET
/v1/devices requests after the commands, each on a new connection), PROF_IDLE_S (seconds idle
at the end), PROF_POLL_MS (the board's poll_ms, default bench.py's 250). UNITGATE_CMD is the
command line prefix the gateway is run under (e.g. valgrind), UNITGATE_BIN the binary.
Prints one JSON line: what was done, the wall time of each phase and the gateway's CPU time
in it (*_cpu_ms: its live threads' schedstat, ns resolution, user + system; meaningful only
without valgrind, and inflated on a loaded machine).
"""

import os
import shlex
import sys
import tempfile
import time
import json
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "bench-thingsboard"))
import bench  # noqa: E402  (its Child, Cloud, Observations, Unitgate and helpers)

OPS = int(os.environ.get("PROF_OPS", "50"))
SETTLE = os.environ.get("PROF_SETTLE", "1") == "1"
GETS = int(os.environ.get("PROF_GETS", "0"))
IDLE_S = float(os.environ.get("PROF_IDLE_S", "0"))
bench.POLL_MS = int(os.environ.get("PROF_POLL_MS", "250"))
# Under valgrind the gateway starts and answers ~50x slower.
bench.START_WITHIN = bench.CHANGE_WITHIN = bench.SETTLE_WITHIN = 120.0


def cpu_ns(pid):
    """CPU time (user + system, ns) of the process's live threads, from schedstat."""
    total = 0
    for t in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((t / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


class Wrapped(bench.Child):
    """bench.Child with the gateway's command line prefixed by UNITGATE_CMD."""

    def __init__(self, name, argv, log_path, cwd=None, env=None):
        prefix = shlex.split(os.environ.get("UNITGATE_CMD", "")) if name == "unitgate" else []
        super().__init__(name, prefix + list(argv), log_path, cwd=cwd, env=env)


bench.Child = Wrapped


def main():
    ug_bin = Path(os.environ["UNITGATE_BIN"])
    sim_bin = Path(os.environ.get("HW_SIM_BIN", bench.REPO / "target/release/hw-sim"))
    work = Path(tempfile.mkdtemp(prefix="profile-command-"))
    children = []
    cloud = None
    out = {"ops": OPS, "settle": SETTLE, "gets": GETS, "idle_s": IDLE_S,
           "poll_ms": bench.POLL_MS, "work": str(work)}
    try:
        mport = bench.free_port()
        (work / "mosquitto.conf").write_text(
            f"listener {mport} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n"
            "user root\nlog_dest stderr\nlog_type error\nlog_type warning\n")
        children.append(bench.Child("mosquitto", ["/usr/sbin/mosquitto", "-c",
                                                  work / "mosquitto.conf"], work / "mosquitto.log"))
        bench.until("mosquitto listening", lambda: children[-1].check() or bench.port_open(mport), 10)
        cport = bench.free_port()
        (work / "site.toml").write_text(f"""
[[devices.relay_boards]]
id = "{bench.BOARD}"
transport = "tcp"
address = "127.0.0.1:0"
unit_id = 1
coils = 32
inputs = 8
response_delay_ms = 3
""")
        sim = bench.Child("hw-sim", [sim_bin, "serve", "-c", work / "site.toml", "--listen",
                                     f"127.0.0.1:{cport}"], work / "hw-sim.log")
        children.append(sim)
        bench.until("hw-sim control API", lambda: sim.check() or bench.port_open(cport), 10)
        with urllib.request.urlopen(f"http://127.0.0.1:{cport}/devices", timeout=5) as r:
            board_addr = next(d for d in json.load(r) if d["id"] == bench.BOARD)["address"]["address"]
        obs = bench.Observations(cport)
        cloud = bench.Cloud(mport)
        ug = bench.Unitgate(work, ug_bin, mport, board_addr)
        children.append(ug.child)
        ug.seed()
        obs.coil_change(bench.UG_COIL, True, time.monotonic() + bench.CHANGE_WITHIN)
        bench.until("unitgate settled after seeding", ug.settled, bench.SETTLE_WITHIN)
        cloud.next("ug_status", lambda s: s == "online", bench.START_WITHIN)
        ug.settle_gets = 0

        on = True
        c0 = cpu_ns(ug.child.pid)
        t = time.monotonic()
        for k in range(OPS):
            op, body = ("grant_access", {"tenancy_id": bench.TENANCY}) if on else ("deallocate", {})
            cloud.publish(f"unitgate/v1/{bench.SITE}/cmd/{op}",
                          json.dumps({"request_id": f"p-{k}", "unit_id": bench.UNIT, **body}))
            obs.coil_change(bench.UG_COIL, not on, time.monotonic() + bench.CHANGE_WITHIN)
            reply = cloud.next("ug_reply", lambda b, k=k: b.get("request_id") == f"p-{k}",
                               bench.CHANGE_WITHIN)
            if reply.get("ok") is not True:
                raise RuntimeError(f"{op}: {reply}")
            on = not on
            if SETTLE:
                bench.until("unitgate settled", ug.settled, bench.SETTLE_WITHIN, poll=0.005)
        if not SETTLE:
            bench.until("unitgate settled", ug.settled, bench.SETTLE_WITHIN, poll=0.005)
        out["commands_s"] = round(time.monotonic() - t, 2)
        out["settle_gets"] = ug.settle_gets
        out["commands_cpu_ms"] = round((cpu_ns(ug.child.pid) - c0) / 1e6, 2)
        t = time.monotonic()
        c0 = cpu_ns(ug.child.pid)
        for _ in range(GETS):
            ug.ok("GET", "/v1/devices")
        out["gets_s"] = round(time.monotonic() - t, 2)
        out["gets_cpu_ms"] = round((cpu_ns(ug.child.pid) - c0) / 1e6, 2)
        c0 = cpu_ns(ug.child.pid)
        time.sleep(IDLE_S)  # the idle phase itself, not a wait for a condition
        out["idle_cpu_ms"] = round((cpu_ns(ug.child.pid) - c0) / 1e6, 2)
        print(json.dumps(out), flush=True)
    finally:
        if cloud:
            cloud.close()
        for c in reversed(children):
            c.stop(grace=60.0)


if __name__ == "__main__":
    main()
