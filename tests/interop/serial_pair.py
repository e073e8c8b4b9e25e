"""A virtual serial line: `socat` joining two pseudo-terminals, each reachable by a stable
link name, so a peer opens one end and the gateway the other (as over an RS-485 adapter;
a pty ignores the baud rate, so wire timing is not exercised)."""

import os
from pathlib import Path

from harness import Process, until


class SerialPair:
    def __init__(self, workdir, log, name="line"):
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self.a = workdir / f"{name}-a"
        self.b = workdir / f"{name}-b"
        self.process = Process(
            f"socat-{name}",
            [
                "socat",
                "-d",
                "-d",
                f"pty,raw,echo=0,link={self.a}",
                f"pty,raw,echo=0,link={self.b}",
            ],
            log,
        )

    def start(self):
        self.process.start()
        until(
            f"socat made {self.a.name} and {self.b.name}",
            lambda: self._ready(),
        )
        return self

    def _ready(self):
        assert self.process.running(), f"socat exited:\n{self.process.tail()}"
        return all(os.path.exists(p) for p in (self.a, self.b))

    def stop(self):
        return self.process.stop(grace=5)
