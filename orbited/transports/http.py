"""twisted.web helpers shared by the HTTP transports: query decoding, CORS, JSON errors."""

from __future__ import annotations

import json
from collections.abc import Sequence

from twisted.web.http import Request

from orbited.transports.common import BrowserRequestError, origin_allowed


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


def apply_cors(request: Request, allowed: Sequence[str]) -> None:
    """Refuse a cross-origin request from an origin not allowed; allow the others."""
    try:
        origin = header(request, b"origin")
        host = header(request, b"host")
    except UnicodeDecodeError:
        raise BrowserRequestError(400, "bad_request", "Origin or Host is not UTF-8") from None
    if origin is None:
        return
    if not origin_allowed(origin, host, allowed):
        raise BrowserRequestError(403, "origin_not_allowed", f"origin {origin} not allowed")
    request.setHeader(b"access-control-allow-origin", origin.encode())
    request.setHeader(b"vary", b"Origin")


def send_json_error(request: Request, error: BrowserRequestError) -> bytes:
    request.setResponseCode(error.status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps({"error": {"code": error.code, "message": error.message}}).encode()
