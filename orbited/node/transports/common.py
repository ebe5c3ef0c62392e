"""What every browser transport checks first: origin, token and resume position.

Errors carry both the HTTP status (for transports that answer over HTTP) and the
WebSocket close code (4000 + that status) documented in docs/protocol.md, "Errors".
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, NamedTuple
from urllib.parse import urlsplit

from orbited.core.keys import ConnectionKey
from orbited.core.tokens import TokenError, check_expiry, verified_before, verify_token
from orbited.node.frames import DISPLACED, USER_LIMIT
from orbited.node.mailbox import Position, PositionError

if TYPE_CHECKING:
    from orbited.node.hub import Hub

BAD_ACK = 'bad_frame: expected {"type":"ack","seq":n}'  # close reason, with code 4400


def parse_ack(payload: bytes) -> int:
    """The ``seq`` of a browser's ack message ``{"type":"ack","seq":n}`` (docs/protocol.md,
    "WebSocket"); ValueError for anything else (closed with 4400 and BAD_ACK)."""
    try:
        message = json.loads(payload)
        if message.get("type") != "ack":
            raise ValueError("unknown frame type")
        seq = message["seq"]
    except (ValueError, KeyError, AttributeError, RecursionError) as e:
        raise ValueError(str(e)) from None
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise ValueError("seq must be a non-negative integer")
    return seq


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


def user_limit_error(max_connections: int) -> BrowserRequestError:
    """A new connection the user's connection limit refuses (``user_max_connections``,
    refuse policy): HTTP 429 ``user_limit``, or WebSocket close 4429 (docs/protocol.md,
    "Errors (browser side)")."""
    return BrowserRequestError(429, "user_limit", f"at most {max_connections} connections per user")


def closed_reason(code: int, reason: str, max_connections: int) -> str:
    """The WebSocket close reason of ``Sink.closed(code, reason)``: the hub's reason word,
    then what happened (at most 123 bytes of UTF-8, as a close reason may be)."""
    if code == USER_LIMIT:
        text = f"{reason}: at most {max_connections} connections per user"
    elif code == DISPLACED:
        text = f"{reason}: a newer connection of this user took its place"
    else:
        text = reason
    return text.encode()[:123].decode("utf-8", "ignore")


def check_admitted(hub: Hub, key: ConnectionKey) -> None:
    """Before a transport starts its response: BrowserRequestError (429 / 4429) when the
    hub would refuse ``key`` a new connection now (Hub.admits, after the token check).
    ``Hub.attach`` stays the authority; this lets SSE, poll and iframe answer a plain
    HTTP 429 instead of starting a stream."""
    if not hub.admits(key):
        raise user_limit_error(hub.config.users.max_connections)


@dataclass(frozen=True)
class BrowserAuth:
    secret: bytes
    token_leeway: float = 30.0


_new = tuple.__new__  # (without the NamedTuple's Python-level __new__)


class Attach(NamedTuple):  # (built per request: a tuple is cheaper than a dataclass)
    key: ConnectionKey
    after: Position | None


def single_param(params: Mapping[str, Sequence[str]], name: str) -> str | None:
    values = params.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise BrowserRequestError(400, "bad_request", f"parameter {name} given more than once")
    return values[0]


class KnownToken(NamedTuple):
    """A token this connection presented and that verified (``token``, the ``key`` it
    proves, its ``exp``): its connection's next request with the same token needs only
    the expiry checked again, as ``verify_token`` does for a token it verified before."""

    token: str
    key: ConnectionKey
    exp: float


def authenticate(
    auth: BrowserAuth, params: Mapping[str, Sequence[str]], after: Position | None = None,
    known: KnownToken | None = None, remember: bool = True,
) -> Attach:  # fmt: skip
    """Check ``token`` and ``last`` query parameters (already decoded to str). ``after``:
    ``last`` already parsed (the front's plan did), so not parsed again. ``known``: the
    token the connection presented last time (KnownToken). ``remember``: verify_token's."""
    token = single_param(params, "token")
    try:
        if known is not None and token == known.token:
            check_expiry(known.exp, auth.token_leeway)
            key = known.key
        else:
            key = verify_token(auth.secret, token or "", auth.token_leeway, None, remember)
    except TokenError as e:
        raise BrowserRequestError(401, e.code, e.message) from None
    if after is None:
        last = single_param(params, "last")
        if last:
            try:
                after = Position.parse(last)
            except PositionError as e:
                raise BrowserRequestError(400, "bad_position", str(e)) from None
    attach: Attach = _new(Attach, (key, after))
    return attach


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


def resumes_session_params(auth: BrowserAuth, params: Mapping[str, Sequence[str]]) -> bool:
    """``resumes_session`` of the decoded query (str names and values): the same answer,
    as a position and a verified token are ASCII."""
    return resume_position(auth, params)[0]


def resume_position(
    auth: BrowserAuth, params: Mapping[str, Sequence[str]], known: str | None = None
) -> tuple[bool, Position | None]:
    """``resumes_session_params``, and the position ``last`` gives when there is one and
    it parses (for ``authenticate``: parsed once). ``known``: a token that verified on
    this connection (KnownToken.token), so verified before."""
    last, token = params.get("last"), params.get("token")
    if not last or len(last) != 1:
        return False, None
    try:
        after = Position.parse(last[0])
    except PositionError:
        return False, None
    if not token or len(token) != 1:
        return False, after
    return token[0] == known or verified_before(auth.secret, token[0]), after


DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class Origin:
    """An origin as RFC 6454 compares them: scheme, host (lower case) and port (the
    scheme's default port filled in). ``http://app.example`` and ``http://app.example:80``
    are the same origin; ``http://app.example:8000`` is another one."""

    scheme: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Origin | None:
        """A serialised origin (``https://app.example:8443``, as browsers send in
        ``Origin``), or None if ``text`` is not one: another scheme, a path, user info,
        a bad port, whitespace or control characters."""
        if not text.isascii() or not text.isprintable() or " " in text:
            return None  # urlsplit would quietly drop tabs and newlines
        try:
            url = urlsplit(text)
            port = url.port
        except ValueError:  # e.g. "http://[" or a port over 65535 (found by fuzzing)
            return None
        if (
            url.scheme not in DEFAULT_PORTS
            or not url.hostname
            or "@" in url.netloc
            or url.path
            or url.query
            or url.fragment
            or text.endswith(("?", "#", ":"))
        ):
            return None
        return cls(url.scheme, url.hostname, DEFAULT_PORTS[url.scheme] if port is None else port)


def request_scheme(secure: bool, forwarded_proto: str | None) -> str:
    """The scheme the browser used to reach the node: ``https`` over TLS, else what the
    nearest proxy says in ``X-Forwarded-Proto`` (its last value; a TLS terminator in front
    of the node sets it), else ``http``. A page cannot make its browser send this header
    on a WebSocket, EventSource or iframe request, nor on a cross-origin fetch without a
    preflight the node does not grant, so it cannot use it to pass as same-origin."""
    if secure:
        return "https"
    if forwarded_proto:
        proto = forwarded_proto.rsplit(",", 1)[-1].strip().lower()
        if proto in DEFAULT_PORTS:
            return proto
    return "http"


@lru_cache(maxsize=64)
def _allowed_origins(allowed: tuple[str, ...]) -> frozenset[Origin]:
    return frozenset(o for o in map(Origin.parse, allowed) if o is not None)


def origin_allowed(
    origin: str | None, host: str | None, allowed: Sequence[str], scheme: str = "http"
) -> bool:
    """May a page of ``origin`` use this node? Requests without ``Origin`` (non-browser
    clients) pass; so does a page of the node's own origin — ``scheme`` (request_scheme),
    and host and port of the request's ``Host`` header, compared as RFC 6454 origins —
    and one in the allow-list (``*``: any). Every transport asks this one function."""
    if origin is None:
        return True
    if "*" in allowed or origin in allowed:
        return True
    page = _parse_origin(origin)
    if page is None:
        return False
    if page in _allowed_origins(tuple(allowed)):
        return True
    return host is not None and page == _parse_origin(f"{scheme}://{host}")


@lru_cache(maxsize=4096)
def _parse_origin(text: str) -> Origin | None:
    """Origin.parse, remembered: a node sees few distinct origins and hosts, and parsing
    one (urlsplit) was half the cost of checking a request's origin."""
    return Origin.parse(text)
