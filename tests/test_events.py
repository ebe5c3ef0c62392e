"""Event request parsing (docs/protocol.md, "Event requests")."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orbited.events import EventRequest, PingRequest, RequestError, RequestLimits, parse_request
from orbited.keys import ConnectionKey

LIMITS = RequestLimits(max_recipients=3, max_payload=100)


def parse(doc) -> EventRequest | PingRequest:
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return parse_request(body, LIMITS)


def test_valid_request():
    req = parse({"id": "e1", "to": [["u", "s", "/l"]], "data": {"b": 1, "a": "é"}})
    assert req.event_id == "e1"
    assert req.recipients == (ConnectionKey("u", "s", "/l"),)
    assert json.loads(req.payload) == {"b": 1, "a": "é"}
    assert "é".encode() in req.payload  # UTF-8, not \u escapes


def test_same_event_same_digest_different_event_different_digest():
    a = parse({"id": "e1", "to": [["u", "", ""]], "data": 1})
    assert a.digest == parse({"to": [["u", "", ""]], "data": 1, "id": "e1"}).digest
    assert a.digest != parse({"id": "e2", "to": [["u", "", ""]], "data": 1}).digest
    assert a.digest != parse({"id": "e1", "to": [["v", "", ""]], "data": 1}).digest
    assert a.digest != parse({"id": "e1", "to": [["u", "", ""]], "data": 2}).digest


def test_ping():
    assert parse({"op": "ping"}) == PingRequest(None)


@pytest.mark.parametrize(
    "doc, code",
    [
        (b"{not json", "bad_json"),
        (b"\xff\xfe", "bad_json"),
        (b'{"id":"e","to":[["u","",""]],"data":NaN}', "bad_json"),
        (b'{"id":"e","to":[["u","",""]],"data":[1e999]}', "bad_json"),
        ('{"id":"e","to":[["u","",""]],"data":1}'.encode("utf-16"), "bad_json"),
        (b'\xef\xbb\xbf{"id":"e","to":[["u","",""]],"data":1}', "bad_json"),
        (b"[" * 100_000, "bad_json"),
        (b'{"id":"e","to":[["u","",""]],"data":"\\ud800"}', "bad_json"),
        ([1], "bad_request"),
        ({"to": [["u", "", ""]], "data": 1}, "bad_request"),
        ({"id": "", "to": [["u", "", ""]], "data": 1}, "bad_request"),
        ({"id": "x" * 129, "to": [["u", "", ""]], "data": 1}, "bad_request"),
        ({"id": 5, "to": [["u", "", ""]], "data": 1}, "bad_request"),
        ({"id": "e", "to": [], "data": 1}, "bad_request"),
        ({"id": "e", "to": "u", "data": 1}, "bad_request"),
        ({"id": "e", "to": [["u", "", ""]]}, "bad_request"),
        ({"id": "e", "to": [["u", "", ""]], "data": 1, "extra": 2}, "bad_request"),
        ({"id": "e", "to": [["u", ""]], "data": 1}, "bad_key"),
        ({"id": "e", "to": [["", "s", "l"]], "data": 1}, "bad_key"),
        ({"id": "e", "to": [["u", 5, "l"]], "data": 1}, "bad_key"),
        ({"id": "e", "to": [["x" * 257, "", ""]], "data": 1}, "bad_key"),
        ({"id": "e", "to": [["u", "", ""]] * 4, "data": 1}, "too_many_recipients"),
        ({"id": "e", "to": [["u", "", ""]], "data": "x" * 200}, "payload_too_large"),
        ({"id": "e", "op": "drop_tables"}, "unknown_op"),
    ],
)
def test_bad_requests_have_clear_codes(doc, code):
    with pytest.raises(RequestError) as info:
        parse(doc)
    assert info.value.code == code
    assert info.value.message


@given(st.binary(max_size=300))
def test_arbitrary_bytes_are_parsed_or_rejected_cleanly(body):
    try:
        parse_request(body, LIMITS)
    except RequestError as e:
        assert e.code in {
            "bad_json",
            "bad_request",
            "bad_key",
            "unknown_op",
            "too_many_recipients",
            "payload_too_large",
        }


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=10,
)


@given(json_values)
def test_any_json_data_round_trips(data):
    try:
        req = parse({"id": "e", "to": [["u", "", ""]], "data": data})
    except RequestError as e:
        assert e.code in ("payload_too_large", "bad_json")
        return
    assert json.loads(req.payload) == data
