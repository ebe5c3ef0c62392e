"""REQ/REP backtraces (docs/sp.md, "REQ/REP")."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orbited.sp.reqrep import (
    RepConnection,
    RequestIds,
    TooManyHops,
    encode_reply,
    request_id,
    split_backtrace,
)
from orbited.sp.wire import REP, REQ, SPConnection, SPProtocolError, encode_header, encode_message


def test_direct_request_has_one_word():
    backtrace, payload = split_backtrace(bytes.fromhex("80000001") + b"hello")
    assert backtrace == bytes.fromhex("80000001")
    assert payload == b"hello"
    assert request_id(backtrace) == 0x80000001


def test_device_hops_are_kept_verbatim():
    # The 3-word backtrace nng echoes in the reference byte dump.
    body = bytes.fromhex("000000070000abcd80000042") + b"via-2-hops"
    backtrace, payload = split_backtrace(body)
    assert backtrace == bytes.fromhex("000000070000abcd80000042")
    assert payload == b"via-2-hops"


def test_empty_payload_is_allowed():
    assert split_backtrace(bytes.fromhex("80000009")) == (bytes.fromhex("80000009"), b"")


@pytest.mark.parametrize("body", [b"", b"\x80\x00", bytes.fromhex("00000001"), b"\x00" * 7])
def test_body_without_request_id_is_a_protocol_error(body):
    with pytest.raises(SPProtocolError):
        split_backtrace(body)


def test_more_than_max_hops_is_dropped_not_fatal():
    # nng 1.11 answers up to 8 words (7 hops + the request id) and drops longer ones,
    # including 8 hop words with no id yet, without closing the connection.
    hop = bytes.fromhex("00000001")
    assert split_backtrace(hop * 7 + bytes.fromhex("80000001"))[1] == b""
    with pytest.raises(TooManyHops):
        split_backtrace(hop * 8 + bytes.fromhex("80000001"))
    with pytest.raises(TooManyHops):
        split_backtrace(hop * 8)


def test_request_ids_follow_nng():
    ids = RequestIds()
    first = ids.next()
    assert first & 0x80000000
    assert ids.next() == first + 1 or first == 0xFFFFFFFF
    wrap = RequestIds(start=0xFFFFFFFF)
    assert wrap.next() == 0xFFFFFFFF
    assert wrap.next() == 0x80000000
    assert RequestIds.encode(0x80000001) == bytes.fromhex("80000001")


# -- RepConnection: framing and backtraces in one pass (orbited.node.rep's receive path) --

REQ_HEADER = encode_header(REQ)


def test_reply_bytes_match_the_documented_dump():
    # docs/sp.md, "REQ/REP bodies": REP → REQ for request id 0x80000001.
    assert encode_reply(bytes.fromhex("80000001"), b"ok:hello") == (
        bytes.fromhex("000000000000000c80000001") + b"ok:hello"
    )


def test_rep_connection_splits_direct_and_device_requests():
    conn = RepConnection(max_message=64)
    hops = bytes.fromhex("000000070000abcd")
    data = REQ_HEADER + encode_message(bytes.fromhex("80000001") + b"a")
    data += encode_message(hops + bytes.fromhex("80000042") + b"b")
    data += encode_message(bytes.fromhex("80000003"))  # empty payload
    assert conn.receive_requests(data) == [
        (bytes.fromhex("80000001"), b"a"),
        (hops + bytes.fromhex("80000042"), b"b"),
        (bytes.fromhex("80000003"), b""),
    ]
    assert conn.buffered == 0


def test_rep_connection_drops_too_many_hops_and_counts_them():
    conn = RepConnection(max_hops=2)
    deep = encode_message(bytes.fromhex("00000001" * 2 + "80000001") + b"x")
    data = REQ_HEADER + deep + encode_message(bytes.fromhex("80000002") + b"y")
    assert conn.receive_requests(data) == [(bytes.fromhex("80000002"), b"y")]
    assert conn.dropped == 1


@pytest.mark.parametrize("body", [b"", b"\x80\x00", bytes.fromhex("00000001")])
def test_rep_connection_refuses_a_body_without_request_id(body):
    conn = RepConnection()
    good = encode_message(bytes.fromhex("80000001") + b"a")
    with pytest.raises(SPProtocolError, match="no request id"):
        conn.receive_requests(REQ_HEADER + good + encode_message(body))
    assert conn.buffered == 0


def test_rep_connection_a_large_request_in_many_reads():
    conn = RepConnection(max_message=1 << 20)
    stream = REQ_HEADER + encode_message(bytes.fromhex("80000001") + b"z" * 300_000)
    out = []
    for i in range(0, len(stream), 4096):
        out += conn.receive_requests(stream[i : i + 4096])
    assert out == [(bytes.fromhex("80000001"), b"z" * 300_000)]
    assert conn.buffered == 0


words = st.one_of(
    st.just(b""),
    st.lists(st.integers(0, 0xFFFFFFFF), max_size=10).map(
        lambda ws: b"".join(w.to_bytes(4, "big") for w in ws)
    ),
)


@given(
    st.lists(st.tuples(words, st.binary(max_size=12)), max_size=12),
    st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=20),
    st.integers(1, 10),
)
def test_rep_connection_equals_framing_then_split(bodies, cuts, max_hops):
    """The one-pass receive gives what SPConnection.receive and split_backtrace give,
    for any stream and any chunking: the same requests, drops and errors."""
    stream = REQ_HEADER + b"".join(encode_message(bt + p) for bt, p in bodies)
    expected, dropped, error = [], 0, False
    try:
        for body in SPConnection(REP, REQ).receive(stream):
            try:
                expected.append(split_backtrace(body, max_hops))
            except TooManyHops:
                dropped += 1
    except SPProtocolError:
        error = True
    conn = RepConnection(max_hops=max_hops)
    got, pos, i, failed = [], 0, 0, False
    while pos < len(stream):
        step = cuts[i % len(cuts)]
        try:
            got += conn.receive_requests(stream[pos : pos + step])
        except SPProtocolError:
            failed = True
            break
        pos, i = pos + step, i + 1
    assert failed == error
    if not error:
        assert got == expected
        assert conn.dropped == dropped
        assert conn.buffered == 0
    else:  # what came out before the bad request is a prefix of the good ones
        assert got == expected[: len(got)]
