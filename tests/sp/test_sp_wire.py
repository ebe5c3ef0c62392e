"""SP TCP mapping core (docs/sp.md): header, framing, limits — no sockets."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orbited.sp import wire
from orbited.sp.wire import SPConnection, SPProtocolError

# Byte dumps taken from nng 1.11.0 on the wire (pynng, captured on loopback).
PYNNG_REP0_HEADER = bytes.fromhex("0053500000310000")
PYNNG_REQ0_HEADER = bytes.fromhex("0053500000300000")


def test_headers_match_nng_bytes():
    assert wire.encode_header(wire.REP) == PYNNG_REP0_HEADER
    assert wire.encode_header(wire.REQ) == PYNNG_REQ0_HEADER
    assert wire.parse_header(PYNNG_REQ0_HEADER, wire.REQ) == wire.REQ


def test_message_framing_matches_nng_bytes():
    body = bytes.fromhex("80000001") + b"hello"
    assert wire.encode_message(body) == bytes.fromhex("0000000000000009") + body


def rep() -> SPConnection:
    return SPConnection(wire.REP, wire.REQ, max_message=64)


def test_header_then_messages_in_one_chunk():
    conn = rep()
    data = PYNNG_REQ0_HEADER + wire.encode_message(b"a") + wire.encode_message(b"") + b"\0\0"
    assert conn.receive(data) == [b"a", b""]
    assert conn.header_received
    assert conn.buffered == 2  # half a length prefix waits for more


def test_byte_at_a_time():
    conn = rep()
    stream = PYNNG_REQ0_HEADER + wire.encode_message(b"xyz") + wire.encode_message(b"q" * 10)
    out = []
    for i in range(len(stream)):
        out += conn.receive(stream[i : i + 1])
    assert out == [b"xyz", b"q" * 10]


@pytest.mark.parametrize(
    "header, reason",
    [
        (b"GET / HT", "not an SP header"),
        (bytes.fromhex("0053500100300000"), "not an SP header"),  # version byte 1
        (bytes.fromhex("0053500000300001"), "reserved"),
        (bytes.fromhex("0053500000100000"), "peer speaks pair0, expected req"),
        (bytes.fromhex("0053500000310000"), "peer speaks rep, expected req"),
    ],
)
def test_bad_headers_are_protocol_errors(header, reason):
    with pytest.raises(SPProtocolError, match=reason):
        rep().receive(header)


def test_garbage_is_refused_before_eight_bytes():
    with pytest.raises(SPProtocolError):
        rep().receive(b"GE")


def test_oversize_message_is_refused_from_its_length_alone():
    conn = rep()
    conn.receive(PYNNG_REQ0_HEADER)
    assert conn.receive(wire.encode_message(b"x" * 64)) == [b"x" * 64]
    with pytest.raises(SPProtocolError, match="exceeds limit 64"):
        conn.receive((65).to_bytes(8, "big"))
    with pytest.raises(SPProtocolError, match="exceeds limit"):
        rep().receive(PYNNG_REQ0_HEADER + b"\xff" * 8)


@given(
    st.lists(st.binary(max_size=64), max_size=20),
    st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=30),
)
def test_any_split_of_valid_stream_round_trips(messages, cuts):
    stream = PYNNG_REQ0_HEADER + b"".join(wire.encode_message(m) for m in messages)
    conn = rep()
    out, pos, i = [], 0, 0
    while pos < len(stream):
        step = cuts[i % len(cuts)]
        out += conn.receive(stream[pos : pos + step])
        pos, i = pos + step, i + 1
    assert out == messages
    assert conn.buffered == 0


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise_anything_but_protocol_errors(data):
    conn = rep()
    try:
        conn.receive(data)
    except SPProtocolError:
        return
    assert conn.buffered <= len(data)
