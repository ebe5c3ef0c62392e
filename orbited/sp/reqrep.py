"""REQ/REP message bodies: the backtrace that a REP must echo (sans-I/O).

A request body is ``[hop id u32, MSB clear]* [request id u32, MSB set] payload``. The REP
side splits it, hands the payload up, and prefixes the reply with the same words verbatim.
See docs/sp.md.
"""

from __future__ import annotations

import secrets
import struct
from dataclasses import dataclass

from orbited.sp.wire import LENGTH_SIZE, REP, REQ, SPConnection, SPProtocolError

MAX_HOPS = 8  # nng's default ttl-max, in words: longer backtraces are dropped, not answered
# The largest request a node reads (its sp_max_message default, RepLimits): past it, it
# closes the connection. Our clients give up a larger request rather than send it.
MAX_REQUEST = 4 * 1024 * 1024
_WORD = struct.Struct(">I")
_LENGTH = struct.Struct(">Q")
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


def encode_reply(backtrace: bytes, payload: bytes) -> bytes:
    """One reply message on the wire: length, the request's backtrace verbatim, payload."""
    return _LENGTH.pack(len(backtrace) + len(payload)) + backtrace + payload


@dataclass
class RepConnection(SPConnection):
    """The REP side of one connection: SP framing (``SPConnection``: header, lengths,
    ``max_message``) and the backtrace split in one pass over each read.

    ``receive_requests(data)`` returns ``(backtrace, payload)`` for every complete request
    found so far, in order. A request with more than ``max_hops`` backtrace words is
    dropped and counted in ``dropped`` (nng drops it too); a body that ends before its
    request id raises SPProtocolError, as a bad header or an oversize length does, and
    then none of that read's requests is returned (the connection is to be closed: none
    of them would be answered).
    """

    own_protocol: int = REP
    peer_protocol: int = REQ
    max_hops: int = MAX_HOPS

    def __post_init__(self) -> None:
        super().__post_init__()
        self.dropped = 0

    def receive_requests(self, data: bytes) -> list[tuple[bytes, bytes]]:
        try:
            return self._receive_requests(data)
        except SPProtocolError:
            self._buffer.clear()
            raise

    def _receive_requests(self, data: bytes) -> list[tuple[bytes, bytes]]:
        view = self._feed(data)
        if view is None:
            return []
        requests: list[tuple[bytes, bytes]] = []
        end = len(view)
        pos = 0
        max_message = self.max_message
        max_hops = self.max_hops
        unpack = _LENGTH.unpack_from
        while end - pos >= LENGTH_SIZE:
            (length,) = unpack(view, pos)
            if length > max_message:
                raise SPProtocolError(f"message of {length} bytes exceeds limit {max_message}")
            start = pos + LENGTH_SIZE
            if end - start < length:
                break
            pos = start + length
            if length >= 4 and view[start] & _END_OF_BACKTRACE and max_hops >= 1:
                # A direct REQ's request: its one word is the whole backtrace.
                requests.append((view[start : start + 4], view[start + 4 : pos]))
                continue
            try:
                requests.append(split_backtrace(view[start:pos], max_hops))
            except TooManyHops:
                self.dropped += 1
        self._keep(view, pos)
        return requests


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
