"""RFC 6455, the server side the browser port needs, sans-I/O (no Twisted here).

- the opening handshake: ``check_handshake`` (the rule docs/protocol.md, "Errors (browser
  side)" states: 426 without ``Upgrade: websocket`` or version 13, 400 without a
  ``Sec-WebSocket-Key`` of 16 bytes in base64, ``Connection: Upgrade`` or ``Host``) and
  ``handshake_response`` (no extension and no subprotocol is ever negotiated);
- server frames: unmasked and unfragmented (``text_header``, ``frame``, ``close_frame``);
- ``ClientFrames``: the browser's frames in, whole messages out, every breach of the RFC
  an ``WSError`` carrying the close code to answer with: 1002 (protocol error: unmasked
  frame, reserved bit or opcode, control frame over 125 bytes or fragmented, continuation
  without a message, a new message inside a fragmented one, a bad close payload), 1007
  (a text message — the whole of it, fragments joined — or a close reason not UTF-8),
  1009 (a message over ``max_message`` bytes, counted over all of its fragments and
  refused as soon as a frame header announces it: the node never buffers more).

The node's WebSocket was autobahn's until issue 20; autobahn is now the conformance oracle
in tests/node/test_wsframe.py and the fuzz target ``wsframe`` (docs/architecture.md,
"Design choices").
"""

from __future__ import annotations

import binascii
import hashlib
import struct
from collections.abc import Mapping
from typing import NamedTuple

from orbited.core import speedups

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10
VERSION = b"13"
MAX_CONTROL = 125
# Close codes a peer may send (RFC 6455 7.4.1 and the IANA registry; 1004-1006, 1015 and
# the unassigned ones below 3000 must never be on the wire).
VALID_CLOSE = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013,
                         1014}) | frozenset(range(3000, 5000))  # fmt: skip


class HandshakeError(Exception):
    """The upgrade request is refused with an HTTP status (426 or 400)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _has_token(value: bytes | None, token: bytes) -> bool:
    """Whether the comma-separated header ``value`` lists ``token`` (case-insensitive)."""
    if value is None:
        return False
    value = value.lower()
    return value == token or token in [t.strip() for t in value.split(b",")]


_BASE64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _is_key(key: bytes) -> bool:
    """Whether ``key`` is 16 bytes in base64: what ``len(base64.b64decode(key,
    validate=True)) == 16`` decides (22 characters of the alphabet, then ``==``; the
    spare bits of the last one are not looked at), without its regular expression."""
    return len(key) == 24 and key.endswith(b"==") and not key[:22].translate(None, _BASE64)


def check_handshake(headers: Mapping[bytes, bytes]) -> bytes:
    """The ``Sec-WebSocket-Key`` of a valid upgrade request (``headers``: lower-case names,
    the last value of each); raises HandshakeError otherwise."""
    upgrade = _has_token(headers.get(b"upgrade"), b"websocket")
    if not upgrade or headers.get(b"sec-websocket-version") != VERSION:
        message = "this URL is a WebSocket" if not upgrade else "WebSocket version must be 13"
        raise HandshakeError(426, "upgrade_required", message)
    key = headers.get(b"sec-websocket-key") or b"x"
    if (
        not _is_key(key)
        or not _has_token(headers.get(b"connection"), b"upgrade")
        or not headers.get(b"host")
    ):
        message = "not a WebSocket handshake (RFC 6455, section 4.1)"
        raise HandshakeError(400, "bad_request", message)
    return key


def accept_key(key: bytes) -> bytes:
    """The ``Sec-WebSocket-Accept`` of ``key``: base64 of the SHA-1 of it and the GUID."""
    return binascii.b2a_base64(hashlib.sha1(key + GUID).digest(), newline=False)


# Its C twin where orbited.core._speedups is built (0.15 against 0.6 µs an accept; the
# same bytes for every key: tests/core/test_speedups.py).
if speedups.native is not None:
    accept_key = speedups.native.accept_key  # noqa: F811


def handshake_response(key: bytes) -> bytes:
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: %s\r\n\r\n" % accept_key(key)
    )


def text_header(length: int) -> bytes:
    """The header of an unmasked, unfragmented text frame of ``length`` bytes."""
    if length < 126:
        return bytes((0x81, length))
    if length < 65536:
        return struct.pack(">BBH", 0x81, 126, length)
    return struct.pack(">BBQ", 0x81, 127, length)


def frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 65536:
        return struct.pack(">BBH", 0x80 | opcode, 126, n) + payload
    return struct.pack(">BBQ", 0x80 | opcode, 127, n) + payload


def close_frame(code: int, reason: str = "") -> bytes:
    """A close frame; the reason is cut to 123 bytes (on a character boundary)."""
    text = reason.encode("utf-8")[:123].decode("utf-8", "ignore").encode("utf-8")
    return frame(OP_CLOSE, struct.pack(">H", code) + text)


class WSError(Exception):
    """The browser broke RFC 6455: answer with close ``code`` and ``reason``, after the
    whole ``messages`` that came before the breach (so the outcome does not depend on
    how the bytes were cut)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason
        self.messages: list[Message] = []


class Message(NamedTuple):
    opcode: int  # OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG
    payload: bytes


def close_code(payload: bytes) -> int | None:
    """The code of a (checked) close frame's payload; None if it has none."""
    return struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else None


class ClientFrames:
    """Frames from one browser: ``feed`` bytes, get whole messages (control frames as
    they come, between fragments too). After a WSError the parser is not fed again."""

    __slots__ = ("max_message", "buf", "fragments", "frag_op", "frag_len")

    def __init__(self, max_message: int) -> None:
        self.max_message = max_message
        self.buf = b""
        self.fragments: list[bytes] | None = None
        self.frag_op = 0
        self.frag_len = 0

    def feed(self, data: bytes) -> list[Message]:
        out: list[Message] = []
        try:
            self._feed(data, out)
        except WSError as e:
            e.messages = out
            raise
        return out

    def _feed(self, data: bytes, out: list[Message]) -> None:
        buf = self.buf + data if self.buf else data
        pos = 0
        end = len(buf)
        while end - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            if b0 & 0x70:
                raise WSError(1002, "reserved bits set (no extension was negotiated)")
            if not b1 & 0x80:
                raise WSError(1002, "client frames must be masked")
            fin, op, n = b0 & 0x80, b0 & 0x0F, b1 & 0x7F
            if op in (3, 4, 5, 6, 7) or op > OP_PONG:
                raise WSError(1002, "reserved opcode")
            hdr = 2
            if n == 126:
                if end - pos < 4:
                    break
                n = struct.unpack_from(">H", buf, pos + 2)[0]
                hdr = 4
            elif n == 127:
                if end - pos < 10:
                    break
                n = struct.unpack_from(">Q", buf, pos + 2)[0]
                hdr = 10
            if op >= OP_CLOSE:
                if n > MAX_CONTROL or not fin:
                    raise WSError(1002, "control frame over 125 bytes or fragmented")
            elif op == OP_CONT and self.fragments is None:
                raise WSError(1002, "continuation frame without a message to continue")
            elif op != OP_CONT and self.fragments is not None:
                raise WSError(1002, "new message inside a fragmented one")
            elif n + self.frag_len > self.max_message:
                raise WSError(1009, f"message over {self.max_message} bytes")
            start = pos + hdr + 4
            if end < start + n:
                break
            payload = _unmask(buf[start : start + n], buf[pos + hdr : start])
            pos = start + n
            if op >= OP_CLOSE:
                if op == OP_CLOSE:
                    _check_close(payload)
                out.append(Message(op, payload))
            elif op == OP_CONT:
                assert self.fragments is not None
                self.fragments.append(payload)
                self.frag_len += n
                if fin:
                    whole = b"".join(self.fragments)
                    self.fragments, self.frag_len = None, 0
                    out.append(_message(self.frag_op, whole))
            elif fin:
                out.append(_message(op, payload))
            else:
                self.fragments, self.frag_op, self.frag_len = [payload], op, n
        self.buf = buf[pos:] if pos < end else b""


def _message(op: int, payload: bytes) -> Message:
    if op == OP_TEXT:
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError:
            raise WSError(1007, "text message is not UTF-8") from None
    return Message(op, payload)


def _check_close(payload: bytes) -> None:
    if len(payload) == 1:
        raise WSError(1002, "close payload of 1 byte")
    if len(payload) >= 2:
        if close_code(payload) not in VALID_CLOSE:
            raise WSError(1002, "invalid close code")
        try:
            payload[2:].decode("utf-8")
        except UnicodeDecodeError:
            raise WSError(1007, "close reason is not UTF-8") from None


def _unmask(data: bytes, mask: bytes) -> bytes:
    n = len(data)
    if not n:
        return b""
    m = int.from_bytes((mask * (n // 4 + 1))[:n], "little")
    return (int.from_bytes(data, "little") ^ m).to_bytes(n, "little")


def mask_frame(opcode: int, payload: bytes, mask: bytes = b"\x01\x02\x03\x04", fin: bool = True,
               rsv: int = 0) -> bytes:  # fmt: skip
    """A client (masked) frame: for tests and the fuzz target."""
    n = len(payload)
    b0 = (0x80 if fin else 0) | rsv << 4 | opcode
    if n < 126:
        head = bytes((b0, 0x80 | n))
    elif n < 65536:
        head = struct.pack(">BBH", b0, 0x80 | 126, n)
    else:
        head = struct.pack(">BBQ", b0, 0x80 | 127, n)
    return head + mask + _unmask(payload, mask)
