"""Acknowledgements for the transports without a way back (SSE, iframe streaming).

``POST /orbited/ack?token=T&last=S:N`` confirms every event up to N of stream S of the
token's key, as a WebSocket ``ack`` frame or a long-poll ``last`` does (docs/protocol.md):
the node frees them early, and requests in the acknowledged mode get their reply. The
stream is required: a late ack from a stream that is gone must not confirm events of a
new mailbox (e.g. one waiting on a route's new owner after a crash).
"""

from __future__ import annotations

from twisted.web.http import Request

from orbited.node.transports.common import BrowserRequestError, authenticate
from orbited.node.transports.http import BrowserResource, apply_cors, decoded_args, send_json_error


class AckResource(BrowserResource):
    def render_OPTIONS(self, request: Request) -> bytes:  # noqa: N802
        return self.preflight(request, b"POST")

    def render_POST(self, request: Request) -> bytes:  # noqa: N802
        request.setHeader(b"cache-control", b"no-store")
        try:
            apply_cors(request, self.cors_origins)
            params = decoded_args(request)
            attach = authenticate(self.auth, params)  # parses last=<stream>:<seq> too
            if attach.after is None:
                raise BrowserRequestError(400, "bad_position", "last=<stream>:<seq> is required")
        except BrowserRequestError as e:
            return send_json_error(request, e)
        self.hub.ack(attach.key, attach.after.seq, attach.after.stream)
        request.setResponseCode(204)
        return b""
