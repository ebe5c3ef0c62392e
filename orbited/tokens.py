"""Browser tokens: JWT HS256 signed by the web app with the secret it shares with nodes.

Claims (docs/protocol.md, "Tokens"): ``sub`` user, ``sid`` session, ``loc`` location,
``aud`` "orbited", ``iat`` and a required ``exp``. Verification returns the ConnectionKey
the token proves, or raises TokenError with a stable code.
"""

from __future__ import annotations

import os
import secrets
import stat
import time
from collections import OrderedDict
from pathlib import Path

import jwt

from orbited.keys import ConnectionKey, KeyError_

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
    """The token a web app hands to the browser for connection ``key``."""
    check_secret(secret)
    issued = int(time.time() if now is None else now)
    claims = {
        "sub": key.user,
        "sid": key.session,
        "loc": key.location,
        "aud": AUDIENCE,
        "iat": issued,
        "exp": issued + int(ttl),
    }
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


def verify_token(
    secret: bytes, token: str, leeway: float = 30.0, now: float | None = None
) -> ConnectionKey:
    used = _monotonic()
    hit = _verified.get((secret, token))
    if hit is not None:
        key, exp, _ = hit
        if exp + leeway < (time.time() if now is None else now):
            raise TokenError("token_expired", "token has expired")
        _verified[(secret, token)] = (key, exp, used)
        _verified.move_to_end((secret, token))
        return key
    key, exp = _verify(secret, token, leeway, now)
    _verified[(secret, token)] = (key, exp, used)
    # Oldest use first: drop the idle ones, then any beyond the size.
    while _verified and (
        len(_verified) > VERIFIED_CACHE_SIZE
        or next(iter(_verified.values()))[2] < used - VERIFIED_IDLE
    ):
        _verified.popitem(last=False)
    return key


def _verify(
    secret: bytes, token: str, leeway: float, now: float | None
) -> tuple[ConnectionKey, float]:
    if not token:
        raise TokenError("token_missing", "no token given")
    if len(token) > 4096:
        raise TokenError("token_malformed", "token longer than 4096 characters")
    if not token.isascii():  # a JWT is base64url and dots; PyJWT would fail to encode it
        raise TokenError("token_malformed", "token is not a valid JWT: not ASCII")
    options = {"require": ["exp", "sub", "aud"]}
    try:
        if now is None:
            claims = jwt.decode(
                token,
                secret,
                algorithms=[ALGORITHM],
                audience=AUDIENCE,
                leeway=leeway,
                options=options,
            )
        else:
            # PyJWT reads the wall clock itself; check expiry by hand for an injected clock.
            claims = jwt.decode(
                token,
                secret,
                algorithms=[ALGORITHM],
                audience=AUDIENCE,
                options={**options, "verify_exp": False, "verify_iat": False},
            )
            exp = claims["exp"]
            # PyJWT checks the type only when it checks expiry itself (found by fuzzing).
            if not isinstance(exp, int | float) or isinstance(exp, bool):
                raise jwt.DecodeError("Expiration Time claim (exp) must be an integer.")
            if exp + leeway < now:
                raise jwt.ExpiredSignatureError("Signature has expired")
    except jwt.ExpiredSignatureError:
        raise TokenError("token_expired", "token has expired") from None
    except jwt.InvalidSignatureError:
        raise TokenError("token_invalid", "token signature does not verify") from None
    except jwt.DecodeError as e:
        raise TokenError("token_malformed", f"token is not a valid JWT: {e}") from None
    except jwt.InvalidTokenError as e:
        raise TokenError("token_invalid", f"token rejected: {e}") from None
    try:
        key = ConnectionKey.from_json([claims["sub"], claims.get("sid", ""), claims.get("loc", "")])
        return key, claims["exp"]
    except KeyError_ as e:
        raise TokenError("token_invalid", f"token claims are not a connection key: {e}") from None


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
    check_secret(secret)
    return secret
