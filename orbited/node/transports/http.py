"""twisted.web helpers shared by the HTTP transports: query decoding, CORS, JSON errors."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from http import HTTPStatus
from typing import TYPE_CHECKING

from twisted.web import resource, server
from twisted.web.http import RESPONSES, Request

from orbited.core.keys import ConnectionKey
from orbited.node.transports.common import (
    BrowserAuth,
    BrowserRequestError,
    origin_allowed,
    request_scheme,
    user_limit_error,
)
from orbited.node.transports.limits import BrowserLimits, BrowserLimitsConfig, Overloaded

if TYPE_CHECKING:
    from orbited.node.frames import Frame
    from orbited.node.hub import Hub
from orbited.runtime.web import (
    HeadLimits,
    JSONDirectory,
    JSONResource,
    OrbitedSite,
    error_json,
    send_error,
)


class HTTPSink:
    """What every HTTP transport's Sink shares: one request attached to one key, detached
    when the response ends or the browser goes away (docs/architecture.md). It counts
    as one of the node's browser connections (``limits``) while it lasts."""

    kind: str  # the transport's name in per-key traces: "sse", "iframe", "poll"
    wants_pings = True
    is_poll = False  # counts against max_pending_polls too

    def __init__(
        self, hub: Hub, key: ConnectionKey, request: Request, limits: BrowserLimits
    ) -> None:
        self.hub = hub
        self.key = key
        self.request = request
        self.limits = limits
        self.finished = False
        self.last_write = hub.clock.seconds()
        limits.opened(self.is_poll)
        request.notifyFinish().addBoth(self._gone)

    def _end(self) -> bool:
        """Mark finished and detach; False if that already happened."""
        if self.finished:
            return False
        self.finished = True
        self.limits.closed(self.is_poll)
        self._stop_timers()
        self.hub.detach(self.key, self)
        return True

    def _stop_timers(self) -> None:
        pass

    # orbited.node.hub.Sink: each transport writes frames its own way.
    def deliver(self, out: list[Frame]) -> bool:
        raise NotImplementedError

    def replaced(self) -> None:
        raise NotImplementedError

    def reconnect(self, reason: str, route: int | None = None, spread: float | None = None) -> None:
        raise NotImplementedError

    def closed(self, code: int, reason: str) -> None:
        raise NotImplementedError

    def refuse(self) -> None:
        """Sink.closed(4429) before anything of the response was written: HTTP 429
        ``user_limit`` (the JSON error answer) instead of a stream or a poll's answer."""
        if not self._end():
            return
        error = user_limit_error(self.hub.config.users.max_connections)
        self.request.write(send_json_error(self.request, error))
        self.request.finish()

    def close_connection(self) -> None:
        """End the TCP connection with this response, not only the response: after a
        ``reconnect`` frame the browser's next request must open a new connection, for
        one it reused could be pinned (an L4 data plane routes per TCP connection) to a
        node that no longer serves the route. Says ``Connection: close`` if the
        response's headers are still unsent; twisted.web closes a channel that is not
        ``persistent`` once its response is finished."""
        if not self.request.startedWriting:
            self.request.setHeader(b"connection", b"close")
        channel = self.request.channel
        if channel is not None:
            channel.persistent = False

    def _gone(self, _: object) -> None:
        self._end()  # the browser closed the request first, or we finished it


def decoded_args(request: Request) -> dict[str, list[str]]:
    try:
        return {
            k.decode("utf-8"): [v.decode("utf-8") for v in vs] for k, vs in request.args.items()
        }
    except UnicodeDecodeError:
        raise BrowserRequestError(400, "bad_request", "query is not UTF-8") from None


def header(request: Request, name: bytes) -> str | None:
    value = request.getHeader(name)
    return None if value is None else value.decode("utf-8")


def page_allowed(request: Request, origin: str | None, allowed: Sequence[str]) -> bool:
    """origin_allowed for a page of ``origin`` and this request (its Host header and the
    scheme it came by): the one same-origin rule of every transport."""
    try:
        host = header(request, b"host")
        scheme = request_scheme(request.isSecure(), header(request, b"x-forwarded-proto"))
    except UnicodeDecodeError:
        raise BrowserRequestError(400, "bad_request", "a header is not UTF-8") from None
    return origin_allowed(origin, host, allowed, scheme)


def apply_cors(request: Request, allowed: Sequence[str]) -> None:
    """Refuse a cross-origin request from an origin not allowed; allow the others."""
    try:
        origin = header(request, b"origin")
    except UnicodeDecodeError:
        raise BrowserRequestError(400, "bad_request", "Origin is not UTF-8") from None
    if origin is None:
        return
    if not page_allowed(request, origin, allowed):
        raise BrowserRequestError(403, "origin_not_allowed", f"origin {origin} not allowed")
    request.setHeader(b"access-control-allow-origin", origin.encode())
    request.setHeader(b"vary", b"Origin")
    # A page may read a 503's Retry-After only if exposed (not a CORS-safelisted header).
    request.setHeader(b"access-control-expose-headers", b"Retry-After")


class BrowserResource(JSONResource):
    """A browser transport's resource: the hub, token check and CORS allow-list.

    HEAD is refused (405): twisted.web would answer it with render_GET, which would
    attach a transport (or hold a poll) for a response nobody reads."""

    head_allowed = False

    def __init__(
        self,
        hub: Hub,
        auth: BrowserAuth,
        cors_origins: list[str],
        limits: BrowserLimits | None = None,
    ) -> None:
        super().__init__()
        self.hub = hub
        self.auth = auth
        self.cors_origins = cors_origins
        self.limits = limits or BrowserLimits(BrowserLimitsConfig(), hub.clock)

    def preflight(self, request: Request, methods: bytes) -> bytes:
        """Answer a CORS preflight for ``methods`` (transports that fetch() call this)."""
        try:
            apply_cors(request, self.cors_origins)
        except BrowserRequestError as e:
            return send_json_error(request, e)
        request.setHeader(b"access-control-allow-methods", methods)
        request.setHeader(b"access-control-max-age", b"600")
        request.setResponseCode(204)
        return b""


def orbited_site(
    children: dict[bytes, resource.Resource],
    error_body: Callable[[str, str], bytes] = error_json,
    head_limits: BrowserLimitsConfig = BrowserLimitsConfig(),  # noqa: B008 - frozen
    max_body: int | None = None,
) -> server.Site:
    """A Site serving ``children`` under /orbited/; every other path is 404 JSON.
    ``head_limits``: its max_request_line, max_header_bytes and max_headers apply, and
    its max_request_body unless ``max_body`` is given."""
    orbited = JSONDirectory()
    for name, child in children.items():
        orbited.putChild(name, child)
    root = JSONDirectory()
    root.putChild(b"orbited", orbited)
    head = HeadLimits(
        head_limits.max_request_line, head_limits.max_header_bytes, head_limits.max_headers,
        head_limits.max_request_body if max_body is None else max_body,
    )  # fmt: skip
    site = OrbitedSite(root, error_body, head)
    site.displayTracebacks = False
    site.noisy = False
    return site


def status_phrase(status: int) -> bytes:
    """The reason phrase of ``status``: twisted.web's, else the standard one (twisted.web
    knows no 429, which it would call "Unknown Status")."""
    phrase = RESPONSES.get(status)
    if phrase is None:
        try:
            phrase = HTTPStatus(status).phrase.encode()
        except ValueError:
            phrase = b"Error"
    return phrase


def send_json_error(request: Request, error: BrowserRequestError) -> bytes:
    if isinstance(error, Overloaded):
        request.setHeader(b"retry-after", str(error.retry_after).encode())
    body = send_error(request, error.status, error.code, error.message)
    request.setResponseCode(error.status, status_phrase(error.status))
    return body
