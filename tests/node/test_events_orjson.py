"""orjson on the request path (orbited.node.events) gives exactly what the standard
library's strict path gives: the same decoded documents, the same payload and digest
bytes, the same errors; and a node without orjson works (only slower)."""

from __future__ import annotations

import json
import string

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from orbited.node import events, frames
from orbited.node.events import RequestError, RequestLimits

LIMITS = RequestLimits()

# What a request can decode to: no NaN/Infinity, no lone surrogate (the strict path
# refuses both), integers of any size (big ones take the strict path).
texts = st.text(st.characters(exclude_categories=["Cs"]), max_size=20)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([1e-7, 1e-5, 1.5e-5, 2.5e-9, 1e-4, 1e16, 1e-10, 5e-324, 1e308, -0.0, 0.1])
    | texts
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(texts, inner, max_size=5),
    max_leaves=20,
)


def std(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(values)
def test_orjson_dumps_is_json_dumps_but_for_small_floats(value):
    assert events.FAST_ENCODE  # orjson >= 3.12 (setup.cfg): its floats are json's
    try:
        fast = orjson.dumps(value)
    except TypeError:  # past 64 bits: the encoder falls back
        assert "int" in repr(type(value)) or isinstance(value, list | dict)
        fast = None
    if fast is not None and fast != std(value):
        # The differences we know, floats of 1e-5 to 1e-10 (orjson 0.00001 and 1e-7, json
        # 1e-05 and 1e-07): the encoder redoes those with json.
        assert events._ORJSON_DIFFERS.search(fast), (fast, std(value))
    assert events._encode_fast(value) == std(value) == events._encode(value)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(values, st.sampled_from([None, 2]), st.booleans())
def test_bodies_decode_to_the_same_document_either_way(value, indent, ascii_only):
    body = json.dumps(value, indent=indent, ensure_ascii=ascii_only).encode()
    assert repr(events._load(body)) == repr(events.loads_strict(body.decode()))


def _outcome(body: bytes) -> object:
    try:
        return events.parse_request(body, LIMITS)
    except RequestError as e:
        return (e.code, e.message, e.event_id)


def _both(body: bytes, monkeypatch: pytest.MonkeyPatch) -> tuple[object, object]:
    fast = _outcome(body)
    with monkeypatch.context() as m:
        m.setattr(events, "_orjson", None)
        slow = _outcome(body)
    return fast, slow


keys = st.lists(st.sampled_from(["u", "s", "/l", "", "ü", 1]), min_size=3, max_size=3)
requests = st.fixed_dictionaries(
    {"id": st.text(string.printable + "é\"\\", min_size=1, max_size=8), "to": st.lists(keys),
     "data": values},
    optional={"ack": st.sampled_from([1, 0.5, 0, True, "x"]), "op": st.just("event")},
)  # fmt: skip


@settings(
    max_examples=300,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(req=requests, data=st.data())
@example(req={"id": "a", "to": [["u", "s", "/l"]], "data": 2**64}, data=None)
@example(req={"id": "a", "to": [["u", "s", "/l"]], "data": [1e-7, 1e-300, 1e-5]}, data=None)
def test_parse_request_is_the_same_with_and_without_orjson(req, data, monkeypatch):
    body = json.dumps(req, ensure_ascii=False).encode()
    if data is not None:  # a mutated body: flip, drop or insert bytes
        for _ in range(data.draw(st.integers(0, 3))):
            at = data.draw(st.integers(0, max(0, len(body) - 1)))
            b = data.draw(st.binary(min_size=0, max_size=2))
            body = body[:at] + b + body[at + data.draw(st.integers(0, 2)) :]
    fast, slow = _both(body, monkeypatch)
    assert fast == slow


@pytest.mark.parametrize(
    "body",
    [
        b'{"id":"a","to":[["u","s","/l"]],"data":"\\ud800"}',  # a lone surrogate
        b'{"id":"a","to":[["u","s","/l"]],"data":1e999}',  # beyond a double
        b'{"id":"a","to":[["u","s","/l"]],"data":NaN}',
        b'\xef\xbb\xbf{"id":"a","to":[["u","s","/l"]],"data":1}',  # a BOM
        b'{"id":"a","to":[["u","s","/l"]],"data":"\xff"}',  # not UTF-8
        b'{"id":"a","to":[["u","s","/l"]],"data":' + b"[" * 2000 + b"]" * 2000 + b"}",
    ],
)
def test_what_orjson_refuses_gets_the_documented_error(body, monkeypatch):
    fast, slow = _both(body, monkeypatch)
    assert fast == slow and isinstance(fast, tuple) and fast[0] == "bad_json"


def test_integers_past_64_bits_keep_every_digit(monkeypatch):
    body = b'{"id":"a","to":[["u","s","/l"]],"data":[18446744073709551616,-9223372036854775809]}'
    fast, slow = _both(body, monkeypatch)
    assert fast == slow
    assert isinstance(fast, events.EventRequest)
    assert fast.payload == b"[18446744073709551616,-9223372036854775809]"


@given(st.text(max_size=12).filter(lambda t: not any(0xD800 <= ord(c) <= 0xDFFF for c in t)))
def test_event_ids_are_encoded_as_json_dumps_does(text):
    assert frames.event_id(text) == std(text)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=20), st.lists(st.lists(st.text(max_size=10), min_size=3, max_size=3)))
@example("a\ud800", [["x", "", ""]])  # a lone surrogate: orjson refuses it, json decides
@example('q"\\\x7f\u2028\x1f', [["é", "1e-5", "0.00001"]])  # escapes, digits in strings
def test_a_request_s_addressing_is_encoded_as_json_does(event_id, to):
    """The digest's input for the fast path's id and keys (strings only): orjson's
    bytes, unchecked, are json's; what orjson refuses still encodes (or fails) as json."""
    try:
        expected = std([event_id, to])
    except UnicodeEncodeError:
        with pytest.raises(UnicodeEncodeError):
            events._encode_strings([event_id, to])
        return
    assert events._encode_strings([event_id, to]) == expected


BIG = ["18446744073709551616", "-9500000000000000000", "9999999999999999999", "1" * 40]


@pytest.mark.parametrize("big", BIG)
@pytest.mark.parametrize(
    "template",
    [
        '{"id":"a","to":[["u","s","/l"]],"data":%s}',
        '{"id":"a","to":[["u","s","/l"]],"data":{"text":"hello","n":[%s]}}',
        '{"id":"a","to":[["u","s","/l"]],"data":["e1e2e+3",%s]}',
        '{"id":"a","to":[["u","s","/l"]],"data":1,"hash":%s}',
        '{"id":"a","to":[["u","s","/l"]],"data":1,"hash":2,"traceparent":%s}',
        '{"id":"a","to":[["u","s",%s]],"data":1}',
        '{"id":"a","to":[["u","s","/l"],["v","s",%s]],"data":1}',
        '{"id":%s,"to":[["u","s","/l"]],"data":1}',
        '{"id":"a","to":[["u","s","/l"]],"data":1,"ack":%s}',
        '{"id":"a","to":[["u","s","/l"]],"data":1,"latest":"x","offline":%s}',
        '{"id":"a","to":[["u","s","/l"]],"data":1,"extra":%s}',
        '{"id":"a","to":[["u","s","/l"]],"data":"%s"}',  # digits in a string: no float
        '{"id":"a%s","to":[["u","s","/l"]],"data":"1e19"}',
    ],
)
def test_integers_past_64_bits_anywhere_decide_as_the_strict_path(template, big, monkeypatch):
    """orjson reads an integer past 64 bits as a float; the fast path looks for one only
    where a float reaches the request (its payload), every other path reads the body
    again strictly: each field, valid or not, gives the strict path's request or error."""
    body = (template % big).encode()
    fast, slow = _both(body, monkeypatch)
    assert fast == slow
    if template.endswith('"data":%s}'):
        assert isinstance(fast, events.EventRequest) and fast.payload == big.encode()


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    field=st.sampled_from(["data", "hash", "id", "key"]),
    number=st.integers(min_value=-(10**30), max_value=10**30) | st.floats(allow_nan=False),
    text=st.text(alphabet="e+123 .-", max_size=6),
)
def test_numbers_of_any_size_decide_as_the_strict_path(field, number, text, monkeypatch):
    req: dict[str, object] = {"id": "a", "to": [["u", "s", "/l"]], "data": [text, number]}
    if field == "hash":
        req["hash"] = number
    elif field == "id":
        req["id"] = number
    elif field == "key":
        req["to"] = [["u", "s", number]]
    fast, slow = _both(json.dumps(req).encode(), monkeypatch)
    assert fast == slow
