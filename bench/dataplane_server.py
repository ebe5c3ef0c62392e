"""The far end of the data-plane benchmark: a download/echo TCP server on asyncio.

    python -m bench.dataplane_server --ready-file F [--reuse-port] HOST:PORT [HOST:PORT ...]

Owns the server side of bench/dataplane.py's three loads, on every listed port alike
(each path gets ports of its own so their flows never share a 4-tuple space):

- a connection whose first byte is ``D`` is a download: the server writes 256 KiB chunks
  until the client goes away (the client counts what it received, so every byte counted
  has crossed the whole path);
- any other connection is an echo: every byte comes back (the 1-byte connect/echo/close
  load and the 64-byte keep-alive request/response load).

Several processes may serve the same ports (``--reuse-port``, SO_REUSEPORT) so that the
direct baseline is not limited by one Python process. Writes the ready file once
listening, then runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path

CHUNK = b"\0" * 262144
CHUNKS_PER_TURN = 8  # then yield: a fast reader must not starve the loop's other sockets


class Conn(asyncio.Protocol):
    __slots__ = ("transport", "mode", "paused", "loop")

    def __init__(self) -> None:
        self.mode = ""
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.loop = asyncio.get_running_loop()

    def data_received(self, data: bytes) -> None:
        if self.mode == "E":
            self.transport.write(data)
        elif not self.mode:
            if data[:1] == b"D":
                self.mode = "D"
                self.transport.set_write_buffer_limits(high=1 << 20)
                self.pump()
            else:
                self.mode = "E"
                self.transport.write(data)

    def pump(self) -> None:
        for _ in range(CHUNKS_PER_TURN):
            if self.paused or self.transport.is_closing():
                return
            self.transport.write(CHUNK)
        self.loop.call_soon(self.pump)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.mode == "D":
            self.pump()

    def connection_lost(self, exc: Exception | None) -> None:
        self.paused = True


async def serve(addresses: list[tuple[str, int]], ready: Path, reuse_port: bool) -> None:
    loop = asyncio.get_running_loop()
    servers = []
    bound = []
    for host, port in addresses:
        server = await loop.create_server(
            Conn, host, port, backlog=4096, reuse_port=reuse_port, reuse_address=True
        )
        servers.append(server)
        host, port = server.sockets[0].getsockname()[:2]
        bound.append(f"{host}:{port}")
    tmp = ready.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "listen": bound}))
    tmp.rename(ready)  # atomic: the driver never reads half a file
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.dataplane_server")
    p.add_argument("--ready-file", type=Path, required=True)
    p.add_argument("--reuse-port", action="store_true")
    p.add_argument("listen", nargs="+", help="HOST:PORT")
    args = p.parse_args(argv)
    addresses = []
    for item in args.listen:
        host, port = item.rsplit(":", 1)
        addresses.append((host, int(port)))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(addresses, args.ready_file, args.reuse_port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
