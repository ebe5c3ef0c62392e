"""SP over TCP (the nanomsg/nng TCP mapping) as a sans-I/O state machine.

Owns the 8-byte connection header and the u64 big-endian length framing, and nothing
else: no sockets, no timers. See docs/sp.md.

    header  = 00 'S' 'P' 00 | proto u16 BE | 00 00      (proto = protocol << 4 | role)
    message = u64 BE length | body
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

HEADER_SIZE = 8
LENGTH_SIZE = 8
_LENGTH = struct.Struct(">Q")
_HEADER_PREFIX = b"\x00SP\x00"

# Protocol numbers (bytes 4-5 of the header), as every SP implementation uses them.
PAIR_V0 = 0x10
PAIR_V1 = 0x11
PUB, SUB = 0x20, 0x21
REQ, REP = 0x30, 0x31
PUSH, PULL = 0x50, 0x51
SURVEYOR, RESPONDENT = 0x62, 0x63
BUS = 0x70

PROTOCOL_NAMES = {
    PAIR_V0: "pair0",
    PAIR_V1: "pair1",
    PUB: "pub",
    SUB: "sub",
    REQ: "req",
    REP: "rep",
    PUSH: "push",
    PULL: "pull",
    SURVEYOR: "surveyor",
    RESPONDENT: "respondent",
    BUS: "bus",
}


class SPProtocolError(Exception):
    """The peer broke the SP TCP mapping; the connection must be closed (as nng does)."""


def encode_header(protocol: int) -> bytes:
    return _HEADER_PREFIX + struct.pack(">H", protocol) + b"\x00\x00"


def parse_header(header: bytes, expected_peer: int) -> int:
    """Validate an 8-byte peer header; return the peer's protocol number."""
    if len(header) != HEADER_SIZE:
        raise SPProtocolError(f"header must be {HEADER_SIZE} bytes, got {len(header)}")
    if header[:4] != _HEADER_PREFIX:
        raise SPProtocolError(f"not an SP header: {header.hex(' ')}")
    if header[6:8] != b"\x00\x00":
        raise SPProtocolError(f"reserved header bytes not zero: {header.hex(' ')}")
    protocol = int.from_bytes(header[4:6], "big")
    if protocol != expected_peer:
        got = PROTOCOL_NAMES.get(protocol, hex(protocol))
        want = PROTOCOL_NAMES.get(expected_peer, hex(expected_peer))
        raise SPProtocolError(f"peer speaks {got}, expected {want}")
    return protocol


def encode_message(body: bytes) -> bytes:
    return _LENGTH.pack(len(body)) + body


def encode_message_parts(parts: list[bytes]) -> list[bytes]:
    """Framing for a body given in pieces (e.g. backtrace + payload), for writeSequence."""
    return [_LENGTH.pack(sum(len(p) for p in parts)), *parts]


@dataclass
class SPConnection:
    """One SP TCP connection's receive side: header first, then length-prefixed messages.

    ``receive(data)`` returns the complete message bodies found so far and raises
    SPProtocolError on a bad header, wrong peer protocol or a message over ``max_message``
    (and then drops what it buffered). At most ``max_message + LENGTH_SIZE`` bytes stay
    buffered between calls: one partial message whose announced length is within limit.
    """

    own_protocol: int
    peer_protocol: int
    max_message: int = 1024 * 1024

    def __post_init__(self) -> None:
        self._buffer = bytearray()
        self.header_received = False

    def initial_bytes(self) -> bytes:
        """What this side sends as soon as the TCP connection is up."""
        return encode_header(self.own_protocol)

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def receive(self, data: bytes) -> list[bytes]:
        try:
            return self._receive(data)
        except SPProtocolError:
            # The connection is done for: keep nothing of it (bounded even if the shell
            # goes on feeding us).
            self._buffer.clear()
            raise

    def _receive(self, data: bytes) -> list[bytes]:
        view = self._feed(data)
        if view is None:
            return []
        messages: list[bytes] = []
        end = len(view)
        pos = 0
        max_message = self.max_message
        unpack = _LENGTH.unpack_from
        while end - pos >= LENGTH_SIZE:
            (length,) = unpack(view, pos)
            if length > max_message:
                raise SPProtocolError(f"message of {length} bytes exceeds limit {max_message}")
            start = pos + LENGTH_SIZE
            if end - start < length:
                break
            pos = start + length
            messages.append(view[start:pos])
        self._keep(view, pos)
        return messages

    # The two halves of a receive, for the loops that cut messages out of ``view``
    # (this class's, and the REP side's in orbited.sp.reqrep).

    def _feed(self, data: bytes) -> bytes | None:
        """Take ``data``; return the bytes to cut messages from (complete messages first,
        then at most one partial one), or None while no complete message is there. With
        nothing buffered these are ``data`` itself (no copy); a buffered partial message
        is copied out once, when it is complete, never per read (a large message read in
        many pieces costs no more than its length)."""
        buf = self._buffer
        if not buf and self.header_received:
            return data if type(data) is bytes else bytes(data)
        buf += data
        if not self.header_received:
            if len(buf) < HEADER_SIZE:
                # Fail fast on a wrong first byte rather than waiting for the rest.
                if not _HEADER_PREFIX.startswith(bytes(buf[:4])):
                    raise SPProtocolError(f"not an SP header: {bytes(buf).hex(' ')}")
                return None
            parse_header(bytes(buf[:HEADER_SIZE]), self.peer_protocol)
            self.header_received = True
            del buf[:HEADER_SIZE]
        if len(buf) < LENGTH_SIZE:
            return None
        (length,) = _LENGTH.unpack_from(buf, 0)
        if length > self.max_message:
            raise SPProtocolError(f"message of {length} bytes exceeds limit {self.max_message}")
        if len(buf) - LENGTH_SIZE < length:
            return None
        view = bytes(buf)
        buf.clear()
        return view

    def _keep(self, view: bytes, pos: int) -> None:
        """Buffer what is left of ``view`` after ``pos`` (a partial message)."""
        if pos < len(view):
            self._buffer += memoryview(view)[pos:]
