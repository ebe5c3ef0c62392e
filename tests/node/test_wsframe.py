"""orbited.node.transports.wsframe: the node's RFC 6455 server side, as plain values.

The same rules end to end, with autobahn's client as the oracle, are in
tests/node/test_httpfront.py; the fuzz target ``wsframe`` feeds random bytes and splits."""

from __future__ import annotations

import base64
import binascii
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orbited.node.transports.wsframe import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    ClientFrames,
    HandshakeError,
    Message,
    WSError,
    accept_key,
    check_handshake,
    close_frame,
    frame,
    mask_frame,
    text_header,
)

KEY = base64.b64encode(b"0123456789abcdef")


def test_accept_key_is_rfc_6455s_example():
    assert accept_key(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def good_headers(**changes: bytes | None) -> dict[bytes, bytes]:
    headers = {b"host": b"h", b"upgrade": b"websocket", b"connection": b"keep-alive, Upgrade",
               b"sec-websocket-version": b"13", b"sec-websocket-key": KEY}  # fmt: skip
    for name, value in changes.items():
        name_b = name.replace("_", "-").encode()
        if value is None:
            headers.pop(name_b, None)
        else:
            headers[name_b] = value
    return headers


@pytest.mark.parametrize(
    ("changes", "status"),
    [
        ({}, None),
        ({"upgrade": None}, 426),
        ({"upgrade": b"h2c"}, 426),
        ({"sec_websocket_version": b"8"}, 426),
        ({"sec_websocket_key": None}, 400),
        ({"sec_websocket_key": b"short=="}, 400),
        ({"sec_websocket_key": b"MDEyMzQ1Njc4OWFiY2Rl!!=="}, 400),  # 24 chars, not base64
        ({"connection": b"keep-alive"}, 400),
        ({"host": None}, 400),
    ],
)
def test_handshake_rule(changes, status):
    headers = good_headers(**changes)
    if status is None:
        assert check_handshake(headers) == KEY
    else:
        with pytest.raises(HandshakeError) as e:
            check_handshake(headers)
        assert e.value.status == status


def _b64decodes_to_16(key: bytes) -> bool:
    """The key rule as first written: base64 with the strict alphabet, 16 bytes."""
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except binascii.Error:
        return False


@given(
    st.one_of(
        st.binary(min_size=20, max_size=28),
        st.text("AZaz09+/=-_ \n\x80", min_size=20, max_size=28).map(str.encode),
        st.binary(min_size=15, max_size=17).map(base64.b64encode),
        st.tuples(st.binary(min_size=16, max_size=16).map(base64.b64encode),
                  st.integers(0, 23), st.sampled_from(b"A+/=-_ \x80")).map(
            lambda t: t[0][: t[1]] + bytes([t[2]]) + t[0][t[1] + 1 :]),
    )
)  # fmt: skip
def test_the_key_is_accepted_exactly_when_it_decodes_to_16_bytes(key):
    """check_handshake's key rule (without base64's regular expression) is the one
    ``len(base64.b64decode(key, validate=True)) == 16`` states."""
    headers = good_headers(sec_websocket_key=key)
    if _b64decodes_to_16(key):
        assert check_handshake(headers) == key
    else:
        with pytest.raises(HandshakeError) as e:
            check_handshake(headers)
        assert e.value.status == 400


def test_server_frames():
    assert text_header(5) == b"\x81\x05"
    assert text_header(200) == b"\x81\x7e\x00\xc8"
    assert text_header(70000) == b"\x81\x7f" + struct.pack(">Q", 70000)
    assert frame(OP_PING, b"") == b"\x89\x00"
    # a close reason is cut to 123 bytes on a character boundary
    long = close_frame(4000, "é" * 100)
    assert len(long) == 2 + 2 + 122 and long[:4] == b"\x88\x7c\x0f\xa0"
    (long[4:]).decode("utf-8")


def feed_all(parser: ClientFrames, data: bytes) -> list[Message]:
    return parser.feed(data)


def test_whole_messages_and_control_frames_between_fragments():
    p = ClientFrames(4096)
    close = mask_frame(OP_CLOSE, struct.pack(">H", 1000))
    data = (mask_frame(OP_TEXT, b'{"ty', fin=False) + mask_frame(OP_PING, b"p")
            + mask_frame(OP_CONT, b'pe":1}') + close)  # fmt: skip
    assert p.feed(data) == [
        Message(OP_PING, b"p"),
        Message(OP_TEXT, b'{"type":1}'),
        Message(OP_CLOSE, b"\x03\xe8"),
    ]


def test_a_character_split_across_fragments_is_valid():
    text = "é✓".encode()
    p = ClientFrames(4096)
    data = mask_frame(OP_TEXT, text[:1], fin=False) + mask_frame(OP_CONT, text[1:])
    assert p.feed(data) == [Message(OP_TEXT, text)]


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (frame(OP_TEXT, b"unmasked"), 1002),
        (mask_frame(OP_TEXT, b"x", rsv=4), 1002),
        (mask_frame(OP_TEXT, b"x", rsv=1), 1002),
        (mask_frame(3, b"x"), 1002),
        (mask_frame(11, b""), 1002),
        (mask_frame(OP_PING, b"x" * 126), 1002),
        (mask_frame(OP_PING, b"x", fin=False), 1002),
        (mask_frame(OP_CONT, b"x"), 1002),
        (mask_frame(OP_TEXT, b"a", fin=False) + mask_frame(OP_TEXT, b"b"), 1002),
        (mask_frame(OP_CLOSE, b"\x03"), 1002),
        (mask_frame(OP_CLOSE, struct.pack(">H", 1005)), 1002),
        (mask_frame(OP_CLOSE, struct.pack(">H", 1006)), 1002),
        (mask_frame(OP_CLOSE, struct.pack(">H", 1015)), 1002),
        (mask_frame(OP_CLOSE, struct.pack(">H", 999)), 1002),
        (mask_frame(OP_CLOSE, struct.pack(">H", 2000)), 1002),
        (mask_frame(OP_CLOSE, struct.pack(">H", 5000)), 1002),
        (mask_frame(OP_CLOSE, struct.pack(">H", 1000) + b"\xff"), 1007),
        (mask_frame(OP_TEXT, b"\xc3"), 1007),
        (mask_frame(OP_TEXT, b"\xed\xa0\x80"), 1007),  # a surrogate
        (mask_frame(OP_TEXT, b"x" * 4097), 1009),
        (mask_frame(OP_TEXT, b"x" * 4000, fin=False) + mask_frame(OP_CONT, b"x" * 97), 1009),
    ],
)
def test_violations_close_with_their_code(data, code):
    with pytest.raises(WSError) as e:
        ClientFrames(4096).feed(data)
    assert e.value.code == code


def test_an_oversize_message_is_refused_from_its_header_alone():
    head = mask_frame(OP_TEXT, b"x" * 70000)[:14]  # no payload sent yet
    with pytest.raises(WSError) as e:
        ClientFrames(4096).feed(head)
    assert e.value.code == 1009


def test_binary_and_pong_and_empty_close_pass():
    p = ClientFrames(10)
    data = mask_frame(OP_BINARY, b"\x00\xff") + mask_frame(OP_PONG, b"") + mask_frame(OP_CLOSE, b"")
    assert p.feed(data) == [Message(OP_BINARY, b"\x00\xff"), Message(OP_PONG, b""),
                            Message(OP_CLOSE, b"")]  # fmt: skip


STREAM = (
    mask_frame(OP_TEXT, b'{"type":"ack","seq":1}', b"\xaa\xbb\xcc\xdd")
    + mask_frame(OP_TEXT, "ü".encode() * 100, fin=False)
    + mask_frame(OP_PING, b"ping")
    + mask_frame(OP_CONT, b"x" * 300, b"\x00\x00\x00\x00", fin=False)
    + mask_frame(OP_CONT, b"")
    + mask_frame(OP_TEXT, b"y" * 1000)
    + mask_frame(OP_CLOSE, struct.pack(">H", 4000) + b"bye")
)


@given(st.lists(st.integers(0, len(STREAM)), max_size=12))
def test_any_split_gives_the_same_messages(cuts):
    whole = ClientFrames(4096).feed(STREAM)
    p = ClientFrames(4096)
    got: list[Message] = []
    last = 0
    for cut in sorted(cuts) + [len(STREAM)]:
        got += p.feed(STREAM[last:cut])
        last = cut
    assert got == whole
    assert [m.opcode for m in whole] == [OP_TEXT, OP_PING, OP_TEXT, OP_TEXT, OP_CLOSE]
    assert p.buf == b""
