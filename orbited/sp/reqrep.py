"""REQ/REP message bodies: the backtrace that a REP must echo (sans-I/O).

A request body is ``[hop id u32, MSB clear]* [request id u32, MSB set] payload``. The REP
side splits it, hands the payload up, and prefixes the reply with the same words verbatim.
See docs/sp.md.
"""

from __future__ import annotations

import secrets
import struct

from orbited.sp.wire import SPProtocolError

MAX_HOPS = 8  # nng's default ttl-max, in words: longer backtraces are dropped, not answered
_WORD = struct.Struct(">I")
_END_OF_BACKTRACE = 0x80


class TooManyHops(Exception):
    """The request went through more devices than allowed; nng drops such a request silently."""


def split_backtrace(body: bytes, max_hops: int = MAX_HOPS) -> tuple[bytes, bytes]:
    """Return (backtrace, payload). The backtrace ends with the word whose MSB is set.

    Mirrors nng's REP: a backtrace of more than ``max_hops`` words (request id included)
    raises TooManyHops (nng drops the request, keeps the connection); a body that ends
    before the MSB-set word raises SPProtocolError (nng closes the connection).
    """
    pos = 0
    length = len(body)
    words = 0
    while True:
        words += 1
        if words > max_hops:
            raise TooManyHops(f"backtrace longer than {max_hops} words")
        if pos + 4 > length:
            raise SPProtocolError("request has no request id (body ends before an MSB-set word)")
        last = body[pos] & _END_OF_BACKTRACE
        pos += 4
        if last:
            return body[:pos], body[pos:]


def request_id(backtrace: bytes) -> int:
    """The request id is the last backtrace word (MSB set)."""
    return int(_WORD.unpack_from(backtrace, len(backtrace) - 4)[0])


class RequestIds:
    """nng REQ semantics for our own clients: random start with MSB set, +1 per request."""

    def __init__(self, start: int | None = None) -> None:
        self._next = start if start is not None else 0x80000000 | secrets.randbits(31)

    def next(self) -> int:
        value = self._next
        self._next = 0x80000000 | ((value + 1) & 0x7FFFFFFF)
        return value

    @staticmethod
    def encode(request_id: int) -> bytes:
        return _WORD.pack(request_id)
