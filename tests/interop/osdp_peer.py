"""The Python libosdp package (the reference C libosdp in a wheel) as a gate keypad: an
OSDP peripheral device (PD) on one end of a serial line, the gateway's control panel on
the other. It declares what a keypad with a display has (LED, buzzer, text: libosdp NAKs
a command without its capability and the CP then drops the PD), sends key presses and
records every command the gateway sends it."""

import os
import threading

from osdp import (
    Capability,
    Channel,
    Command,
    Event,
    LibFlag,
    LogLevel,
    PDCapabilities,
    PDInfo,
    PeripheralDevice,
)

from harness import until

# OSDP keypad codes: digits in ASCII, '*' 0x7F, '#' 0x0D (OSDP 2.2, osdp_KEYPAD).
KEY_CODES = {**{str(d): ord(str(d)) for d in range(10)}, "*": 0x7F, "#": 0x0D}


class PtyChannel(Channel):
    """The PD's side of the line: libosdp wants reads that never block."""

    def __init__(self, path):
        super().__init__()
        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)

    def read(self, max_bytes):
        try:
            return os.read(self.fd, max_bytes)
        except BlockingIOError:
            return b""

    def write(self, buf):
        try:
            return os.write(self.fd, buf)
        except BlockingIOError:
            return 0

    def flush(self):
        pass

    def close(self):
        os.close(self.fd)


class KeypadPeer:
    """A keypad at OSDP `address` on serial device `port`; `scbk` (16 bytes) turns on the
    secure channel, enforced (no plaintext, no default key), as a commissioned reader does."""

    def __init__(self, port, address=0, scbk=None):
        self.channel = PtyChannel(port)
        self.address = address
        caps = PDCapabilities(
            [
                (Capability.LEDControl, 4, 1),
                (Capability.AudibleControl, 2, 1),
                (Capability.TextOutput, 1, 1),
            ]
        )
        flags = [LibFlag.EnforceSecure] if scbk else []
        info = PDInfo(address, self.channel, scbk=scbk, flags=flags, name="interop-pd")
        self.pd = PeripheralDevice(info, caps, log_level=LogLevel.Warning)
        self._lock = threading.Lock()
        self._commands = []
        self.pd.set_command_handler(self._on_command)

    def _on_command(self, command):
        with self._lock:
            self._commands.append(dict(command))
        return 0, None

    def start(self):
        self.pd.start()
        return self

    def online(self):
        return self.pd.is_online()

    def secure(self):
        return self.pd.is_sc_active()

    def press(self, keys):
        """Key presses as one osdp_KEYPAD reply (the CP collects them on its next poll)."""
        data = bytes(KEY_CODES[k] for k in keys)
        assert self.pd.submit_event(
            {"event": Event.KeyPress, "reader_no": 0, "data": data}
        ), "libosdp refused the key event"

    def commands(self):
        with self._lock:
            return list(self._commands)

    def take_commands(self):
        with self._lock:
            out, self._commands = self._commands, []
        return out

    def wait_feedback(self, what):
        """Waits for the LED, buzzer and text commands of one decision; returns them by kind."""

        def got():
            seen = {c["command"] for c in self.commands()}
            return {Command.LED, Command.Buzzer, Command.Text} <= seen

        until(what, got)
        by_kind = {}
        for c in self.take_commands():
            by_kind.setdefault(c["command"], c)
        return by_kind

    def stop(self):
        try:
            if self.pd.thread is not None:
                self.pd.teardown()
        finally:
            self.channel.close()
