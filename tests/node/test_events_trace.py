"""The event request's trace context fields (docs/protocol.md, "Trace context"):
``traceparent`` and ``tracestate`` are carried as sent, checked for type and length only,
never part of the dedup digest, and a traced request keeps the fast path's result."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orbited.core.tracecontext import MAX_TRACE_FIELD
from orbited.node import events
from orbited.node.events import (
    EventRequest,
    RequestError,
    RequestLimits,
    parse_request,
    with_trace_headers,
)

LIMITS = RequestLimits(max_recipients=3, max_payload=100)
PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
OTHER = "00-4bf92f3577b34da6a3ce929d0e0e4736-b7ad6b7169203331-01"
BASE = {"id": "e1", "to": [["u", "s", "/l"]], "data": {"a": 1}}


def parse(doc: object) -> EventRequest:
    request = parse_request(json.dumps(doc).encode(), LIMITS)
    assert isinstance(request, EventRequest)
    return request


def general(doc: dict) -> EventRequest:
    """The general path's answer for the same document: the fast path must equal it."""
    request = events._parse_general(doc, LIMITS)
    assert isinstance(request, EventRequest)
    return request


@pytest.mark.parametrize(
    "extra",
    [
        {"traceparent": PARENT},
        {"traceparent": PARENT, "tracestate": "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"},
        {"traceparent": PARENT, "hash": 2},
        {"traceparent": PARENT, "tracestate": "a=b", "hash": 2},
        {"tracestate": "a=b"},
        {"traceparent": "not a trace context"},  # carried; ignored where it is parsed
    ],
)
def test_the_fields_are_carried_as_sent(extra):
    request = parse({**BASE, **extra})
    assert request.traceparent == extra.get("traceparent")
    assert request.tracestate == extra.get("tracestate")
    assert request.hash == extra.get("hash")
    assert request == general({**BASE, **extra})


def test_without_them_they_are_none():
    for doc in (BASE, {**BASE, "hash": 2}, {**BASE, "ack": 1}):
        request = parse(doc)
        assert request.traceparent is None and request.tracestate is None


def test_they_are_not_part_of_the_digest():
    """A resend whose web app opened another span (or none) is the same request: the
    node answers it as a duplicate instead of delivering it again."""
    plain = parse(BASE)
    for extra in ({"traceparent": PARENT}, {"traceparent": OTHER, "tracestate": "a=b"}):
        assert parse({**BASE, **extra}).digest == plain.digest
    acked = parse({**BASE, "ack": 2})
    assert parse({**BASE, "ack": 2, "traceparent": OTHER}).digest == acked.digest
    tagged = parse({**BASE, "latest": "t"})
    assert parse({**BASE, "latest": "t", "traceparent": PARENT}).digest == tagged.digest


def test_the_acknowledged_mode_carries_them_too():
    request = parse({**BASE, "ack": 1.5, "traceparent": PARENT, "tracestate": "a=b"})
    assert (request.ack, request.traceparent, request.tracestate) == (1.5, PARENT, "a=b")


@pytest.mark.parametrize(
    "name, value",
    [
        ("traceparent", None),
        ("traceparent", 1),
        ("traceparent", ["x"]),
        ("traceparent", {"v": PARENT}),
        ("traceparent", "x" * (MAX_TRACE_FIELD + 1)),
        ("tracestate", None),
        ("tracestate", False),
        ("tracestate", "x" * (MAX_TRACE_FIELD + 1)),
    ],
)
def test_a_wrong_type_or_length_is_bad_request(name, value):
    for doc in ({**BASE, name: value}, {**BASE, name: value, "hash": 2, "ack": 1}):
        with pytest.raises(RequestError) as e:
            parse(doc)
        assert e.value.code == "bad_request"
        assert e.value.message == f"{name} must be a string of at most 512 characters"
        assert e.value.event_id == "e1"


def test_the_longest_fields_are_accepted():
    value = "x" * MAX_TRACE_FIELD
    request = parse({**BASE, "traceparent": value, "tracestate": value})
    assert request.traceparent == request.tracestate == value


def test_other_errors_keep_their_precedence_in_a_traced_request():
    with pytest.raises(RequestError) as e:
        parse({"id": "e1", "to": [["u", "s", "/l"]], "traceparent": PARENT})
    assert (e.value.code, e.value.message) == ("bad_request", "an event needs data")
    with pytest.raises(RequestError) as e:
        parse({**BASE, "traceparent": PARENT, "extra": 1})
    assert e.value.message == "unknown fields: ['extra']"
    with pytest.raises(RequestError) as e:
        parse({**BASE, "traceparent": PARENT, "hash": 0})
    assert e.value.message == "hash is the hash version the client routed with (1 or 2)"
    with pytest.raises(RequestError) as e:
        parse({**BASE, "to": [["", "s", "/l"]], "traceparent": PARENT})
    assert e.value.code == "bad_key"
    with pytest.raises(RequestError) as e:
        parse_request(json.dumps({"op": "ping", "traceparent": PARENT}).encode(), LIMITS)
    assert e.value.message == "unknown fields in a ping: ['traceparent']"


FIELD = st.one_of(
    st.none(), st.integers(-1, 3), st.booleans(), st.text(max_size=6),
    st.sampled_from([PARENT, "x" * MAX_TRACE_FIELD, "x" * (MAX_TRACE_FIELD + 1)]),
)  # fmt: skip


@given(
    st.dictionaries(st.sampled_from(["hash", "traceparent", "tracestate", "ack"]), FIELD),
    st.sampled_from([BASE, {"id": "e", "to": [["u", "", ""]]}, {"id": "", **BASE}]),
)
def test_the_fast_path_decides_as_the_general_path(extra, base):
    """Any mix of the optional fields: the same request, or the same error."""
    doc = {**base, **extra}

    def outcome(parse_doc):
        try:
            return parse_doc()
        except RequestError as e:
            return (e.code, e.message, e.event_id)

    fast = outcome(lambda: parse_request(json.dumps(doc).encode(), LIMITS))
    slow = outcome(lambda: events._parse_general(doc, LIMITS))
    assert fast == slow


def test_publish_headers_apply_when_the_body_has_none():
    plain = parse(BASE)
    traced = with_trace_headers(plain, PARENT, "a=b")
    assert (traced.traceparent, traced.tracestate) == (PARENT, "a=b")
    assert traced._replace(traceparent=None, tracestate=None) == plain
    assert with_trace_headers(plain, None, "a=b") is plain  # tracestate alone: nothing


def test_body_fields_win_over_publish_headers():
    body = parse({**BASE, "traceparent": OTHER})
    assert with_trace_headers(body, PARENT, "a=b") is body


def test_overlong_publish_headers_are_ignored():
    plain = parse(BASE)
    assert with_trace_headers(plain, "x" * (MAX_TRACE_FIELD + 1), None) is plain
    traced = with_trace_headers(plain, PARENT, "x" * (MAX_TRACE_FIELD + 1))
    assert (traced.traceparent, traced.tracestate) == (PARENT, None)


def test_a_traced_request_takes_the_fast_path(monkeypatch):
    """The general path is for pings, options and errors: a traced event skips it."""

    def general_path(doc, limits):
        raise AssertionError("general path")

    monkeypatch.setattr(events, "_parse_general", general_path)
    for extra in ({"traceparent": PARENT}, {"traceparent": PARENT, "tracestate": "a=b", "hash": 2}):
        assert parse({**BASE, **extra}).traceparent == PARENT


@given(
    st.text(max_size=40),
    st.one_of(st.none(), st.text(max_size=20)),
    st.sampled_from([{}, {"ack": 1}, {"latest": "t"}, {"hash": 2}]),
)
def test_any_trace_context_leaves_the_digest_alone(traceparent, tracestate, options):
    plain = parse({**BASE, **options})
    doc = {**BASE, **options, "traceparent": traceparent}
    if tracestate is not None:
        doc["tracestate"] = tracestate
    traced = parse(doc)
    assert traced.digest == plain.digest
    assert traced._replace(traceparent=None, tracestate=None) == plain
