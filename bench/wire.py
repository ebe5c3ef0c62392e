"""The simulated browsers' connections: lean asyncio protocols for HTTP/1.1 and WebSocket.

Owns the client side of the browser port as bench/browsers.py drives it: a request and
its response (head, then the body whole or as it arrives), and a WebSocket (the upgrade,
then frames both ways). Why not the ``websockets`` library and asyncio streams, as
before: the load generator must cost less than the node it loads. On this 2-core box,
1 000 simulated browsers on streams and ``websockets`` (a task, a future and a timer per
received message) took about a core, more than the nodes they measured, so every
failover figure measured the generator's queueing. Here a connection is one
``asyncio.Protocol``: bytes are parsed in ``data_received`` (httptools, the node's own
HTTP parser, for responses; a few lines for the unmasked frames a server sends) and
each message goes straight to a callback, with one idle timer per connection instead of
one per message. bench/README.md ("Load generator") has the before/after figures.

Only what a browser page needs: no TLS, no redirects, no extensions, no fragmented
client messages. ``run_loop`` runs a load generator on uvloop (in the test extra) when it
is installed: the generators' own CPU per event or connection about halves again.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import struct
from collections.abc import Callable, Coroutine
from typing import Any

import httptools

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3


def run_loop(main: Coroutine[Any, Any, None], loop: str = "uvloop") -> None:
    """Run ``main`` on uvloop when ``loop`` asks for it and it is installed, else asyncio."""
    if loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            uvloop.run(main)
            return
    asyncio.run(main)


class HTTPStatusError(Exception):
    """A response other than the one expected (e.g. no 101 for an upgrade)."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        super().__init__(f"HTTP {status}")
        self.status, self.headers, self.body = status, headers, body


class WSClosed(Exception):
    """The WebSocket ended: ``code`` is the peer's close code (None: no close frame)."""

    def __init__(self, code: int | None, reason: str = "") -> None:
        super().__init__(f"ws closed {code}")
        self.code, self.reason = code, reason


class _Conn(asyncio.Protocol):
    """Shared by both kinds: the transport, the end of the connection as a future, and an
    idle watchdog (``idle()`` gives the allowed silence; re-read at each check)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = loop.create_future()
        self.idle: Callable[[], float] | None = None
        self._rx_at = loop.time()
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def watch(self, idle: Callable[[], float]) -> None:
        """Fail the connection with TimeoutError after ``idle()`` s without a byte."""
        self.idle = idle
        self._rx_at = self.loop.time()
        if self._timer is None:
            self._timer = self.loop.call_later(idle(), self._check)

    def _check(self) -> None:
        self._timer = None
        if self.idle is None or self.closed.done():
            return
        due = self._rx_at + self.idle()
        if self.loop.time() >= due:
            self.fail(TimeoutError("silence"))
        else:
            self._timer = self.loop.call_at(due, self._check)

    def fail(self, error: BaseException) -> None:
        if not self.closed.done():
            self.closed.set_exception(error)
        self.abort()

    def abort(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            self.transport.abort()  # no lingering FIN handshakes for thousands of these

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.closed.done():
            self.closed.set_exception(exc or EOFError("EOF"))
        self._lost(exc)

    def _lost(self, exc: Exception | None) -> None:
        pass


async def open_conn(factory: Callable[[], _Conn], host: str, port: int, timeout: float) -> Any:
    loop = asyncio.get_running_loop()
    _, proto = await asyncio.wait_for(loop.create_connection(factory, host, port), timeout)
    proto.closed.add_done_callback(_swallow)  # a failure nobody awaits is not a warning
    return proto


def _swallow(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


# -- HTTP/1.1 ----------------------------------------------------------------------------


class HTTPConn(_Conn):
    """One keep-alive HTTP/1.1 connection, one request at a time.

    ``await request(...)`` returns (status, lower-cased headers) once the head is in;
    then either ``await body()`` or ``stream(on_chunk)`` + ``await done()``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, host: str, port: int) -> None:
        super().__init__(loop)
        self.host, self.port = host, port
        self.reusable = False
        self._parser: httptools.HttpResponseParser | None = None
        self._head: asyncio.Future[tuple[int, dict[str, str]]] | None = None
        self._done: asyncio.Future[bytes] | None = None
        self._headers: dict[str, str] = {}
        self._chunks: list[bytes] = []
        self._on_chunk: Callable[[bytes], None] | None = None
        self._name = b""

    def send(self, method: str, target: str, headers: dict[str, str] | None = None) -> None:
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if method == "POST":
            lines.append("Content-Length: 0")
        self.reusable = False  # until this response has been read to its end
        self._parser = httptools.HttpResponseParser(self)
        self._head = self.loop.create_future()
        self._done = self.loop.create_future()
        self._headers, self._chunks, self._on_chunk = {}, [], None
        assert self.transport is not None
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def stream(self, on_chunk: Callable[[bytes], None]) -> None:
        """Hand the body to ``on_chunk`` as it arrives (what came already, first)."""
        self._on_chunk = on_chunk
        chunks, self._chunks = self._chunks, []
        for chunk in chunks:
            on_chunk(chunk)

    async def head(self) -> tuple[int, dict[str, str]]:
        assert self._head is not None
        return await _first(self._head, self.closed)

    async def body(self) -> bytes:
        assert self._done is not None
        return await _first(self._done, self.closed)

    # httptools callbacks
    def data_received(self, data: bytes) -> None:
        self._rx_at = self.loop.time()
        if self._parser is None:
            self.fail(ConnectionError("bytes before a request"))
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass
        except httptools.HttpParserError as e:
            self.fail(ConnectionError(f"bad response: {e}"))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1").strip()

    def on_headers_complete(self) -> None:
        assert self._parser is not None and self._head is not None
        if not self._head.done():
            self._head.set_result((self._parser.get_status_code(), self._headers))

    def on_body(self, body: bytes) -> None:
        if self._on_chunk is not None:
            self._on_chunk(body)
        else:
            self._chunks.append(body)

    def on_message_complete(self) -> None:
        assert self._parser is not None and self._done is not None
        self.reusable = self._parser.should_keep_alive()
        if not self._done.done():
            self._done.set_result(b"".join(self._chunks))
        # The chunks stay for ``stream`` (a response whole in one read: an SSE answer
        # that is a reconnect frame and the stream's end); ``send`` drops them.

    def _lost(self, exc: Exception | None) -> None:
        self.reusable = False
        if self._parser is not None and self._done is not None and not self._done.done():
            # a body "until EOF" (no length, not chunked) ends here
            if self._head is not None and self._head.done():
                te = self._headers.get("transfer-encoding", "").lower()
                if "content-length" not in self._headers and "chunked" not in te:
                    self._done.set_result(b"".join(self._chunks))
                    return
            self._done.set_exception(exc or EOFError("EOF"))
            self._done.add_done_callback(_swallow)


async def _first(result: asyncio.Future[Any], closed: asyncio.Future[None]) -> Any:
    """``result``, unless the connection ends (or its watchdog fires) first."""
    if not result.done():
        await asyncio.wait((result, closed), return_when=asyncio.FIRST_COMPLETED)
    if result.done():
        return result.result()
    closed.result()  # raises the connection's end
    raise EOFError("EOF")


# -- WebSocket ---------------------------------------------------------------------------


class WSConn(_Conn):
    """A client WebSocket (RFC 6455): ``on_message(bytes)`` per text/binary message,
    pings answered, the close frame's code in ``closed``'s WSClosed."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, on_message: Callable[[bytes], None]
    ) -> None:
        super().__init__(loop)
        self.on_message = on_message
        self._buf = bytearray()
        self._upgraded: asyncio.Future[None] = loop.create_future()
        self._accept = b""
        self._parts: list[bytes] = []

    def upgrade(self, host: str, port: int, target: str) -> None:
        key = base64.b64encode(os.urandom(16))
        self._accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
        assert self.transport is not None
        self.transport.write(
            b"GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
            % (target.encode("latin-1"), host.encode("latin-1"), port, key)
        )

    async def upgraded(self) -> None:
        await _first(self._upgraded, self.closed)

    def send_text(self, payload: bytes) -> None:
        self._send(0x1, payload)

    def _send(self, opcode: int, payload: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 1 << 16:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        mask = os.urandom(4)
        key = (mask * (n // 4 + 1))[:n]
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
        self.transport.write(head + mask + masked)

    def data_received(self, data: bytes) -> None:
        self._rx_at = self.loop.time()
        buf = self._buf
        buf += data
        if not self._upgraded.done():
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > 65536:
                    self.fail(ConnectionError("response head too long"))
                return
            head = bytes(buf[: end + 4])
            del buf[: end + 4]
            if not self._handshake(head):
                return
        pos, n = 0, len(buf)
        while n - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length, at = b1 & 0x7F, pos + 2
            if b1 & 0x80:
                self.fail(ConnectionError("masked frame from the server"))
                return
            if length == 126:
                if n - at < 2:
                    break
                (length,) = struct.unpack_from("!H", buf, at)
                at += 2
            elif length == 127:
                if n - at < 8:
                    break
                (length,) = struct.unpack_from("!Q", buf, at)
                at += 8
            if n - at < length:
                break
            payload = bytes(buf[at : at + length])
            pos = at + length
            if not self._frame(b0 & 0x80, b0 & 0x0F, payload):
                return
        del buf[:pos]

    def _handshake(self, head: bytes) -> bool:
        status_line, _, rest = head.partition(b"\r\n")
        parts = status_line.split(b" ", 2)
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        headers = {}
        for line in rest.split(b"\r\n"):
            name, sep, value = line.partition(b":")
            if sep:
                headers[name.decode("latin-1").strip().lower()] = value.decode("latin-1").strip()
        if status != 101 or headers.get("sec-websocket-accept", "").encode() != self._accept:
            length = int(headers.get("content-length", "0") or 0)
            body = bytes(self._buf[:length])
            self._upgraded.set_exception(HTTPStatusError(status, headers, body))
            self._upgraded.add_done_callback(_swallow)
            self.abort()
            return False
        self._upgraded.set_result(None)
        return True

    def _frame(self, fin: int, opcode: int, payload: bytes) -> bool:
        if opcode == 0x0 or (opcode in (0x1, 0x2) and not fin):
            self._parts.append(payload)
            if not fin:
                return True
            payload, self._parts = b"".join(self._parts), []
            opcode = 0x1
        if opcode in (0x1, 0x2):
            self.on_message(payload)
        elif opcode == 0x8:
            code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
            reason = payload[2:].decode("utf-8", "replace")
            self.fail(WSClosed(code, reason))
            return False
        elif opcode == 0x9:
            self._send(0xA, payload)
        return True

    def _lost(self, exc: Exception | None) -> None:
        if not self._upgraded.done():
            self._upgraded.set_exception(exc or EOFError("EOF"))
            self._upgraded.add_done_callback(_swallow)
