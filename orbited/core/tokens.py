"""Browser tokens: JWT HS256 signed by the web app with the secret it shares with nodes.

Claims (docs/protocol.md, "Tokens"): ``sub`` user, ``sid`` session, ``loc`` location,
``aud`` "orbited", ``iat`` and a required ``exp``. Verification returns the ConnectionKey
the token proves, or raises TokenError with a stable code.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import importlib
import json
import os
import secrets
import stat
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from orbited.core import speedups
from orbited.core.keys import MAX_PART_BYTES, WILDCARD, ConnectionKey

AUDIENCE = "orbited"
ALGORITHM = "HS256"
MIN_SECRET_BYTES = 32
DEFAULT_TTL = 3600


class TokenError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def issue_token(
    secret: bytes, key: ConnectionKey, ttl: float = DEFAULT_TTL, now: float | None = None
) -> str:
    """The token a web app hands to the browser for connection ``key``. ValueError if a
    part of ``key`` is ``"*"``: reserved as the wildcard of event requests."""
    check_secret(secret)
    reserved = _wildcard_claim(key)
    if reserved is not None:
        raise ValueError(f'{reserved} must not be "{WILDCARD}"')
    issued = int(time.time() if now is None else now)
    claims = {
        "sub": key.user,
        "sid": key.session,
        "loc": key.location,
        "aud": AUDIENCE,
        "iat": issued,
        "exp": issued + int(ttl),
    }
    # PyJWT (with cryptography, ~0.1 s of CPU to import) only where tokens are issued:
    # HaloD and the node import this module for load_secret and the hand-written check.
    import jwt

    return jwt.encode(claims, secret, algorithm=ALGORITHM)


# Verified tokens: a long-poll browser presents the same token on every poll, and the
# JWT decode and HMAC were two thirds of a poll's cost. Only successful verifications are
# kept, keyed by secret and token; expiry, the one check that can change with time, is
# checked again on every hit. An entry not used for VERIFIED_IDLE seconds is dropped (a
# poll comes back well within that), so the cache holds the tokens in use, not every
# page's token of the last hours: at ≈ 800 bytes an entry, a full cache of stale tokens
# was the one thing growing in the 3 000-browser soak. Least recently used go first.
VERIFIED_CACHE_SIZE = 32_768
VERIFIED_IDLE = 120.0
_verified: OrderedDict[tuple[bytes, str], tuple[ConnectionKey, float, float]] = OrderedDict()
_monotonic = time.monotonic  # a module attribute, so tests can move it


def verified_before(secret: bytes, token: str) -> bool:
    """Whether ``token`` verified under ``secret`` recently (a lookup, no crypto; its
    expiry is not checked here: ``verify_token`` does that on use)."""
    return (secret, token) in _verified


def verified_expiry(secret: bytes, token: str) -> float | None:
    """The expiry (``exp``, seconds since the epoch) of ``token`` if it verified under
    ``secret`` recently (a lookup, no crypto), else None."""
    hit = _verified.get((secret, token))
    return None if hit is None else hit[1]


def check_expiry(exp: float, leeway: float = 30.0, now: float | None = None) -> None:
    """TokenError ``token_expired`` when a token expiring at ``exp`` has expired (the
    check ``verify_token`` makes of a token it verified before)."""
    if exp + leeway < (time.time() if now is None else now):
        raise TokenError("token_expired", "token has expired")


def verify_token(
    secret: bytes, token: str, leeway: float = 30.0, now: float | None = None,
    remember: bool = True,
) -> ConnectionKey:  # fmt: skip
    """The key ``token`` proves, or TokenError. ``now`` (seconds since the epoch) is the
    wall clock unless given; either way the same checks run (docs/protocol.md, "Tokens").
    ``remember`` False: a token not verified before is not kept (a WebSocket presents
    its token once; only tokens presented again, by polls and acks, are worth an entry)."""
    if now is None:
        now = time.time()
    used = _monotonic()
    entry = (secret, token)
    hit = _verified.get(entry)
    if hit is not None:
        key, exp, _ = hit
        check_expiry(exp, leeway, now)
        _verified[entry] = (key, exp, used)
        _verified.move_to_end(entry)
        return key
    native = _native_keyed.get(secret) if _native is not None else None
    common = None if native is None else native.claims(token, _known_headers, now, leeway)
    if common is not None:  # the C check's answer: the one the checks below would give
        key, exp = ConnectionKey(common[0], common[1], common[2]), common[3]
    else:
        key, exp = _check_claims(_verified_claims(secret, token), leeway, now)
        if native is None and _native is not None and len(_native_keyed) < MAX_KEYED:
            _native_keyed[secret] = _native.Key(secret)
    if not remember:
        return key
    # Only a token that passed every check is kept: exp is a finite float here.
    _verified[entry] = (key, exp, used)
    # Oldest use first: drop the idle ones, then any beyond the size.
    while _verified and (
        len(_verified) > VERIFIED_CACHE_SIZE
        or next(iter(_verified.values()))[2] < used - VERIFIED_IDLE
    ):
        _verified.popitem(last=False)
    return key


MAX_TOKEN_CHARS = 4096
# NumericDate claims (exp, iat, nbf): JSON numbers from 0 to 2^53 - 1, the integers every
# JSON parser (JavaScript's included) reads exactly; a float beyond cannot be compared
# with the clock without overflow (10**400 + 30.0 raises).
MAX_NUMERIC_DATE = 2**53 - 1


def _verified_claims(secret: bytes, token: str) -> dict[str, object]:
    """The claims of a token whose signature verifies: structure and signature only."""
    if not token:
        raise TokenError("token_missing", "no token given")
    if len(token) > MAX_TOKEN_CHARS:
        raise TokenError("token_malformed", f"token longer than {MAX_TOKEN_CHARS} characters")
    if not token.isascii():  # a JWT is base64url and dots; PyJWT would fail to encode it
        raise TokenError("token_malformed", "token is not a valid JWT: not ASCII")
    return _parse_claims(_hs256_payload(secret, token.encode("ascii")))


# The JWS check by hand, HS256 only (4-5x faster than PyJWT's decode_complete, a fifth of
# a WebSocket accept's token cost). It decides as PyJWT 2.15's PyJWS.decode_complete(token,
# secret, algorithms=["HS256"]) does, step for step, with the same error code and message
# for each refusal (tests/core/test_tokens_hand.py checks it against PyJWT as the oracle,
# on random and mutated tokens); PyJWT still issues tokens (issue_token).
_MALFORMED = "token is not a valid JWT"
_BAD_HEADER = "token header is not valid"
_NOT_BASE64URL = bytes(range(256)).translate(
    None, b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
)  # the bytes a base64url segment must not hold


_TO_STANDARD = bytes.maketrans(b"-_", b"+/")
# Each base64url character's 6-bit value. A canonical encoding leaves the bits of the
# last character that carry no data zero: the low 4 bits when a group ends after 2
# characters, the low 2 after 3.
_B64_VALUE = {c: i for i, c in enumerate(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")}  # fmt: skip
_STRAY_BITS = (0, 0, 0x0F, 0x03)  # by length % 4


def _segment(segment: bytes) -> bytes:
    """One base64url segment, as PyJWS._decode_base64url_segment reads it: up to two
    '=' of padding (then a length multiple of 4), only the base64url alphabet, and the
    canonical encoding of what it decodes to (no stray bits in the last character)."""
    stripped = segment.rstrip(b"=")
    size = len(stripped)
    padding = len(segment) - size
    if (
        padding > 2
        or (padding and len(segment) % 4)
        or size % 4 == 1
        or len(stripped.translate(None, _NOT_BASE64URL)) != size
        or (size and _B64_VALUE[stripped[-1]] & _STRAY_BITS[size % 4])
    ):
        raise TokenError("token_malformed", _MALFORMED)
    return binascii.a2b_base64(stripped.translate(_TO_STANDARD) + b"=" * (-size % 4))


# Header segments that passed every header check in a token whose signature verified: a
# web app signs every token with the same header, so its JSON is read once. At most
# MAX_KNOWN_HEADERS (the first ones seen; only a holder of the secret can add one).
MAX_KNOWN_HEADERS = 16
_known_headers: set[bytes] = set()


# HMAC-SHA256 keyed once per secret (RFC 2104: SHA-256 of the key xor opad, then of
# the digest of the key xor ipad and the message): the two SHA-256 states after the key
# blocks are kept, and each token copies them (hashlib's public copy) instead of
# hmac.digest's key set-up (0.7 against 2.2 us in one process; hmac.HMAC's own copy,
# through its Python-level methods, 1.2). At most MAX_KEYED secrets are kept (a node
# has one, two while it rotates).
MAX_KEYED = 8
_keyed: dict[bytes, tuple[Any, Any]] = {}
_BLOCK = 64  # SHA-256's block size
_IPAD = bytes(b ^ 0x36 for b in range(256))
_OPAD = bytes(b ^ 0x5C for b in range(256))


def _hs256(secret: bytes, data: bytes) -> bytes:
    """HMAC-SHA256 of ``data`` under ``secret`` (what ``hmac.digest(secret, data,
    "sha256")`` gives)."""
    keyed = _keyed.get(secret)
    if keyed is None:
        key = hashlib.sha256(secret).digest() if len(secret) > _BLOCK else secret
        key = key.ljust(_BLOCK, b"\0")
        keyed = (hashlib.sha256(key.translate(_IPAD)), hashlib.sha256(key.translate(_OPAD)))
        if len(_keyed) < MAX_KEYED:
            _keyed[secret] = keyed
    inner = keyed[0].copy()
    inner.update(data)
    outer = keyed[1].copy()
    outer.update(inner.digest())
    return outer.digest()


_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")


def _hs256_payload(secret: bytes, token: bytes) -> bytes:
    """The payload bytes of a JWS in compact form signed with HS256 under ``secret``."""
    signing_input, _, crypto_segment = token.rpartition(b".")
    header_segment, dot, payload_segment = signing_input.partition(b".")
    if not dot:
        raise TokenError("token_malformed", _MALFORMED)  # fewer than three segments
    mac = _hs256(secret, signing_input)
    if header_segment in _known_headers:  # every check below on the header passes
        # The common token: its signature is the MAC's canonical encoding (then the
        # signature segment decodes, as PyJWS requires, to exactly the MAC), compared
        # in constant time; the payload segment is still checked as PyJWS reads it.
        # Anything else is decided below, step for step.
        encoded = binascii.b2a_base64(mac, newline=False).translate(_TO_URLSAFE).rstrip(b"=")
        if hmac.compare_digest(encoded, crypto_segment):
            return _segment(payload_segment)
        payload = _segment(payload_segment)
        signature = _segment(crypto_segment)
    else:
        payload, signature = _checked_header(header_segment, payload_segment, crypto_segment)
    if not hmac.compare_digest(mac, signature):
        raise TokenError("token_invalid", "token signature does not verify")
    if header_segment not in _known_headers and len(_known_headers) < MAX_KNOWN_HEADERS:
        _known_headers.add(header_segment)
    return payload


def _checked_header(
    header_segment: bytes, payload_segment: bytes, crypto_segment: bytes
) -> tuple[bytes, bytes]:
    """The header's checks, in PyJWS's order (the segments are decoded in between):
    the decoded payload and signature if it is an HS256 header we accept."""
    try:
        header = json.loads(_segment(header_segment))
    except (ValueError, RecursionError):
        raise TokenError("token_malformed", _MALFORMED) from None
    if not isinstance(header, dict):
        raise TokenError("token_malformed", _MALFORMED)
    unencoded = header.get("b64", True) is False  # RFC 7797: not supported
    if unencoded and payload_segment:
        raise TokenError("token_malformed", _MALFORMED)
    payload = b"" if unencoded else _segment(payload_segment)
    signature = _segment(crypto_segment)
    if "kid" in header and not isinstance(header["kid"], str):
        raise TokenError("token_malformed", _BAD_HEADER)
    if "crit" in header:
        crit = header["crit"]
        if (
            not isinstance(crit, list)
            or not crit
            or any(not isinstance(ext, str) or ext != "b64" or ext not in header for ext in crit)
        ):
            raise TokenError("token_malformed", _BAD_HEADER)
    if unencoded:
        crit = header.get("crit") or []
        if not isinstance(crit, list) or "b64" not in crit:
            raise TokenError("token_malformed", _BAD_HEADER)
        raise TokenError("token_malformed", _MALFORMED)  # no detached payload here
    alg = header.get("alg")
    if "alg" not in header or not alg or alg != ALGORITHM:
        raise TokenError("token_invalid", f"token rejected: only {ALGORITHM} is accepted")
    return payload, signature


# The common token's check in C (orbited/core/_speedups.c, built by setup.py where a compiler
# and OpenSSL's headers are found): ten times faster than the checks in this module. It
# answers only where these checks would accept, with their answer, and leaves every other
# token (and every refusal) to them: a header it has not seen verify (_known_headers), a
# signature or payload that is not the canonical encoding, claims other than issue_token's
# or any check failing. tests/core/test_speedups.py compares the two. Keyed once per
# secret, at a secret's first verification in Python; at most MAX_KEYED secrets.
_native: Any = speedups.native  # None: not built, every token is checked in Python
_native_keyed: dict[bytes, Any] = {}


def _no_constants(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    doc = dict(pairs)
    if len(doc) != len(pairs):  # RFC 7519 section 4: reject, or take the last; we reject
        raise ValueError("duplicate member name")
    return doc


_CLAIMS_DECODER = json.JSONDecoder(parse_constant=_no_constants, object_pairs_hook=_no_duplicates)
_STRICT_ENCODER = json.JSONEncoder(ensure_ascii=False, check_circular=False)


# orjson (a dependency of the node; optional here: without it only speed is lost) reads
# a web app's compact claims 5x faster than the strict decoder below. Its result is taken
# only where it is the strict decoder's: orjson itself refuses what is not strict UTF-8
# JSON (a BOM, NaN/Infinity, a number past the double range, a lone surrogate: then the
# strict decoder gives the documented error), and without a backslash or whitespace every
# member of every object is one ``":`` in the text, so a result with as many top-level
# names as the text has ``":`` had no duplicate name (nor any nested object with members).
# orjson reads an integer past 64 bits as a float, silently: a text holding a run of 19
# digits or more goes to the strict decoder (as orbited.node.events does).
_orjson: Any
try:
    _orjson = importlib.import_module("orjson")
except ImportError:  # pragma: no cover - the strict path is tested by setting it to None
    _orjson = None
_NOT_PLAIN = b" \t\n\r\\"  # JSON whitespace and the backslash
_DIGITS_TO_ZERO = bytes.maketrans(b"123456789", b"000000000")
_LONG_RUN = b"0" * 19


def _parse_claims(payload: bytes) -> dict[str, object]:
    """Strict JSON: UTF-8 (no BOM), no NaN/Infinity, no duplicate names, no lone
    surrogates (they cannot be written back as UTF-8), an object."""
    oj = _orjson
    if (
        oj is not None
        and len(payload.translate(None, _NOT_PLAIN)) == len(payload)
        and payload.translate(_DIGITS_TO_ZERO).find(_LONG_RUN) < 0
    ):
        try:
            doc = oj.loads(payload)
        except oj.JSONDecodeError:
            pass  # the strict path decides, with its message
        else:
            if type(doc) is dict and payload.count(b'":') == len(doc):
                return doc
    try:
        claims = _CLAIMS_DECODER.decode(payload.decode("utf-8"))
        if b"\\u" in payload:  # only a \u escape can make a lone surrogate (strict UTF-8)
            _STRICT_ENCODER.encode(claims).encode("utf-8")
    except (ValueError, RecursionError):  # (UnicodeError is a ValueError)
        raise TokenError("token_malformed", "token claims are not strict UTF-8 JSON") from None
    if not isinstance(claims, dict):
        raise TokenError("token_malformed", "token claims are not a JSON object")
    return claims


def _malformed(name: str, expected: str) -> TokenError:
    # The claim's name only, never its value: messages reach the browser.
    return TokenError("token_malformed", f"token claim {name} must be {expected}")


def _numeric_date(claims: dict[str, object], name: str) -> float | None:
    value = claims.get(name, ...)
    if value is ...:
        return None
    if (
        not isinstance(value, int | float)
        or type(value) is bool  # an int subclass: refused here
        or not 0 <= value <= MAX_NUMERIC_DATE  # also refuses NaN and infinities
    ):
        raise _malformed(name, f"a number of seconds from 0 to {MAX_NUMERIC_DATE}")
    return float(value)


def _string(claims: dict[str, object], name: str, min_bytes: int, max_bytes: int) -> str | None:
    value = claims.get(name, ...)
    if value is ...:
        return None
    # Lone surrogates were refused with the JSON: every str here encodes as UTF-8.
    if type(value) is not str or not min_bytes <= len(value.encode()) <= max_bytes:
        raise _malformed(name, f"a string of {min_bytes}-{max_bytes} bytes of UTF-8")
    return value


_COMMON_CLAIMS = frozenset(("sub", "sid", "loc", "aud", "exp", "iat"))


def _check_claims(
    claims: dict[str, object], leeway: float, now: float
) -> tuple[ConnectionKey, float]:
    """The one claim check, for every caller: types, sizes and encodings first
    (token_malformed), then presence, audience, nbf and iat (token_invalid), then
    expiry (token_expired).

    First the token every web app issues (issue_token's claims: ASCII strings, integer
    dates, the one audience, nothing else), which passes every check below: accepted
    at once. Anything else, or any doubt, goes through the checks in order."""
    sub, sid, loc = claims.get("sub"), claims.get("sid", ""), claims.get("loc", "")
    exp, iat = claims.get("exp"), claims.get("iat", 0)
    if (
        type(sub) is str and type(sid) is str and type(loc) is str
        and type(exp) is int and type(iat) is int and claims.get("aud") == AUDIENCE
        and claims.keys() <= _COMMON_CLAIMS
        and 0 < len(sub) <= MAX_PART_BYTES and len(sid) <= MAX_PART_BYTES
        and len(loc) <= MAX_PART_BYTES and sub.isascii() and sid.isascii() and loc.isascii()
        and 0 <= iat <= now + leeway and 0 <= exp <= MAX_NUMERIC_DATE
        and exp + leeway >= now
        and sub != WILDCARD and sid != WILDCARD and loc != WILDCARD
    ):  # fmt: skip
        return ConnectionKey(sub, sid, loc), float(exp)
    exp = _numeric_date(claims, "exp")
    iat = _numeric_date(claims, "iat")
    nbf = _numeric_date(claims, "nbf")
    sub = _string(claims, "sub", 1, MAX_PART_BYTES)
    sid = _string(claims, "sid", 0, MAX_PART_BYTES)
    loc = _string(claims, "loc", 0, MAX_PART_BYTES)
    _string(claims, "iss", 0, MAX_TOKEN_CHARS)
    _string(claims, "jti", 0, MAX_TOKEN_CHARS)
    aud = claims.get("aud", ...)
    audiences = [aud] if type(aud) is str else aud
    if aud is not ... and (
        type(audiences) is not list or any(type(a) is not str for a in audiences)
    ):
        raise _malformed("aud", "a string or an array of strings")
    missing = [name for name, value in (("sub", sub), ("aud", aud), ("exp", exp))
               if value is None or value is ...]  # fmt: skip
    if missing:
        raise TokenError("token_invalid", f"token lacks required claims: {', '.join(missing)}")
    if AUDIENCE not in audiences:  # type: ignore[operator]
        raise TokenError("token_invalid", f"token audience is not {AUDIENCE!r}")
    if nbf is not None and nbf > now + leeway:
        raise TokenError("token_invalid", "token is not valid yet (nbf)")
    if iat is not None and iat > now + leeway:
        raise TokenError("token_invalid", "token is issued in the future (iat)")
    assert exp is not None and sub is not None
    key = ConnectionKey(sub, sid or "", loc or "")
    reserved = _wildcard_claim(key)
    if reserved is not None:  # "*" addresses every session or location of the user
        raise TokenError("token_invalid", f'{reserved} must not be "{WILDCARD}"')
    if exp + leeway < now:
        raise TokenError("token_expired", "token has expired")
    return key, exp


def _wildcard_claim(key: ConnectionKey) -> str | None:
    """The claim of ``key`` that is the reserved wildcard ``"*"``, if one is."""
    if WILDCARD in key:
        return ("sub", "sid", "loc")[key.index(WILDCARD)]
    return None


def check_secret(secret: bytes) -> None:
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"the shared secret must be at least {MIN_SECRET_BYTES} bytes")


def load_secret(path: Path, create: bool = False) -> bytes:
    """Read the shared secret (surrounding whitespace ignored); optionally create one."""
    if create and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IRUSR | stat.S_IWUSR)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(48) + "\n")
    secret = path.read_bytes().strip()
    if len(secret) < MIN_SECRET_BYTES:  # the file's name: a node reads up to five keys
        raise ValueError(
            f"{path}: a key must be at least {MIN_SECRET_BYTES} bytes "
            f"(surrounding whitespace ignored), not {len(secret)}"
        )
    return secret
