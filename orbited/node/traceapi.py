"""``GET /orbited/trace`` on the browser port: one node's per-key trace for an operator.

``?user=U[&session=S][&location=L][&event=E][&limit=N]`` answers ``Hub.trace_answer`` as
JSON (docs/operations.md, "Tracing a delivery"). Registered only when ``trace_key_file``
is set; without it the path is an unknown one (404). The request needs
``Authorization: Bearer <trace key>`` (401 ``unauthorized`` otherwise), and any
``Origin`` header or cross-site ``Sec-Fetch-Site`` is refused (403 ``cross_site``): a
page cannot use the key even if it leaked. GET and HEAD only (405).
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from twisted.web.http import Request

from orbited.core.control import MAX_TRACE_LIMIT, trace_query
from orbited.node.hub import Hub
from orbited.runtime.web import JSONResource, send_error

MAX_EVENT_ID = 128  # as an event request's id (docs/protocol.md)
_PARAMS = frozenset({b"user", b"session", b"location", b"event", b"limit"})


class TraceResource(JSONResource):
    def __init__(self, hub: Hub, key: bytes) -> None:
        super().__init__()
        self.hub = hub
        self.key = key

    def render_GET(self, request: Request) -> bytes:  # noqa: N802
        headers = request.requestHeaders
        site = (request.getHeader(b"sec-fetch-site") or b"").lower()
        if headers.hasHeader(b"origin") or site not in (b"", b"none", b"same-origin"):
            return send_error(request, 403, "cross_site", "trace queries are not for pages")
        auth = request.getHeader(b"authorization") or b""
        scheme, _, given = auth.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.key):
            request.setHeader(b"www-authenticate", b'Bearer realm="orbited"')
            return send_error(request, 401, "unauthorized", "missing or wrong trace key")
        try:
            query = self._query(request)
        except ValueError as e:
            return send_error(request, 400, "bad_request", str(e))
        answer = self.hub.trace_answer(**query)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(answer).encode()

    def _query(self, request: Request) -> dict[str, Any]:
        args = request.args or {}
        unknown = sorted(k.decode("latin-1") for k in args if k not in _PARAMS)
        if unknown:
            raise ValueError(f"unknown parameter {unknown[0]!r}")
        values: dict[str, str | None] = {}
        for name in ("user", "session", "location", "event", "limit"):
            given = args.get(name.encode())
            if given is not None and len(given) > 1:
                raise ValueError(f"{name} given more than once")
            try:
                values[name] = None if given is None else given[0].decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{name} is not UTF-8") from None
        # An empty session or location is "any", as on HaloD's /trace.
        user = values["user"]
        session, location = values["session"] or None, values["location"] or None
        if user is None:
            raise ValueError("user is required")
        trace_query(0, user, session, location)  # the key parts' rules, as HaloD's /trace
        event = values["event"]
        if event is not None and not 0 < len(event) <= MAX_EVENT_ID:
            raise ValueError(f"event must be 1-{MAX_EVENT_ID} characters")
        limit = None
        if values["limit"] is not None:  # as a trace_query's (more than kept: all kept)
            raw = values["limit"]
            if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= MAX_TRACE_LIMIT:
                raise ValueError(f"limit must be 1-{MAX_TRACE_LIMIT}")
            limit = int(raw)
        return {"user": user, "session": session, "location": location, "event": event,
                "limit": limit}  # fmt: skip
