"""pymodbus as the site's relay board: a Modbus TCP or RTU server with coils and discrete
inputs, run on its own asyncio loop in a thread of the test process. Tests read the coils
and set the inputs through the server's own datastore (`async_getValues` /
`async_setValues`), never through our code.

pymodbus 3.16 datastore: a `SimData` block of `DataType.BITS` at address 0 is coil (or
input) 0 on the wire. The deprecated `ModbusSequentialDataBlock` would be offset by one."""

import asyncio
import threading
import time

from pymodbus import FramerType
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from harness import WAIT

# Modbus function codes naming the datastore tables.
COILS = 1
INPUTS = 2


def _bits(n):
    return [SimData(0, values=[False] * n, datatype=DataType.BITS)]


def _registers():
    return [SimData(0, count=1, datatype=DataType.REGISTERS)]


class ModbusPeer:
    """`transport` "tcp" (listens on 127.0.0.1:`port`) or "rtu" (serves the serial device
    `port`); `unit_id` the Modbus device id it answers to."""

    def __init__(self, transport, port, unit_id=1, coils=16, inputs=16):
        self.transport = transport
        self.port = port
        self.unit_id = unit_id
        self.n_coils = coils
        self.n_inputs = inputs
        # Every write the board took: (monotonic time, function code, address, values).
        self.writes = []
        device = SimDevice(
            unit_id,
            simdata=(_bits(coils), _bits(inputs), _registers(), _registers()),
            action=self._on_access,
        )
        self._device = device
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"pymodbus-{transport}", daemon=True
        )
        self.server = None

    async def _on_access(self, func_code, _start, address, _count, _registers, values):
        # Called by pymodbus on its loop for every request; writes carry their values.
        if values is not None:
            self.writes.append((time.monotonic(), func_code, address, list(values)))
        return None

    def coil_writes(self, coil):
        """(time, on) of every write to `coil`, single (fc 5) or multiple (fc 15)."""
        out = []
        for t, fc, address, values in list(self.writes):
            if fc in (5, 15) and address <= coil < address + len(values):
                out.append((t, bool(values[coil - address])))
        return out

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(WAIT)

    def start(self):
        self._thread.start()

        async def serve():
            if self.transport == "tcp":
                server = ModbusTcpServer([self._device], address=("127.0.0.1", self.port))
            else:
                server = ModbusSerialServer(
                    [self._device],
                    framer=FramerType.RTU,
                    port=str(self.port),
                    baudrate=115200,
                )
            await server.serve_forever(background=True)
            return server

        self.server = self._run(serve())
        return self

    def coils(self):
        """Every coil, as the board holds them."""
        return self._run(
            self.server.async_getValues(self.unit_id, COILS, 0, self.n_coils)
        )[: self.n_coils]

    def inputs(self):
        return self._run(
            self.server.async_getValues(self.unit_id, INPUTS, 0, self.n_inputs)
        )[: self.n_inputs]

    def set_input(self, n, on):
        """A door or gate sensor changing, as the board sees it."""
        self._run(self.server.async_setValues(self.unit_id, INPUTS, n, [bool(on)]))

    def stop(self):
        if self._thread.is_alive():
            if self.server is not None:
                self._run(self.server.shutdown())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(WAIT)
        if not self._loop.is_running():
            self._loop.close()
