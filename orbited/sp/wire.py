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
        buf = self._buffer
        buf += data
        pos = 0
        if not self.header_received:
            if len(buf) < HEADER_SIZE:
                # Fail fast on a wrong first byte rather than waiting for the rest.
                if not _HEADER_PREFIX.startswith(bytes(buf[:4])):
                    raise SPProtocolError(f"not an SP header: {bytes(buf).hex(' ')}")
                return []
            parse_header(bytes(buf[:HEADER_SIZE]), self.peer_protocol)
            self.header_received = True
            pos = HEADER_SIZE
        messages: list[bytes] = []
        end = len(buf)
        max_message = self.max_message
        while end - pos >= LENGTH_SIZE:
            (length,) = _LENGTH.unpack_from(buf, pos)
            if length > max_message:
                raise SPProtocolError(f"message of {length} bytes exceeds limit {max_message}")
            if end - pos - LENGTH_SIZE < length:
                break
            start = pos + LENGTH_SIZE
            messages.append(bytes(buf[start : start + length]))
            pos = start + length
        if pos:
            del buf[:pos]
        return messages
