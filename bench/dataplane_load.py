"""Load generator of the data-plane benchmark: one process, driven over stdin/stdout.

    python -m bench.dataplane_load

Owns the client side of bench/dataplane.py's loads against bench/dataplane_server.py. The
driver starts several of these (inside the benchmark's network namespace when it has one)
and sends each the same command, one JSON object per line; each answers one JSON line:

- ``{"op": "bulk", "host", "port", "conc", "start", "seconds"}``: ``conc`` connections
  (one thread each, blocking ``recv_into``) ask for a download and count the bytes that
  arrive between ``start`` and ``start + seconds``;
- ``{"op": "conn", ..., "conc"}``: ``conc`` concurrent connect → 1 byte → its echo → close
  loops on one selectors loop; counts completed cycles, errors (refused, reset, EOF, wrong
  byte) and cycles still unfinished at the end (``stuck``: e.g. a SYN waiting for a retry);
- ``{"op": "rr", ..., "conc", "size"}``: ``conc`` keep-alive connections, each sending
  ``size`` bytes and waiting for their echo before the next; counts round trips.

``start`` is a ``time.monotonic()`` instant (system-wide, so every process starts
together); the answer carries the counts, the window, and this process's CPU seconds.
Non-blocking sockets and one loop rather than a thread per connection: Python threads
would spend the shared cores on the GIL instead of on the path being measured.
"""

from __future__ import annotations

import errno
import json
import os
import selectors
import socket
import sys
import threading
import time
from typing import Any

MAX_CONN_SECONDS = 5.0  # a cycle older than this counts as an error and is abandoned


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def _sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def bulk(host: str, port: int, conc: int, start: float, seconds: float) -> dict[str, Any]:
    end = start + seconds
    counts = [0] * conc
    errors = [0]

    def one(i: int) -> None:
        buf = bytearray(1 << 20)
        try:
            with socket.create_connection((host, port), timeout=5) as s:
                s.sendall(b"D")
                _sleep_until(start)
                s.settimeout(max(0.5, end - time.monotonic() + 0.5))
                view = memoryview(buf)
                while True:
                    n = s.recv_into(view)
                    if not n:
                        errors[0] += 1  # the path closed a download that never ends
                        return
                    if time.monotonic() >= end:
                        return
                    counts[i] += n
        except OSError:
            errors[0] += 1

    threads = [threading.Thread(target=one, args=(i,)) for i in range(conc)]
    for t in threads:
        t.start()
    _sleep_until(start)
    cpu0 = _cpu()
    for t in threads:
        t.join()
    return {"bytes": sum(counts), "errors": errors[0], "seconds": seconds, "cpu": _cpu() - cpu0}


def conn(host: str, port: int, conc: int, start: float, seconds: float) -> dict[str, Any]:
    """Connect, send one byte, read it back, close: ``conc`` of these in flight."""
    sel = selectors.DefaultSelector()
    end = start + seconds
    done = errors = 0
    live: dict[socket.socket, float] = {}
    err_kinds: dict[str, int] = {}

    def fail(s: socket.socket, why: str) -> None:
        nonlocal errors
        errors += 1
        err_kinds[why] = err_kinds.get(why, 0) + 1
        finish(s)

    def finish(s: socket.socket) -> None:
        sel.unregister(s)
        del live[s]
        s.close()
        if time.monotonic() < end:
            begin()

    def begin() -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        live[s] = time.monotonic()
        code = s.connect_ex((host, port))
        if code in (0, errno.EINPROGRESS):
            sel.register(s, selectors.EVENT_WRITE, "connecting")
        else:
            sel.register(s, selectors.EVENT_WRITE, "failed")
            fail(s, errno.errorcode.get(code, str(code)))

    _sleep_until(start)
    cpu0 = _cpu()
    for _ in range(conc):
        begin()
    while live:
        now = time.monotonic()
        for key, _mask in sel.select(0.05):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            if key.data == "connecting":
                code = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    fail(s, errno.errorcode.get(code, str(code)))
                    continue
                try:
                    s.send(b"x")
                except OSError as e:
                    fail(s, type(e).__name__)
                    continue
                sel.modify(s, selectors.EVENT_READ, "reading")
            else:
                try:
                    got = s.recv(16)
                except OSError as e:
                    fail(s, type(e).__name__)
                    continue
                if got == b"x":
                    if time.monotonic() <= end:
                        done += 1
                    finish(s)
                else:
                    fail(s, "eof" if not got else "wrong reply")
        if now > end:  # stop: what is still in flight is stuck (or just slow)
            stuck = [s for s, t0 in live.items() if now - t0 > MAX_CONN_SECONDS or now > end + 1]
            for s in stuck:
                fail(s, "stuck")
    return {"ops": done, "errors": errors, "error_kinds": err_kinds, "seconds": seconds,
            "cpu": _cpu() - cpu0}  # fmt: skip


def rr(host: str, port: int, conc: int, size: int, start: float, seconds: float) -> dict[str, Any]:
    """Keep-alive request/response: send ``size`` bytes, await their echo, repeat."""
    sel = selectors.DefaultSelector()
    msg = b"r" * size
    socks = []
    for _ in range(conc):
        s = socket.create_connection((host, port), timeout=5)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        socks.append(s)
    pending = {s: 0 for s in socks}  # bytes of the current echo still to come
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    end = start + seconds
    done = errors = 0
    _sleep_until(start)
    cpu0 = _cpu()
    for s in socks:
        s.send(msg)
        pending[s] = size
    while time.monotonic() < end and pending:
        for key, _mask in sel.select(0.05):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            try:
                got = s.recv(65536)
            except OSError:
                got = b""
            if not got:
                errors += 1
                sel.unregister(s)
                del pending[s]
                continue
            pending[s] -= len(got)
            if pending[s] <= 0:
                done += 1
                s.send(msg)
                pending[s] = size
    cpu = _cpu() - cpu0
    for s in socks:
        s.close()
    return {"ops": done, "errors": errors, "seconds": seconds, "cpu": cpu}


def command(cmd: dict[str, Any]) -> dict[str, Any]:
    op = cmd["op"]
    where = (cmd["host"], int(cmd["port"]))
    start, seconds, conc = float(cmd["start"]), float(cmd["seconds"]), int(cmd["conc"])
    if op == "bulk":
        return bulk(*where, conc, start, seconds)
    if op == "conn":
        return conn(*where, conc, start, seconds)
    if op == "rr":
        return rr(*where, conc, int(cmd.get("size", 64)), start, seconds)
    if op == "ping":
        return {"pid": os.getpid()}
    return {"error": f"unknown op {op!r}"}


def main() -> int:
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            reply = command(json.loads(line))
        except Exception as e:  # noqa: BLE001 - the driver prints it; the worker lives on
            reply = {"error": f"{type(e).__name__}: {e}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
