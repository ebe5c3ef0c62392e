"""Load-generator process for the idle-capacity and connect-storm scenarios.

    python -m bench.connload          (driven over stdin/stdout by bench/idle.py, bench/storm.py)

Owns the raw-socket subscriber used against every server (Orbited, Nchan, Pushpin): one
asyncio Protocol per connection writing a prepared HTTP request (a WebSocket upgrade or an
``Accept: text/event-stream`` GET) and reading the response head and body bytes, with no
HTTP or WebSocket library in between, so a process can hold ≈ 5 000 connections or open
thousands per second without being the bottleneck.

Commands, one JSON line each on stdin; one JSON line answers each:

- ``{"cmd": "hold", "target": T, "paths": [...], "rate": R}``: open one connection per
  path (R/s in waves every 50 ms, default 4 000/s, at most 64 handshakes in flight, so
  a slow server is not timed out: holding measures memory, the storm measures speed);
  answer once each has its response head (or failed): ``{"held": n, "errors": {...}}``.
  Connections stay open and watch for the marker bytes ``T["mark"]``.
- ``{"cmd": "marks"}``: ``{"marks": connections that received the marker at least once}``.
- ``{"cmd": "storm", "target": T, "paths": [...], "rate": R, "seconds": S, "timeout": W}``:
  open-loop: start connection i (path i mod len) at t0 + i/R whatever the earlier ones are
  doing (at most ``max_inflight`` at once; more are counted as ``client_cap``), each
  connect → request → complete response head (``101`` / ``200``: the server accepted and
  subscribed it) → close. Answers ok count, latencies (s, connect → head), errors by kind
  (``http_5xx``/``http_4xx``/``http_other``, ``refused``, ``reset`` = closed before the
  head, ``timeout``, ``client_cap``), the worst launch lag (a late launch means this
  process, not the server, was the bottleneck) and this process's CPU seconds.
- ``{"cmd": "close"}`` closes held connections; ``{"cmd": "quit"}`` exits.

A target T is ``{"host", "port", "kind": "ws"|"sse", "mark": "..."}``; paths are
subscribe paths of that server (bench/peers.py ``url()``).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import socket
import sys
import time
from typing import Any

from bench.wire import run_loop

WAVE = 200  # connections started per 50 ms while holding: a burst is the storm's job
PENDING = 64  # handshakes in flight per process while holding (closed loop: no time-outs)


def cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def build(target: dict[str, Any], path: str) -> bytes:
    """The request bytes for one subscribe path of a target."""
    host = f"{target['host']}:{target['port']}"
    if target["kind"] == "ws":
        extra = (
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        )
    else:
        extra = "Accept: text/event-stream\r\nCache-Control: no-cache\r\n"
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


class Conn(asyncio.Protocol):
    """One subscriber: resolves ``head`` at the response head, ``first`` at the first body
    byte (both with an error kind or None)."""

    def __init__(self, request: bytes, mark: bytes) -> None:
        self.request = request
        self.mark = mark
        self.buf = b""
        self.head: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self.first: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.marked = False

    def _settle(self, fut: asyncio.Future[str | None], value: str | None) -> None:
        if not fut.done():
            fut.set_result(value)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if not self.head.done():
            self.buf += data
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = self.buf.split(b" ", 2)[1:2]
            code = int(status[0]) if status and status[0].isdigit() else 0
            if code not in (101, 200):
                kind = f"http_{code // 100}xx" if code >= 400 else "http_other"
                self._settle(self.head, kind)
                self._settle(self.first, kind)
                self.transport.close()  # type: ignore[union-attr]
                return
            self._settle(self.head, None)
            data, self.buf = self.buf[end + 4 :], b""
        if data:
            self._settle(self.first, None)
            if not self.marked and self.mark and self.mark in data:
                self.marked = True

    def connection_lost(self, exc: Exception | None) -> None:
        self._settle(self.head, "reset")
        self._settle(self.first, "reset")


IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h: pick the port at connect(), per 4-tuple


class Sources:
    """Source addresses for client sockets, rotated over 127.<base>.<1..250>: with one
    source address, connect() searches one ephemeral port range shared by every socket to
    the server (and with everything else on the box), which gets slow (and burns this
    process's CPU in the kernel) past ≈ 10 000 connections."""

    def __init__(self, base: int) -> None:
        self.addrs = [f"127.{base}.{i // 250}.{1 + i % 250}" for i in range(250)]
        self.i = 0

    async def connect(self, host: str, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            self.i = (self.i + 1) % len(self.addrs)
            sock.bind((self.addrs[self.i], 0))
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
        except BaseException:
            sock.close()
            raise
        return sock


SOURCES = Sources(10 + os.getpid() % 200)


def classify(e: BaseException) -> str:
    if isinstance(e, ConnectionRefusedError):
        return "refused"
    if isinstance(e, (asyncio.TimeoutError, TimeoutError)):
        return "timeout"
    if isinstance(e, (ConnectionResetError, BrokenPipeError)):
        return "reset"
    return type(e).__name__


class Worker:
    def __init__(self) -> None:
        self.held: list[Conn] = []

    async def hold(
        self, target: dict[str, Any], paths: list[str], rate: float | None = None
    ) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        mark = target.get("mark", "").encode()
        errors: dict[str, int] = {}

        pending = asyncio.Semaphore(PENDING)

        async def one(path: str) -> None:
            try:
                async with pending:
                    sock = await asyncio.wait_for(
                        SOURCES.connect(target["host"], target["port"]), 30
                    )
                    _, conn = await loop.create_connection(
                        lambda: Conn(build(target, path), mark), sock=sock
                    )
                    err = await asyncio.wait_for(conn.head, 60)
            except Exception as e:  # noqa: BLE001 - every failure is counted by kind
                err = classify(e)
            else:
                self.held.append(conn)
            if err:
                errors[err] = errors.get(err, 0) + 1

        tasks = []
        wave = max(1, round(float(rate) * 0.05)) if rate else WAVE
        for i in range(0, len(paths), wave):
            tasks += [asyncio.create_task(one(k)) for k in paths[i : i + wave]]
            await asyncio.sleep(0.05)
        await asyncio.gather(*tasks)
        live = sum(1 for c in self.held if c.transport and not c.transport.is_closing())
        return {"held": live, "errors": errors}

    def marks(self) -> dict[str, Any]:
        return {"marks": sum(1 for c in self.held if c.marked)}

    def close(self) -> dict[str, Any]:
        for c in self.held:
            if c.transport:
                c.transport.close()
        n, self.held = len(self.held), []
        return {"closed": n}

    async def storm(self, cmd: dict[str, Any]) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        target, rate, seconds = cmd["target"], float(cmd["rate"]), float(cmd["seconds"])
        timeout, cap = float(cmd.get("timeout", 5.0)), int(cmd.get("max_inflight", 4000))
        paths = cmd["paths"]
        latencies: list[float] = []
        errors: dict[str, int] = {}
        inflight = [0]
        lag = [0.0]

        def err(kind: str) -> None:
            errors[kind] = errors.get(kind, 0) + 1

        async def one(path: str) -> None:
            start = time.perf_counter()
            conn: Conn | None = None
            try:
                async with asyncio.timeout(timeout):
                    sock = await SOURCES.connect(target["host"], target["port"])
                    _, conn = await loop.create_connection(
                        lambda: Conn(build(target, path), b""), sock=sock
                    )
                    kind = await conn.head
            except Exception as e:  # noqa: BLE001 - counted by kind
                kind = classify(e)
            finally:
                inflight[0] -= 1
                if conn is not None and conn.transport is not None:
                    conn.transport.abort()  # RST: no client-side TIME_WAIT (ports)
            if kind:
                err(kind)
            else:
                latencies.append(time.perf_counter() - start)

        cpu0 = cpu_s()
        total = max(1, round(rate * seconds))
        t0 = loop.time() + 0.05
        tasks = []
        for i in range(total):
            due = t0 + i / rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                lag[0] = max(lag[0], -delay)
            if inflight[0] >= cap:
                err("client_cap")
                continue
            inflight[0] += 1
            tasks.append(asyncio.create_task(one(paths[i % len(paths)])))
        await asyncio.gather(*tasks)
        return {
            "offered": total,
            "ok": len(latencies),
            "latencies": latencies,
            "errors": errors,
            "elapsed_s": loop.time() - t0,
            "launch_lag_max_s": lag[0],
            "cpu_s": cpu_s() - cpu0,
        }


async def serve() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    worker = Worker()
    while line := await reader.readline():
        cmd = json.loads(line)
        op = cmd["cmd"]
        if op == "quit":
            break
        if op == "hold":
            cpu0 = cpu_s()
            out = await worker.hold(cmd["target"], cmd["paths"], cmd.get("rate"))
            out["cpu_s"] = cpu_s() - cpu0
        elif op == "marks":
            out = worker.marks()
        elif op == "close":
            out = worker.close()
        elif op == "storm":
            out = await worker.storm(cmd)
        else:
            out = {"error": f"unknown command {op!r}"}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()
    worker.close()


if __name__ == "__main__":
    run_loop(serve())  # uvloop when installed: the load, not the loader, is measured
