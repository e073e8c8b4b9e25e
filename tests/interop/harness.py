"""What every peer of the interop suite needs: free ports, waits with a deadline, and child
processes whose output is kept in a log file (target/interop-logs/) and shown on failure."""

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LOGS = Path(os.environ.get("INTEROP_LOGS", REPO / "target" / "interop-logs"))
# How long any single outcome may take before a test gives up on it.
WAIT = 20.0
POLL = 0.02


def free_port():
    """A port that was free a moment ago (bound to 0, then released for the peer to take)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def until(what, check, timeout=WAIT):
    """Polls `check()` until it returns something truthy, which is returned; fails after
    `timeout` seconds naming `what` and the last value seen."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s (last: {value!r})")
        time.sleep(POLL)


def port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class Process:
    """A child process whose stdout and stderr go to `log` (appended to across restarts)."""

    def __init__(self, name, argv, log, env=None):
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log = Path(log)
        self.env = env
        self.proc = None

    def start(self):
        assert not self.running(), f"{self.name} already runs"
        with open(self.log, "ab") as out:
            out.write(f"==== start: {' '.join(self.argv)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        return self

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self):
        return self.proc.pid

    def kill9(self):
        """Kills the process with SIGKILL: no clean shutdown, sockets closed by the kernel."""
        if self.running():
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=WAIT)
        self._note("killed (SIGKILL)")

    def stop(self, grace=10.0):
        """SIGTERM, then SIGKILL after `grace` seconds; returns the exit code."""
        if self.proc is None:
            return None
        if self.running():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=WAIT)
        self._note(f"stopped, exit code {self.proc.returncode}")
        return self.proc.returncode

    def _note(self, text):
        with open(self.log, "ab") as out:
            out.write(f"==== {text}\n".encode())

    def tail(self, lines=80):
        if not self.log.exists():
            return f"({self.log} does not exist)"
        text = self.log.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


def http_json(url, method="GET", body=None, token=None, timeout=10):
    """One HTTP request with an optional JSON body and Bearer token: (status, JSON body or
    None). An error status is an answer here, not an exception."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    return status, (json.loads(raw) if raw else None)
