"""HTTP publish API: the SP event request over HTTP, for languages without nng.

POST /orbited/publish with ``Authorization: Bearer <API key>`` and the event request JSON
as body; the answer is the same reply JSON (docs/protocol.md, "HTTP publish API"). Off by
default; when enabled it binds 127.0.0.1 unless configured otherwise. The W3C
``traceparent``/``tracestate`` headers give the request a trace context when its body
has none (docs/protocol.md, "Trace context").
"""

from __future__ import annotations

import hmac
import json

from twisted.internet import defer
from twisted.web import server
from twisted.web.http import Request

from orbited.node.hub import Answer, Hub, answer
from orbited.node.transports.http import orbited_site
from orbited.node.transports.limits import BrowserLimitsConfig
from orbited.runtime.web import JSONResource, send_error


def error_reply(code: str, message: str) -> bytes:
    """The publish listener's error body: an event reply with ``"id": null``."""
    return json.dumps(
        {"id": None, "ok": False, "error": {"code": code, "message": message}}
    ).encode()


class PublishResource(JSONResource):
    """POST only: other methods get 405 with ``Allow: POST`` (JSONResource)."""

    def __init__(self, hub: Hub, api_key: bytes, max_body: int) -> None:
        super().__init__()
        self.hub = hub
        self.api_key = api_key
        self.max_body = max_body

    def render_POST(self, request: Request) -> bytes:  # noqa: N802
        auth = request.getHeader(b"authorization") or b""
        scheme, _, key = auth.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(key.strip(), self.api_key):
            request.setHeader(b"www-authenticate", b'Bearer realm="orbited"')
            return send_error(request, 401, "unauthorized", "missing or wrong API key")
        # twisted.web spools large bodies to a temporary file, not to memory.
        content = request.content
        body = b"" if content is None else content.read(self.max_body + 1)
        if len(body) > self.max_body:
            return send_error(request, 413, "body_too_large", f"body over {self.max_body} bytes")
        traceparent, tracestate = trace_headers(request)
        # parse, dispatch, encode (orbited.node.hub)
        reply = answer(self.hub, body, traceparent, tracestate)
        request.setHeader(b"content-type", b"application/json")
        if not isinstance(reply, defer.Deferred):
            return self._answer(request, *reply)

        def later(result: Answer) -> None:
            if not request.finished and request.channel is not None:
                request.write(self._answer(request, *result))
                request.finish()

        reply.addCallback(later)
        return server.NOT_DONE_YET  # type: ignore[return-value]

    @staticmethod
    def _answer(request: Request, ok: bool, reply: bytes) -> bytes:
        if not ok:
            request.setResponseCode(400)
        return reply


def trace_headers(request: Request) -> tuple[str | None, str | None]:
    """The request's ``traceparent`` (the first, if repeated) and ``tracestate`` (several
    joined with commas, as W3C says), decoded as Latin-1 (HTTP's header bytes); not
    checked here (orbited.node.events.with_trace_headers)."""
    headers = request.requestHeaders
    parents = headers.getRawHeaders(b"traceparent")
    if not parents:
        return None, None
    states = headers.getRawHeaders(b"tracestate")
    state = None if not states else b",".join(states).decode("latin-1")
    return parents[0].decode("latin-1"), state


def publish_site(
    hub: Hub,
    api_key: bytes,
    max_body: int,
    head_limits: BrowserLimitsConfig = BrowserLimitsConfig(),  # noqa: B008 - frozen
) -> server.Site:
    """``head_limits``: the browser port's request-head limits apply here too."""
    return orbited_site(
        {b"publish": PublishResource(hub, api_key, max_body)}, error_reply, head_limits,
        max_body,
    )  # fmt: skip
