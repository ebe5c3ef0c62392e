"""The fuzz properties: one "check one input" function per parser, shared by the
hypothesis tests (tests/integration/test_fuzz.py) and the atheris runner (``python -m fuzz``).

Every ``check_*`` function drives a real parser (sans-I/O core or Twisted shell over an
in-memory transport with a fake clock) with one input and raises ``PropertyViolation``
(an AssertionError) when a property breaks; any other exception escaping is itself a
finding. Properties (docs/fuzzing.md): only the documented error type escapes, every
rejection carries a code and a message, valid inputs round-trip, incremental parsers do
not depend on how the stream is cut, and buffering stays under the configured limit.

``TARGETS`` maps a target name to a function of raw bytes, for coverage-guided fuzzing:
it decodes the bytes into the structured arguments with ``Reader``.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlencode

from twisted.internet import task
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import provider

from orbited.core import control, tokens, tracecontext
from orbited.core.keys import (
    MAX_PART_BYTES,
    WILDCARD,
    ConnectionKey,
    KeyError_,
    Selector,
    parse_recipient,
)
from orbited.core.latency import LatencyHistogram
from orbited.core.routes import Role
from orbited.core.tokens import TokenError, issue_token, verify_token
from orbited.node import events, frames
from orbited.node.hub import Hub, HubConfig
from orbited.node.legacy.orbit import MAX_HEADER_BYTES, OrbitError, OrbitParser, OrbitProtocol
from orbited.node.mailbox import Position, PositionError
from orbited.node.rep import RepFactory, RepLimits
from orbited.node.transports import httpfront, wsframe
from orbited.node.transports.common import (
    BrowserAuth,
    BrowserRequestError,
    authenticate,
    origin_allowed,
    single_param,
)
from orbited.node.transports.longpoll import MAX_TIMEOUT, LongPollResource
from orbited.node.transports.streaming import script_literal
from orbited.sp import reqrep, wire

CLOSED = Failure(ConnectionDone())
SECRET = b"fuzz-secret-0123456789-abcdefghijklmnopqrstuvwxyz"
NOW = 1_700_000_000.0


class PropertyViolation(AssertionError):
    """A fuzz property does not hold for this input."""


def expect(condition: object, message: str) -> None:
    if not condition:
        raise PropertyViolation(message)


def chunks(data: bytes, cuts: Sequence[int]) -> Iterator[bytes]:
    """``data`` cut into pieces whose sizes cycle through ``cuts`` (≥ 1 each)."""
    pos, i = 0, 0
    while pos < len(data):
        step = max(1, cuts[i % len(cuts)]) if cuts else len(data)
        yield data[pos : pos + step]
        pos, i = pos + step, i + 1


@contextmanager
def no_logged_failures() -> Iterator[list[dict[str, Any]]]:
    """Fail if anything logs a failure (an exception a shell caught and logged) while
    the block runs: an unhandled exception in disguise."""
    seen: list[dict[str, Any]] = []

    @provider(ILogObserver)
    def observer(event: dict[str, Any]) -> None:
        if "log_failure" in event:
            seen.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        yield seen
    finally:
        globalLogPublisher.removeObserver(observer)
    if seen:
        failure = seen[0]["log_failure"]
        raise PropertyViolation(f"logged failure: {failure.getErrorMessage()!r}\n{failure}")


class Reader:
    """Turns an atheris byte string into structured arguments (deterministically)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def int(self, low: int, high: int) -> int:
        value = self.byte() | self.byte() << 8 | self.byte() << 16
        return low + value % (high - low + 1)

    def cuts(self) -> list[int]:
        return [self.int(1, 64) for _ in range(self.int(1, 6))]

    def bytes(self, max_size: int = 256) -> bytes:
        size = self.int(0, max_size)
        out = self.data[self.pos : self.pos + size]
        self.pos += len(out)
        return out

    def text(self, max_size: int = 64) -> str:
        return self.bytes(max_size).decode("utf-8", "surrogateescape")

    def rest(self) -> bytes:
        out = self.data[self.pos :]
        self.pos = len(self.data)
        return out


# -- SP framing and the REQ/REP backtrace -----------------------------------------------


def _sp_feed(stream: bytes, cuts: Sequence[int], max_message: int) -> tuple[list[bytes], bool, int]:
    conn = wire.SPConnection(wire.REP, wire.REQ, max_message)
    out: list[bytes] = []
    for piece in chunks(stream, cuts):
        try:
            out += conn.receive(piece)
        except wire.SPProtocolError as e:
            expect(str(e), "SPProtocolError without a message")
            return out, True, conn.buffered
        # A partial header, or one partial message whose length is within the limit.
        bound = wire.HEADER_SIZE if not conn.header_received else wire.LENGTH_SIZE + max_message
        expect(conn.buffered < bound, f"buffered {conn.buffered} bytes, bound {bound}")
    return out, False, conn.buffered


def check_sp_stream(stream: bytes, cuts: Sequence[int], max_message: int = 1024) -> None:
    """Arbitrary bytes: SPProtocolError or messages; the same for every chunking."""
    whole, whole_failed, whole_buffered = _sp_feed(stream, [len(stream) or 1], max_message)
    split, split_failed, split_buffered = _sp_feed(stream, cuts, max_message)
    expect(whole_failed == split_failed, "chunking changed whether the stream is refused")
    if not whole_failed:
        expect(split == whole, "chunking changed the messages")
        expect(split_buffered == whole_buffered, "chunking changed what is buffered")
    else:
        expect(whole == [], "a refused receive() returned messages")


def check_sp_roundtrip(messages: Sequence[bytes], cuts: Sequence[int], max_message: int) -> None:
    """Encoded messages parse back to themselves, or the first one over the limit is refused."""
    stream = wire.encode_header(wire.REQ) + b"".join(wire.encode_message(m) for m in messages)
    out, failed, buffered = _sp_feed(stream, cuts, max_message)
    fitting = []
    for m in messages:
        if len(m) > max_message:
            break
        fitting.append(m)
    expect(failed == (len(fitting) < len(messages)), "oversize message not refused (or vice versa)")
    # A refused chunk returns nothing, so what came out is a prefix of what fits.
    expect(out == fitting[: len(out)], "messages changed")
    if not failed:
        expect(out == list(messages) and buffered == 0, "complete stream left bytes behind")


def check_sp_header(header: bytes, expected_peer: int) -> None:
    try:
        protocol = wire.parse_header(header, expected_peer)
    except wire.SPProtocolError as e:
        expect(str(e), "SPProtocolError without a message")
        return
    expect(wire.encode_header(protocol) == header, "accepted header does not round-trip")


def check_backtrace(body: bytes, max_hops: int = reqrep.MAX_HOPS) -> None:
    try:
        backtrace, payload = reqrep.split_backtrace(body, max_hops)
    except (reqrep.TooManyHops, wire.SPProtocolError) as e:
        expect(str(e), "backtrace error without a message")
        return
    expect(backtrace + payload == body, "split lost bytes")
    expect(len(backtrace) % 4 == 0 and 4 <= len(backtrace) <= 4 * max_hops, "bad length")
    words = [backtrace[i] for i in range(0, len(backtrace), 4)]
    expect(words[-1] & 0x80 and not any(w & 0x80 for w in words[:-1]), "MSB rule broken")
    expect(reqrep.RequestIds.encode(reqrep.request_id(backtrace)) == backtrace[-4:], "id")


def check_backtrace_roundtrip(hops: Sequence[int], req_id: int, payload: bytes) -> None:
    """A REQ body built from hop ids and a request id splits back into them."""
    trace = b"".join(reqrep.RequestIds.encode(h & 0x7FFFFFFF) for h in hops)
    trace += reqrep.RequestIds.encode(req_id | 0x80000000)
    max_hops = len(hops) + 1
    expect(reqrep.split_backtrace(trace + payload, max_hops) == (trace, payload), "round-trip")
    if hops:
        try:
            reqrep.split_backtrace(trace + payload, len(hops))
        except reqrep.TooManyHops:
            pass
        else:
            raise PropertyViolation("backtrace over max_hops accepted")


# -- Event requests, connection keys, positions ----------------------------------------

EVENT_ERROR_CODES = {
    "bad_json", "bad_request", "bad_key", "unknown_op", "too_many_recipients",
    "payload_too_large",
}  # fmt: skip
SMALL_LIMITS = events.RequestLimits(
    max_recipients=4, max_payload=64, max_ack_wait=5.0, offline_after=2.0, max_offline_after=9.0
)
# check_node's codes: what depends on the node's hash version and offline hook.
NODE_ERROR_CODES = {"hash_version_mismatch", "bad_request"}


def strict_reply(reply: bytes) -> Any:
    """A reply as a strict decoder reads it: ASCII JSON with no lone surrogate escape
    (a browser or Go would refuse it), no NaN/Infinity."""
    expect(reply.isascii(), "reply is not ASCII")
    doc = json.loads(reply, parse_constant=lambda c: expect(False, f"{c} in reply"))
    expect(strict_json(doc), "reply echoes a lone surrogate")
    return doc


def check_event_body(body: bytes) -> None:
    """Arbitrary request bytes: a request, or a RequestError whose reply is strict JSON."""
    for limits in (events.RequestLimits(), SMALL_LIMITS):
        try:
            request = events.parse_request(body, limits)
        except events.RequestError as e:
            expect(e.code in EVENT_ERROR_CODES and e.message, f"unclear error {e.code!r}")
            reply = strict_reply(events.error_reply(e))
            expect(reply["ok"] is False and reply["error"]["code"] == e.code, "error reply")
            expect(len(e.message) <= 200, "error message quotes too much of the request")
            continue
        if isinstance(request, events.PingRequest):
            strict_reply(events.ok_reply(request.event_id, []))
            continue
        doc = json.loads(body)
        expect(0 < len(request.recipients) <= limits.max_recipients, "recipient limit")
        expect(len(request.payload) <= limits.max_payload, "payload limit")
        expect(json.loads(request.payload) == doc["data"], "data changed")
        expect(request.ack is None or 0 < request.ack <= limits.max_ack_wait, "ack limit")
        check_request_fields(request, doc, limits)
        again = events.parse_request(body, limits)
        expect(again == request, "parsing is not deterministic (resend digest)")
        results = [recipient_result(r) for r in request.recipients]
        reply = strict_reply(events.ok_reply(request.event_id, [r.encode() for r in results]))
        expect(events.decode_reply(events.ok_reply(request.event_id, [r.encode() for r in results]))
               .results == tuple(results), "reply does not decode back")  # fmt: skip
        expect(len(reply["results"]) == len(request.recipients), "one result per recipient")
        check_node_checks(request)


def check_request_fields(
    request: events.EventRequest, doc: dict[str, Any], limits: events.RequestLimits
) -> None:
    """The parsed recipients, latest, offline and hash are what docs/protocol.md allows."""
    for parsed, given in zip(request.recipients, doc["to"], strict=True):
        expect(parsed.to_json() == given, "recipient does not round-trip")
        expect((type(parsed) is Selector) == (given[2] == WILDCARD), "wildcard misread")
        expect(given[0] != WILDCARD, "a wildcard user accepted")
    tag = request.latest
    text = None if tag is None else json.loads(tag)
    expect(text is None or (isinstance(text, str) and 0 < len(text) <= events.MAX_LATEST), "tag")
    expect((tag is None) == ("latest" not in doc), "latest dropped or invented")
    offline = request.offline
    expect(offline is None or 0 < offline <= limits.max_offline_after, "offline limit")
    expect((offline is None) == ("offline" not in doc), "offline dropped or invented")
    expect(request.hash is None or (type(request.hash) is int and request.hash >= 1), "hash")


def recipient_result(recipient: object) -> events.RecipientResult:
    """A plausible result for ``recipient``: a wildcard's lists a key of the user."""
    if type(recipient) is Selector:
        key = ConnectionKey(recipient.user, recipient.session or "", "/")
        return events.matched(((key, events.stored(events.QUEUED, 1, replaced=1)),))
    return events.stored(events.QUEUED, 1)


def check_node_checks(request: events.EventRequest) -> None:
    """check_node on a version 1 and a version 2 node: passes or a documented error
    whose reply carries the node's hash version for hash_version_mismatch."""
    wildcards = any(type(r) is Selector for r in request.recipients)
    for version, hook in ((1, True), (2, False), (2, True)):
        try:
            events.check_node(request, version, hook)
        except events.RequestError as e:
            expect(e.code in NODE_ERROR_CODES and e.message, f"unclear node error {e.code!r}")
            reply = strict_reply(events.error_reply(e))
            if e.code == "hash_version_mismatch":
                expect(reply["error"]["hash"] == version, "mismatch without the node's hash")
                expect(request.hash not in (None, version) or (version == 1 and wildcards),
                       "mismatch for a matching request")  # fmt: skip
            else:
                expect(not hook and request.offline is not None, "offline refused with a hook")
            continue
        expect(request.hash in (None, version), "a hash mismatch passed")
        expect(not (version == 1 and wildcards), "a wildcard passed a version 1 node")
        expect(hook or request.offline is None, "offline passed without a hook")


def check_event_orjson(body: bytes) -> None:
    """Any request bytes: parse_request decides exactly the same with orjson (its fast
    path) and without it (the standard library's strict path): the same EventRequest
    (payload and digest bytes included) or the same error code and message."""

    def outcome() -> object:
        try:
            return events.parse_request(body, SMALL_LIMITS)
        except events.RequestError as e:
            return (e.code, e.message, e.event_id)

    fast = outcome()
    saved = events._orjson
    events._orjson = None
    try:
        slow = outcome()
    finally:
        events._orjson = saved
    expect(fast == slow, f"orjson decides otherwise: {fast!r} vs {slow!r}")


def event_body(
    event_id: str, keys: Sequence[Sequence[str]], data: object, ack: float | None,
    extra: dict[str, Any] | None = None,
) -> bytes:  # fmt: skip
    doc: dict[str, Any] = {"id": event_id, "to": [list(k) for k in keys], "data": data}
    if ack is not None:
        doc["ack"] = ack
    doc.update(extra or {})
    return json.dumps(doc, ensure_ascii=False).encode("utf-8", "surrogatepass")


def wildcard_error(key: Sequence[str]) -> bool:
    """Is ``key`` (three strings, user not empty) a bad wildcard form (bad_key)?"""
    user, session, location = key
    return user == WILDCARD or (session == WILDCARD and location != WILDCARD)


def check_event_roundtrip(
    event_id: str, keys: Sequence[Sequence[str]], data: object, ack: float | None,
    latest: str | None = None, offline: bool | float | None = None, hash_: int | None = None,
) -> None:  # fmt: skip
    """A well-formed request parses to the same id, recipients (keys and wildcards),
    data, ack, latest, offline and hash."""
    extra: dict[str, Any] = {}
    for name, value in (("latest", latest), ("offline", offline), ("hash", hash_)):
        if value is not None:
            extra[name] = value
    body = event_body(event_id, keys, data, ack, extra)
    try:
        request = events.parse_request(body, events.RequestLimits())
    except events.RequestError as e:
        # Only the documented refusals of valid-looking input.
        expect(e.code in ("payload_too_large", "bad_json", "bad_key", "bad_request"), e.code)
        if e.code == "bad_key":
            expect(any(wildcard_error(k) for k in keys), "a valid recipient refused")
        return
    assert isinstance(request, events.EventRequest)
    expect(not any(wildcard_error(k) for k in keys), "a bad wildcard form accepted")
    expect(request.event_id == event_id, "id changed")
    expect([r.to_json() for r in request.recipients] == [list(k) for k in keys], "keys changed")
    for recipient, key in zip(request.recipients, keys, strict=True):
        expect((type(recipient) is Selector) == (key[2] == WILDCARD), "wildcard misread")
    expect(json.loads(request.payload) == data, "data changed")
    expect(request.ack == (None if ack is None else float(ack)), "ack changed")
    expect(request.latest == (None if latest is None else frames.event_id(latest)), "latest")
    expected_offline = None if offline is None else 30.0 if offline is True else float(offline)
    expect(request.offline == expected_offline, "offline changed")
    expect(request.hash == hash_, "hash changed")


def check_key_json(value: object) -> None:
    try:
        key = ConnectionKey.from_json(value)
    except KeyError_ as e:
        expect(str(e), "KeyError_ without a message")
        return
    expect(key.to_json() == list(value), "key does not round-trip")  # type: ignore[call-overload]
    for part in key:
        expect(len(part.encode("utf-8", "surrogatepass")) <= MAX_PART_BYTES, "part limit")


def check_recipient_json(value: object) -> None:
    """Any JSON value as an event recipient: a key, a wildcard (Selector) or bad_key."""
    try:
        recipient = parse_recipient(value)
    except KeyError_ as e:
        expect(str(e), "KeyError_ without a message")
        return
    expect(isinstance(value, list) and len(value) == 3, "not a 3-element array accepted")
    assert isinstance(value, list)
    expect(recipient.to_json() == value, "recipient does not round-trip")
    expect(value[0] != WILDCARD, "a wildcard user accepted")
    if type(recipient) is Selector:
        expect(value[2] == WILDCARD, "a selector without a wildcard location")
    else:
        expect(WILDCARD not in value, "a key with a wildcard part")
    for part in value:
        expect(len(part.encode("utf-8", "surrogatepass")) <= MAX_PART_BYTES, "part limit")


def check_position(text: str) -> None:
    try:
        position = Position.parse(text)
    except PositionError as e:
        expect(str(e), "PositionError without a message")
        return
    # Canonical up to leading zeros of the seq ("s.1:007" is seq 7).
    stream, _, seq = text.partition(":")
    expect(position == (stream, int(seq)) and seq.isascii() and seq.isdigit(), "changed")
    expect(Position.parse(str(position)) == position, "does not round-trip")


def check_position_roundtrip(stream: str, seq: int) -> None:
    expect(Position.parse(str(Position(stream, seq))) == (stream, seq), "round-trip")


# -- Tokens ------------------------------------------------------------------------------

TOKEN_CODES = {"token_missing", "token_malformed", "token_invalid", "token_expired"}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed_token(header: bytes, claims: bytes, secret: bytes = SECRET) -> str:
    """A JWT with arbitrary header and claims bytes and a valid HS256 signature."""
    signing_input = f"{_b64(header)}.{_b64(claims)}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def check_token(token: str) -> None:
    """Any string: a key or a TokenError with a documented code, with either clock."""
    for now in (None, NOW):
        try:
            key = verify_token(SECRET, token, now=now)
        except TokenError as e:
            expect(e.code in TOKEN_CODES and e.message, f"unclear token error {e.code!r}")
            continue
        ConnectionKey.from_json(list(key))


def check_token_claims(header: bytes, claims: bytes) -> None:
    """Correctly signed but arbitrary content: what is accepted is a valid key."""
    check_token(signed_token(header, claims))


def check_token_roundtrip(key: ConnectionKey, ttl: int) -> None:
    if WILDCARD in key:  # reserved: the wildcard of event requests
        try:
            issue_token(SECRET, key, ttl=ttl, now=NOW)
        except ValueError as e:
            expect('must not be "*"' in str(e), str(e))
        else:
            raise PropertyViolation('a token issued with a "*" part')
        return
    token = issue_token(SECRET, key, ttl=ttl, now=NOW)
    expect(verify_token(SECRET, token, leeway=0, now=NOW) == key, "token does not round-trip")
    try:
        verify_token(SECRET, token, leeway=0, now=NOW + ttl + 1)
    except TokenError as e:
        expect(e.code == "token_expired", e.code)
    else:
        raise PropertyViolation("expired token accepted")
    try:
        verify_token(SECRET[::-1], token, now=NOW)
    except TokenError as e:
        expect(e.code == "token_invalid", e.code)
    else:
        raise PropertyViolation("token accepted with another secret")


# -- Token claims: types, sizes and encodings ---------------------------------------------

TOKEN_HEADER = b'{"alg":"HS256","typ":"JWT"}'
TOKEN_LEEWAY = 30.0
NUMERIC_DATES = ("exp", "iat", "nbf")
KEY_CLAIMS = {"sub": "user", "sid": "session", "loc": "location"}
CLAIM_NAMES = ("sub", "sid", "loc", "aud", "exp", "iat", "nbf", "iss", "jti", "x")


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        return False
    return True


def strict_json(value: object) -> bool:
    """No lone surrogate in any string or name, no NaN or infinity, anywhere."""
    if isinstance(value, str):
        return _utf8(value)
    if isinstance(value, float):
        return value == value and value not in (float("inf"), float("-inf"))
    if isinstance(value, list):
        return all(strict_json(v) for v in value)
    if isinstance(value, dict):
        return all(_utf8(k) and strict_json(v) for k, v in value.items())
    return True


def claim_well_formed(name: str, value: object) -> bool:
    """The documented type, size and encoding of one claim (docs/protocol.md, "Tokens"),
    written apart from orbited.core.tokens so that the two can disagree."""
    if name in NUMERIC_DATES:  # a number, not a bool, 0 to 2^53 - 1
        return type(value) in (int, float) and 0 <= value <= 2**53 - 1  # type: ignore[operator]
    if name in KEY_CLAIMS:
        if type(value) is not str or not _utf8(value):
            return False
        return (1 if name == "sub" else 0) <= len(value.encode()) <= MAX_PART_BYTES
    if name == "aud":
        items = [value] if type(value) is str else value
        return type(items) is list and all(type(a) is str for a in items)
    if name in ("iss", "jti"):
        return type(value) is str
    return True  # other claims: any (strict) JSON


def encode_claims(claims: dict[str, object], duplicate: bool, raw: bool) -> bytes:
    """JSON with lone surrogates as \\u escapes (or, ``raw``, as invalid UTF-8 bytes),
    non-finite floats as NaN/Infinity, and optionally the first member written twice."""
    pairs = list(claims.items())
    if duplicate and pairs:
        pairs.append(pairs[0])
    text = (
        "{"
        + ",".join(
            f"{json.dumps(k, ensure_ascii=not raw)}:{json.dumps(v, ensure_ascii=not raw)}"
            for k, v in pairs
        )
        + "}"
    )
    return text.encode("utf-8", "surrogatepass")


def expected_token_outcome(claims: dict[str, object], now: float) -> ConnectionKey | str:
    """What docs/protocol.md says a correctly signed token with these (well-formed) claims
    gets at time ``now``: its key, or the code."""
    aud = claims.get("aud")
    audiences = [aud] if isinstance(aud, str) else aud or []
    if any(name not in claims for name in ("sub", "aud", "exp")) or "orbited" not in audiences:
        return "token_invalid"
    if any(name in claims and claims[name] > now + TOKEN_LEEWAY  # type: ignore[operator]
           for name in ("nbf", "iat")):  # fmt: skip
        return "token_invalid"
    if any(claims.get(name) == WILDCARD for name in KEY_CLAIMS):
        return "token_invalid"  # "*" is reserved (docs/protocol.md, "Connection keys")
    if claims["exp"] + TOKEN_LEEWAY < now:  # type: ignore[operator]
        return "token_expired"
    return ConnectionKey(claims["sub"], claims.get("sid", ""), claims.get("loc", ""))  # type: ignore[arg-type]


def _token_outcome(token: str, now: float | None) -> ConnectionKey | str:
    try:
        return verify_token(SECRET, token, leeway=TOKEN_LEEWAY, now=now)
    except TokenError as e:
        expect(e.code in TOKEN_CODES and e.message and e.message.isascii(), f"unclear {e.code}")
        return e.code


def check_token_claim_types(claims: dict[str, object], duplicate: bool = False,
                            raw: bool = False) -> None:  # fmt: skip
    """A correctly signed token whose claims have any types, sizes and encodings: a claim
    of the wrong type, size or encoding, or claims that are not strict JSON, are
    token_malformed with either clock; otherwise the documented outcome. Either way the
    same outcome on every use (the first use fills the verified-token cache)."""
    from orbited.core import tokens

    payload = encode_claims(claims, duplicate, raw)
    token = signed_token(TOKEN_HEADER, payload)
    tokens._verified.pop((SECRET, token), None)  # an earlier input may have cached it
    try:  # what a JSON reader sees: "\\ud800\\udc00" escapes are one character
        claims = json.loads(payload.decode("utf-8"))
        utf8 = True
    except UnicodeDecodeError:  # raw lone surrogates
        utf8 = False
    well_formed = (
        utf8
        and len(token) <= tokens.MAX_TOKEN_CHARS
        and not (duplicate and claims)
        and strict_json(claims)
        and all(claim_well_formed(name, value) for name, value in claims.items())
    )
    # The injected clock (NOW, in the past) first, then the wall clock: time goes forward.
    for now in (NOW, None):
        first = _token_outcome(token, now)
        expect(_token_outcome(token, now) == first, "another outcome on a second use")
        if not well_formed:
            expect(first == "token_malformed", f"bad claims gave {first!r}")
        elif now is not None:
            expected = expected_token_outcome(claims, now)
            expect(first == expected, f"gave {first!r}, the docs say {expected!r}")
        else:
            expect(first != "token_malformed", "well-formed claims refused as malformed")


def claim_value(r: Reader) -> object:
    """One claim value of a kind chosen by the input: the types, sizes and encodings a
    buggy web app or a forger could write."""
    kind = r.byte() % 16
    if kind == 0:  # within 97 days of NOW, either way
        return int(NOW) + r.int(0, 2**24 - 1) - 2**23
    if kind == 1:
        return 2**53 - 1 + r.int(0, 2) - 1  # at and around the bound
    if kind == 2:
        return -r.int(1, 10**6)
    if kind == 3:
        return NOW + (r.int(0, 2**24 - 1) - 2**23) / 7
    if kind == 4:
        return bool(r.byte() % 2)
    if kind == 5:
        return None
    if kind == 6:
        return str(r.int(0, 4 * 10**9))  # a numeric string
    if kind == 7:
        return r.text(24)  # may hold lone surrogates (surrogateescape)
    if kind == 8:
        return "é" * r.int(125, 131)  # around 256 bytes of UTF-8
    if kind == 9:
        return "\ud800"[: r.int(0, 1)] + chr(0xD800 + r.int(0, 0x7FF)) + r.text(8)
    if kind == 10:
        return [claim_value(r) for _ in range(r.int(0, 3))]
    if kind == 11:
        return {r.text(8): claim_value(r) for _ in range(r.int(0, 2))}
    if kind == 12:
        return "orbited"
    if kind == 13:
        return ["orbited", r.text(8)][: r.int(1, 2)]
    if kind == 14:
        return (float("inf"), float("nan"), 1e300, 10**400)[r.byte() % 4]
    return r.int(-(2**31), 2**31) * 10**20 + r.int(0, 9)  # a huge integer


def _fuzz_token_claims(data: bytes) -> None:
    r = Reader(data)
    flags = r.byte()
    claims = {CLAIM_NAMES[r.byte() % len(CLAIM_NAMES)]: claim_value(r)
              for _ in range(r.int(0, 8))}  # fmt: skip
    check_token_claim_types(claims, bool(flags & 1), bool(flags & 2))


# -- The legacy Orbit 1.0 protocol -------------------------------------------------------

ORBIT_LIMITS = events.RequestLimits(max_recipients=8, max_payload=512)


def _orbit_feed(stream: bytes, cuts: Sequence[int]) -> tuple[list[Any], str | None]:
    parser = OrbitParser(ORBIT_LIMITS)
    out: list[Any] = []
    bound = max(MAX_HEADER_BYTES, ORBIT_LIMITS.max_payload)
    for piece in chunks(stream, cuts):
        try:
            out += parser.feed(piece)
        except OrbitError as e:
            expect(e.message, "OrbitError without a message")
            return out + parser.complete, e.message
        expect(parser.buffered <= bound, f"Orbit parser buffers {parser.buffered} bytes")
    return out, None


def check_orbit_stream(stream: bytes, cuts: Sequence[int]) -> None:
    """Arbitrary bytes: requests or OrbitError; the same for every chunking."""
    whole = _orbit_feed(stream, [len(stream) or 1])
    split = _orbit_feed(stream, cuts)
    expect(whole == split, f"chunking changed the outcome: {whole[1]!r} vs {split[1]!r}")


def orbit_request(
    event_id: str, recipients: Sequence[Sequence[str]], body: bytes, style: int
) -> bytes:
    """A request as pyorbited (style 0) or the 2007 docs (style 1) spell it."""
    if style == 0:
        head = ["Orbit 1.0", "Event", f"id: {event_id}"]
        head += [f"recipient: {u}, {s}, {loc}" for u, s, loc in recipients]
        head.append(f"length: {len(body)}")
    else:
        head = ["Orbit/1.0", "Action: Event", f"Id: {event_id}"]
        head += [f"Recipient: ({u}, {s}, {loc})" for u, s, loc in recipients]
        head.append(f"Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def check_orbit_roundtrip(requests: Sequence[tuple[str, list[list[str]], bytes, int]],
                          cuts: Sequence[int]) -> None:  # fmt: skip
    """Well-formed requests (ids and key parts without separators, no part the reserved
    ``"*"``) parse back."""
    stream = b"".join(orbit_request(*r) for r in requests)
    out, error = _orbit_feed(stream, cuts)
    expect(error is None, f"valid request refused: {error}")
    got = [(r.event_id, [list(k) for k in r.recipients], r.body) for r in out]
    expect(got == [(i, [list(k) for k in ks], b) for i, ks, b, _ in requests], "changed")


# -- HaloD control messages --------------------------------------------------------------

CONTROL_CODES = {control.ErrorCode.BAD_MESSAGE, control.ErrorCode.UNSUPPORTED_VERSION}


def check_control_body(body: bytes) -> None:
    """Arbitrary bytes to either end: a message of an allowed type, or bad_message."""
    for allowed in (control.FROM_NODE, control.FROM_HALOD):
        try:
            msg = control.decode(body, allowed)
        except control.ControlError as e:
            expect(e.code in CONTROL_CODES and e.message, f"unclear control error {e.code!r}")
            continue
        expect(type(msg) in allowed, "wrong type accepted")
        expect(control.decode(control.encode(msg), allowed) == msg, "does not round-trip")


def check_heartbeat_load(value: object) -> None:
    """Any JSON value as a heartbeat's ``load``: ``bad_message`` with a message, or a load
    within the documented limits that round-trips and feeds a LatencyHistogram."""
    body = json.dumps({"type": "heartbeat", "seq": 1, "load": value}).encode()
    try:
        msg = control.decode_from_node(body)
    except control.ControlError as e:
        expect(e.code == control.ErrorCode.BAD_MESSAGE and e.message, "unclear load error")
        return
    expect(isinstance(msg, control.Heartbeat), "not a heartbeat")
    assert isinstance(msg, control.Heartbeat)
    load = msg.load
    expect((load is None) == (value is None), "load lost or invented")
    if load is None:
        return
    expect(control.decode_from_node(control.encode(msg)) == msg, "load does not round-trip")
    expect(all(0 <= n <= control.MAX_COUNTER for n in load.counters().values()), "counter")
    expect(all(1 <= r <= control.MAX_ROUTES for r in load.routes), "route id out of range")
    histogram = LatencyHistogram(load.ack_hist)  # every pair a bucket it has
    expect(histogram.count == sum(n for _, n in load.ack_hist), "histogram count")


def check_trace_query(fields: dict[str, object]) -> None:
    """A ``trace_query`` with any fields: ``bad_message``, or a query the builder HaloD uses
    (``trace_query``) accepts alike, that round-trips."""
    body = json.dumps({"type": "trace_query", **fields}).encode()
    try:
        msg = control.decode_from_halod(body)
    except control.ControlError as e:
        expect(e.code == control.ErrorCode.BAD_MESSAGE and e.message, "unclear query error")
        return
    assert isinstance(msg, control.TraceQuery)
    again = control.trace_query(msg.qid, msg.user, msg.session, msg.location, msg.event,
                                msg.limit)  # fmt: skip
    expect(again == msg, "builder and decoder disagree")
    expect(control.decode_from_halod(control.encode(msg)) == msg, "query does not round-trip")


def check_trace_fit(answer: dict[str, Any], limit: int) -> None:
    """``fit_trace_reply`` on any answer: at most ``limit`` bytes unless not even the
    answer without keys fits; HaloD accepts what it sends whenever ``keys`` is a list of
    objects; a cut answer says ``truncated``; the answer it was given is not changed."""
    before = json.dumps(answer, sort_keys=True)
    try:
        reply = control.fit_trace_reply(3, answer, limit)
        body = control.encode(reply)
    except ValueError:  # NaN / Infinity in the answer: not JSON, the link answers a failure
        return
    expect(json.dumps(answer, sort_keys=True) == before, "the answer was changed")
    if len(body) > limit:
        expect(reply.answer.get("keys") == [], "over the limit with keys left")
    keys = reply.answer.get("keys")
    if isinstance(keys, list) and all(isinstance(k, dict) for k in keys):
        expect(control.decode_from_node(body) == reply, "HaloD refuses the reply")
    if reply.answer is not answer:
        expect(reply.answer.get("truncated") is True, "cut without saying so")


def check_trace_context(traceparent: str, tracestate: str) -> None:
    """W3C trace context text (orbited.core.tracecontext) never raises: a traceparent is
    None or ids of the right form that format back (a version 00 one to the same text);
    a tracestate is None or at most 32 members with distinct keys."""
    parent = tracecontext.parse_traceparent(traceparent)
    if parent is not None:
        expect(len(parent.trace_id) == 32 and len(parent.span_id) == 16, "id lengths")
        expect(0 <= parent.flags <= 0xFF and 0 <= parent.version < 0xFF, "flags or version")
        again = tracecontext.parse_traceparent(str(parent))
        expect(again == dataclasses.replace(parent, version=0), "does not format back")
        if parent.version == 0:
            expect(str(parent) == traceparent, "version 00 text changed")
    members = tracecontext.parse_tracestate(tracestate)
    if members is not None:
        keys = [k for k, _ in members]
        expect(len(keys) <= tracecontext.MAX_TRACESTATE_MEMBERS, "too many members")
        expect(len(set(keys)) == len(keys), "a key twice")


def check_event_trace_fields(traceparent: object, tracestate: object) -> None:
    """An event request with ``traceparent``/``tracestate`` (None: absent): ``bad_request``
    exactly when a field is not a string of at most 512 characters; otherwise the fields
    as sent and the same digest as without them, through both the fast and the general
    parser (a resend with another span id stays a duplicate)."""
    base: dict[str, Any] = {"id": "e1", "to": [["alice", "s", "/l"]], "data": {"x": 1}}
    fields = {k: v for k, v in (("traceparent", traceparent), ("tracestate", tracestate))
              if v is not None}  # fmt: skip
    plain = events.parse_request(json.dumps(base).encode(), events.RequestLimits())
    assert isinstance(plain, events.EventRequest)
    wrong = [k for k, v in fields.items() if tracecontext.trace_field_error(k, v) is not None]
    for extra in ({}, {"ack": 5}):  # the fast path, and the general one
        body = json.dumps({**base, **fields, **extra}).encode()
        try:
            request = events.parse_request(body, events.RequestLimits())
        except events.RequestError as e:
            if e.code == "bad_json":  # a lone surrogate, NaN: not strict JSON, refused so
                expect(not strict_json(list(fields.values())), "bad_json for JSON")
                continue
            expect(e.code == "bad_request" and wrong, f"refused: {e.code} {e.message}")
            continue
        assert isinstance(request, events.EventRequest)
        expect(not wrong, f"accepted a bad {wrong}")
        expect(request.traceparent == traceparent, "traceparent changed")
        expect(request.tracestate == tracestate, "tracestate changed")
        expect(request.digest == plain.digest, "the trace context changed the digest")


# -- Twisted shells over in-memory transports --------------------------------------------


class _TCPStringTransport(StringTransport):
    def setTcpNoDelay(self, enabled: bool) -> None:  # noqa: N802
        pass


def check_rep_protocol(stream: bytes, cuts: Sequence[int], max_message: int = 256) -> None:
    """The REP shell: replies to what parses, closes on what does not, bounded buffer."""
    clock = task.Clock()
    factory = RepFactory(lambda payload: payload[::-1], RepLimits(max_message=max_message), clock)
    proto = factory.buildProtocol(None)
    transport = _TCPStringTransport()
    with no_logged_failures():
        proto.makeConnection(transport)
        for piece in chunks(stream, cuts):
            proto.dataReceived(piece)
            expect(proto._sp.buffered < wire.LENGTH_SIZE + max_message, "REP buffer over limit")
            if proto.closed:
                expect(transport.disconnecting, "closed without closing the transport")
                break
        if len(cuts) % 2 and not proto.closed:  # half the inputs end with a FIN
            written = len(transport.value())
            proto.readConnectionLost()
            # Every reply of this handler is written at once: nothing left, so it closes.
            expect(transport.disconnecting and not transport.disconnected, "FIN: no close")
            expect(len(transport.value()) == written, "written after the FIN")
        clock.advance(60)  # the header timeout closes a connection that sent no header
        expect(proto._sp.header_received or transport.disconnecting, "silent peer kept open")
        proto.connectionLost(CLOSED)
    expect(not factory.connections, "connection not forgotten")


def _hub() -> Hub:
    return Hub(task.Clock(), HubConfig(requests=ORBIT_LIMITS), epoch="fz")


def check_orbit_protocol(stream: bytes, cuts: Sequence[int]) -> None:
    """The Orbit listener: a reply per request, a Failure and a close on bad input."""
    hub = _hub()
    proto = OrbitProtocol(hub)
    transport = StringTransport()
    requests, error = _orbit_feed(stream, [len(stream) or 1])
    fin = bool(len(cuts) % 2)  # half the inputs end with a FIN (half-close)
    written_at_close: int | None = None
    with no_logged_failures():
        proto.makeConnection(transport)
        for piece in chunks(stream, cuts):
            # Bytes may still arrive while the close is pending: they must be ignored.
            proto.dataReceived(piece)
            expect(proto.parser.buffered <= max(MAX_HEADER_BYTES, 512), "Orbit buffer")
            if transport.disconnecting and written_at_close is None:
                written_at_close = len(transport.value())
        if fin:
            proto.readConnectionLost()
        proto.connectionLost(CLOSED)
    reply = transport.value()
    expect(transport.disconnecting == (error is not None or fin), "close iff bad or FIN")
    if fin and error is None:  # every request sent in full is answered before the close
        expect(reply.count(b"\r\n\r\n") == len(requests), "a request lost at the FIN")
    if error is not None:
        expect(reply.endswith(b"\r\n\r\n") and b"Failure\r\n" in reply, "no Failure reply")
        expect(len(reply) == written_at_close, "replies written after the close")


def _halod() -> Any:
    from halod.config import HaloDConfig
    from halod.server import HaloD

    # An in-memory SQLite store: the same code path, without a file per input.
    return HaloD(HaloDConfig(db=":memory:", routes=4), task.Clock())


def check_halod_control(stream: bytes, cuts: Sequence[int]) -> None:
    """HaloD's control connection: never an internal error; bounded buffer; bad input
    gets an ``error`` message (or an abort for broken framing) and the connection closes."""
    from halod.server import ControlFactory

    halod = _halod()
    proto = ControlFactory(halod).buildProtocol(None)
    transport = _TCPStringTransport()
    limit = halod.config.control_max_message
    with no_logged_failures():
        proto.makeConnection(transport)
        for piece in chunks(stream, cuts):
            proto.dataReceived(piece)
            expect(proto._sp.buffered < wire.LENGTH_SIZE + limit, "control buffer")
            if proto.closed:
                break
        halod.clock.advance(60)  # the register timeout refuses a silent connection
        proto.connectionLost(CLOSED)
    halod.store.close()
    sent = wire.SPConnection(control.CONTROL_PROTOCOL, control.CONTROL_PROTOCOL).receive(
        transport.value()
    )
    for body in sent:
        msg = control.decode(body, control.FROM_HALOD)
        failed = isinstance(msg, control.Error) and msg.code == control.ErrorCode.INTERNAL_ERROR
        expect(not failed, f"HaloD failed: {msg}")


def _node_link() -> Any:
    from orbited.node.link import HaloDLink
    from orbited.node.observe import build_observer
    from orbited.node.trace import TraceConfig, Tracer

    clock = task.Clock()
    hub = Hub(clock, HubConfig(routes=4), epoch="fz")
    tracer = Tracer(TraceConfig(mode="all"), "n1")  # hand-offs carry traces; queries read them
    hub.observe(build_observer(tracer, None), tracer)
    link = HaloDLink(hub, "n1", "tcp://127.0.0.1:1", lambda: ("127.0.0.1:1", "tcp://127.0.0.1:2"),
                     1, clock)  # type: ignore[arg-type]  # fmt: skip
    return link


def check_node_control(stream: bytes, cuts: Sequence[int]) -> None:
    """The node's end of the control link: whatever HaloD sends, no exception escapes."""
    from orbited.node.link import LinkProtocol

    link = _node_link()
    proto = LinkProtocol(link)
    transport = _TCPStringTransport()
    with no_logged_failures():
        proto.makeConnection(transport)
        for piece in chunks(stream, cuts):
            proto.dataReceived(piece)
            expect(proto._sp.buffered < wire.LENGTH_SIZE + control.MAX_MESSAGE, "buffer")
            if transport.disconnecting:
                break
        link.clock.advance(10)  # heartbeats at the interval a welcome named, and timeouts
        proto.connectionLost(CLOSED)


def check_node_messages(messages: Sequence[object], cuts: Sequence[int]) -> None:
    """JSON messages (mostly of HaloD's vocabulary) to a node: handled, or refused."""
    stream = wire.encode_header(control.CONTROL_PROTOCOL) + b"".join(
        wire.encode_message(json.dumps(m).encode()) for m in messages
    )
    check_node_control(stream, cuts)


HANDOFF_KEY = ConnectionKey("alice", "s", "/l")


def check_handoff_trace(trace: object) -> dict[str, Any]:
    """A hand-off entry whose ``trace`` member is anything: the mailbox is installed all
    the same (a trace never costs a mailbox), and a trace query after it is answered
    with a ``trace_reply`` HaloD accepts; the key's entry in it is returned."""
    from orbited.node.link import LinkProtocol

    if not strict_json(trace):  # not JSON (NaN, a lone surrogate): no HaloD relays that
        trace = None
    link = _node_link()
    proto = LinkProtocol(link)
    transport = _TCPStringTransport()
    welcome = {"type": "welcome", "role": "active", "routes": [1, 2, 3, 4],
               "total_routes": 4, "incoming": [1, 2, 3, 4], "heartbeat_interval": 1,
               "missed_heartbeats": 3}  # fmt: skip
    entry = {"key": list(HANDOFF_KEY), "route": 1, "stream": "fz0.1", "next_seq": 2,
             "acked": 0, "events": [[1, '"hi"']], "trace": trace}  # fmt: skip
    handoff = {"type": "handoff", "to": "n1", "done": [1, 2, 3, 4], "mailboxes": [entry]}
    query = {"type": "trace_query", "qid": 5, "user": "alice", "session": None,
             "location": None, "event": None, "limit": None}  # fmt: skip
    stream = wire.encode_header(control.CONTROL_PROTOCOL) + b"".join(
        wire.encode_message(json.dumps(m).encode()) for m in (welcome, handoff, query)
    )
    with no_logged_failures():
        proto.makeConnection(transport)
        proto.dataReceived(stream)
        expect(not transport.disconnecting, "the link closed over a hand-off's trace")
        mailbox = link.hub.mailbox(HANDOFF_KEY)
        expect(mailbox is not None and mailbox.stream == "fz0.1", "the mailbox was lost")
        proto.connectionLost(CLOSED)
    sent = wire.SPConnection(control.CONTROL_PROTOCOL, control.CONTROL_PROTOCOL).receive(
        transport.value()
    )
    replies = [m for m in map(control.decode_from_node, sent) if isinstance(m, control.TraceReply)]
    expect(len(replies) == 1 and replies[0].qid == 5, "the trace query was not answered")
    keys = replies[0].answer["keys"]
    expect([k["key"] for k in keys] == [list(HANDOFF_KEY)], "the handed key is not traced")
    return keys[0]


def check_halod_messages(messages: Sequence[object], cuts: Sequence[int]) -> None:
    """JSON messages (mostly of a node's vocabulary) to HaloD: handled, or refused."""
    stream = wire.encode_header(control.CONTROL_PROTOCOL) + b"".join(
        wire.encode_message(json.dumps(m).encode()) for m in messages
    )
    check_halod_control(stream, cuts)


# -- Browser transports: query parameters and the twisted.web resources ------------------

AUTH = BrowserAuth(SECRET)
BROWSER_STATUSES = {400, 401}


def valid_token(user: str = "fz") -> str:
    return issue_token(SECRET, ConnectionKey(user, "s", "/l"))


def check_auth_params(params: dict[str, list[str]]) -> None:
    try:
        attach = authenticate(AUTH, params)
    except BrowserRequestError as e:
        expect(e.status in BROWSER_STATUSES and e.code and e.message, f"unclear {e.code}")
        expect(4000 <= e.close_code < 5000 and len(e.close_reason.encode()) <= 123, "close")
        return
    if attach.after is not None:
        # Leading zeros ("s.1:007") are accepted and normalised: compare values.
        last = single_param(params, "last")
        expect(last is not None and Position.parse(last) == attach.after, "position changed")
        expect(Position.parse(str(attach.after)) == attach.after, "position round trip")


def check_origin(origin: str | None, host: str | None, allowed: list[str]) -> None:
    expect(isinstance(origin_allowed(origin, host, allowed), bool), "not a bool")


RESOURCES = ("poll", "sse", "iframe", "ack", "ws", "health")
METHODS = (b"GET", b"POST", b"OPTIONS", b"HEAD")


def http_request(
    resource: str, method: bytes, args: dict[bytes, list[bytes]], headers: dict[bytes, bytes]
) -> bytes:
    query = urlencode([(k, v) for k, vs in args.items() for v in vs]).encode()
    lines = [b"%s /orbited/%s?%s HTTP/1.1" % (method, resource.encode(), query)]
    lines += [b"%s: %s" % (name, value) for name, value in headers.items()]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def http_exchange(
    resource: str, method: bytes, args: dict[bytes, list[bytes]],
    headers: dict[bytes, bytes], cors: list[str],
) -> bytes:  # fmt: skip
    """The raw response of the node's real browser Site (over an in-memory transport,
    fake clock) to one request; fails on any logged failure."""
    from orbited.node.web import browser_site

    clock = task.Clock()
    hub = Hub(clock, HubConfig(), epoch="fz")
    site = browser_site(hub, AUTH, cors, "fz", 64 * 1024)
    channel = site.buildProtocol(None)
    transport = _TCPStringTransport()
    transport.protocol = channel  # a WebSocket upgrade takes the transport over
    with no_logged_failures():
        channel.makeConnection(transport)
        channel.dataReceived(http_request(resource, method, args, headers))
        clock.advance(MAX_TIMEOUT + 1)  # a held long-poll answers by its timeout
        response = transport.value()
        channel.connectionLost(CLOSED)
        clock.advance(3600)
    return response


def check_http_request(
    resource: str, method: bytes, args: dict[bytes, list[bytes]],
    headers: dict[bytes, bytes], cors: list[str],
) -> None:  # fmt: skip
    """One request: a 2xx, possibly held open, or a 4xx with a JSON error body; never a
    500 and never a logged failure. Bytes a real HTTP parser could not deliver (CR, LF)
    are not generated."""
    response = http_exchange(resource, method, args, headers, cors)
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *header_lines = head.split(b"\r\n")
    expect(status_line.startswith(b"HTTP/1.1 "), f"no response: {response[:80]!r}")
    code = int(status_line.split()[1])
    # Every answer of the browser port is ours: a 2xx (possibly held open) or a 4xx with
    # the JSON error body (docs/protocol.md, "Errors (browser side)"); 501 (twisted.web's
    # unknown method) and bare 4xx pages are gone, and a 5xx would be a crash.
    expect(200 <= code < 300 or 400 <= code < 500, f"status {code}")
    content_type = [line.split(b":", 1)[1].strip() for line in header_lines
                    if line.lower().startswith(b"content-type:")]  # fmt: skip
    if code >= 400:
        expect(content_type == [b"application/json"], f"{code} without JSON: {content_type}")
        if method != b"HEAD":  # a HEAD response has the headers only
            error = json.loads(body)["error"]
            expect(error["code"] and error["message"], "error without code or message")


def strip_crlf(value: bytes) -> bytes:
    return value.replace(b"\r", b"").replace(b"\n", b"")


def check_timeout_param(text: str) -> None:
    try:
        value = LongPollResource._timeout({"timeout": [text]})
    except BrowserRequestError as e:
        expect(e.status == 400 and e.code == "bad_timeout", e.code)
        return
    expect(0 <= value <= MAX_TIMEOUT, f"timeout {value} accepted")


def check_frame_encodings(data: object, tag: str | None = None) -> None:
    """An event carrying any JSON ``data`` (and any latest-value ``tag``) can neither
    split an SSE line nor leave the iframe's <script> block or string literal, and the
    page gets the frame back intact (docs/protocol.md, "SSE" and "iframe streaming";
    docs/security.md)."""
    doc: dict[str, Any] = {"id": "e", "to": [["u", "s", "/l"]], "data": data}
    if tag is not None:
        doc["latest"] = tag
    body = json.dumps(doc).encode()
    try:
        request = events.parse_request(body, events.RequestLimits(max_payload=1 << 20))
    except events.RequestError:
        return  # e.g. too deep: refused before it reaches a browser
    assert isinstance(request, events.EventRequest)
    frame = frames.event(1, request.payload, frames.event_id("e"), request.latest, 2)
    parsed = json.loads(frame)
    expect(parsed["data"] == json.loads(request.payload), "frame changed data")
    if tag is not None:
        expect(parsed["latest"] == tag and parsed["replaced"] == 2, "frame changed the tag")
    expect(b"\n" not in frame and b"\r" not in frame, "a raw line break in a frame (SSE)")
    literal = script_literal(frame)
    expect(literal.isascii(), "non-ASCII in the iframe literal")
    for unsafe in (b"<", b">", b"&"):
        expect(unsafe not in literal, f"{unsafe!r} in the iframe literal")
    expect(json.loads(literal) == frame.decode(), "the iframe literal is not the frame")


# -- atheris adapters: raw bytes → the checks above --------------------------------------

_HEADER_NAMES = (b"origin", b"host", b"last-event-id", b"x-other")
_PARAM_NAMES = (b"token", b"last", b"timeout", b"origin", b"x")


def _fuzz_http(data: bytes) -> None:
    r = Reader(data)
    resource = RESOURCES[r.byte() % len(RESOURCES)]
    method = METHODS[r.byte() % len(METHODS)]
    args: dict[bytes, list[bytes]] = {}
    for _ in range(r.int(0, 4)):
        name = _PARAM_NAMES[r.byte() % len(_PARAM_NAMES)]
        value = valid_token().encode() if r.byte() % 3 == 0 else r.bytes(64)
        args.setdefault(name, []).append(value)
    headers = {_HEADER_NAMES[r.byte() % 4]: strip_crlf(r.bytes(64))
               for _ in range(r.int(0, 3))}  # fmt: skip
    cors = [r.text(32) for _ in range(r.int(0, 2))]
    check_http_request(resource, method, args, headers, cors)


def _fuzz_params(data: bytes) -> None:
    r = Reader(data)
    params: dict[str, list[str]] = {}
    for _ in range(r.int(0, 4)):
        name = ("token", "last", "x")[r.byte() % 3]
        value = valid_token() if r.byte() % 3 == 0 else r.text(80)
        params.setdefault(name, []).append(value)
    check_auth_params(params)
    check_timeout_param(r.text(24))
    check_origin(r.text(64) or None, r.text(32) or None, [r.text(16)])


def _fuzz_tokens(data: bytes) -> None:
    r = Reader(data)
    check_token(r.text(200))
    check_token_claims(r.bytes(128), r.rest())


def _fuzz_keys(data: bytes) -> None:
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        value = data.decode("latin-1")
    check_key_json(value)
    check_recipient_json(value)
    check_position(data.decode("utf-8", "surrogateescape"))


def _json_or_text(data: bytes) -> object:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return data.decode("utf-8", "replace")


def _fuzz_load(data: bytes) -> None:
    check_heartbeat_load(_json_or_text(data))


def _fuzz_trace_query(data: bytes) -> None:
    value = _json_or_text(data)
    check_trace_query(value if isinstance(value, dict) else {"qid": 1, "user": value})


def _fuzz_trace_fit(data: bytes) -> None:
    r = Reader(data)
    limit = r.int(0, 4096)
    value = _json_or_text(r.rest())
    check_trace_fit(value if isinstance(value, dict) else {"keys": value}, limit)


def _fuzz_trace_context(data: bytes) -> None:
    text = data.decode("utf-8", "surrogateescape")
    check_trace_context(text, text)
    half = len(text) // 2
    check_trace_context(text[:half], text[half:])
    value = _json_or_text(data)
    if isinstance(value, list) and len(value) == 2:
        check_event_trace_fields(value[0], value[1])
    else:
        check_event_trace_fields(value, None)


def _fuzz_handoff_trace(data: bytes) -> None:
    check_handoff_trace(_json_or_text(data))


def _fuzz_frames(data: bytes) -> None:
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        value = data.decode("utf-8", "replace")
    check_frame_encodings(value)
    if isinstance(value, str):
        check_frame_encodings(None, value)


# -- the browser port's lean front: RFC 6455 frames in, request heads ----------------------


WS_CODES = frozenset({1002, 1007, 1009})


def _ws_feed(stream: bytes, cuts: Sequence[int], max_message: int) -> tuple[list[Any], int]:
    parser = wsframe.ClientFrames(max_message)
    out: list[Any] = []
    try:
        for piece in chunks(stream, cuts):
            out += parser.feed(piece)
            # unparsed: at most one frame's header and payload (a message's, or 125)
            bound = max(max_message, wsframe.MAX_CONTROL) + 14
            expect(len(parser.buf) <= bound, "wsframe buffered past the limit")
    except wsframe.WSError as e:
        expect(e.code in WS_CODES and e.reason, f"close code {e.code} not documented")
        return out + e.messages, e.code
    return out, 0


def check_wsframe(stream: bytes, cuts: Sequence[int], max_message: int = 64) -> None:
    """Arbitrary browser bytes: whole messages or a WSError with 1002/1007/1009; the same
    for every chunking; text valid UTF-8, data messages within ``max_message``."""
    messages, code = _ws_feed(stream, cuts, max_message)
    whole, whole_code = _ws_feed(stream, [max(1, len(stream))], max_message)
    expect(code == whole_code, "the close code depends on the chunking")
    expect(messages == whole, "the messages depend on the chunking")
    for m in messages:
        if m.opcode == wsframe.OP_TEXT:
            m.payload.decode("utf-8")
        if m.opcode in (wsframe.OP_TEXT, wsframe.OP_BINARY):
            expect(len(m.payload) <= max_message, "a message over max_message passed")
        else:
            expect(len(m.payload) <= 125, "a control frame over 125 bytes passed")


def check_wsframe_roundtrip(payloads: Sequence[bytes], cuts: Sequence[int]) -> None:
    """Masked, fragmented text messages come back whole (each payload split in three)."""
    stream = b""
    for p in payloads:
        a, b = len(p) // 3, 2 * len(p) // 3
        stream += (wsframe.mask_frame(wsframe.OP_TEXT, p[:a], fin=False)
                   + wsframe.mask_frame(wsframe.OP_PING, p[:10])
                   + wsframe.mask_frame(wsframe.OP_CONT, p[a:b], b"\xff\x00\x10\x7f", fin=False)
                   + wsframe.mask_frame(wsframe.OP_CONT, p[b:]))  # fmt: skip
    messages, code = _ws_feed(stream, cuts, 1 << 20)
    expect(code == 0, "a valid stream was refused")
    texts = [m.payload for m in messages if m.opcode == wsframe.OP_TEXT]
    expect(texts == list(payloads), "fragmented messages did not come back whole")


def _read_head(data: bytes, cuts: Sequence[int]) -> Any:
    reader = httpfront.HeadReader(256, 8)
    result = None
    for piece in chunks(data, cuts):
        result = reader.feed(piece)
        if result is not None:
            break
    return result


def check_httpfront(data: bytes, cuts: Sequence[int]) -> None:
    """Any bytes on the browser port: the head reader needs more, hands off, or gives a
    GET of a hot URL or a bodiless POST of /orbited/ack; whole and chunked agree on the
    outcome; the plan never raises and hands off what it cannot serve."""
    result = _read_head(data, cuts)
    whole = _read_head(data, [max(1, len(data))])
    if isinstance(whole, httpfront.Head) and isinstance(result, httpfront.Head):
        # Read in pieces, a head may be complete before the bytes after it arrive: those
        # then come while its answer is held (the same rule as "pipelined").
        same = (result.route, result.query, result.headers, result.keep_alive)
        expect(same == (whole.route, whole.query, whole.headers, whole.keep_alive),
               "chunking changed the head")  # fmt: skip
        expect(whole.rest.startswith(result.rest), "chunking changed an upgrade's early bytes")
    elif isinstance(whole, httpfront.Head):
        expect(result is httpfront.HANDOFF or result is None, "chunking lost the head")
    if result is None or result is httpfront.HANDOFF:
        return
    expect(isinstance(result, httpfront.Head), "not a Head")
    expect(result.route in httpfront.HOT.values(), "not a hot route")
    todo = httpfront.plan(result, ["https://app.example"], BrowserAuth(SECRET))
    if todo is not None:
        expect(len(todo.params.get("token", ())) <= 1, "a repeated token was planned")
        if result.route is httpfront.Route.WS:
            expect(len(base64.b64decode(todo.ws_key)) == 16, "a bad key was accepted")


# -- orbited/core/_speedups.c against its Python twins ------------------------------------


def _head_outcome(data: bytes, fast: bool) -> object:
    saved = httpfront._read_get_head
    httpfront._read_get_head = saved if fast else None
    try:
        reader = httpfront.HeadReader(256, 8)
        outcome = reader.feed(data)
    finally:
        httpfront._read_get_head = saved
    return (tuple(outcome) if isinstance(outcome, httpfront.Head) else outcome, reader.raw,
            reader.url, reader.state, reader.upgrade_at, reader.released)  # fmt: skip


def check_head_twins(data: bytes) -> None:
    """Any bytes as a request's first read: the C head reader (where built) leaves the
    HeadReader with the outcome and state llhttp's reading gives."""
    if httpfront._read_get_head is None:
        return
    expect(_head_outcome(data, True) == _head_outcome(data, False),
           "the C head reader and llhttp disagree")  # fmt: skip


_HS256_JSON = b'{"alg":"HS256","typ":"JWT"}'  # issue_token's header


def check_token_twins(token: str, now: float) -> None:
    """Any token: the C check (where built) answers None or the Python check's answer."""
    native = tokens._native
    if native is None:
        return
    known = {_b64(_HS256_JSON).encode()}
    answer = native.Key(SECRET).claims(token, known, now, TOKEN_LEEWAY)
    if answer is None:
        return
    try:
        key, exp = tokens._check_claims(tokens._verified_claims(SECRET, token), TOKEN_LEEWAY, now)
    except TokenError as e:
        raise PropertyViolation(f"the C check accepted what Python refuses: {e.code}") from None
    expect(answer == (*key, exp), "the C check's answer is not the Python check's")


def check_event_twins(body: bytes) -> None:
    """Any SP request body: the C reader of the common event request (where built)
    answers None or parse_request's strict reading of it, and parse_request gives the
    same outcome with it and without it."""
    if events.parse_common is None:
        return
    limits = events.RequestLimits()
    answer = events.parse_common(body, limits.max_payload, limits.max_recipients)
    strict = parsed_request(body, False)
    if answer is not None:
        expect(type(strict) is events.EventRequest, "the C reader took a request Python refuses")
    expect(parsed_request(body, True) == strict, "the C reader and parse_request disagree")


def parsed_request(
    body: bytes, fast: bool, limits: events.RequestLimits | None = None
) -> object:  # fmt: skip
    """parse_request's outcome: with the C reader and orjson (``fast``), or the strict
    path alone; an error as (code, message)."""
    saved = events.parse_common
    events.parse_common = saved if fast else None
    try:
        return events.parse_request(body, limits or events.RequestLimits(), _strict=not fast)
    except events.RequestError as e:
        return (e.code, str(e))
    finally:
        events.parse_common = saved


def _fuzz_token_twins(data: bytes) -> None:
    r = Reader(data)
    now = NOW + r.int(-100, 100)
    claims = r.rest()
    check_token_twins(claims.decode("latin-1"), now)
    check_token_twins(signed_token(_HS256_JSON, claims), now)


def _cut(check: Callable[[bytes, Sequence[int]], None]) -> Callable[[bytes], None]:
    def target(data: bytes) -> None:
        r = Reader(data)
        cuts = r.cuts()
        check(r.rest(), cuts)

    return target


def _with_header(check: Callable[[bytes, Sequence[int]], None], protocol: int
                 ) -> Callable[[bytes], None]:  # fmt: skip
    """Most inputs start with a valid SP header, so the fuzzer gets past it."""

    def target(data: bytes) -> None:
        r = Reader(data)
        cuts = r.cuts()
        prefix = wire.encode_header(protocol) if r.byte() % 4 else b""
        check(prefix + r.rest(), cuts)

    return target


DESCRIPTIONS = {
    "sp_stream": "SPConnection: any bytes (mostly after a valid header), any chunking",
    "sp_header": "parse_header: 8 bytes round-trip or SPProtocolError",
    "backtrace": "split_backtrace: any REQ body, max_hops 1..10",
    "event_json": "parse_request: any SP request body, default and small limits",
    "event_orjson": "parse_request: the same outcome with and without orjson",
    "keys_positions": "ConnectionKey.from_json on any JSON; Position.parse on any text",
    "tokens": "verify_token: any string; correctly signed arbitrary header/claims",
    "token_claims": "verify_token: signed claims of any type, size, encoding; docs' outcome",
    "orbit_parser": "OrbitParser: any bytes, any chunking, bounded buffer",
    "orbit_protocol": "OrbitProtocol over StringTransport with a real Hub",
    "rep_protocol": "RepProtocol over StringTransport with task.Clock",
    "control_json": "orbited.core.control.decode: any body, both directions",
    "control_load": "a heartbeat's load: any JSON value; limits, round trip, histogram",
    "trace_query": "trace_query: any fields; decoder and builder agree, round trip",
    "trace_fit": "fit_trace_reply: any answer and limit; size, HaloD accepts it",
    "trace_context": "traceparent/tracestate parsing; event trace fields and the digest",
    "handoff_trace": "a hand-off entry's trace member: any JSON; the mailbox still installs",
    "halod_control": "HaloD's ControlProtocol with a real HaloD (no internal_error)",
    "node_control": "the node's LinkProtocol with a real Hub (tracing on)",
    "http_params": "authenticate/single_param, long-poll timeout, origin_allowed",
    "http_resources": "the node's browser Site: one HTTP request, never a 500",
    "frame_encodings": "any event data through SSE and iframe framing: no escape, intact",
    "wsframe": "ClientFrames: any browser bytes, any chunking, 1002/1007/1009, bounded",
    "httpfront": "HeadReader and plan: any bytes on the browser port, any chunking",
    "speedups_head": "HeadReader: the same outcome with the C head reader and with llhttp",
    "speedups_token": "the token check in C: no answer, or the Python check's answer",
    "speedups_event": "parse_request: the same outcome with the C event reader and without",
}

_VALID_EVENT = b'{"id":"e1","to":[["alice","s1","/chat"]],"data":{"text":"hi"},"ack":5}'
_ORBIT = orbit_request("7", [["alice", "0", "/chat"]], b'"hi"', 0)
_REGISTER = control.Register("n1", "127.0.0.1:8001", "tcp://127.0.0.1:9001", 10)
_WELCOME = control.Welcome(None, Role.ACTIVE, (1, 2), 4, 1.0, 3)
_LOAD = control.HeartbeatLoad(events=5, recipients=6, delivered=4, queued=2, acked=1, full=0,
                              moved=0, ack_hist=((2, 3), (14, 1)), routes={1: 2, 3: 0},
                              routes_full=True)  # fmt: skip


def _control_seed(*messages: control.Message) -> bytes:
    # Reader: 1 cut of 64 bytes, then a byte that keeps the SP header.
    return (
        b"\x00\x00\x00"
        + b"\x3f\x00\x00"
        + b"\x01"
        + b"".join(wire.encode_message(control.encode(m)) for m in messages)
    )


# Starting inputs for coverage-guided runs (written into an empty --corpus directory).
SEEDS: dict[str, list[bytes]] = {
    "sp_stream": [b"\x00" * 7 + wire.encode_message(b"\x80\x00\x00\x01hello")],
    "sp_header": [wire.encode_header(wire.REQ)],
    "backtrace": [b"\x08\x00\x00\x00\x01\x80\x00\x00\x02payload"],
    "event_json": [
        _VALID_EVENT,
        b'{"op":"ping","id":"p"}',
        b'{"id":"m","to":[["a","*","*"],["b","s","*"],["c","s","/l"]],"data":1,"hash":2,'
        b'"latest":"room:42","offline":true,"ack":3}',
    ],
    "event_orjson": [_VALID_EVENT, b'{"id":"e","to":[["a","b","/c"]],"data":[1e-5,1e99,2e20]}'],
    "keys_positions": [b'["alice","s1","/chat"]', b"aZ3x_Q.1f:42"],
    "tokens": [bytes([len(valid_token()), 0, 0]) + valid_token().encode()],
    # flags 0; 3 claims: sub "orbited", aud "orbited", exp NOW + 2**23 - 1 (kind 0)
    "token_claims": [b"\x00\x03\x00\x00\x00\x0c\x03\x0c\x04\x00\xff\xff\xff"],
    "orbit_parser": [b"\x00\x00\x00\x3f\x00\x00" + _ORBIT],
    "orbit_protocol": [b"\x00\x00\x00\x3f\x00\x00" + _ORBIT],
    "rep_protocol": [b"\x00" * 7 + wire.encode_message(b"\x80\x00\x00\x01hello")],
    "control_json": [
        control.encode(_REGISTER),
        control.encode(_WELCOME),
        control.encode(control.Heartbeat(3, 1, 2, _LOAD)),
        control.encode(control.TraceQuery(7, "alice", None, "/chat", "42", 16)),
        control.encode(control.TraceReply(7, {"node": "n1", "keys": [{"key": ["a", "", ""]}]})),
    ],
    "control_load": [json.dumps(control.Heartbeat(1, load=_LOAD).load.to_wire()).encode()],  # type: ignore[union-attr]
    "trace_query": [
        b'{"qid":1,"user":"alice","session":"s","location":null,"event":"e","limit":4}'
    ],
    "handoff_trace": [
        b'[{"t":1796540400.5,"event":"e1","request":"77aa0c13d2e4f0a1","node":"n2",'
        b'"route":1,"status":"queued","seq":1,"stream":"fz0.1","dropped":0,"ack_wait":null,'
        b'"written":null,"transport":null,"rewritten":0,"acked":null,"outcome":null,'
        b'"handed":"out","trace_id":null},{"t":1796540400.6,"what":"moved","route":1}]',
    ],
    "trace_context": [
        b'["00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01","congo=t61rcWkgMzE"]',
        b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-future",
    ],
    "trace_fit": [
        b"\x40\x00\x00"
        + json.dumps(
            {
                "node": "n1",
                "keys": [
                    {
                        "key": ["a", "", ""],
                        "dispatches": [{"t": i, "pad": "x" * 40} for i in range(9)],
                        "notes": [{"t": 0.5, "what": "attach"}],
                    }
                ],
            }
        ).encode()
    ],
    "halod_control": [_control_seed(_REGISTER, control.Heartbeat(1))],
    "node_control": [
        _control_seed(_WELCOME, control.HeartbeatAck(1)),
        _control_seed(_WELCOME, control.TraceQuery(1, "alice", None, None, "42", 4)),
    ],
    "http_params": [b"\x00\x01\x00\x00\x00"],
    "http_resources": [b"\x00\x00\x01\x00\x00\x00\x00"],
    "frame_encodings": [b'{"text":"</script><script>alert(1)</script>\\u2028"}'],
    "wsframe": [
        b"\x00\x00\x00\x3f\x00\x00" + wsframe.mask_frame(wsframe.OP_TEXT, b'{"type":"ack"}')
    ],
    "httpfront": [b"\x00\x00\x00\x3f\x00\x00GET /orbited/poll?token=t HTTP/1.1\r\nHost: h\r\n\r\n"],
    "speedups_head": [
        b"GET /orbited/ws?token=t HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    ],
    "speedups_token": [b"\x64\x00\x00" + b'{"sub":"a","aud":"orbited","exp":1700000000}'],
    "speedups_event": [
        b'{"id": "p1-5", "to": [["c17", "b", "/bench"]], "data": {"t": 1796648159.6544864}}',
        b'{"id":"e","to":[["u","s","l"]],"data":[1,-2.5e-07,"\xc3\xa9",{"a":null}],"hash":2}',
    ],
}

TARGETS: dict[str, Callable[[bytes], None]] = {
    "sp_stream": _with_header(check_sp_stream, wire.REQ),
    "sp_header": lambda d: check_sp_header(d[:8], wire.REQ),
    "backtrace": lambda d: check_backtrace(d[1:], 1 + d[0] % 10 if d else 8),
    "event_json": check_event_body,
    "event_orjson": check_event_orjson,
    "keys_positions": _fuzz_keys,
    "tokens": _fuzz_tokens,
    "token_claims": _fuzz_token_claims,
    "orbit_parser": _cut(check_orbit_stream),
    "orbit_protocol": _cut(check_orbit_protocol),
    "rep_protocol": _with_header(check_rep_protocol, wire.REQ),
    "control_json": check_control_body,
    "control_load": _fuzz_load,
    "trace_query": _fuzz_trace_query,
    "trace_fit": _fuzz_trace_fit,
    "trace_context": _fuzz_trace_context,
    "handoff_trace": _fuzz_handoff_trace,
    "halod_control": _with_header(check_halod_control, control.CONTROL_PROTOCOL),
    "node_control": _with_header(check_node_control, control.CONTROL_PROTOCOL),
    "http_params": _fuzz_params,
    "http_resources": _fuzz_http,
    "frame_encodings": _fuzz_frames,
    "wsframe": _cut(check_wsframe),
    "httpfront": _cut(check_httpfront),
    "speedups_head": check_head_twins,
    "speedups_token": _fuzz_token_twins,
    "speedups_event": check_event_twins,
}
