"""Streaming HTTP transports (twisted.web): Server-Sent Events and the iframe "forever frame".

Both hold one HTTP response open and write each frame as it comes:

- SSE  /orbited/sse?token=...[&last=P]    text/event-stream; event frames carry
  ``id: <stream>:<seq>`` so EventSource's automatic reconnect resumes via Last-Event-ID.
- iframe /orbited/iframe?token=...&origin=O[&last=P]   an HTML document whose script blocks
  hand each frame (a JSON string, escaped so no payload can leave its script block) to
  the parent page with postMessage(frame, O). After ``max_bytes`` the node sends a
  reconnect frame and ends the response, so a browser never holds an unbounded document.

See docs/protocol.md, "SSE" and "iframe streaming".
"""

from __future__ import annotations

import json
import re
from typing import ClassVar, cast

from twisted.internet.interfaces import ITCPTransport
from twisted.logger import Logger
from twisted.web import server
from twisted.web.http import Request

from orbited.core.keys import ConnectionKey
from orbited.node import frames
from orbited.node.frames import Frame
from orbited.node.hub import Hub
from orbited.node.mailbox import Position, PositionError
from orbited.node.transports.common import (
    BrowserAuth,
    BrowserRequestError,
    authenticate,
    check_admitted,
    single_param,
)
from orbited.node.transports.http import (
    BrowserResource,
    HTTPSink,
    apply_cors,
    decoded_args,
    page_allowed,
    send_json_error,
)
from orbited.node.transports.limits import BrowserLimits, WriteQueueWatch
from orbited.runtime.twisted_compat import close_delimited, unsent_bytes

_ORIGIN = re.compile(
    r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?\Z|^https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?\Z"
)  # \Z, not $: "$" let "http://h\n" through (found by fuzzing)
IFRAME_PRELUDE_BYTES = 2048  # browsers render a streamed document only after ~1 KB


class _Stream(HTTPSink):
    """Sink for one held streaming response. A browser that does not read it fast enough
    (``max_write_queue`` unsent bytes) loses the connection at once: nothing more can be
    said to it in order, and the buffered bytes are freed; it resumes from its position
    (docs/protocol.md, "Errors")."""

    log = Logger()
    kind: str  # "sse", "iframe": the transport's name in per-key traces
    label: ClassVar[str]  # "SSE", "iframe": its name in the log

    def __init__(
        self, hub: Hub, key: ConnectionKey, request: Request, limits: BrowserLimits
    ) -> None:
        super().__init__(hub, key, request, limits)
        self.written = 0
        self.watch = WriteQueueWatch(
            limits.config.max_write_queue, hub.clock, self._unsent, self._slow
        )

    def _unsent(self) -> int | None:
        transport = self.request.channel.transport if self.request.channel else None
        return None if transport is None else unsent_bytes(transport)

    def _slow(self, unsent: int) -> None:
        self.limits.slow()
        self.log.info("closing a slow {kind} reader: {n} bytes unsent", kind=self.label, n=unsent)
        if self._end():
            transport = self.request.channel.transport if self.request.channel else None
            if transport is not None:  # TCP (or TLS over TCP) under twisted.web
                cast(ITCPTransport, transport).abortConnection()

    def _stop_timers(self) -> None:
        self.watch.stop()

    def encode(self, frame: Frame) -> bytes:
        raise NotImplementedError

    def deliver(self, out: list[Frame]) -> bool:
        if self.finished:
            return False
        chunk = b"".join(self.encode(frame) for frame in out)
        self.request.write(chunk)
        self.written += len(chunk)
        self.last_write = self.hub.clock.seconds()
        return not self.watch.wrote()

    def replaced(self) -> None:
        self.finish(Frame(frames.REPLACED))

    def reconnect(self, reason: str, route: int | None = None, spread: float | None = None) -> None:
        if not self.finished:
            self.close_connection()
        self.finish(Frame(frames.reconnect(reason, route, spread)))

    def closed(self, code: int, reason: str) -> None:
        # The stream's head (and the iframe's document head) left in start(): a frame.
        self.finish(Frame(frames.closed(code, reason)))

    def finish(self, last_frame: Frame | None = None) -> None:
        """End the response, after ``last_frame`` if given (written even past a cap)."""
        if self.finished:
            return
        if last_frame is not None:
            self.request.write(self.encode(last_frame))
        self._end()
        self.request.finish()


class _SSEStream(_Stream):
    kind = "sse"
    label = "SSE"

    def encode(self, frame: Frame) -> bytes:
        """An SSE event; an event frame's carries ``id: <stream>:<seq>`` (the position
        EventSource sends back as Last-Event-ID)."""
        seq, stream = frame.seq, frame.stream
        if seq is not None and stream is not None:
            return b"id: %s:%d\ndata: %s\n\n" % (stream.encode(), seq, frame.data)
        return b"data: %s\n\n" % frame.data


def script_literal(frame: bytes) -> bytes:
    """A JS string literal holding ``frame``, safe inside an HTML <script> block."""
    text = json.dumps(frame.decode("utf-8"))
    for raw, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                         ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):  # fmt: skip
        text = text.replace(raw, escaped)
    return text.encode("ascii", "backslashreplace")


class _IframeStream(_Stream):
    kind = "iframe"
    label = "iframe"

    def __init__(
        self,
        hub: Hub,
        key: ConnectionKey,
        request: Request,
        limits: BrowserLimits,
        max_bytes: int,
    ) -> None:
        super().__init__(hub, key, request, limits)
        self.max_bytes = max_bytes

    def encode(self, frame: Frame) -> bytes:
        return b"<script>f(%s)</script>\n" % script_literal(frame.data)

    def deliver(self, out: list[Frame]) -> bool:
        if not super().deliver(out):
            return False
        if self.written > self.max_bytes:
            # Tell the page to reconnect (it resumes from its position) and end here.
            self.reconnect("response size limit")
        return True


def _iframe_head(origin: str) -> bytes:
    """The document's head: ``f`` posts a frame to the parent page; once the document has
    loaded (the response ended), it posts ``""``, after every frame (posted messages keep
    their order; the parent's load event of the iframe does not wait for them)."""
    target = script_literal(origin.encode())
    return (
        b'<!DOCTYPE html><html><head><meta charset="utf-8"><title>orbited</title></head>'
        b"<body><script>var t=%s;function f(s){parent.postMessage(s,t);}"
        b'addEventListener("load",function(){f("");});</script>\n'
        b"<!--%s-->\n" % (target, b" " * IFRAME_PRELUDE_BYTES)
    )


class _StreamingResource(BrowserResource):
    def start(self, request: Request, params: dict[str, list[str]], key: ConnectionKey) -> _Stream:
        raise NotImplementedError

    def position(self, request: Request, params: dict[str, list[str]]) -> Position | None:
        return None

    def render_GET(self, request: Request) -> bytes | int:  # noqa: N802
        request.setHeader(b"cache-control", b"no-store")
        try:
            apply_cors(request, self.cors_origins)
            self.limits.check()  # before any work: 503 when overloaded
            params = decoded_args(request)
            after = self.position(request, params)
            if after is not None:
                params.pop("last", None)  # Last-Event-ID, the newer position, wins
            attach = authenticate(self.auth, params)
            after = after or attach.after
            check_admitted(self.hub, attach.key)  # 429 before the stream starts
            stream = self.start(request, params, attach.key)
        except BrowserRequestError as e:
            return send_json_error(request, e)
        self.hub.attach(attach.key, stream, after)
        return server.NOT_DONE_YET


class SSEResource(_StreamingResource):
    def position(self, request: Request, params: dict[str, list[str]]) -> Position | None:
        header = request.getHeader(b"last-event-id")
        if not header:
            return None
        try:
            return Position.parse(header.decode("ascii"))
        except (UnicodeDecodeError, PositionError) as e:
            raise BrowserRequestError(400, "bad_position", f"Last-Event-ID: {e}") from None

    def start(self, request: Request, params: dict[str, list[str]], key: ConnectionKey) -> _Stream:
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"x-accel-buffering", b"no")  # nginx: do not buffer the stream
        request.write(b": orbited\n\n")  # headers leave now; EventSource opens
        return _SSEStream(self.hub, key, request, self.limits)


class IframeResource(_StreamingResource):
    def __init__(
        self,
        hub: Hub,
        auth: BrowserAuth,
        cors_origins: list[str],
        max_bytes: int,
        limits: BrowserLimits | None = None,
    ) -> None:
        super().__init__(hub, auth, cors_origins, limits)
        self.max_bytes = max_bytes

    def start(self, request: Request, params: dict[str, list[str]], key: ConnectionKey) -> _Stream:
        origin = single_param(params, "origin")
        if (
            not origin
            or not _ORIGIN.match(origin)
            or not page_allowed(request, origin, self.cors_origins)
        ):
            raise BrowserRequestError(
                403, "origin_not_allowed", "origin must name an allowed parent page origin"
            )
        close_delimited(request)  # a cut ends the document: its load tells the page
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"content-security-policy", f"frame-ancestors {origin}".encode())
        head = _iframe_head(origin)
        request.write(head)
        stream = _IframeStream(self.hub, key, request, self.limits, self.max_bytes)
        stream.written = len(head)  # the cap is on the whole document
        return stream
