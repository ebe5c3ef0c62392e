"""HaloD's control protocol, sans-I/O: JSON messages over SP PAIR v0 (docs/halod-protocol.md).

Owns the message vocabulary, its encoding and the validation of everything a peer sends;
both ends (halod.server and orbited.node.link) use it. Framing is orbited.sp.wire's.
"""

from __future__ import annotations

import json
import re
from typing import Any

from orbited.core.settings import ConfigError, parse_host_port, parse_sp_address
from orbited.sp.wire import PAIR_V0

CONTROL_PROTOCOL = PAIR_V0  # both ends speak pair0: one peer, messages both ways
VERSION = 1
MAX_MESSAGE = 1024 * 1024  # an `assign` for 4096 routes is ≈ 25 KB
# Route ids and N: a node builds per-route state for N routes, so a welcome naming
# 2**31 of them would exhaust its memory (found by fuzzing). Route ports cap N anyway.
MAX_ROUTES = 65536
MIN_HEARTBEAT_INTERVAL = 0.001  # seconds; below this a node's heartbeat would spin

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}")
_ADDRESS = re.compile(r"[\x21-\x7e]{1,256}")  # printable ASCII, no spaces

# Node → HaloD
REGISTER = "register"
HEARTBEAT = "heartbeat"
LEAVE = "leave"
# HaloD → node
WELCOME = "welcome"
ASSIGN = "assign"
ROUTE_MOVED = "route_moved"
HEARTBEAT_ACK = "heartbeat_ack"
ERROR = "error"
# Both ways: an old owner's mailboxes for the new owner, relayed by HaloD
HANDOFF = "handoff"

FROM_NODE = (REGISTER, HEARTBEAT, LEAVE, HANDOFF)
FROM_HALOD = (WELCOME, ASSIGN, ROUTE_MOVED, HEARTBEAT_ACK, ERROR, HANDOFF)
HANDOFF_CHUNK = 256 * 1024  # bytes of events per hand-off message, well under MAX_MESSAGE

# Error codes HaloD sends before closing (docs/halod-protocol.md, "Errors").
BAD_MESSAGE = "bad_message"
UNSUPPORTED_VERSION = "unsupported_version"
UNAUTHORIZED = "unauthorized"
DUPLICATE_NAME = "duplicate_name"
ID_MISMATCH = "id_mismatch"
ID_CLAIMED = "id_claimed"
NOT_REGISTERED = "not_registered"
FAILED = "failed"
SHUTDOWN = "shutdown"


class ControlError(Exception):
    """A message HaloD refuses; ``code`` goes back to the node in an ``error`` message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)  # built once


def encode(message: dict[str, Any]) -> bytes:
    return _ENCODER.encode(message).encode()


def heartbeat_ack(seq: int) -> bytes:
    """The most frequent message, preformatted (equal to encode() of it)."""
    return b'{"type":"heartbeat_ack","seq":%d}' % seq


def _route_list(msg: dict[str, Any], field: str, optional: bool = False) -> None:
    routes = msg.get(field)
    if routes is None and optional:
        return
    if not isinstance(routes, list) or not all(
        isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= MAX_ROUTES for r in routes
    ):
        raise ControlError(BAD_MESSAGE, f"{field} must be a list of route ids")


def _int(msg: dict[str, Any], field: str, low: int, high: int, optional: bool = False) -> None:
    value = msg.get(field)
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ControlError(BAD_MESSAGE, f"{field} must be an integer in {low}..{high}")


def _str(msg: dict[str, Any], field: str, pattern: re.Pattern[str], optional: bool = False) -> None:
    value = msg.get(field)
    if value is None and optional:
        return
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ControlError(BAD_MESSAGE, f"{field} is missing or malformed")


def _valid_move(move: object) -> bool:
    """One route_moved entry: the node uses route as an id, sp in replies to web apps."""
    if not isinstance(move, dict):
        return False
    route = move.get("route")
    if not isinstance(route, int) or isinstance(route, bool) or not 1 <= route <= MAX_ROUTES:
        return False
    strings = all(
        move.get(f) is None or isinstance(move[f], str) for f in ("name", "browser", "sp")
    )
    return strings and isinstance(move.get("handoff", False), bool)


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def decode(body: bytes, allowed: tuple[str, ...]) -> dict[str, Any]:
    """Parse and validate one message whose ``type`` is in ``allowed``."""
    try:
        # UTF-8 only, and no NaN/Infinity: what encode() can send back (a relayed or
        # re-encoded message must stay JSON; found by fuzzing).
        msg = json.loads(body.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ControlError(BAD_MESSAGE, "not a JSON message") from None
    if not isinstance(msg, dict):
        raise ControlError(BAD_MESSAGE, "a message is a JSON object")
    kind = msg.get("type")
    if kind not in allowed:
        raise ControlError(BAD_MESSAGE, f"unexpected message type {str(kind)[:40]!r}")
    if kind == REGISTER:
        _int(msg, "version", 0, 2**31)
        if msg["version"] != VERSION:
            raise ControlError(UNSUPPORTED_VERSION, f"this HaloD speaks version {VERSION}")
        _str(msg, "name", NAME)
        _str(msg, "browser", _ADDRESS)
        _str(msg, "sp", _ADDRESS)
        try:  # the data plane forwards to these
            parse_host_port(msg["browser"])
            parse_sp_address(msg["sp"])
        except ConfigError as e:
            raise ControlError(BAD_MESSAGE, str(e)) from None
        _int(msg, "capacity", 0, 2**40)
        _int(msg, "node_id", 1, 2**31, optional=True)
        if "secret" in msg and not isinstance(msg["secret"], str):
            raise ControlError(BAD_MESSAGE, "secret must be a string")
    elif kind in (HEARTBEAT, HEARTBEAT_ACK):
        _int(msg, "seq", 0, 2**62)
        _int(msg, "connections", 0, 2**40, optional=True)
        _int(msg, "mailboxes", 0, 2**40, optional=True)
    elif kind in (WELCOME, ASSIGN):
        _int(msg, "node_id", 1, 2**31, optional=True)
        if msg.get("role") not in ("active", "spare", "drained"):
            raise ControlError(BAD_MESSAGE, "role is active, spare or drained")
        _route_list(msg, "routes")
        _route_list(msg, "incoming", optional=True)
        if kind == WELCOME:
            _int(msg, "total_routes", 1, MAX_ROUTES)
            interval = msg.get("heartbeat_interval")
            if (
                not isinstance(interval, int | float) or isinstance(interval, bool)
                or not MIN_HEARTBEAT_INTERVAL <= interval <= 3600
            ):  # fmt: skip
                raise ControlError(
                    BAD_MESSAGE,
                    f"heartbeat_interval must be {MIN_HEARTBEAT_INTERVAL:g} to 3600 seconds",
                )
            _int(msg, "missed_heartbeats", 1, 1000)
    elif kind == ROUTE_MOVED:
        moves = msg.get("moves")
        if not isinstance(moves, list) or not all(_valid_move(m) for m in moves):
            raise ControlError(
                BAD_MESSAGE, "moves must be a list of {route, name, browser, sp, handoff}"
            )
    elif kind == HANDOFF:
        _str(msg, "to", NAME)
        _route_list(msg, "done")
        mailboxes = msg.get("mailboxes")
        if not isinstance(mailboxes, list) or not all(isinstance(m, dict) for m in mailboxes):
            raise ControlError(BAD_MESSAGE, "mailboxes must be a list of objects")
    elif kind == ERROR:
        if not isinstance(msg.get("code"), str) or not isinstance(msg.get("message"), str):
            raise ControlError(BAD_MESSAGE, "an error has a code and a message")
    return msg


def error(code: str, message: str) -> dict[str, Any]:
    return {"type": ERROR, "code": code, "message": message}


def handoff_messages(
    to: str, done: list[int], entries: list[dict[str, Any]], chunk: int = HANDOFF_CHUNK
) -> list[dict[str, Any]]:
    """An old owner's exported mailboxes (orbited.node.hub.export_entry) as ``handoff``
    messages of about ``chunk`` bytes of events each; a large mailbox is split across
    messages (same key and stream, later events). The last message names the ``done``
    routes (docs/halod-protocol.md, "Hand-off")."""
    messages: list[dict[str, Any]] = []
    batch: list[dict[str, Any]] = []
    size = 0

    def flush() -> None:
        nonlocal batch, size
        messages.append({"type": HANDOFF, "to": to, "done": [], "mailboxes": batch})
        batch, size = [], 0

    for entry in entries:
        events = entry["events"]
        part: list[list[Any]] = []
        for event in events:
            cost = len(event[1]) + 16
            if part and size + cost > chunk:
                batch.append({**entry, "events": part})
                flush()
                part = []
            part.append(event)
            size += cost
        batch.append({**entry, "events": part})
        size += 128
        if size > chunk:
            flush()
    if batch or not messages:
        flush()
    messages[-1]["done"] = sorted(done)
    return messages
