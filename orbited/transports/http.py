"""twisted.web helpers shared by the HTTP transports: query decoding, CORS, JSON errors."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

from twisted.web import resource, server
from twisted.web.http import Request

from orbited.keys import ConnectionKey
from orbited.transports.common import (
    BrowserAuth,
    BrowserRequestError,
    origin_allowed,
    request_scheme,
)
from orbited.transports.limits import BrowserLimits, BrowserLimitsConfig, Overloaded

if TYPE_CHECKING:
    from orbited.hub import Hub


class HTTPSink:
    """What every HTTP transport's Sink shares: one request attached to one key, detached
    when the response ends or the browser goes away (docs/architecture.md). It counts
    as one of the node's browser connections (``limits``) while it lasts."""

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


class BrowserResource(resource.Resource):
    """A browser transport's resource: the hub, token check and CORS allow-list."""

    isLeaf = True

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

    def render_HEAD(self, request: Request) -> bytes:  # noqa: N802
        # twisted.web answers HEAD with render_GET: that would attach a transport (or hold
        # a poll) for a response nobody reads, and where there is no GET it was a 500.
        # (Raising UnsupportedMethod would not do: twisted.web then fakes HEAD with GET.)
        allowed = [
            name.removeprefix("render_").encode()
            for name in dir(self)
            if name.startswith("render_") and name != "render_HEAD"
        ]
        request.setHeader(b"allow", b", ".join(sorted(allowed)))
        error = BrowserRequestError(405, "method_not_allowed", "HEAD is not supported")
        return send_json_error(request, error)

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


class QuietSite(server.Site):
    """A Site without an access log: a line per long-poll, ack and WebSocket upgrade
    costs CPU at push-server rates and would write every browser's token to the log."""

    def log(self, request: Request) -> None:
        pass


def orbited_site(children: dict[bytes, resource.Resource]) -> server.Site:
    """A Site serving ``children`` under /orbited/."""
    orbited = resource.Resource()
    for name, child in children.items():
        orbited.putChild(name, child)
    root = resource.Resource()
    root.putChild(b"orbited", orbited)
    site = QuietSite(root)
    site.displayTracebacks = False
    site.noisy = False
    return site


def send_json_error(request: Request, error: BrowserRequestError) -> bytes:
    request.setResponseCode(error.status)
    request.setHeader(b"content-type", b"application/json")
    if isinstance(error, Overloaded):
        request.setHeader(b"retry-after", str(error.retry_after).encode())
    return json.dumps({"error": {"code": error.code, "message": error.message}}).encode()
