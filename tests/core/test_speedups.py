"""orbited/core/_speedups.c against its Python twins.

The common token's check in C answers only where the Python check (orbited.core.tokens,
itself checked against PyJWT in test_tokens_hand.py) accepts, and then with the Python
check's answer; it answers for every token issue_token makes. Differential: signed
claims documents of every shape, then mutations of the token's text and of the claims'
JSON, with the clock on either side of each limit. The version 2 route and the WebSocket
accept key give their twins' values (and the published vectors)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import random
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fuzz.targets import parsed_request
from orbited.core import hashing, tokens
from orbited.core.keys import MAX_PART_BYTES, ConnectionKey
from orbited.core.tokens import TokenError, issue_token, verify_token
from orbited.node import events
from orbited.node.transports import httpfront, wsframe

native = tokens._native
ROOT = Path(__file__).resolve().parents[2]
SECRET = b"s" * 32
OTHER = b"t" * 80  # longer than SHA-256's block: hashed first (RFC 2104)
HEADER = b"eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"  # issue_token's: {"alg":"HS256","typ":"JWT"}
NOW = 1_800_000_000.0


def test_the_speedups_are_built_where_ci_runs():
    """CI installs libssl-dev (./dev): a build that silently fell back to Python there
    would lose the accept path's speed unnoticed."""
    if not os.environ.get("CI") and native is None:
        pytest.skip("orbited.core._speedups not built here (no compiler or OpenSSL headers)")
    assert native is not None


needs_native = pytest.mark.skipif(native is None, reason="orbited.core._speedups not built")


def b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def signed(payload: bytes, secret: bytes = SECRET, header: bytes = HEADER) -> str:
    signing = header + b"." + b64(payload)
    return (signing + b"." + b64(hmac.digest(secret, signing, "sha256"))).decode()


def python_check(secret: bytes, token: str, now: float, leeway: float) -> object:
    """The Python check's answer: (sub, sid, loc, exp) or its refusal."""
    try:
        key, exp = tokens._check_claims(tokens._verified_claims(secret, token), leeway, now)
    except TokenError as e:
        return (e.code, e.message)
    return (*key, exp)


def agree(secret: bytes, token: str, now: float, leeway: float = 30.0) -> object:
    """The C check's answer, after asserting it is None or the Python check's."""
    known = {HEADER}
    answer = native.Key(secret).claims(token, known, now, leeway)
    if answer is not None:
        assert answer == python_check(secret, token, now, leeway), token
        assert type(answer[3]) is float
    return answer


@needs_native
def test_issued_tokens_are_answered_as_the_python_check_answers():
    longest = ConnectionKey("x" * MAX_PART_BYTES, "y" * MAX_PART_BYTES, "/" * MAX_PART_BYTES)
    for key in [ConnectionKey("u", "", ""), ConnectionKey("alice", "s1", "/chat"), longest]:
        for secret in (SECRET, OTHER):
            token = issue_token(secret, key, ttl=60, now=NOW)
            assert agree(secret, token, NOW) == (*key, NOW + 60)
            assert agree(secret, token, NOW + 89.9) is not None  # within the leeway
            assert agree(secret, token, NOW + 91) is None  # expired: Python words it
            assert agree(OTHER if secret == SECRET else SECRET, token, NOW) is None


@needs_native
def test_only_known_headers_are_answered():
    token = issue_token(SECRET, ConnectionKey("u", "s", "l"), now=NOW)
    key = native.Key(SECRET)
    assert key.claims(token, set(), NOW, 30.0) is None
    assert key.claims(token, {b"other"}, NOW, 30.0) is None
    assert key.claims(token, frozenset({HEADER}), NOW, 30.0) is not None


CLAIM_NAMES = ["sub", "sid", "loc", "aud", "exp", "iat", "nbf", "x"]
values = (
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=4)
    | st.sampled_from(["orbited", "*", "", "é", "a\\b", 'a"b', "x" * 257])
    | st.integers(-2, 2**54) | st.sampled_from([NOW, NOW - 100, NOW + 100, 2**53 - 1, 2**53])
    | st.floats(allow_nan=False, allow_infinity=False) | st.booleans() | st.none()
    | st.lists(st.just("orbited"), max_size=2)
)  # fmt: skip
claim_docs = st.dictionaries(st.sampled_from(CLAIM_NAMES), values, max_size=7)
_PIECES = [b"{", b"}", b",", b":", b'"', b" ", b"\\", b"0", b"01", b"-", b".5", b"e3",
           b'"sub":"b"', b'"exp":1', b"\xc3\xa9", b"\x7f", b"\x00",
           b"1234567890123456789"]  # fmt: skip


@needs_native
@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(claim_docs, st.data())
def test_claims_of_any_shape_are_answered_as_the_python_check_answers(doc, data):
    payload = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
    for _ in range(data.draw(st.integers(0, 2))):  # junk, duplicates, numbers, escapes
        at = data.draw(st.integers(0, len(payload)))
        payload = payload[:at] + data.draw(st.sampled_from(_PIECES)) + payload[at:]
    agree(SECRET, signed(payload), data.draw(st.sampled_from([NOW, NOW - 31, NOW + 31, 0.0])))


EXP = int(NOW)


@needs_native
@pytest.mark.parametrize(("payload", "answered"), [
    (b'{"sub":"a","aud":"orbited","exp":%d}' % EXP, True),
    (b'{"exp":%d,"aud":"orbited","loc":"/","sid":"s","iat":0,"sub":"a"}' % EXP, True),
    (b'{"sub":"a","aud":"orbited","exp":9007199254740991,"iat":%d}' % (EXP + 30), True),
    (b'{"sub":"a","aud":"orbited","exp":9007199254740992}', False),  # past 2**53 - 1
    (b'{"sub":"a","aud":"orbited","exp":%d,"iat":%d}' % (EXP, EXP + 31), False),  # future
    (b'{"sub":"a","aud":"orbited","exp":%d}' % (EXP - 31), False),  # expired
    (b'{"sub":"*","aud":"orbited","exp":%d}' % EXP, False),  # the wildcard
    (b'{"sub":"a","loc":"*","aud":"orbited","exp":%d}' % EXP, False),
    (b'{"sub":"","aud":"orbited","exp":%d}' % EXP, False),  # an empty user
    (b'{"sub":"a","aud":["orbited"],"exp":%d}' % EXP, False),  # accepted, in Python
    (b'{"sub":"a","aud":"orbited","exp":%d.0}' % EXP, False),  # accepted, in Python
    (b'{"sub":"a","aud":"orbited","exp":%d,"nbf":0}' % EXP, False),  # accepted, in Python
    (b'{"sub":"\\u0061","aud":"orbited","exp":%d}' % EXP, False),  # an escape
    (b'{"sub":"a", "aud":"orbited","exp":%d}' % EXP, False),  # whitespace
    (b'{"sub":"a","sub":"a","aud":"orbited","exp":%d}' % EXP, False),  # a duplicate
    (b'{"sub":"a","aud":"orbited","exp":%d,}' % EXP, False),  # a trailing comma
    (b'{"sub":"a","aud":"orbited","exp":0%d}' % EXP, False),  # a leading zero
])  # fmt: skip
def test_the_common_claims_are_answered_and_the_rest_left_to_python(payload, answered):
    assert (agree(SECRET, signed(payload), NOW) is not None) is answered


_TOKEN_PIECES = ["", ".", "=", "==", "A", "-", "_", "+", "/", "é", " ", "\x00", "eyJ9"]


@needs_native
@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_tokens_are_answered_as_the_python_check_answers(data):
    key = ConnectionKey(data.draw(st.sampled_from(["u", "alice"])), "s", "/l")
    token = issue_token(SECRET, key, ttl=60, now=NOW)
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(token)))
        cut = data.draw(st.integers(0, 2))
        token = token[:at] + data.draw(st.sampled_from(_TOKEN_PIECES)) + token[at + cut :]
    agree(SECRET, token, NOW)


@needs_native
@pytest.mark.parametrize("token", [
    "", ".", "..", "a.b", "a.b.c", HEADER.decode() + ".e30." + "A" * 43,
    "x" * (tokens.MAX_TOKEN_CHARS + 1), "é.é.é",
])  # fmt: skip
def test_odd_tokens_are_left_to_the_python_check(token):
    assert native.Key(SECRET).claims(token, {HEADER}, NOW, 30.0) is None


@needs_native
def test_a_long_token_is_answered_up_to_the_limit():
    """MAX_TOKEN_CHARS holds for both checks: a longest-allowed token is answered."""
    base = f'{{"sub":"a","aud":"orbited","exp":{int(NOW)},"sid":"'
    sid = ""
    while len(signed((base + sid + 'x"}').encode())) <= tokens.MAX_TOKEN_CHARS:
        sid += "x"
    payload = (base + sid[:-1] + '"}').encode()
    # sid over MAX_PART_BYTES: the Python check refuses it, so the C check leaves it
    assert agree(SECRET, signed(payload), NOW) is None
    short = f'{{"sub":"a","aud":"orbited","exp":{int(NOW)}}}'.encode()
    assert agree(SECRET, signed(short), NOW) == ("a", "", "", NOW)


@needs_native
def test_verify_token_takes_the_native_answer(monkeypatch):
    """After a secret's first token verified in Python, its common tokens are checked in C
    (the Python claim checks are not called), with the same key and the same cache."""
    secret = b"n" * 33
    first = issue_token(secret, ConnectionKey("u0", "s", "l"))
    assert verify_token(secret, first, remember=False) == ConnectionKey("u0", "s", "l")
    assert secret in tokens._native_keyed

    def python_path(*args: object) -> None:
        raise AssertionError("the Python check ran")

    monkeypatch.setattr(tokens, "_check_claims", python_path)
    token = issue_token(secret, ConnectionKey("u1", "s", "l"))
    assert verify_token(secret, token) == ConnectionKey("u1", "s", "l")
    assert tokens.verified_expiry(secret, token) is not None  # remembered as before
    expired = issue_token(secret, ConnectionKey("u2", "s", "l"), now=time.time() - 7200)
    with pytest.raises(AssertionError):  # left to Python, which words the refusal
        verify_token(secret, expired)


def test_without_the_native_check_every_token_is_checked_in_python(monkeypatch):
    monkeypatch.setattr(tokens, "_native", None)
    secret = b"p" * 34
    for user in ("a", "b"):
        token = issue_token(secret, ConnectionKey(user, "", ""))
        assert verify_token(secret, token, remember=False) == ConnectionKey(user, "", "")
    assert secret not in tokens._native_keyed
    expired = issue_token(secret, ConnectionKey("c", "", ""), now=time.time() - 7200)
    with pytest.raises(TokenError) as refused:
        verify_token(secret, expired)
    assert refused.value.code == "token_expired"


# -- the version 2 route and the WebSocket accept key: the same as their Python twins ----

users = st.text(max_size=12) | st.text(st.characters(max_codepoint=0x7F), max_size=300)
route_counts = st.integers(1, 5000) | st.sampled_from([1, 2**31, 2**63 - 1])


@needs_native
@settings(max_examples=1000, deadline=None)
@given(users, route_counts)
@example("", 1)
@example("a" * 300, 2**63 - 1)
def test_the_native_route_is_the_python_route(user, routes):
    native_route = native.route_of_user(user, routes)
    python_route = hashing._route(hashing.user_bytes(user), routes)
    if user.isascii():
        assert native_route == python_route
    else:
        assert native_route is None  # the Python twin decides
    assert hashing.route_of_user(user, routes) == python_route
    assert hashing.route_of(ConnectionKey(user, "s", "l"), routes, 2) == python_route


@needs_native
@pytest.mark.parametrize("routes", [0, -1, 2**63, 2**70])
def test_routes_out_of_the_native_range_are_left_to_python(routes):
    assert native.route_of_user("alice", routes) is None
    if routes < 1:
        with pytest.raises(ValueError, match="routes must be at least 1"):
            hashing.route_of_user("alice", routes)
    else:
        assert hashing.route_of_user("alice", routes) == hashing._route(b"\0\0\0\x05alice", routes)


def test_route_vectors_hold_with_and_without_the_native_route(monkeypatch):
    """docs/hashing-vectors.json's version 2 vectors (any implementation must give them)."""
    vectors = json.loads((ROOT / "docs" / "hashing-vectors.json").read_text("utf-8"))
    for native_route in (hashing._native_user_route, None):
        monkeypatch.setattr(hashing, "_native_user_route", native_route)
        for case in vectors["v2"]["vectors"]:
            for routes, route in case["routes"].items():
                assert hashing.route_of_user(case["user"], int(routes)) == route, case
                for key in case["keys"]:
                    assert hashing.route_of(ConnectionKey(*key), int(routes), 2) == route


@needs_native
@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64))
@example(b"dGhlIHNhbXBsZSBub25jZQ==")
def test_the_native_accept_key_is_rfc_6455s(key):
    expected = base64.b64encode(hashlib.sha1(key + wsframe.GUID).digest())
    assert native.accept_key(key) == expected
    assert wsframe.accept_key(key) == expected
    if key == b"dGhlIHNhbXBsZSBub25jZQ==":  # RFC 6455, section 1.3
        assert expected == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


# -- the common GET head: read as llhttp (through HeadReader) reads it -------------------

_NAMES = [b"Host", b"host", b"Origin", b"Upgrade", b"Connection", b"connection",
          b"Sec-WebSocket-Key", b"Sec-WebSocket-Version", b"Last-Event-ID", b"Expect",
          b"X-Forwarded-Proto", b"Content-Length", b"Transfer-Encoding", b"Proxy-Connection",
          b"User-Agent", b"X-" + b"a" * 70, b"Bad Name", b"B\xe4d", b"",
          b"!#$%&'*+-.^_`|~"]  # fmt: skip
_VALUES = [b"h", b"127.0.0.1:8000", b"websocket", b"Upgrade", b"keep-alive, Upgrade",
           b"upgrade,keep-alive", b"close", b"Upgrade, close", b"keep-alive", b" spaced ",
           b"a\tb", b"13", b"0", b"chunked", b"", b"\xc3\xa9", b"a\x00b", b"a\rb", b"x" * 90,
           b"dGhlIHNhbXBsZSBub25jZQ==", b"http://h:1", b",", b"Upgrade,,"]  # fmt: skip
_TARGETS = [b"/orbited/ws?token=T", b"/orbited/poll?token=t&last=s:1", b"/orbited/sse",
            b"/orbited/ack", b"/orbited/ws", b"/orbited/health", b"/orbited/ws?a#b",
            b"http://h/orbited/ws", b"*", b"/orbited/ws?" + bytes(range(0x21, 0x7F)),
            b"/orbited/ws?" + bytes(range(0x21, 0x7F)).replace(b"#", b"")]  # fmt: skip
_JUNK = [b"\r\n", b"\n", b"\r", b" ", b"\t", b":", b"\x00", b"\x7f", b"\xff", b"GET ", b"#",
         b"HTTP/1.0", b"\r\n\r\n", b"\x81\x80abcd",
         b"GET /orbited/poll HTTP/1.1\r\n\r\n"]  # fmt: skip


def _read(data: bytes, fast: bool, small: int, max_headers: int) -> object:
    """HeadReader's outcome of ``data`` in one read, and what it left behind."""
    saved = httpfront._read_get_head
    httpfront._read_get_head = saved if fast else None
    try:
        reader = httpfront.HeadReader(small, max_headers)
        outcome = reader.feed(data)
    finally:
        httpfront._read_get_head = saved
    if isinstance(outcome, httpfront.Head):
        outcome = tuple(outcome)
    return outcome, reader.raw, reader.url, reader.state, reader.upgrade_at, reader.released


@needs_native
@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_heads_are_read_as_llhttp_reads_them(data):
    method = data.draw(st.sampled_from([b"GET", b"GET", b"GET", b"POST", b"get", b"HEAD"]))
    version = data.draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0"]))
    head = method + b" " + data.draw(st.sampled_from(_TARGETS)) + b" " + version + b"\r\n"
    for _ in range(data.draw(st.integers(0, 8))):
        name, value = data.draw(st.sampled_from(_NAMES)), data.draw(st.sampled_from(_VALUES))
        blank = data.draw(st.sampled_from([b" ", b"", b"  ", b"\t"]))
        head += name + b":" + blank + value + b"\r\n"
    head += b"\r\n" + data.draw(st.sampled_from([b"", b"", b"\x81\x80abcd", b"GET / HTTP/1.1"]))
    for _ in range(data.draw(st.integers(0, 2))):  # a few bytes anywhere
        at = data.draw(st.integers(0, len(head)))
        head = head[:at] + data.draw(st.sampled_from(_JUNK)) + head[at:]
    small = data.draw(st.sampled_from([16384, 120]))
    max_headers = data.draw(st.sampled_from([100, 3]))
    assert _read(head, True, small, max_headers) == _read(head, False, small, max_headers)


@needs_native
@pytest.mark.parametrize("head", [
    b"GET /orbited/ws?token=T HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n\x81\x80abcd",
    b"GET /orbited/poll?token=t HTTP/1.1\r\nHost: h:1\r\nOrigin: http://h:1\r\n"
    b"User-Agent: Mozilla/5.0 (X11)\r\nConnection: keep-alive\r\n\r\n",
    b"GET /orbited/sse?token=t HTTP/1.1\r\nHost: h\r\nLast-Event-ID: s:1\r\n\r\n",
    # Chromium's and Firefox's upgrades, as they send them
    b"GET /orbited/ws?token=eyJ.eyJ.sig&last=n1.1f:3 HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n"
    b"Connection: Upgrade\r\nPragma: no-cache\r\nCache-Control: no-cache\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    b"Chrome/156.0.0.0 Safari/537.36\r\nUpgrade: websocket\r\n"
    b"Origin: http://127.0.0.1:8080\r\nSec-WebSocket-Version: 13\r\n"
    b"Accept-Encoding: gzip, deflate, br, zstd\r\nAccept-Language: en-US,en;q=0.9\r\n"
    b"Cookie: session=abc; theme=dark\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n",
    b"GET /orbited/ws?token=t HTTP/1.1\r\nHost: h:8000\r\nUser-Agent: Mozilla/5.0 (X11; "
    b"Linux x86_64; rv:140.0) Gecko/20100101 Firefox/140.0\r\nAccept: */*\r\n"
    b"Sec-WebSocket-Version: 13\r\nOrigin: http://h:8000\r\nSec-WebSocket-Extensions: "
    b"permessage-deflate\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Connection: keep-alive, Upgrade\r\nSec-Fetch-Dest: empty\r\nSec-Fetch-Mode: "
    b"websocket\r\nPragma: no-cache\r\nUpgrade: websocket\r\n\r\n",
])  # fmt: skip
def test_browsers_heads_are_read_in_c(head):
    """The heads browsers send are the C reader's (else it would save nothing)."""
    assert native.read_get_head(head, httpfront.WANTED, 100, 16384) is not None
    assert _read(head, True, 16384, 100) == _read(head, False, 16384, 100)


# -- the common event request: read as parse_request reads it -----------------------------

LIMITS = events.RequestLimits()
plain = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=6)
json_data = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([0.0, -0.0, 1e16, 1e22, 1e-7, 1e-5, 0.1, 1.5e300, 5e-324, 2**53 + 1.0])
    | plain | st.text(max_size=6)
    | st.sampled_from(["\x7f", "\u2028", "é", "\U0001f600", "a\"b", "\x1f"]),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(plain | st.text(max_size=3), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip
parts = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=4) | (
    st.sampled_from(["*", "", "é", "x" * 64, "x" * 65, "a\\b", 'a"b', "\x1f"])
)
_EVENT_PIECES = [b" ", b"\n", b"\t", b"\r", b",", b":", b"{", b"}", b"[", b"]", b'"', b"\\",
                 b"0", b"-", b".", b"e", b"1", b'"id":"x"', b'"hash":2', b"\xc3", b"\xed\xa0\x80",
                 b"\x00", b"NaN", b"1e400", b"12345678901234567890"]  # fmt: skip


def _parsed(body: bytes, fast: bool) -> object:
    return parsed_request(body, fast, LIMITS)


@needs_native
@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_event_requests_are_read_as_the_strict_parser_reads_them(data):
    def often(common: Any, rare: Any) -> Any:  # the common request most of the time
        return data.draw(common if data.draw(st.integers(0, 3)) else rare)

    doc: dict[str, object] = {
        "id": often(plain.filter(bool), st.text(max_size=5) | st.sampled_from(["x" * 129])),
        "to": often(st.tuples(plain.filter(bool), plain, plain).map(lambda key: [list(key)]),
                    st.lists(st.lists(parts, min_size=2, max_size=4), max_size=2)),
        "data": data.draw(json_data),
    }  # fmt: skip
    if not data.draw(st.integers(0, 2)):
        doc["hash"] = data.draw(st.sampled_from([1, 2, 0, -1, True, 2.0, 10**20, "2"]))
    if not data.draw(st.integers(0, 5)):
        doc[data.draw(st.sampled_from(["ack", "latest", "offline", "traceparent", "x"]))] = 1
    if data.draw(st.booleans()):
        doc = dict(reversed(list(doc.items())))
    style = data.draw(st.sampled_from([{}, {"separators": (",", ":")}, {"indent": 1},
                                       {"ensure_ascii": False}]))  # fmt: skip
    body = json.dumps(doc, **style).encode("utf-8", "surrogatepass")
    for _ in range(data.draw(st.sampled_from([0, 0, 0, 1, 2]))):
        at = data.draw(st.integers(0, len(body)))
        body = body[:at] + data.draw(st.sampled_from(_EVENT_PIECES)) + body[at:]
    answer = native.parse_event(body, LIMITS.max_payload, LIMITS.max_recipients)
    strict = _parsed(body, False)
    if answer is not None:
        assert type(strict) is events.EventRequest, (body, strict)
        assert _parsed(body, True) == strict
    else:
        assert _parsed(body, True) == strict


@needs_native
@pytest.mark.parametrize("body", [
    b'{"id": "p1-5", "to": [["c17", "b", "/bench"]], "data": {"t": 1796648159.6544864, '
    b'"ph": "m", "n": 5}}',  # json.dumps's default blanks: the bench's publisher
    b'{"id":"chat-42","to":[["alice","s1","/chat"]],"data":{"text":"h\xc3\xa9","n":[1,2.5,null]},'
    b'"hash":2}',  # orbited.client's form
    b'{"hash":2,"data":"x","to":[["u","",""]],"id":"e"}',
])  # fmt: skip
def test_common_event_requests_are_read_in_c(body):
    assert native.parse_event(body, LIMITS.max_payload, LIMITS.max_recipients) is not None
    assert _parsed(body, True) == _parsed(body, False)


@needs_native
def test_the_limits_of_an_event_request_hold_in_c():
    body = b'{"id":"e","to":[["u","s","l"]],"data":"%s"}' % (b"x" * 100)
    assert native.parse_event(body, 102, 1) is not None  # the payload: 102 bytes
    assert native.parse_event(body, 101, 1) is None  # over max_payload: Python refuses it
    assert native.parse_event(body, 102, 0) is None
    small = events.RequestLimits(max_payload=101)
    with pytest.raises(events.RequestError, match="payload_too_large|101"):
        events.parse_request(body, small)


def _float_texts(rng: random.Random, n: int) -> Iterator[str]:
    """Numbers with a fraction in the shapes web apps write them: time stamps with 6
    decimals, fixed decimals of any magnitude, repr and %.14g to %.17g of random doubles,
    random digit strings, and a repr's neighbours one unit either side in its last digit
    (where the shortest digits and the nearest ones part)."""
    digits = "0123456789"
    for _ in range(n):
        k = rng.randrange(7)
        scale = 10.0 ** rng.randrange(-6, 18)
        if k == 0:
            yield "%.6f" % (1.7e9 + rng.random() * 1e8)
        elif k == 1:
            yield f"{rng.uniform(-1, 1) * scale:.{rng.randrange(1, 20)}f}"
        elif k == 2:
            yield repr(struct.unpack("d", struct.pack("Q", rng.getrandbits(64)))[0])
        elif k == 3:
            yield f"{rng.uniform(-1, 1) * scale:.{rng.randrange(14, 18)}g}"
        elif k == 4:
            whole = "".join(rng.choice(digits) for _ in range(rng.randrange(1, 18)))
            fraction = "".join(rng.choice(digits) for _ in range(rng.randrange(1, 24)))
            yield rng.choice(["", "-"]) + (whole.lstrip("0") or "0") + "." + fraction
        elif k == 5:
            yield repr(rng.random() * scale)
        else:
            text = repr(rng.random() * 10.0 ** rng.randrange(0, 16))
            if "e" in text:
                continue
            dot = text.index(".")
            moved = str(int(text.replace(".", "")) + rng.choice((-1, 1)))
            moved = moved.rjust(len(text) - 1, "0")
            yield moved[:dot] + "." + moved[dot:]


def _float_answered(text: str) -> bool:
    body = b'{"id":"e","to":[["u","s","l"]],"data":%s}' % text.encode()
    return native.parse_event(body, LIMITS.max_payload, LIMITS.max_recipients) is not None


@needs_native
@pytest.mark.parametrize("seed", range(4))
def test_floats_are_read_in_c_exactly_where_repr_writes_them_so(seed):
    """A float's text is kept as it is written only where Python's repr writes that float
    so (what the node writes otherwise); most are decided without formatting it back
    (_speedups.c, decimal_is_repr), and each decision is compared with repr here."""
    rng = random.Random(seed)
    checked = kept = 0
    for text in _float_texts(rng, 50_000):
        if "." not in text and "e" not in text:
            continue  # an integer
        want = repr(float(text)) == text
        assert _float_answered(text) == want, (text, repr(float(text)))
        checked += 1
        kept += want
    assert kept > checked // 2 and checked - kept > checked // 10  # both answers, often


@needs_native
@pytest.mark.parametrize(("text", "kept"), [
    ("1796657864.569144", True),  # a time stamp: 16 digits, decided without formatting
    ("1796657864.56914", True), ("0.1234567890123456", True), ("999999999999999.9", True),
    ("0.1", True), ("0.0001", True), ("0.00012", True), ("-0.5", True), ("2.675", True),
    ("0.0", True), ("9999999999999998.0", True),  # integer-valued: formatted back
    ("4503599627370495.5", True), ("4503599627370496.5", False),  # 2**52: repr ...496.0
    ("1234567890123456.5", True),  # 17 digits, past 2**53: formatted back
    ("0.30000000000000004", True), ("0.30000000000000001", False),  # repr: 0.3
    ("1.0000000000000002", True), ("1.0000000000000001", False),  # repr: 1.0
    ("0.1000000000000000055511151231257827", False),  # repr: 0.1
    ("9007199254740.993", False),  # a neighbour reads as the same double: repr ...992
    ("0.00001", False), ("1e-05", True), ("1e16", False), ("1e+16", True),
    ("123456789012345678.5", False), ("5e-324", True), ("1.7976931348623157e+308", True),
])  # fmt: skip
def test_the_edges_of_the_float_check(text, kept):
    assert (repr(float(text)) == text) is kept
    assert _float_answered(text) is kept


@needs_native
@pytest.mark.parametrize("data", [
    b"1.50", b"1e5", b"1E5", b"0.10", b"1e-7", b"100000000000000000.0", b"-0", b"1e400",
    b"1234567890123456789", b'{"a":1,"a":2}', b'[{"b":{"c":0,"c":0}}]', b'"\\u00e9"',
    b'"a\\nb"', b'"\x1f"', b'"\xed\xa0\x80"', b"[" * 70 + b"]" * 70, b"NaN", b"tru",
])  # fmt: skip
def test_data_the_node_would_write_otherwise_is_left_to_python(data):
    """Data whose JSON the node keeps in another form (a number's other spelling, a name
    twice, an escape) or refuses: read in Python, which writes or refuses it."""
    body = b'{"id":"e","to":[["u","s","l"]],"data":%s}' % data
    assert native.parse_event(body, LIMITS.max_payload, LIMITS.max_recipients) is None
    assert _parsed(body, True) == _parsed(body, False)
