"""Acknowledgements for the transports without a way back (SSE, iframe streaming).

``POST /orbited/ack?token=T&seq=N`` confirms every event up to N of the token's key, as a
WebSocket ``ack`` frame or a long-poll ``last`` does (docs/protocol.md, "Acknowledgements"):
the node frees them early, and requests in the acknowledged mode get their reply.
"""

from __future__ import annotations

from twisted.web.http import Request

from orbited.transports.common import BrowserRequestError, authenticate, single_param
from orbited.transports.http import BrowserResource, apply_cors, decoded_args, send_json_error

MAX_SEQ = 10**15  # positions have at most 15 digits (orbited.mailbox)


class AckResource(BrowserResource):
    def render_OPTIONS(self, request: Request) -> bytes:  # noqa: N802
        try:
            apply_cors(request, self.cors_origins)
        except BrowserRequestError as e:
            return send_json_error(request, e)
        request.setHeader(b"access-control-allow-methods", b"POST")
        request.setHeader(b"access-control-max-age", b"600")
        request.setResponseCode(204)
        return b""

    def render_POST(self, request: Request) -> bytes:  # noqa: N802
        request.setHeader(b"cache-control", b"no-store")
        try:
            apply_cors(request, self.cors_origins)
            params = decoded_args(request)
            attach = authenticate(self.auth, params)
            seq = single_param(params, "seq") or ""
            if not (seq.isascii() and seq.isdigit() and 0 < int(seq) < MAX_SEQ):
                raise BrowserRequestError(400, "bad_seq", "seq must be a positive integer")
        except BrowserRequestError as e:
            return send_json_error(request, e)
        self.hub.ack(attach.key, int(seq))
        request.setResponseCode(204)
        return b""
