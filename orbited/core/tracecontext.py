"""W3C Trace Context (https://www.w3.org/TR/trace-context/) as the event request carries
it: the ``traceparent`` and ``tracestate`` fields (docs/protocol.md, "Trace context").

Pure and dependency-free: the node's OpenTelemetry observer (orbited/node/otel.py), its
delivery tracer and the web-app clients share it. The node keeps the request's strings as
they came (only their type and length are checked when a request is parsed) and parses
``traceparent`` where it is used, so a request without one, or a node with tracing off,
pays nothing. A string that does not parse is ignored, as the W3C recommendation says:
the request is served untraced, never refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# The longest traceparent or tracestate an event request (or a publish header) may carry;
# longer is bad_request in a request body. W3C tracestate holds at most 32 members: 512
# characters is the length it says a vendor must be able to propagate.
MAX_TRACE_FIELD = 512

# version "-" trace-id "-" parent-id "-" trace-flags, lowercase hex only. A future version
# may append "-" and more fields after the 55 characters of version 00.
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?", re.S)
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16

SAMPLED = 0x01  # the trace-flags bit: the caller may have recorded its span

# tracestate: up to 32 comma-separated list members key=value, optional spaces and tabs
# around each, empty members allowed (W3C Trace Context, section 3.3).
MAX_TRACESTATE_MEMBERS = 32
_KEY = r"(?:[a-z][a-z0-9_\-*/]{0,255}|[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13})"
_VALUE = r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
_MEMBER = re.compile(f"({_KEY})=({_VALUE})")


@dataclass(frozen=True, slots=True)
class TraceParent:
    """A parsed ``traceparent``: ids as lowercase hex (the W3C form)."""

    trace_id: str  # 32 hex digits, not all zero
    span_id: str  # 16 hex digits, not all zero: the caller's span
    flags: int = SAMPLED  # 0..255
    version: int = 0

    @property
    def sampled(self) -> bool:
        return bool(self.flags & SAMPLED)

    def __str__(self) -> str:
        return format_traceparent(self.trace_id, self.span_id, self.flags)


def parse_traceparent(value: str) -> TraceParent | None:
    """``value`` as W3C ``traceparent``, or None if it is not one: not four dash-separated
    lowercase hex fields of 2, 32, 16 and 2 digits, version ``ff``, an all-zero trace or
    span id, or version 00 with anything after the flags. A higher version may carry more
    fields after a dash (W3C: parse what version 00 defines)."""
    m = _TRACEPARENT.fullmatch(value)
    if m is None:
        return None
    version, trace_id, span_id, flags, rest = m.groups()
    if version == "ff" or trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    if version == "00" and rest is not None:
        return None
    return TraceParent(trace_id, span_id, int(flags, 16), int(version, 16))


def parse_tracestate(value: str) -> tuple[tuple[str, str], ...] | None:
    """``value`` as W3C ``tracestate``: its list members ``(key, value)`` in order, or
    None if any member is malformed, a key repeats or there are more than 32 (W3C: then
    the whole tracestate is discarded, the traceparent still used)."""
    members: list[tuple[str, str]] = []
    for part in value.split(","):
        part = part.strip(" \t")
        if not part:
            continue
        m = _MEMBER.fullmatch(part)
        if m is None:
            return None
        members.append((m.group(1), m.group(2)))
    if len(members) > MAX_TRACESTATE_MEMBERS or len({k for k, _ in members}) != len(members):
        return None
    return tuple(members)


def format_traceparent(trace_id: str, span_id: str, flags: int = SAMPLED) -> str:
    """The version 00 ``traceparent`` of a span: ``00-<trace id>-<span id>-<flags>``.
    ValueError for ids that are not lowercase hex of the right length, all zero, or flags
    outside 0..255."""
    if (
        len(trace_id) != 32 or len(span_id) != 16
        or _TRACEPARENT.fullmatch(f"00-{trace_id}-{span_id}-00") is None
        or trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN or not 0 <= flags <= 0xFF
    ):  # fmt: skip
        raise ValueError(f"not a W3C trace context: {trace_id!r} {span_id!r} {flags!r}")
    return f"00-{trace_id}-{span_id}-{flags:02x}"


def trace_field_error(name: str, value: object) -> str | None:
    """Why ``value`` cannot be the request field ``name`` (``traceparent`` or
    ``tracestate``), or None: it must be a string of at most MAX_TRACE_FIELD characters.
    Its content is not checked here (a malformed one is ignored, not refused)."""
    if type(value) is not str or len(value) > MAX_TRACE_FIELD:
        return f"{name} must be a string of at most {MAX_TRACE_FIELD} characters"
    return None
