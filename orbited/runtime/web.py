"""twisted.web pieces both daemons' HTTP listeners share: JSON errors everywhere (never
twisted.web's HTML pages), a leaf resource answering 405/404 as documented, a Site with
no access log, and an HTTP channel enforcing request-head limits (414/431/400 with a JSON
body)."""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server
from twisted.web.http import Request

from orbited.runtime.twisted_compat import HookedHTTPChannel


@dataclass(frozen=True)
class HeadLimits:
    """Request limits of an HTTP listener (docs/operations.md: the node's keys of the
    same names; HaloD's status port uses these defaults but ``max_body``)."""

    max_request_line: int = 16 * 1024  # bytes of "GET /orbited/...?... HTTP/1.1"; then 414
    max_header_bytes: int = 16 * 1024  # bytes of all header lines together; then 431
    max_headers: int = 100  # header lines; then 431
    # Bytes of a request body (Content-Length, or read so far of a chunked one); then 413.
    # twisted.web spools a large body to a temporary file: without a bound, any client
    # could fill the disk through a port that needs no credential to be read.
    max_body: int = 64 * 1024
    # Seconds from a request's first byte to its whole head and body; then the connection
    # is closed without an answer (a request sent a byte at a time must not hold a socket:
    # twisted.web's own timeout is an idle one, reset by every byte).
    request_timeout: float = 10.0


def error_json(code: str, message: str) -> bytes:
    """The browser port's error body (docs/protocol.md, "Errors (browser side)")."""
    return json.dumps({"error": {"code": code, "message": message}}).encode()


def send_error(request: Request, status: int, code: str, message: str) -> bytes:
    """Answer ``status`` with the JSON error body of the request's site."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    body = getattr(getattr(request, "site", None), "error_body", error_json)
    return body(code, message)


class JSONResource(resource.Resource):
    """A leaf resource that answers what it does not serve with the documented JSON error,
    never twisted.web's HTML pages: any method without a ``render_<METHOD>`` — also
    PUT, PATCH and methods twisted.web does not know, which it would answer 501 — gets
    405 with ``Allow``; a path below it (``/orbited/poll/x``) gets 404."""

    isLeaf = True
    head_allowed = True  # HEAD is GET without the body (twisted.web drops the body)
    _allowed: list[str] | None = None

    def allowed_methods(self) -> list[str]:
        if self._allowed is None:
            names = {n.removeprefix("render_") for n in dir(self) if n.startswith("render_")}
            names.discard("HEAD")
            if self.head_allowed and "GET" in names:
                names.add("HEAD")
            self._allowed = sorted(names)
        return self._allowed

    def render(self, request: server.Request) -> bytes | int:
        if request.postpath:
            return send_error(request, 404, "not_found", "no such resource")
        method = request.method.decode("ascii", "replace")  # a token: ASCII
        allowed = self.allowed_methods()
        if method not in allowed:
            request.setHeader(b"allow", ", ".join(allowed).encode())
            return send_error(
                request, 405, "method_not_allowed", f"{method[:32]} is not supported here"
            )
        if method == "HEAD" and not hasattr(self, "render_HEAD"):
            method = "GET"
        return getattr(self, f"render_{method}")(request)


class NotFoundResource(resource.Resource):
    """404 with the JSON error body, for any method and any path below."""

    isLeaf = True

    def render(self, request: Request) -> bytes:
        return send_error(request, 404, "not_found", "no such resource")


class JSONDirectory(resource.Resource):
    """A resource with children; any other name below it, and itself, are 404 JSON."""

    def getChild(self, path: bytes, request: Request) -> resource.Resource:  # noqa: N802
        return NotFoundResource()

    def render(self, request: Request) -> bytes:
        return send_error(request, 404, "not_found", "no such resource")


class QuietSite(server.Site):
    """A Site without an access log: a line per long-poll, ack and WebSocket upgrade
    costs CPU at push-server rates and would write every browser's token to the log."""

    def log(self, request: Request) -> None:
        pass


class OrbitedChannel(HookedHTTPChannel):
    """twisted.web's HTTP/1.1 parser, answering a request head it will not read with a
    status and the site's JSON error body instead of closing without a word (a request
    line over MAX_LENGTH) or a bare "400 Bad Request" (anything else): 414 for a request
    line over ``max_request_line``, 431 for headers over ``max_header_bytes`` or
    ``max_headers``, 413 for a body over ``max_body`` (its Content-Length, or the bytes of
    a chunked one as they come), 400 ``bad_request`` for a head it cannot parse. The
    connection is then closed: its write side at once, the rest after DRAIN_SECONDS in
    which what the client still sends is read and dropped (closing with unread data would
    reset the connection, and the client might lose the answer). A request whose head and
    body have not all come ``request_timeout`` seconds after its first byte is closed
    without an answer."""

    DRAIN_SECONDS = 2.0
    site: Any = None
    _refused = False
    _drain: IDelayedCall | None = None
    _deadline: IDelayedCall | None = None
    _header_bytes = 0
    _body_bytes = 0

    def connectionMade(self) -> None:  # noqa: N802
        channels = getattr(self.site, "channels", None)
        if channels is not None:
            channels.add(self)
        limits: HeadLimits = getattr(self.site, "head_limits", HeadLimits())
        self.limits = limits
        self.MAX_LENGTH = max(limits.max_request_line, limits.max_header_bytes)
        self.maxHeaders = limits.max_headers
        # Our own count (lineReceived) enforces max_header_bytes; Twisted's total never
        # fires first.
        self.totalHeadersSize = limits.max_request_line + limits.max_header_bytes
        super().connectionMade()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self._refused:
            return
        if self._deadline is None and not self.handling_request() and self.at_request_line():
            # A request's first byte (between requests, only what starts the next one).
            self._deadline = self.callLater(self.limits.request_timeout, self._too_slow)
        super().dataReceived(data)

    def _too_slow(self) -> None:
        self._deadline = None
        transport = self.transport
        if transport is not None:
            self._refused = True
            getattr(transport, "abortConnection", transport.loseConnection)()

    def allHeadersReceived(self) -> None:  # noqa: N802
        length = self.length  # Content-Length (None: chunked; 0: no body)
        if length is not None and length > self.limits.max_body:
            self._refuse_body()
            return
        self._body_bytes = 0
        super().allHeadersReceived()

    def rawDataReceived(self, data: bytes) -> None:  # noqa: N802
        if self._refused:
            return
        if self.length is None and not self.handling_request():  # a chunked body, as it comes
            self._body_bytes += len(data)
            if self._body_bytes > self.limits.max_body:
                self._refuse_body()
                return
        super().rawDataReceived(data)

    def allContentReceived(self) -> None:  # noqa: N802
        deadline = self._deadline
        if deadline is not None:
            self._deadline = None
            if deadline.active():
                deadline.cancel()
        super().allContentReceived()

    def _refuse_body(self) -> None:
        max_body = self.limits.max_body
        self._refuse(413, "Content Too Large", "body_too_large", f"body over {max_body} bytes")

    def lineReceived(self, line: bytes) -> None:  # noqa: N802
        if self._refused:
            return
        if self.at_request_line():
            if len(line) > self.limits.max_request_line:
                self._refuse(414, "URI Too Long", "uri_too_long", "request line too long")
                return
            self._header_bytes = 0
        else:
            self._header_bytes += len(line)
            if self._header_bytes > self.limits.max_header_bytes:
                self._refuse_headers()
                return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:  # noqa: N802
        # LineReceiver's hook for a line over MAX_LENGTH (Twisted just closes).
        if self.at_request_line():
            self._refuse(414, "URI Too Long", "uri_too_long", "request line too long")
        else:
            self._refuse_headers()

    def bad_request(self) -> None:
        # Every request head twisted.web cannot parse (bad request line or header, too
        # many headers, bad Content-Length or chunking) comes here instead of Twisted's
        # bare "400 Bad Request" (tests/runtime/test_twisted_compat.py pins the hook,
        # tests/node/test_browser_port.py covers each case).
        if self.header_count() > self.maxHeaders:
            self._refuse_headers()
        else:
            self._refuse(400, "Bad Request", "bad_request", "malformed HTTP request")

    def _refuse_headers(self) -> None:
        limits = self.limits
        message = (
            f"request headers over {limits.max_header_bytes} bytes or {limits.max_headers} lines"
        )
        self._refuse(431, "Request Header Fields Too Large", "headers_too_large", message)

    def _refuse(self, status: int, phrase: str, code: str, message: str) -> None:
        if self._refused or self.transport is None:
            return
        self._refused = True
        self.setTimeout(None)
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        body = getattr(self.site, "error_body", error_json)(code, message)
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (status, phrase.encode(), len(body), body)
        )
        half_close = getattr(self.transport, "loseWriteConnection", None)
        if half_close is None:
            self.transport.loseConnection()
            return
        half_close()
        abort = getattr(self.transport, "abortConnection", self.transport.loseConnection)
        self._drain = self.callLater(self.DRAIN_SECONDS, abort)

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        for call in (self._drain, self._deadline):
            if call is not None and call.active():
                call.cancel()
        self._drain = self._deadline = None
        super().connectionLost(reason)


class OrbitedRequest(server.Request):
    """A request whose failure (a bug: an exception in a resource) is answered 500 with
    the JSON error body ``internal_error``, not twisted.web's HTML page."""

    failure_log = Logger()

    def processingFailed(self, reason: Any) -> Any:  # noqa: N802
        self.failure_log.failure("", failure=reason)
        body = getattr(self.site, "error_body", error_json)("internal_error", "a bug in the node")
        self.setResponseCode(500)
        self.setHeader(b"content-type", b"application/json")
        self.setHeader(b"content-length", b"%d" % len(body))
        self.write(body)
        self.finish()
        return reason


class OrbitedSite(QuietSite):
    """The Site of a node's HTTP listeners: JSON errors everywhere (``error_body``), the
    request-head limits of ``head_limits``."""

    protocol = OrbitedChannel  # type: ignore[assignment]
    requestFactory = OrbitedRequest

    def __init__(
        self,
        root: resource.Resource,
        error_body: Callable[[str, str], bytes] = error_json,
        head_limits: HeadLimits = HeadLimits(),  # noqa: B008 - frozen
    ) -> None:
        super().__init__(root)
        self.error_body = error_body
        self.head_limits = head_limits
        # Open HTTP connections, for close_idle_connections. Weak: one a WebSocket took
        # over (autobahn) never hears connectionLost.
        self.channels: weakref.WeakSet[OrbitedChannel] = weakref.WeakSet()

    def close_idle_connections(self) -> None:
        """Close every keep-alive connection with no request in progress (node shutdown,
        after the reconnect frames: a browser must not send its next request over one)."""
        for channel in list(self.channels):
            transport = channel.transport
            if transport is None or getattr(transport, "disconnecting", False):
                continue  # taken over by a WebSocket, or closing already
            if not channel.requests and not channel._refused:
                channel.loseConnection()
