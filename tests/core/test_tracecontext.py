"""W3C trace context (orbited/core/tracecontext.py; docs/protocol.md, "Trace context")."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orbited.core.tracecontext import (
    MAX_TRACE_FIELD,
    TraceParent,
    format_traceparent,
    parse_traceparent,
    parse_tracestate,
    trace_field_error,
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
# The example of the W3C recommendation, section 3.2.
EXAMPLE = f"00-{TRACE}-{SPAN}-01"


def test_the_w3c_example_parses():
    parent = parse_traceparent(EXAMPLE)
    assert parent == TraceParent(TRACE, SPAN, 1, 0)
    assert parent.sampled
    assert str(parent) == EXAMPLE


def test_an_unsampled_parent():
    parent = parse_traceparent(f"00-{TRACE}-{SPAN}-00")
    assert parent is not None and not parent.sampled


@pytest.mark.parametrize(
    "value",
    [
        "",
        "00",
        EXAMPLE.upper(),  # lowercase hex only
        f"00-{TRACE.upper()}-{SPAN}-01",
        f"00-{'0' * 32}-{SPAN}-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero span id
        f"ff-{TRACE}-{SPAN}-01",  # version 255 is invalid
        f"00-{TRACE}-{SPAN}-01-extra",  # version 00 has exactly four fields
        f"00-{TRACE}-{SPAN}-01 ",
        f" 00-{TRACE}-{SPAN}-01",
        f"00-{TRACE[:-1]}-{SPAN}-01",
        f"00-{TRACE}-{SPAN}0-01",
        f"00_{TRACE}_{SPAN}_01",
        f"0x-{TRACE}-{SPAN}-01",
        f"00-{TRACE}-{SPAN}-1",
        f"00-{TRACE[:-1]}٣-{SPAN}-01",  # a non-ASCII digit
        f"cc-{TRACE}-{SPAN}-01x",  # a later version: more only after a dash
    ],
)
def test_malformed_values_are_not_a_parent(value):
    assert parse_traceparent(value) is None


def test_a_later_version_is_read_as_version_00():
    parent = parse_traceparent(f"cc-{TRACE}-{SPAN}-01-what-comes-later")
    assert parent == TraceParent(TRACE, SPAN, 1, 0xCC)
    assert str(parent) == EXAMPLE  # what we pass on is version 00


@pytest.mark.parametrize(
    "trace_id, span_id, flags",
    [
        ("0" * 32, SPAN, 1),
        (TRACE, "0" * 16, 1),
        (TRACE.upper(), SPAN, 1),
        (TRACE[:-1], SPAN, 1),
        (TRACE, SPAN + "0", 1),
        (TRACE, SPAN, 256),
        (TRACE, SPAN, -1),
        (TRACE[:-1] + "\n", SPAN, 1),
    ],
)
def test_format_refuses_what_is_not_a_trace_context(trace_id, span_id, flags):
    with pytest.raises(ValueError):
        format_traceparent(trace_id, span_id, flags)


@given(
    st.text("0123456789abcdef", min_size=32, max_size=32),
    st.text("0123456789abcdef", min_size=16, max_size=16),
    st.integers(0, 255),
)
def test_format_and_parse_round_trip(trace_id, span_id, flags):
    if set(trace_id) == {"0"} or set(span_id) == {"0"}:
        with pytest.raises(ValueError):
            format_traceparent(trace_id, span_id, flags)
        return
    text = format_traceparent(trace_id, span_id, flags)
    assert len(text) == 55
    assert parse_traceparent(text) == TraceParent(trace_id, span_id, flags, 0)


@given(st.text(max_size=80))
def test_parse_never_raises_and_only_accepts_the_w3c_form(value):
    parent = parse_traceparent(value)
    if parent is not None:
        assert value[2] == value[35] == value[52] == "-"
        assert value[3:35] == parent.trace_id and value[36:52] == parent.span_id


def test_field_errors():
    assert trace_field_error("traceparent", EXAMPLE) is None
    assert trace_field_error("tracestate", "x" * MAX_TRACE_FIELD) is None
    assert trace_field_error("tracestate", "") is None
    for bad in (None, 1, ["x"], {"a": 1}, "x" * (MAX_TRACE_FIELD + 1), True):
        message = trace_field_error("traceparent", bad)
        assert message == f"traceparent must be a string of at most {MAX_TRACE_FIELD} characters"


@pytest.mark.parametrize(
    "value, members",
    [
        ("", ()),
        ("rojo=00f067aa0ba902b7", (("rojo", "00f067aa0ba902b7"),)),
        (  # the W3C examples: a multi-tenant key, spaces around members, an empty member
            "rojo=00f067aa0ba902b7, congo=t61rcWkgMzE,,\tfw529a3039@dt=a b",
            (("rojo", "00f067aa0ba902b7"), ("congo", "t61rcWkgMzE"), ("fw529a3039@dt", "a b")),
        ),
        (",".join(f"k{i}=v" for i in range(32)), tuple((f"k{i}", "v") for i in range(32))),
    ],
)
def test_tracestate_members(value, members):
    assert parse_tracestate(value) == members


@pytest.mark.parametrize(
    "value",
    [
        "rojo",  # no value
        "Rojo=1",  # keys are lowercase
        "1rojo=1",  # a simple key starts with a letter
        "rojo=",  # a value has at least one character
        "rojo=a\x7f",  # printable ASCII only
        "rojo=a\tb",
        "rojo=a=b",  # no '=' in a value
        "rojo=1,rojo=2",  # a key once
        "a@B=1",
        "a@=1",
        "rojo=\u00e9",  # printable ASCII only
        ",".join(f"k{i}=v" for i in range(33)),  # 32 members at most
    ],
)
def test_malformed_tracestate(value):
    assert parse_tracestate(value) is None
