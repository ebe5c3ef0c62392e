"""What every browser transport checks first: origin, token and resume position.

Errors carry both the HTTP status (for transports that answer over HTTP) and the
WebSocket close code (4000 + that status) documented in docs/protocol.md, "Errors".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from orbited.keys import ConnectionKey
from orbited.mailbox import Position, PositionError
from orbited.tokens import TokenError, verified_before, verify_token


class BrowserRequestError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    @property
    def close_code(self) -> int:
        return 4000 + self.status

    @property
    def close_reason(self) -> str:
        # A close reason may be at most 123 bytes of UTF-8.
        return f"{self.code}: {self.message}".encode()[:123].decode("utf-8", "ignore")


@dataclass(frozen=True)
class BrowserAuth:
    secret: bytes
    token_leeway: float = 30.0


@dataclass(frozen=True)
class Attach:
    key: ConnectionKey
    after: Position | None


def single_param(params: Mapping[str, Sequence[str]], name: str) -> str | None:
    values = params.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise BrowserRequestError(400, "bad_request", f"parameter {name} given more than once")
    return values[0]


def authenticate(auth: BrowserAuth, params: Mapping[str, Sequence[str]]) -> Attach:
    """Check ``token`` and ``last`` query parameters (already decoded to str)."""
    token = single_param(params, "token")
    try:
        key = verify_token(auth.secret, token or "", auth.token_leeway)
    except TokenError as e:
        raise BrowserRequestError(401, e.code, e.message) from None
    last = single_param(params, "last")
    after = None
    if last:
        try:
            after = Position.parse(last)
        except PositionError as e:
            raise BrowserRequestError(400, "bad_position", str(e)) from None
    return Attach(key, after)


def resumes_session(auth: BrowserAuth, args: Mapping[bytes, Sequence[bytes]]) -> bool:
    """Does this raw request go on from a session's position: one ``last`` that parses,
    with a token that verified before (no crypto, so it can be asked before any work)?
    Only such a request is exempt from connect_rate: a forged or garbage ``last``, or an
    unseen token, is charged like any new connection (docs/operations.md, "Limits")."""
    last, token = args.get(b"last"), args.get(b"token")
    if not last or not token or len(last) != 1 or len(token) != 1:
        return False
    try:
        Position.parse(last[0].decode("ascii"))
        return verified_before(auth.secret, token[0].decode("ascii"))
    except (UnicodeDecodeError, PositionError):
        return False


def origin_allowed(origin: str | None, host: str | None, allowed: Sequence[str]) -> bool:
    """Same-origin and non-browser (no Origin) requests pass; others need the allow-list."""
    if origin is None:
        return True
    if "*" in allowed or origin in allowed:
        return True
    if host is None or origin == "null":
        return False
    try:
        netloc = urlsplit(origin).netloc
    except ValueError:  # e.g. "http://[": not a URL, so not our origin (found by fuzzing)
        return False
    return netloc.lower() == host.lower()
