"""The hand-written HS256 check (orbited.core.tokens) decides every token as PyJWT does:
PyJWT's PyJWS.decode_complete is the oracle, on random and mutated tokens, for the same
accept/refuse decision, error code and message (and the same payload when accepted)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import jwt
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from packaging.version import Version

from orbited.core import tokens
from orbited.core.keys import ConnectionKey
from orbited.core.tokens import TokenError

# The oracle is PyJWT 2.15's segment decoding (strict base64url, canonical, at most two
# '='); earlier versions, still allowed by setup.cfg, read segments more loosely.
pytestmark = pytest.mark.skipif(
    Version(jwt.__version__) < Version("2.15"), reason="PyJWT >= 2.15 is the oracle"
)

SECRET = b"s" * 32
OTHER = b"t" * 40
_JWS = jwt.PyJWS()


def oracle(secret: bytes, token: str) -> object:
    """What the node did before the hand check: PyJWT, errors mapped to our codes."""
    try:
        return _JWS.decode_complete(token, secret, algorithms=["HS256"])["payload"]
    except jwt.InvalidSignatureError:
        return ("token_invalid", "token signature does not verify")
    except jwt.DecodeError:
        return ("token_malformed", "token is not a valid JWT")
    except jwt.InvalidAlgorithmError:
        return ("token_invalid", "token rejected: only HS256 is accepted")
    except jwt.InvalidTokenError:
        return ("token_malformed", "token header is not valid")


def hand(secret: bytes, token: str) -> object:
    try:
        return tokens._hs256_payload(secret, token.encode("ascii"))
    except TokenError as e:
        return (e.code, e.message)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed(header: object, payload: bytes, secret: bytes = SECRET) -> str:
    head = b64(json.dumps(header).encode())
    body = b64(payload)
    signing_input = f"{head}.{body}".encode()
    sig = hmac.new(secret, signing_input, hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


VALID = tokens.issue_token(SECRET, ConnectionKey("u", "s", "/l"), ttl=60, now=1_700_000_000)

json_scalars = st.none() | st.booleans() | st.integers(-3, 3) | st.text(max_size=6)
headers = st.dictionaries(
    st.sampled_from(["alg", "typ", "kid", "crit", "b64", "x"]),
    st.sampled_from(["HS256", "HS384", "none", "RS256", "", "b64", "kid"])
    | json_scalars
    | st.lists(st.sampled_from(["b64", "kid", "x"]) | json_scalars, max_size=3),
    max_size=5,
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(headers, st.binary(max_size=40), st.sampled_from([SECRET, OTHER]))
@example({"alg": "HS256", "crit": ["b64"], "b64": True}, b"{}", SECRET)
@example({"alg": "HS256", "crit": ["b64"], "b64": False}, b"{}", SECRET)
@example({"alg": "HS256", "b64": False}, b"", SECRET)
@example({"alg": "HS256", "kid": 1}, b"{}", SECRET)
@example({"typ": "JWT"}, b"{}", SECRET)
def test_signed_tokens_with_any_header_are_decided_as_pyjwt_does(header, payload, secret):
    token = signed(header, payload)
    assert hand(secret, token) == oracle(secret, token)


ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=.!+/ "


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
@example(None)
def test_mutated_tokens_are_decided_as_pyjwt_does(data):
    token = VALID
    if data is not None:
        for _ in range(data.draw(st.integers(1, 4))):
            at = data.draw(st.integers(0, len(token)))
            cut = data.draw(st.integers(0, 3))
            insert = data.draw(st.text(ALPHABET, max_size=3))
            token = token[:at] + insert + token[at + cut :]
    assert hand(SECRET, token) == oracle(SECRET, token)


@settings(max_examples=300, deadline=None)
@given(st.text(ALPHABET, max_size=60))
@example("a.b")
@example("..")
@example("e30.e30.")
@example("e30=.e30.e30")
@example("e30===.e30.e30")
def test_random_strings_are_decided_as_pyjwt_does(token):
    assert hand(SECRET, token) == oracle(SECRET, token)


def test_verify_token_uses_the_hand_check():
    assert tokens._verified_claims(SECRET, VALID)["sub"] == "u"
    with pytest.raises(TokenError) as refused:
        tokens._verified_claims(OTHER, VALID)
    assert refused.value.code == "token_invalid"


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_a_known_header_decides_the_rest_of_the_token_as_pyjwt_does(data):
    # Once a header verified, later tokens with it skip its JSON: what follows (payload,
    # signature, their segments) must still be decided exactly as PyJWT decides it.
    tokens._known_headers.clear()
    assert isinstance(hand(SECRET, VALID), bytes)
    head, body, sig = VALID.split(".")
    assert head.encode() in tokens._known_headers
    body = data.draw(st.sampled_from([body, b64(b"{}"), b64(b'{"sub":1}'), ""]))
    sig = data.draw(st.sampled_from([sig, b64(b"x" * 32), ""]))
    token = f"{head}.{body}.{sig}"
    for _ in range(data.draw(st.integers(0, 2))):
        at = data.draw(st.integers(len(head) + 1, len(token)))
        token = token[:at] + data.draw(st.text(ALPHABET, max_size=2)) + token[at + 1 :]
    assert hand(SECRET, token) == oracle(SECRET, token)
    if data.draw(st.booleans()):  # signed right: accepted with the known header too
        signing_input = token.rpartition(".")[0].encode()
        good = hmac.new(SECRET, signing_input, hashlib.sha256).digest()
        token = f"{signing_input.decode()}.{b64(good)}"
        assert hand(SECRET, token) == oracle(SECRET, token)


def test_only_headers_of_verified_tokens_are_remembered_and_at_most_16():
    tokens._known_headers.clear()
    forged = signed({"alg": "HS256", "typ": "JWT", "x": 1}, b"{}", OTHER)
    assert hand(SECRET, forged) == ("token_invalid", "token signature does not verify")
    assert tokens._known_headers == set()
    for n in range(tokens.MAX_KNOWN_HEADERS + 5):
        assert hand(SECRET, signed({"alg": "HS256", "n": n}, b"{}")) == b"{}"
    assert len(tokens._known_headers) == tokens.MAX_KNOWN_HEADERS
    late = signed({"alg": "HS256", "n": 99}, b"{}")
    assert hand(SECRET, late) == oracle(SECRET, late)  # decided in full, as before


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=8), st.sampled_from(["sub", "x", "sid"]))
@example("\ud800", "sub")
@example("\udfff\ud800", "x")
def test_claims_with_escapes_are_refused_exactly_when_not_strict_utf8(text, name):
    # A lone surrogate can only come from a \u escape; without one the re-encode is skipped.
    payload = json.dumps({name: text}).encode()  # ensure_ascii: every non-ASCII is \u
    strict = True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        strict = False
    if strict:
        assert tokens._parse_claims(payload) == {name: text}
    else:
        with pytest.raises(TokenError) as refused:
            tokens._parse_claims(payload)
        assert refused.value.code == "token_malformed"


# -- the claims: orjson's fast path decides as the strict decoder does -------------------

_PIECES = [b'{', b'}', b'[', b']', b',', b':', b'"', b'"sub"', b'"aud"', b'"exp"', b'"a"',
           b'"orbited"', b'1', b'-0', b'0.5', b'1e400', b'1e-400', b'12345678901234567890123',
           b'9007199254740993', b'true', b'null', b'NaN', b'Infinity', b' ', b'\t', b'\\',
           b'\\u00e9', b'\\ud800', b'\xc3\xa9', b'\xff', b'\xef\xbb\xbf', b'":', b'{}',
           b'"x":{"y":1,"y":2}', b'"sub":"b"']  # fmt: skip


def _strict_parse(payload: bytes) -> object:
    saved = tokens._orjson
    tokens._orjson = None
    try:
        return repr(tokens._parse_claims(payload))
    except TokenError as e:
        return (e.code, e.message)
    finally:
        tokens._orjson = saved


def _fast_parse(payload: bytes) -> object:
    try:
        return repr(tokens._parse_claims(payload))
    except TokenError as e:
        return (e.code, e.message)


claim_docs = st.dictionaries(
    st.sampled_from(["sub", "sid", "loc", "aud", "exp", "iat", "x"]),
    json_scalars | st.floats(allow_nan=False) | st.integers()
    | st.lists(json_scalars, max_size=3) | st.dictionaries(st.text(max_size=2), json_scalars),
    max_size=6,
)  # fmt: skip


@settings(max_examples=1500, deadline=None)
@given(claim_docs, st.data())
@example({"sub": "a", "aud": "orbited", "exp": 1}, None)
def test_claims_read_by_orjson_are_read_as_the_strict_decoder_reads_them(doc, data):
    text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False)
    payload = text.encode("utf-8", "surrogatepass")
    if data is not None:  # mutate: duplicate names, nesting, whitespace, escapes, junk
        for _ in range(data.draw(st.integers(0, 3))):
            at = data.draw(st.integers(0, len(payload)))
            piece = data.draw(st.sampled_from(_PIECES))
            payload = payload[:at] + piece + payload[at:]
    assert _fast_parse(payload) == _strict_parse(payload)


@pytest.mark.parametrize("payload", [
    b'{"sub":"a","sub":"b","aud":"orbited","exp":1}',  # a duplicate name
    b'{"sub":"a","aud":"orbited","exp":1,"x":{"y":1,"y":2}}',  # one in a nested object
    b'{"sub":"a","aud":"orbited","exp":1,"x":[{"y":1,"y":2}]}',  # in an array
    b'{"sub":"a" ,"sub":"b","aud":"orbited","exp":1}',  # whitespace before a colon
    b'{"sub":"a","aud":"orbited","exp":1e400}',  # infinite: orjson refuses, json reads inf
    b'{"sub":"a","aud":"orbited","exp":123456789012345678901234567890}',  # past 64 bits
    b'\xef\xbb\xbf{"sub":"a","aud":"orbited","exp":1}',  # a BOM
])  # fmt: skip
def test_what_orjson_reads_otherwise_is_decided_by_the_strict_decoder(payload):
    assert _fast_parse(payload) == _strict_parse(payload)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=80), min_size=1, max_size=12), st.binary())
def test_the_keyed_hmac_is_hmac_sha256_for_every_secret_and_keeps_a_few(secrets, data):
    """_hs256 (the keyed state copied per token) gives hmac.digest's HMAC-SHA256, for
    more secrets than it keeps keyed (MAX_KEYED), and keeps no more than that."""
    for secret in secrets:
        assert tokens._hs256(secret, data) == hmac.digest(secret, data, "sha256")
        assert tokens._hs256(secret, data) == hmac.digest(secret, data, "sha256")  # kept one
    assert len(tokens._keyed) <= tokens.MAX_KEYED


@pytest.mark.parametrize(
    "change",
    [
        lambda sig: sig,  # the canonical signature: accepted by its encoded form
        lambda sig: sig + "=",  # padded: PyJWS decides (a length not a multiple of 4)
        lambda sig: sig[:-1] + ("B" if sig[-1] == "A" else "A"),  # stray bits or wrong
        lambda sig: sig.replace("-", "+").replace("_", "/"),  # the standard alphabet
        lambda sig: sig + "A",
        lambda sig: sig[:-1],
        lambda sig: "",
    ],
)
@pytest.mark.parametrize("body", [None, "e30", "e30=", "e3", "!!!"])
def test_a_known_headers_signature_compared_encoded_is_decided_as_pyjwt_does(change, body):
    """With a known header the signature is compared in its encoded form first (the
    MAC's canonical base64url); every other spelling of it, and a payload segment
    PyJWS refuses, are still decided as PyJWS decides them."""
    tokens._known_headers.clear()
    assert isinstance(hand(SECRET, VALID), bytes)  # its header is known now
    head, payload, _ = VALID.split(".")
    payload = payload if body is None else body
    good = hmac.new(SECRET, f"{head}.{payload}".encode(), hashlib.sha256).digest()
    token = f"{head}.{payload}.{change(b64(good))}"
    assert hand(SECRET, token) == oracle(SECRET, token)
