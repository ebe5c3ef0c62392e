"""REQ/REP backtraces (docs/sp.md, "REQ/REP")."""

import pytest

from orbited.sp.reqrep import RequestIds, TooManyHops, request_id, split_backtrace
from orbited.sp.wire import SPProtocolError


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
