"""The event request protocol carried inside SP REQ bodies (sans-I/O).

Request:  {"id": "<event id>", "to": [[user, session, location], ...], "data": <JSON>}
          optional: "ack", "latest", "offline", "hash", "traceparent", "tracestate" (W3C
          trace context: orbited.core.tracecontext); a recipient may be a wildcard
          [user, "*", "*"] or [user, session, "*"] (orbited.core.keys.Selector)
Reply:    {"id": ..., "ok": true, "results": [{"status": ..., "seq": n}, ...]}
          {"id": ..., "ok": false, "error": {"code": ..., "message": ...}}
The full specification, with every status and error code, is docs/protocol.md.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import sys
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NamedTuple

from orbited.core import speedups
from orbited.core.hashing import WILDCARDS_NEED_V2
from orbited.core.keys import (
    WILDCARD,
    ConnectionKey,
    KeyError_,
    Recipient,
    Selector,
    parse_recipient,
)
from orbited.core.tracecontext import MAX_TRACE_FIELD, trace_field_error
from orbited.node.frames import event_id as _json_text

MAX_EVENT_ID = 128
MAX_LATEST = 128  # characters of a latest-value tag


class Status(StrEnum):
    """A recipient's outcome in a reply's ``results`` (the value is the wire string)."""

    DELIVERED = "delivered"  # written to an attached transport
    QUEUED = "queued"  # kept in the mailbox until the browser (re)connects
    NO_CONNECTION = "no_connection"  # no mailbox for that key on this node
    MOVED = "moved"  # the key's route is not served here (HaloD moved it); nothing stored
    ACKED = "acked"  # acknowledged mode: the browser confirmed it has the event
    UNACKED = "unacked"  # acknowledged mode: in the mailbox, not confirmed within the wait
    FULL = "full"  # the node's mailboxes hold mailbox_total_bytes: refused, not stored
    MATCHED = "matched"  # a wildcard reached keys: ``keys`` holds each one's result
    LIMITED = "limited"  # the user's dispatch rate is exceeded: not stored, retry_after
    REPLACED = "replaced"  # acknowledged mode: superseded by a newer latest-value event

    @property
    def stored(self) -> bool:
        """Is the event in the recipient's mailbox (delivered or waiting for it)?"""
        return self in _STORED


_STORED = frozenset({Status.DELIVERED, Status.QUEUED, Status.ACKED, Status.UNACKED})

DELIVERED = Status.DELIVERED
QUEUED = Status.QUEUED
NO_CONNECTION = Status.NO_CONNECTION
MOVED = Status.MOVED
ACKED = Status.ACKED
UNACKED = Status.UNACKED
FULL = Status.FULL
MATCHED = Status.MATCHED
LIMITED = Status.LIMITED
REPLACED = Status.REPLACED


@dataclass(frozen=True)
class RequestLimits:
    max_recipients: int = 10_000
    max_payload: int = 64 * 1024  # bytes of the encoded "data"
    max_ack_wait: float = 60.0  # seconds a request in the acknowledged mode may wait
    offline_after: float = 30.0  # what "offline": true means, in seconds
    max_offline_after: float = 86_400.0  # the largest "offline" a request may give


class RequestError(Exception):
    """A refused request. ``hash``: for ``hash_version_mismatch``, the node's hash
    version, which the error reply carries so clients switch."""

    def __init__(
        self, code: str, message: str, event_id: str | None = None, hash: int | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.event_id = event_id
        self.hash = hash


class EventRequest(NamedTuple):
    """One event request, parsed. Immutable; a tuple (one is built per request, and a
    frozen dataclass costs three times as much to build)."""

    event_id: str
    recipients: tuple[Recipient, ...]  # keys, and Selectors for wildcards
    payload: bytes  # "data" encoded once as compact UTF-8 JSON
    digest: bytes  # identifies a resend: same id, recipients, data, latest and offline
    ack: float | None = None  # acknowledged mode: reply once browsers confirm, or after this
    latest: bytes | None = None  # the latest-value tag, JSON-encoded once (like frames.event_id)
    offline: float | None = None  # offline hook: seconds ("offline": true: offline_after)
    hash: int | None = None  # the hash version the client routed with, if it said
    # W3C trace context of the web app's span, as sent (type and length checked, content
    # not: orbited.core.tracecontext.parse_traceparent where it is used; a malformed one
    # is ignored). Not part of the digest: a resend with another span id is a duplicate.
    traceparent: str | None = None
    tracestate: str | None = None


@dataclass(frozen=True)
class PingRequest:
    event_id: str | None


# One encoder and one decoder for every request: json.dumps/loads with options build a
# new JSONEncoder/JSONDecoder per call, a measurable share of a one-recipient event.
# allow_nan=False: 1e999 parses to inf, which browsers' JSON.parse would reject.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _encode(obj: object) -> bytes:
    return _ENCODER.encode(obj).encode()


# orjson, when installed (a dependency; optional at import: without it only speed is
# lost), decodes request bodies and encodes payloads and ids. Its results are used only
# where they are exactly the standard library's (tests/node/test_events_orjson.py pins
# it): anything it refuses goes through the strict path above, which gives the
# documented error or reads what orjson would not (very deep nesting); a body holding a
# run of 19 digits or more is decoded by the strict path (orjson reads an integer past
# 64 bits as a float, silently); floats of magnitude 1e-5 to 1e-10, which orjson
# writes otherwise (0.00001 and 1e-7 where json writes 1e-05 and 1e-07), are encoded
# again by json.
# Versions before 3.12 also write 1e16 for json's 1e+16: then only decoding uses orjson.
_orjson: Any
try:
    _orjson = importlib.import_module("orjson")
except ImportError:  # pragma: no cover - the fallback is tested by setting it to None
    _orjson = None
# A run of 19 digits, found by mapping every digit to "0" and looking for 19 of them:
# bytes.translate and find are ≈ 15× faster than the regex search rb"\d{19}" (0.9 µs
# for a one-recipient request, 2.4 ms for one to 10 000 keys), with the same answer.
_DIGITS_TO_ZERO = bytes.maketrans(b"123456789", b"000000000")
_LONG_RUN = b"0" * 19
_ORJSON_DIFFERS = re.compile(rb"\de-\d(?!\d)|0\.0000")
# The common event request's reader in C (orbited.core._speedups.parse_event: a
# one-recipient event whose data is written as the node keeps it, blanks aside), or None
# where the extension is not built: an answer is read as ``request_of`` makes it, None
# leaves the body to parse_request's Python (which tests/core/test_speedups.py checks).
parse_common: Any = None if speedups.native is None else speedups.native.parse_event
_PROBE = [1e16, 1e22, 1.5e300, 1e-4, 1e-11, 0.1, -0.0, 1.0, '\x7f\u2028\x1f"\\é']
FAST_ENCODE = _orjson is not None and _orjson.dumps(_PROBE) == _encode(_PROBE)


def _encode_fast(obj: object) -> bytes:
    """``_encode`` for what a request decoded to (no NaN/Infinity: those come only from
    Python values, which orjson would write as null); the same bytes, faster."""
    oj = _orjson
    if oj is not None and FAST_ENCODE:
        try:
            out: bytes = oj.dumps(obj)
        except TypeError:  # an integer past 64 bits, a lone surrogate: json decides
            pass
        else:
            # (find, not ``in``: bytes' ``in`` takes the buffer protocol, twice the cost;
            # "-" first: a one-byte find is a memchr, while a two-byte one costs ≈ 1 ns per
            # byte of text rich in "e", 10 µs for 8 KB)
            if (
                (out.find(b"-") < 0 or out.find(b"e-") < 0) and out.find(b"0.0000") < 0
            ) or not _ORJSON_DIFFERS.search(out):
                return out
    return _ENCODER.encode(obj).encode()


def _encode_strings(obj: list[Any]) -> bytes:
    """``_encode`` of strings in lists (a request's id and checked keys, for its digest):
    orjson writes a string exactly as json does with ensure_ascii=False (no number whose
    form differs can be in it), so no check of its output is needed; a string orjson
    refuses (a lone surrogate) goes through ``_encode_fast``. (FAST_ENCODE: the probe
    holds the strings whose escapes could differ.)"""
    oj = _orjson
    if oj is not None and FAST_ENCODE:
        try:
            out: bytes = oj.dumps(obj)
        except TypeError:
            pass
        else:
            return out
    return _encode_fast(obj)


def _encode_payload(obj: object) -> bytes:
    """``_encode_fast`` for an event's data, which mailboxes keep until the browser
    acknowledges it: orjson's bytes object is copied into one of its exact size. orjson
    allocates its output with room to spare and shrinks it: a node keeping those paid
    ≈ 1.5 µs more per event than one keeping a copy (issue 20; in one process, 20 000
    payloads of 40 bytes kept: 1.8 µs per encode, 0.25 with the copy; 700 bytes: 3.7
    and 0.36). A copy of a small bytes object costs ≈ 0.1 µs."""
    try:
        out = _encode_fast(obj)
    except RecursionError:
        # The strict decoder reads a few levels deeper than the encoder writes: a payload
        # it read (not orjson: it refuses it) can still be too deep to encode.
        raise RequestError("bad_json", "request JSON is nested too deeply") from None
    return memoryview(out).tobytes()


def _load(body: bytes) -> object:
    """A request body as JSON (strict: loads_strict's rules), or RequestError bad_json."""
    oj = _orjson
    if oj is not None and body.translate(_DIGITS_TO_ZERO).find(_LONG_RUN) < 0:
        try:
            return oj.loads(body)
        except oj.JSONDecodeError:
            pass  # the strict path: the documented message (or a document orjson refuses)
    try:
        # Decode first: json.loads on bytes would also accept UTF-16/32 and a BOM.
        return loads_strict(body.decode("utf-8"))
    except ValueError as e:
        if "integer string conversion" in str(e):  # Python's own words name its setting
            raise RequestError(
                "bad_json",
                f"request JSON has an integer of more than {sys.get_int_max_str_digits()} digits",
            ) from None
        raise RequestError("bad_json", f"request is not UTF-8 JSON: {e}") from None
    except RecursionError:
        raise RequestError("bad_json", "request JSON is nested too deeply") from None


def _no_constants(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_no_constants)
_STRICT_CHECK = json.JSONEncoder(ensure_ascii=False, allow_nan=False, check_circular=False)
# What can make a decoded document not JSON, though the text is strict UTF-8 with no
# NaN/Infinity: a \uD800-\uDFFF escape (a lone surrogate, unless it is half of a pair)
# and a number too large for a double (1e999, 309 digits: Python reads inf). Only when
# one may be there is the whole document checked.
_SUSPECT = re.compile(r"\\u[dD][89a-fA-F]|[eE]\+?\d{3}|\d{309}")


def loads_strict(text: str) -> object:
    """JSON as browsers and strict decoders read it: no NaN/Infinity, no number beyond
    the double range, no lone surrogate anywhere (not a Unicode character: a reply
    echoing one is refused by strict decoders). ValueError or RecursionError otherwise."""
    doc = _DECODER.decode(text)
    if _SUSPECT.search(text):
        try:
            _STRICT_CHECK.encode(doc).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("strings must not contain lone surrogates") from None
        except ValueError:
            raise ValueError("numbers must be finite") from None
    return doc


def _quote(value: object) -> str:
    """A bounded excerpt of request content for an error message."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


_EVENT_FIELDS_T = frozenset(("id", "to", "data", "hash", "traceparent", "tracestate"))
_REQUEST_FIELDS = frozenset((
    "id", "op", "to", "data", "ack", "latest", "offline", "hash", "traceparent", "tracestate",
))  # fmt: skip
_new = tuple.__new__  # a NamedTuple's own __new__ is a Python call
_parse_recipient = parse_recipient
_blake2b = hashlib.blake2b
DIGEST_SIZE = 16  # bytes of a request's digest (blake2b): the dedup memory's key


def request_of(
    common: tuple[str, str, str, str, bytes, bytes, int | None], digest: bytes
) -> EventRequest:
    """The EventRequest of ``parse_common``'s answer (event_id, user, session, location,
    payload, what the digest hashes, hash) and its digest (blake2b, 16 bytes)."""
    event_id, user, session, location, payload, _, hash_ = common
    return _new(
        EventRequest,
        (event_id, (_new(ConnectionKey, (user, session, location)),), payload, digest, None,
         None, None, hash_, None, None),
    )  # fmt: skip


def parse_request(
    body: bytes, limits: RequestLimits, _strict: bool = False
) -> EventRequest | PingRequest:
    """One SP request body, parsed and checked (docs/protocol.md); RequestError if it is
    refused. (``_strict``: decode with the strict path, as when orjson is not there.)"""
    if parse_common is not None and not _strict:
        # The common request read in C: the same EventRequest as below, or None for
        # anything else (tests/core/test_speedups.py).
        common = parse_common(body, limits.max_payload, limits.max_recipients)
        if common is not None:
            return request_of(common, _blake2b(common[5], digest_size=DIGEST_SIZE).digest())
    # _load, _encode_payload and parse_recipient's fast paths are written out in this
    # function's common path (one call each fewer per request; every request comes here).
    oj = _orjson if not _strict else None
    doc: Any = None
    # ``exact``: ``doc`` is what the strict path reads. orjson's document is, unless the
    # body holds a run of 19 digits (an integer past 64 bits reads as a float): the
    # common path below looks for that only where a float could have come from one (in
    # the payload it encodes); every other path first makes ``doc`` exact (``_exact``).
    exact = False
    if oj is not None:
        try:
            doc = oj.loads(body)
        except oj.JSONDecodeError:
            doc, exact = _load(body), True
    else:
        doc, exact = _load(body), True
    # The common request, an event with exactly id, to and data (and the hash version
    # clients send, and a trace context), all valid, on one straight path; anything else
    # (pings, the acknowledged mode, every error) takes the general path below, so each
    # error keeps its message and precedence.
    if type(doc) is dict:
        n = len(doc)
        traceparent = tracestate = hash_ = None
        try:
            # id, to and data there (three lookups: cheaper than comparing key sets),
            # and nothing else but hash or the trace context.
            event_id, to, data = doc["id"], doc["to"], doc["data"]
            if n == 3:
                pass
            elif n == 4 and "hash" in doc:
                hash_ = doc["hash"]
                if type(hash_) is not int or hash_ < 1:
                    return _parse_general(doc if exact else _exact(body, doc), limits)
            elif n <= 6 and doc.keys() <= _EVENT_FIELDS_T:  # traced (and id, to, data)
                hash_ = doc.get("hash")
                traceparent = doc.get("traceparent")
                tracestate = doc.get("tracestate")
                if (
                    ("hash" in doc and (type(hash_) is not int or hash_ < 1))
                    or ("traceparent" in doc
                        and (type(traceparent) is not str or len(traceparent) > MAX_TRACE_FIELD))
                    or ("tracestate" in doc
                        and (type(tracestate) is not str or len(tracestate) > MAX_TRACE_FIELD))
                ):  # fmt: skip
                    return _parse_general(doc if exact else _exact(body, doc), limits)
            else:
                return _parse_general(doc if exact else _exact(body, doc), limits)
        except KeyError:
            return _parse_general(doc if exact else _exact(body, doc), limits)
        if (
            type(event_id) is str and 0 < len(event_id) <= MAX_EVENT_ID
            and type(to) is list and 0 < len(to) <= limits.max_recipients
        ):  # fmt: skip
            recipients: tuple[Recipient, ...] | None = None
            if len(to) == 1:
                key = to[0]
                if type(key) is list and len(key) == 3 and WILDCARD not in key:
                    user, session, location = key
                    if (
                        type(user) is str and type(session) is str and type(location) is str
                        and 0 < len(user) <= 64 and len(session) <= 64 and len(location) <= 64
                    ):  # fmt: skip
                        recipients = (_new(ConnectionKey, (user, session, location)),)
            try:
                if recipients is None:
                    recipients = (_parse_recipient(to[0]),) if len(to) == 1 else _recipients(to)
            except KeyError_:
                pass
            else:
                payload = None
                addressed = None
                if oj is not None and FAST_ENCODE:  # _encode_payload
                    try:
                        fast: bytes = oj.dumps(data)
                    except TypeError:
                        pass
                    else:
                        if (
                            (fast.find(b"-") < 0 or fast.find(b"e-") < 0)
                            and fast.find(b"0.0000") < 0
                        ) or not _ORJSON_DIFFERS.search(fast):
                            payload = memoryview(fast).tobytes()
                    try:  # _encode_strings (a tuple: orjson writes it as the list)
                        addressed = oj.dumps((event_id, to))
                    except TypeError:
                        pass
                if payload is None:
                    payload = _encode_payload(data)
                # An integer past 64 bits that orjson read as a float is written as one of
                # 1e+16 or more ("e+": json's form, which FAST_ENCODE checks orjson's is):
                # with a "+" in the payload, a run of 19 digits in the body means the
                # strict path decides. (A one-byte find: a memchr.)
                if (
                    not exact and payload.find(b"+") >= 0
                    and body.translate(_DIGITS_TO_ZERO).find(_LONG_RUN) >= 0
                ):  # fmt: skip
                    return parse_request(body, limits, True)
                if len(payload) <= limits.max_payload:
                    if addressed is None:
                        addressed = _encode_strings([event_id, to])
                    digest = _blake2b(addressed + b"\0" + payload, digest_size=DIGEST_SIZE).digest()
                    # Every field, in order (tuple.__new__ takes no defaults).
                    return _new(
                        EventRequest,
                        (event_id, recipients, payload, digest, None, None, None, hash_,
                         traceparent, tracestate),
                    )  # fmt: skip
    return _parse_general(doc if exact else _exact(body, doc), limits)


def _exact(body: bytes, doc: object) -> object:
    """``doc``, orjson's decoding of ``body``, or the strict path's when they can differ
    (``body`` holds a run of 19 digits)."""
    if body.translate(_DIGITS_TO_ZERO).find(_LONG_RUN) >= 0:
        return _load(body)
    return doc


def _recipients(to: list[Any]) -> tuple[Recipient, ...]:
    """parse_recipient of each of ``to`` (KeyError_ for a bad one), with its fast path
    inline: a request may name 10 000 keys (≈ 12 % less than a call per key)."""
    out: list[Recipient] = []
    append = out.append
    key_type = ConnectionKey
    for k in to:
        if type(k) is list and len(k) == 3 and WILDCARD not in k:
            user, session, location = k
            if (
                type(user) is str and type(session) is str and type(location) is str
                and 0 < len(user) <= 64 and len(session) <= 64 and len(location) <= 64
            ):  # fmt: skip
                append(_new(key_type, (user, session, location)))
                continue
        append(_parse_recipient(k))
    return tuple(out)


def _parse_general(doc: object, limits: RequestLimits) -> EventRequest | PingRequest:
    if not isinstance(doc, dict):
        raise RequestError("bad_request", "request must be a JSON object")
    event_id = doc.get("id")
    if event_id is not None and (
        not isinstance(event_id, str) or not 0 < len(event_id) <= MAX_EVENT_ID
    ):
        raise RequestError("bad_request", f"id must be a string of 1-{MAX_EVENT_ID} characters")
    op = doc.get("op", "event")
    if op == "ping":
        unknown = doc.keys() - {"id", "op"}
        if unknown:
            raise RequestError(
                "bad_request", f"unknown fields in a ping: {_quote(sorted(unknown))}", event_id
            )
        return PingRequest(event_id)
    if op != "event":
        raise RequestError("unknown_op", f"unknown op {_quote(op)}", event_id)
    if event_id is None:
        raise RequestError("bad_request", "an event needs an id (used to ignore resends)")
    unknown = doc.keys() - _REQUEST_FIELDS
    if unknown:
        raise RequestError("bad_request", f"unknown fields: {_quote(sorted(unknown))}", event_id)
    to = doc.get("to")
    if not isinstance(to, list) or not to:
        raise RequestError("bad_request", "to must be a non-empty array of keys", event_id)
    if len(to) > limits.max_recipients:
        raise RequestError(
            "too_many_recipients",
            f"{len(to)} recipients; the limit is {limits.max_recipients}",
            event_id,
        )
    if "data" not in doc:
        raise RequestError("bad_request", "an event needs data", event_id)
    try:
        recipients = tuple([_parse_recipient(k) for k in to])
    except KeyError_ as e:
        raise RequestError("bad_key", str(e), event_id) from None
    # No lone surrogate, no infinity: refused with the JSON, so this encodes.
    payload = _encode_payload(doc["data"])
    if len(payload) > limits.max_payload:
        raise RequestError(
            "payload_too_large",
            f"data is {len(payload)} bytes encoded; the limit is {limits.max_payload}",
            event_id,
        )
    ack = doc.get("ack")
    if ack is not None and (
        not isinstance(ack, int | float) or isinstance(ack, bool)
        or not 0 < ack <= limits.max_ack_wait
    ):  # fmt: skip
        raise RequestError(
            "bad_request", f"ack is seconds to wait, 0 < ack <= {limits.max_ack_wait:g}", event_id
        )
    tag = doc.get("latest")
    latest = None
    if "latest" in doc:
        if type(tag) is not str or not 0 < len(tag) <= MAX_LATEST:
            raise RequestError(
                "bad_request", f"latest must be a string of 1-{MAX_LATEST} characters", event_id
            )
        latest = _json_text(tag)
    raw_offline = doc.get("offline")
    offline = None
    if "offline" in doc:
        offline = _offline(raw_offline, limits, event_id)
    hash_ = doc.get("hash")
    if "hash" in doc and (type(hash_) is not int or hash_ < 1):
        raise RequestError(
            "bad_request", "hash is the hash version the client routed with (1 or 2)", event_id
        )
    traceparent, tracestate = doc.get("traceparent"), doc.get("tracestate")
    for name in ("traceparent", "tracestate"):
        if name in doc:
            problem = trace_field_error(name, doc[name])
            if problem is not None:
                raise RequestError("bad_request", problem, event_id)
    # Not in the digest: the trace context names the sender's span, which a resend may
    # change; the request it resends is the same.
    if latest is None and offline is None:
        addressed = _encode_fast([event_id, to])
    else:  # a resend with another tag or offline wait is another request
        addressed = _encode_fast([event_id, to, tag, raw_offline])
    digest = hashlib.blake2b(addressed + b"\0" + payload, digest_size=DIGEST_SIZE).digest()
    return EventRequest(
        event_id, recipients, payload, digest, None if ack is None else float(ack),
        latest, offline, hash_, traceparent, tracestate,
    )  # fmt: skip


def _offline(value: object, limits: RequestLimits, event_id: str | None) -> float:
    """An "offline" field: true (the node's offline_after) or seconds in (0, max]."""
    if value is True:
        return float(limits.offline_after)
    if (
        isinstance(value, int | float) and not isinstance(value, bool)
        and 0 < value <= limits.max_offline_after
    ):  # fmt: skip
        return float(value)
    raise RequestError(
        "bad_request",
        "offline is true or seconds to wait for an acknowledgement, "
        f"0 < offline <= {limits.max_offline_after:g}",
        event_id,
    )


def with_trace_headers(
    request: EventRequest, traceparent: str | None, tracestate: str | None
) -> EventRequest:
    """``request`` with the trace context of the HTTP publish API's ``traceparent`` and
    ``tracestate`` headers, when its body carried no ``traceparent`` (body fields win).
    A header longer than MAX_TRACE_FIELD is ignored (headers are not the request: they
    are never refused)."""
    if request.traceparent is not None or traceparent is None:
        return request
    if len(traceparent) > MAX_TRACE_FIELD:
        return request
    if tracestate is not None and len(tracestate) > MAX_TRACE_FIELD:
        tracestate = None
    return request._replace(traceparent=traceparent, tracestate=tracestate)


def check_node(request: EventRequest, hash_version: int, offline_hook: bool = True) -> None:
    """The checks of a parsed request that depend on the node, not on the request alone
    (docs/protocol.md, "Errors"): RequestError ``hash_version_mismatch`` (carrying the
    node's ``hash``) when the request's ``hash`` is not the node's or a wildcard reaches
    a node running hash version 1; ``bad_request`` for ``offline`` on a node without an
    offline hook. Cheap when nothing applies: a plain request on a version 2 node with
    no ``offline`` costs two comparisons."""
    client = request.hash
    if client is not None and client != hash_version:
        raise RequestError(
            "hash_version_mismatch",
            f"this node routes with hash_version {hash_version}; the request used {_quote(client)}",
            request.event_id,
            hash_version,
        )
    if hash_version == 1 and any(type(r) is Selector for r in request.recipients):
        raise RequestError(
            "hash_version_mismatch", WILDCARDS_NEED_V2, request.event_id, hash_version
        )
    if request.offline is not None and not offline_hook:
        raise RequestError("bad_request", "offline hook not configured", request.event_id)


def event_request(
    event_id: str,
    recipients: tuple[ConnectionKey, ...],
    data: object,
    limits: RequestLimits,
    ack: float | None = None,
) -> EventRequest:
    """An EventRequest from values a front end parsed itself (Orbit 1.0): ``data`` is
    encoded once, with the checks parse_request makes on the same fields (RequestError).
    ``data`` must be JSON-encodable without NaN/Infinity or lone surrogates (what
    loads_strict returns, or a str of valid Unicode)."""
    if not 0 < len(event_id) <= MAX_EVENT_ID:
        raise RequestError("bad_request", f"id must be a string of 1-{MAX_EVENT_ID} characters")
    if not recipients:
        raise RequestError("bad_request", "to must be a non-empty array of keys", event_id)
    if len(recipients) > limits.max_recipients:
        raise RequestError(
            "too_many_recipients",
            f"{len(recipients)} recipients; the limit is {limits.max_recipients}",
            event_id,
        )
    if ack is not None and not 0 < ack <= limits.max_ack_wait:
        raise RequestError(
            "bad_request", f"ack is seconds to wait, 0 < ack <= {limits.max_ack_wait:g}", event_id
        )
    try:
        payload = _encode(data)
    except (ValueError, UnicodeEncodeError) as e:
        raise RequestError("bad_json", f"data is not JSON: {e}", event_id) from None
    if len(payload) > limits.max_payload:
        raise RequestError(
            "payload_too_large",
            f"data is {len(payload)} bytes encoded; the limit is {limits.max_payload}",
            event_id,
        )
    addressed = _encode([event_id, [list(k) for k in recipients]])
    digest = hashlib.blake2b(addressed + b"\0" + payload, digest_size=DIGEST_SIZE).digest()
    return EventRequest(event_id, recipients, payload, digest, ack)


KeyResult = tuple[ConnectionKey, "RecipientResult"]


class RecipientResult(NamedTuple):
    """One recipient's outcome (docs/protocol.md, "Replies"). ``seq``: its position in the
    recipient's mailbox (stored statuses, and ``replaced``); ``dropped``: older events
    the mailbox dropped to keep this one; ``route``, ``to`` (the new owner's SP address,
    if known) and ``hash`` (the node's hash version): for ``moved``. ``keys``: a
    wildcard's result per key it reached (``matched``; ``()`` with ``no_connection``);
    ``retry_after``: seconds, for ``limited``; ``replaced``: how many events of the
    event's latest-value tag it superseded; ``by``: for ``replaced``, the seq of the
    event that superseded it; ``held``: a wildcard's event kept for the user's next
    connection. A tuple: a reply may list 10 000 of them."""

    status: Status
    seq: int | None = None
    dropped: int = 0
    route: int | None = None
    to: str | None = None
    keys: tuple[KeyResult, ...] | None = None
    retry_after: float | None = None
    replaced: int = 0
    by: int | None = None
    held: bool = False
    hash: int | None = None

    def encode(self) -> bytes:
        if len(self) == 11:
            status, seq, dropped, route, to, keys, retry_after, replaced, by, held, hash_ = self
            if (
                replaced or by is not None or keys is not None or retry_after is not None
                or held or hash_ is not None
            ):  # fmt: skip
                return _encode_result(self)
        else:  # 5: what a caller of the previous release built with tuple.__new__
            status, seq, dropped, route, to = self[:5]
        if seq is not None:
            if dropped:
                return b'{"status":"%s","seq":%d,"dropped":%d}' % (status.encode(), seq, dropped)
            return b'{"status":"%s","seq":%d}' % (status.encode(), seq)
        if route is not None:
            return moved_result(route, to)
        return b'{"status":"%s"}' % status.encode()


def _encode_result(r: RecipientResult) -> bytes:
    """Any result, fields in the documented order (docs/protocol.md, "Replies")."""
    status, seq, dropped, route, to, keys, retry_after, replaced, by, held, hash_ = r
    out = [b'"status":"%s"' % status.encode()]
    if seq is not None:
        out.append(b'"seq":%d' % seq)
    if dropped:
        out.append(b'"dropped":%d' % dropped)
    if replaced:
        out.append(b'"replaced":%d' % replaced)
    if by is not None:
        out.append(b'"by":%d' % by)
    if route is not None:
        out.append(b'"route":%d' % route)
    if to is not None:
        out.append(b'"to":%s' % _encode_reply(to))
    if hash_ is not None:
        out.append(b'"hash":%d' % hash_)
    if retry_after is not None:
        out.append(b'"retry_after":%s' % _encode_reply(retry_after))
    if keys is not None:
        out.append(
            b'"keys":[%s]'
            % b",".join(
                b'{"key":%s,%s' % (_encode_reply(list(key)), result.encode()[1:])
                for key, result in keys
            )
        )
    if held:
        out.append(b'"held":true')
    return b"{%s}" % b",".join(out)


def stored(status: Status, seq: int, dropped: int = 0, replaced: int = 0) -> RecipientResult:
    return RecipientResult(status, seq, dropped, replaced=replaced)


def moved(route: int, to: str | None, hash: int | None = None) -> RecipientResult:
    return RecipientResult(Status.MOVED, None, 0, route, to, hash=hash)


def matched(keys: tuple[KeyResult, ...]) -> RecipientResult:
    """A wildcard's result: each key it reached with that key's own result. No key:
    ``no_connection`` with ``"keys": []`` (``held``: kept for the user's next tab)."""
    if keys:
        return RecipientResult(Status.MATCHED, keys=keys)
    return NO_KEYS


def held() -> RecipientResult:
    return HELD


def limited(retry_after: float) -> RecipientResult:
    return RecipientResult(Status.LIMITED, retry_after=retry_after)


def superseded(seq: int, by: int) -> RecipientResult:
    """Acknowledged mode: the event at ``seq`` was replaced by the event at ``by``."""
    return RecipientResult(Status.REPLACED, seq, by=by)


NO_CONNECTION_RECIPIENT = RecipientResult(Status.NO_CONNECTION)
FULL_RECIPIENT = RecipientResult(Status.FULL)
NO_KEYS = RecipientResult(Status.NO_CONNECTION, keys=())  # a wildcard that reached no key
HELD = RecipientResult(Status.NO_CONNECTION, keys=(), held=True)


class DispatchResult(NamedTuple):
    """The outcome of one event request: a result per recipient, in request order.
    ``duplicate``: a resend of a request answered before; ``results`` are the first
    answer's and nothing was delivered again. ``encoded``: the reply's bytes without the
    duplicate mark, when the hub has them already (it keeps them to answer resends).
    Immutable (a tuple: one is built per request, and a frozen dataclass costs twice
    as much to build)."""

    event_id: str
    results: tuple[RecipientResult, ...]
    duplicate: bool = False
    encoded: bytes | None = None


def encode_reply(outcome: DispatchResult) -> bytes:
    """The SP / HTTP reply body of a dispatch (docs/protocol.md, "Replies")."""
    reply = outcome.encoded
    if reply is None:
        reply = ok_reply(outcome.event_id, [r.encode() for r in outcome.results])
    return mark_duplicate(reply) if outcome.duplicate else reply


def decode_reply(reply: bytes) -> DispatchResult:
    """A successful reply this module encoded (the dedup memory keeps them as bytes) back
    into a DispatchResult; ``encoded`` is ``reply``. ValueError if it is not one."""
    doc = json.loads(reply)
    if not isinstance(doc, dict) or doc.get("ok") is not True:
        raise ValueError("not a successful event reply")
    results = tuple(_result(r) for r in doc["results"])
    return DispatchResult(doc["id"], results, bool(doc.get("duplicate")), reply)


def _result(r: dict[str, Any]) -> RecipientResult:
    keys = r.get("keys")
    return RecipientResult(
        Status(r["status"]), r.get("seq"), r.get("dropped", 0), r.get("route"), r.get("to"),
        None if keys is None else tuple((ConnectionKey(*k["key"]), _result(k)) for k in keys),
        r.get("retry_after"), r.get("replaced", 0), r.get("by"), r.get("held", False),
        r.get("hash"),
    )  # fmt: skip


# Per-recipient results are encoded as bytes directly: a reply may list 10 000 of them,
# and the dedup memory keeps replies, so no dict per recipient is ever built or kept.
NO_CONNECTION_RESULT = b'{"status":"no_connection"}'


def result(status: str, seq: int, dropped: int = 0) -> bytes:
    if dropped:
        return b'{"status":"%s","seq":%d,"dropped":%d}' % (status.encode(), seq, dropped)
    return b'{"status":"%s","seq":%d}' % (status.encode(), seq)


def moved_result(route: int, to: str | None, hash: int | None = None) -> bytes:
    """The key's route is not this node's: ``to`` is the new owner's SP address if known;
    ``hash`` the node's hash version (every node of this release sends it)."""
    if hash is not None:
        return RecipientResult(Status.MOVED, None, 0, route, to, hash=hash).encode()
    if to is None:
        return b'{"status":"moved","route":%d}' % route
    return b'{"status":"moved","route":%d,"to":%s}' % (route, _encode_reply(to))


_REPLY_ENCODER = json.JSONEncoder(separators=(",", ":"))


def _encode_reply(obj: object) -> bytes:
    # ASCII-escaped, so an id with lone surrogates still yields a valid reply.
    return _REPLY_ENCODER.encode(obj).encode("ascii")


def reply_id(event_id: str | None) -> bytes:
    """An event id as replies carry it (ASCII JSON)."""
    if (
        event_id is not None and event_id.isascii() and event_id.isprintable()
        and '"' not in event_id and "\\" not in event_id
    ):  # fmt: skip
        return b'"%s"' % event_id.encode()  # nothing to escape: what the encoder writes
    return _encode_reply(event_id)


def ok_reply(event_id: str | None, results: list[bytes], eid: bytes | None = None) -> bytes:
    """``eid``: ``event_id`` as frames.event_id encoded it, when the caller has it: the
    reply's id if it is ASCII without DEL (then json writes the same with or without
    ensure_ascii, which escapes DEL too)."""
    rid = eid if eid is not None and eid.isascii() and eid.find(b"\x7f") < 0 else reply_id(event_id)
    return b'{"id":%s,"ok":true,"results":[%s]}' % (rid, b",".join(results))


def mark_duplicate(reply: bytes) -> bytes:
    """The remembered reply of a request, as answered to a resend of it."""
    return reply[:-1] + b',"duplicate":true}'


def error_reply(error: RequestError) -> bytes:
    detail: dict[str, object] = {"code": error.code, "message": error.message}
    if error.hash is not None:
        detail["hash"] = error.hash
    return _encode_reply({"id": error.event_id, "ok": False, "error": detail})
