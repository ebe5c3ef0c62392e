"""HaloD's control protocol, sans-I/O: JSON messages over SP PAIR v0 (docs/halod-protocol.md).

Owns the message vocabulary as typed values (one frozen dataclass per message ``type``),
their encoding and the validation of everything a peer sends; both ends (halod.server and
orbited.node.link) decode once at the edge and pass these values on. Framing is
orbited.sp.wire's. The wire is plain JSON: ``encode`` writes the fields in a fixed order
and leaves out optional fields that are not set, ``decode`` ignores unknown fields.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, TypeAlias, TypeGuard, cast

from orbited.core.hashing import HASH_VERSIONS
from orbited.core.keys import WILDCARD, ConnectionKey, KeyError_
from orbited.core.latency import BUCKETS
from orbited.core.latency import MAX_COUNT as MAX_HIST_COUNT
from orbited.core.routes import Role
from orbited.core.settings import ConfigError, parse_host_port, parse_sp_address
from orbited.sp.wire import PAIR_V0

CONTROL_PROTOCOL = PAIR_V0  # both ends speak pair0: one peer, messages both ways
VERSION = 1
MAX_MESSAGE = 1024 * 1024  # an `assign` for 4096 routes is ≈ 25 KB
# Route ids and N: a node builds per-route state for N routes, so a welcome naming
# 2**31 of them would exhaust its memory (found by fuzzing). Route ports cap N anyway.
MAX_ROUTES = 65536
MIN_HEARTBEAT_INTERVAL = 0.001  # seconds; below this a node's heartbeat would spin
MAX_HEARTBEAT_INTERVAL = 3600.0
HANDOFF_CHUNK = 256 * 1024  # bytes of events per hand-off message, well under MAX_MESSAGE

# Capabilities a node announces in ``register`` (``features``): HaloD sends a message type
# only to nodes that announced it (an unknown type closes the connection).
FEATURES: tuple[str, ...] = ("trace", "load")
MAX_FEATURES = 32
MAX_COUNTER = 2**62  # the heartbeat's ``load`` counters
LOAD_COUNTERS: tuple[str, ...] = (
    "events", "recipients", "delivered", "queued", "acked", "full", "moved"
)  # fmt: skip
MAX_EVENT_ID = 128  # a trace query's event id: the event request's limit (docs/protocol.md)
MAX_TRACE_LIMIT = 65536  # records per key a trace query asks for at most
MAX_QID = 2**53  # a trace query's id (exact in every JSON reader)

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}")
_ADDRESS = re.compile(r"[\x21-\x7e]{1,256}")  # printable ASCII, no spaces
_FEATURE = re.compile(r"[a-z][a-z0-9_]{0,31}")
_ROUTE_KEY = re.compile(r"[1-9][0-9]{0,4}")  # a route id as a JSON object member name

WireDict: TypeAlias = dict[str, Any]  # one JSON object as json.loads returns it


def halod_addresses(text: str, key: str = "") -> list[str]:
    """A node's ``halod`` setting: one control address ``tcp://host:port`` or several
    separated by commas (HaloD on etcd); ConfigError names a malformed one (and ``key``)."""
    addresses = [part.strip() for part in text.split(",")]
    for address in addresses:
        parse_sp_address(address, key)
    return addresses


class ErrorCode(StrEnum):
    """Codes of the ``error`` message HaloD sends before closing (docs/halod-protocol.md);
    also the 409 codes of the operator endpoints."""

    BAD_MESSAGE = "bad_message"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNAUTHORIZED = "unauthorized"
    DUPLICATE_NAME = "duplicate_name"
    ID_MISMATCH = "id_mismatch"
    ID_CLAIMED = "id_claimed"
    NOT_REGISTERED = "not_registered"
    FAILED = "failed"
    SHUTDOWN = "shutdown"
    INTERNAL_ERROR = "internal_error"
    NOT_LEADER = "not_leader"  # a following HaloD (store etcd): try the leader
    UNSUPPORTED_HASH = "unsupported_hash"  # the node's hashes lack the table's version
    REHASH_UNSUPPORTED = "rehash_unsupported"  # POST /rehash: a member lacks the version
    REHASH_IN_PROGRESS = "rehash_in_progress"  # POST /rehash: one is running


class ControlError(Exception):
    """A message refused; ``code`` goes back to the node in an ``error`` message."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# -- the messages --------------------------------------------------------------------------
# Node → HaloD: Register, Heartbeat, Leave, Handoff, TraceReply.
# HaloD → node: Welcome, Assign, RouteMoved, Rehash, HeartbeatAck, Error, Handoff (relayed),
# TraceQuery (only to nodes that announced the "trace" feature).


@dataclass(frozen=True)
class Register:
    """First message on every connection (``version`` is always VERSION on the wire)."""

    TYPE: ClassVar[str] = "register"
    name: str
    browser: str  # host:port the data plane forwards browsers to
    sp: str  # tcp://host:port it forwards web apps to
    capacity: int
    node_id: int | None = None  # the id a reconnecting node holds
    secret: str | None = field(default=None, repr=False)  # the cluster secret
    hashes: tuple[int, ...] | None = None  # hash versions the node speaks; None: (1,)
    features: tuple[str, ...] = ()  # capabilities (FEATURES); absent: none (an older node)


@dataclass(frozen=True)
class HeartbeatLoad:
    """A heartbeat's optional ``load`` (docs/halod-protocol.md, "Load"): counters since the
    node's start (None: not sent), the ack-latency samples since the previous beat as
    sparse ``(bucket, count)`` pairs of orbited.core.latency, and attached connections per
    route (only the routes whose count changed, or all of them when ``routes_full``)."""

    events: int | None = None  # event requests dispatched
    recipients: int | None = None  # per-key results of them
    delivered: int | None = None  # written to an attached browser at once
    queued: int | None = None  # stored for a browser that was away
    acked: int | None = None  # acknowledged-mode results "acked" (the browser confirmed)
    full: int | None = None  # refused: the node's mailbox memory was full
    moved: int | None = None  # refused: the route had moved away
    ack_hist: tuple[tuple[int, int], ...] = ()
    routes: Mapping[int, int] = field(default_factory=dict)
    routes_full: bool = False

    def counters(self) -> dict[str, int]:
        """The counters sent, by name (LOAD_COUNTERS)."""
        out: dict[str, int] = {}
        for name in LOAD_COUNTERS:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    def to_wire(self) -> WireDict:
        out: WireDict = self.counters()
        if self.ack_hist:
            out["ack_hist"] = [[b, n] for b, n in self.ack_hist]
        out["routes"] = {str(r): n for r, n in self.routes.items()}
        if self.routes_full:
            out["routes_full"] = True
        return out

    @classmethod
    def from_wire(cls, value: object) -> HeartbeatLoad:
        """The ``load`` object as sent (or as a node's hub reports it: route ids may be
        ints there); ControlError ``bad_message`` names what is wrong."""
        if not isinstance(value, dict):
            raise _bad("load must be an object")
        counters: dict[str, int | None] = {}
        for name in LOAD_COUNTERS:
            n = value.get(name)
            if n is not None and (not _is_int(n) or not 0 <= n <= MAX_COUNTER):
                raise _bad(f"load.{name} must be an integer in 0..{MAX_COUNTER}")
            counters[name] = n
        hist = value.get("ack_hist", ())
        if not isinstance(hist, list | tuple) or len(hist) > BUCKETS:
            raise _bad(f"load.ack_hist must be a list of at most {BUCKETS} pairs")
        pairs: list[tuple[int, int]] = []
        for pair in hist:
            if (
                not isinstance(pair, list | tuple) or len(pair) != 2
                or not _is_int(pair[0]) or not 0 <= pair[0] < BUCKETS
                or not _is_int(pair[1]) or not 0 <= pair[1] <= MAX_HIST_COUNT
            ):  # fmt: skip
                raise _bad(
                    f"load.ack_hist pairs are [bucket 0..{BUCKETS - 1}, count 0..{MAX_HIST_COUNT}]"
                )
            pairs.append((pair[0], pair[1]))
        if len({b for b, _ in pairs}) != len(pairs):
            raise _bad("load.ack_hist names a bucket twice")
        raw = value.get("routes", {})
        if not isinstance(raw, dict) or len(raw) > MAX_ROUTES:
            raise _bad(f"load.routes must be an object of at most {MAX_ROUTES} routes")
        routes: dict[int, int] = {}
        for key, n in raw.items():
            if isinstance(key, str) and _ROUTE_KEY.fullmatch(key):
                route = int(key)
            elif _is_int(key):
                route = key
            else:
                route = 0
            if not 1 <= route <= MAX_ROUTES or not _is_int(n) or not 0 <= n <= MAX_HIST_COUNT:
                raise _bad(
                    f"load.routes maps route ids 1..{MAX_ROUTES} to counts 0..{MAX_HIST_COUNT}"
                )
            routes[route] = n
        full = value.get("routes_full", False)
        if not isinstance(full, bool):
            raise _bad("load.routes_full must be true or false")
        return cls(**counters, ack_hist=tuple(pairs), routes=routes, routes_full=full)


@dataclass(frozen=True)
class Heartbeat:
    TYPE: ClassVar[str] = "heartbeat"
    seq: int
    connections: int | None = None  # browsers connected now
    mailboxes: int | None = None  # keys with a mailbox, lingering ones too
    load: HeartbeatLoad | None = None  # nodes that announce the "load" feature


@dataclass(frozen=True)
class Leave:
    """The node is stopping: hand its routes over now."""

    TYPE: ClassVar[str] = "leave"


@dataclass(frozen=True)
class Handoff:
    """Mailboxes of routes moved away from the sender, for their new owner ``to``; HaloD
    relays the message unchanged. ``mailboxes`` entries are wire objects (built and read
    by the node's hub); ``done`` names the routes whose hand-off is complete."""

    TYPE: ClassVar[str] = "handoff"
    to: str
    done: tuple[int, ...]
    mailboxes: tuple[WireDict, ...]
    users: tuple[WireDict, ...] = ()  # per-user state (offline holds and watches)


@dataclass(frozen=True)
class Welcome:
    """Answer to ``register``: the node's role, routes and HaloD's timing."""

    TYPE: ClassVar[str] = "welcome"
    node_id: int | None  # None for a spare
    role: Role
    routes: tuple[int, ...]  # complete and ascending
    total_routes: int
    heartbeat_interval: float
    missed_heartbeats: int
    incoming: tuple[int, ...] = ()  # routes among ``routes`` whose mailboxes are handed over
    version: int | None = None  # the table version this assignment belongs to
    hash_version: int = 1  # the cluster's hash version (docs/hashing.md); absent: 1


@dataclass(frozen=True)
class Assign:
    """The node's complete assignment after a change."""

    TYPE: ClassVar[str] = "assign"
    node_id: int | None
    role: Role
    routes: tuple[int, ...]
    incoming: tuple[int, ...] = ()
    version: int | None = None  # the table version this assignment belongs to
    hash_version: int = 1  # the cluster's hash version (docs/hashing.md); absent: 1


@dataclass(frozen=True)
class RouteMove:
    """One ``route_moved`` entry: ``route`` now reaches the node ``name`` (None: no node
    has it); ``handoff``: that node is alive and waits for the route's mailboxes."""

    route: int
    name: str | None
    browser: str | None = None
    sp: str | None = None
    handoff: bool = False


@dataclass(frozen=True)
class RouteMoved:
    TYPE: ClassVar[str] = "route_moved"
    moves: tuple[RouteMove, ...]


@dataclass(frozen=True)
class Rehash:
    """The cluster's hash version changed (docs/hashing.md, "Moving a cluster from version
    1 to 2"): every route's owner, all of them, in the new ``version`` of the table (the
    route table itself is unchanged). Every node exchanges the mailboxes whose route
    changed with every other; ``handoff`` in ``owners`` is not used."""

    TYPE: ClassVar[str] = "rehash"
    hash_version: int
    version: int
    owners: tuple[RouteMove, ...]


@dataclass(frozen=True)
class HeartbeatAck:
    TYPE: ClassVar[str] = "heartbeat_ack"
    seq: int


@dataclass(frozen=True)
class Error:
    """A refusal; HaloD closes the connection after it. ``code`` is kept as sent (a node
    may hear codes of a newer HaloD)."""

    TYPE: ClassVar[str] = "error"
    code: str
    message: str
    leader: str | None = None  # not_leader: the leading HaloD's control address, if known


@dataclass(frozen=True)
class TraceQuery:
    """HaloD asks a node (one that announced the "trace" feature) for its trace records
    of a user's keys (docs/halod-protocol.md, "Tracing"); ``session``/``location`` None:
    any; ``event`` None: every event; ``limit`` None: every record kept."""

    TYPE: ClassVar[str] = "trace_query"
    qid: int
    user: str
    session: str | None = None
    location: str | None = None
    event: str | None = None
    limit: int | None = None


@dataclass(frozen=True)
class TraceReply:
    """The node's answer to ``trace_query`` ``qid``: the JSON of its ``/orbited/trace``
    endpoint (records are data; only the shape is checked: ``keys`` is a list of
    objects). ``fit_trace_reply`` keeps it within MAX_MESSAGE / 2."""

    TYPE: ClassVar[str] = "trace_reply"
    qid: int
    answer: WireDict


NodeMessage: TypeAlias = Register | Heartbeat | Leave | Handoff | TraceReply
HaloDMessage: TypeAlias = (
    Welcome | Assign | RouteMoved | Rehash | HeartbeatAck | Error | Handoff | TraceQuery
)  # fmt: skip
Message: TypeAlias = NodeMessage | HaloDMessage
MessageClass: TypeAlias = (
    type[Register] | type[Heartbeat] | type[Leave] | type[Handoff] | type[Welcome]
    | type[Assign] | type[RouteMoved] | type[Rehash] | type[HeartbeatAck] | type[Error]
    | type[TraceQuery] | type[TraceReply]
)  # fmt: skip

FROM_NODE: tuple[MessageClass, ...] = (Register, Heartbeat, Leave, Handoff, TraceReply)
FROM_HALOD: tuple[MessageClass, ...] = (
    Welcome, Assign, RouteMoved, Rehash, HeartbeatAck, Error, Handoff, TraceQuery
)  # fmt: skip


# -- encoding ------------------------------------------------------------------------------

_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)  # built once


def _move_dict(move: RouteMove) -> WireDict:
    out: WireDict = {"route": move.route, "name": move.name}
    if move.browser is not None:
        out["browser"] = move.browser
    if move.sp is not None:
        out["sp"] = move.sp
    if move.handoff:
        out["handoff"] = True
    return out


def to_wire(message: Message) -> WireDict:
    """The JSON object of ``message``, fields in the order this protocol has always sent."""
    out: WireDict = {"type": message.TYPE}
    match message:
        case Register():
            out.update(version=VERSION, name=message.name, browser=message.browser,
                       sp=message.sp, capacity=message.capacity)  # fmt: skip
            if message.node_id is not None:
                out["node_id"] = message.node_id
            if message.secret is not None:
                out["secret"] = message.secret
            if message.hashes is not None:
                out["hashes"] = list(message.hashes)
            if message.features:
                out["features"] = list(message.features)
        case Heartbeat():
            out["seq"] = message.seq
            if message.connections is not None:
                out["connections"] = message.connections
            if message.mailboxes is not None:
                out["mailboxes"] = message.mailboxes
            if message.load is not None:
                out["load"] = message.load.to_wire()
        case TraceQuery():
            out.update(qid=message.qid, user=message.user, session=message.session,
                       location=message.location, event=message.event,
                       limit=message.limit)  # fmt: skip
        case TraceReply():
            out.update(qid=message.qid, answer=message.answer)
        case Leave():
            pass
        case Handoff():
            out.update(to=message.to, done=list(message.done), mailboxes=list(message.mailboxes))
            if message.users:
                out["users"] = list(message.users)
        case Welcome() | Assign():
            out.update(node_id=message.node_id, role=message.role.value,
                       routes=list(message.routes))  # fmt: skip
            if message.incoming:
                out["incoming"] = list(message.incoming)
            if isinstance(message, Welcome):
                out.update(total_routes=message.total_routes,
                           heartbeat_interval=message.heartbeat_interval,
                           missed_heartbeats=message.missed_heartbeats)  # fmt: skip
            if message.version is not None:
                out["version"] = message.version
            if message.hash_version != 1:  # absent means 1: the wire of older HaloDs
                out["hash_version"] = message.hash_version
        case RouteMoved():
            out["moves"] = [_move_dict(m) for m in message.moves]
        case Rehash():
            out.update(hash_version=message.hash_version, version=message.version,
                       owners=[_move_dict(m) for m in message.owners])  # fmt: skip
        case HeartbeatAck():
            out["seq"] = message.seq
        case Error():
            out.update(code=message.code, message=message.message)
            if message.leader is not None:
                out["leader"] = message.leader
    return out


def encode(message: Message) -> bytes:
    return _ENCODER.encode(to_wire(message)).encode()


def encode_heartbeat_ack(seq: int) -> bytes:
    """The most frequent message, preformatted (equal to encode(HeartbeatAck(seq)))."""
    return b'{"type":"heartbeat_ack","seq":%d}' % seq


# -- decoding and validation ---------------------------------------------------------------


def _bad(text: str) -> ControlError:
    return ControlError(ErrorCode.BAD_MESSAGE, text)


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _routes(msg: WireDict, name: str, optional: bool = False) -> tuple[int, ...]:
    routes = msg.get(name)
    if routes is None and optional:
        return ()
    if not isinstance(routes, list) or not all(_is_int(r) and 1 <= r <= MAX_ROUTES for r in routes):
        raise _bad(f"{name} must be a list of route ids")
    return tuple(routes)


def _int(msg: WireDict, name: str, low: int, high: int) -> int:
    value = msg.get(name)
    if not _is_int(value) or not low <= value <= high:
        raise _bad(f"{name} must be an integer in {low}..{high}")
    return value


def _opt_int(msg: WireDict, name: str, low: int, high: int) -> int | None:
    return None if msg.get(name) is None else _int(msg, name, low, high)


def _str(msg: WireDict, name: str, pattern: re.Pattern[str]) -> str:
    value = msg.get(name)
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise _bad(f"{name} is missing or malformed")
    return value


def _role(msg: WireDict) -> Role:
    role = msg.get("role")
    if role not in (Role.ACTIVE, Role.SPARE, Role.DRAINED):
        raise _bad("role is active, spare or drained")
    return Role(role)


def _move(entry: object) -> RouteMove:
    """One route_moved entry: the node uses route as an id, sp in replies to web apps."""
    if not isinstance(entry, dict):
        raise ValueError("not an object")
    route = entry.get("route")
    if not _is_int(route) or not 1 <= route <= MAX_ROUTES:
        raise ValueError("bad route")
    name, browser, sp = entry.get("name"), entry.get("browser"), entry.get("sp")
    if not all(v is None or isinstance(v, str) for v in (name, browser, sp)):
        raise ValueError("bad address")
    handoff = entry.get("handoff", False)
    if not isinstance(handoff, bool):
        raise ValueError("bad handoff")
    return RouteMove(route, name, browser, sp, handoff)


def _register(msg: WireDict) -> Register:
    version = _int(msg, "version", 0, 2**31)
    if version != VERSION:
        raise ControlError(ErrorCode.UNSUPPORTED_VERSION, f"this HaloD speaks version {VERSION}")
    name = _str(msg, "name", NAME)
    browser = _str(msg, "browser", _ADDRESS)
    sp = _str(msg, "sp", _ADDRESS)
    try:  # the data plane forwards to these
        parse_host_port(browser)
        parse_sp_address(sp)
    except ConfigError as e:
        raise _bad(str(e)) from None
    capacity = _int(msg, "capacity", 0, 2**40)
    node_id = _opt_int(msg, "node_id", 1, 2**31)
    secret = msg.get("secret")
    if secret is not None and not isinstance(secret, str):
        raise _bad("secret must be a string")
    hashes = msg.get("hashes")
    if hashes is not None and (
        not isinstance(hashes, list) or not 0 < len(hashes) <= 16
        or not all(_is_int(v) and 1 <= v <= 2**31 for v in hashes)
    ):  # fmt: skip
        raise _bad("hashes must be a list of hash versions")
    features = msg.get("features", [])
    if (
        not isinstance(features, list) or len(features) > MAX_FEATURES
        or not all(isinstance(f, str) and _FEATURE.fullmatch(f) for f in features)
    ):  # fmt: skip
        raise _bad(f"features must be a list of at most {MAX_FEATURES} names [a-z][a-z0-9_]*")
    return Register(name, browser, sp, capacity, node_id, secret,
                    None if hashes is None else tuple(hashes), tuple(features))  # fmt: skip


def _heartbeat(msg: WireDict) -> Heartbeat:
    load = msg.get("load")
    return Heartbeat(
        _int(msg, "seq", 0, 2**62),
        _opt_int(msg, "connections", 0, 2**40),
        _opt_int(msg, "mailboxes", 0, 2**40),
        None if load is None else HeartbeatLoad.from_wire(load),
    )


def _opt_part(msg: WireDict, name: str) -> str | None:
    value = msg.get(name)
    if value is not None and not isinstance(value, str):
        raise _bad(f"{name} must be a string or null")
    return value


def trace_query(
    qid: int, user: str, session: str | None = None, location: str | None = None,
    event: str | None = None, limit: int | None = None,
) -> TraceQuery:  # fmt: skip
    """A checked TraceQuery: key parts by the connection key's rules (docs/protocol.md,
    "Connection keys"), ``event`` 1–MAX_EVENT_ID characters, ``limit`` 1–MAX_TRACE_LIMIT.
    ValueError says what is wrong (HaloD's ``/trace`` answers it as ``bad_request``)."""
    if not _is_int(qid) or not 0 <= qid <= MAX_QID:
        raise ValueError(f"qid must be an integer in 0..{MAX_QID}")
    if not isinstance(user, str) or any(
        p is not None and not isinstance(p, str) for p in (session, location)
    ):
        raise ValueError("user, session and location must be strings")
    try:
        ConnectionKey.from_json([user, session or "", location or ""])
    except KeyError_ as e:
        raise ValueError(str(e)) from None
    if WILDCARD in (user, session, location):  # no key holds it: leave a part out for "any"
        raise ValueError(f'"{WILDCARD}" is reserved in a key part (leave session or location '
                         'out to ask for any)')  # fmt: skip
    if event is not None and (not isinstance(event, str) or not 0 < len(event) <= MAX_EVENT_ID):
        raise ValueError(f"event must be a string of 1-{MAX_EVENT_ID} characters")
    if limit is not None and (not _is_int(limit) or not 1 <= limit <= MAX_TRACE_LIMIT):
        raise ValueError(f"limit must be an integer in 1..{MAX_TRACE_LIMIT}")
    return TraceQuery(qid, user, session, location, event, limit)


def _trace_query(msg: WireDict) -> TraceQuery:
    try:
        return trace_query(
            _int(msg, "qid", 0, MAX_QID), cast(str, msg.get("user")),
            _opt_part(msg, "session"), _opt_part(msg, "location"), _opt_part(msg, "event"),
            _opt_int(msg, "limit", 1, MAX_TRACE_LIMIT),
        )  # fmt: skip
    except ValueError as e:
        raise _bad(f"trace_query: {e}") from None


def _trace_reply(msg: WireDict) -> TraceReply:
    qid = _int(msg, "qid", 0, MAX_QID)
    answer = msg.get("answer")
    if not isinstance(answer, dict):
        raise _bad("answer must be an object")
    keys = answer.get("keys")
    if not isinstance(keys, list) or not all(isinstance(k, dict) for k in keys):
        raise _bad("answer.keys must be a list of objects")
    return TraceReply(qid, answer)


def _heartbeat_ack(msg: WireDict) -> HeartbeatAck:
    return HeartbeatAck(_int(msg, "seq", 0, 2**62))


def _leave(msg: WireDict) -> Leave:
    return Leave()


def _handoff(msg: WireDict) -> Handoff:
    to = _str(msg, "to", NAME)
    done = _routes(msg, "done")
    mailboxes = msg.get("mailboxes")
    if not isinstance(mailboxes, list) or not all(isinstance(m, dict) for m in mailboxes):
        raise _bad("mailboxes must be a list of objects")
    users = msg.get("users", [])
    if not isinstance(users, list) or not all(isinstance(u, dict) for u in users):
        raise _bad("users must be a list of objects")
    return Handoff(to, done, tuple(mailboxes), tuple(users))


def _hash_version(msg: WireDict, optional: bool = True) -> int:
    value = msg.get("hash_version")
    if value is None and optional:
        return 1  # an older HaloD: its tables are all version 1
    if not _is_int(value) or value not in HASH_VERSIONS:
        raise _bad(f"hash_version must be one of {', '.join(map(str, HASH_VERSIONS))}")
    return value


def _assign(msg: WireDict) -> Assign:
    node_id = _opt_int(msg, "node_id", 1, 2**31)
    role = _role(msg)
    return Assign(node_id, role, _routes(msg, "routes"), _routes(msg, "incoming", optional=True),
                  _opt_int(msg, "version", 0, 2**62), _hash_version(msg))  # fmt: skip


def _welcome(msg: WireDict) -> Welcome:
    assign = _assign(msg)
    total = _int(msg, "total_routes", 1, MAX_ROUTES)
    interval = msg.get("heartbeat_interval")
    if (
        not isinstance(interval, int | float) or isinstance(interval, bool)
        or not MIN_HEARTBEAT_INTERVAL <= interval <= MAX_HEARTBEAT_INTERVAL
    ):  # fmt: skip
        raise _bad(
            f"heartbeat_interval must be {MIN_HEARTBEAT_INTERVAL:g} to "
            f"{MAX_HEARTBEAT_INTERVAL:g} seconds"
        )
    missed = _int(msg, "missed_heartbeats", 1, 1000)
    return Welcome(assign.node_id, assign.role, assign.routes, total, float(interval), missed,
                   assign.incoming, assign.version, assign.hash_version)  # fmt: skip


def _route_moved(msg: WireDict) -> RouteMoved:
    moves = msg.get("moves")
    try:
        if not isinstance(moves, list):
            raise ValueError("not a list")
        return RouteMoved(tuple(_move(m) for m in moves))
    except ValueError:
        raise _bad("moves must be a list of {route, name, browser, sp, handoff}") from None


def _rehash(msg: WireDict) -> Rehash:
    hash_version = _hash_version(msg, optional=False)
    version = _int(msg, "version", 0, 2**62)
    owners = msg.get("owners")
    try:
        if not isinstance(owners, list) or len(owners) > MAX_ROUTES:
            raise ValueError("not a list")
        moves = tuple(_move(m) for m in owners)
    except ValueError:
        raise _bad("owners must be a list of {route, name, browser, sp}") from None
    if len({m.route for m in moves}) != len(moves):
        raise _bad("owners names a route twice")
    return Rehash(hash_version, version, moves)


def _error(msg: WireDict) -> Error:
    code, text = msg.get("code"), msg.get("message")
    if not isinstance(code, str) or not isinstance(text, str):
        raise _bad("an error has a code and a message")
    leader = msg.get("leader")
    if leader is not None and (
        not isinstance(leader, str) or not _ADDRESS.fullmatch(leader)
    ):  # fmt: skip
        raise _bad("leader must be a control address")
    if leader is not None:
        try:
            parse_sp_address(leader)
        except ConfigError:
            raise _bad("leader must be a control address tcp://host:port") from None
    return Error(code, text, leader)


_PARSERS: Mapping[str, Callable[[WireDict], Message]] = {
    Register.TYPE: _register,
    Heartbeat.TYPE: _heartbeat,
    Leave.TYPE: _leave,
    Handoff.TYPE: _handoff,
    Welcome.TYPE: _welcome,
    Assign.TYPE: _assign,
    RouteMoved.TYPE: _route_moved,
    Rehash.TYPE: _rehash,
    HeartbeatAck.TYPE: _heartbeat_ack,
    Error.TYPE: _error,
    TraceQuery.TYPE: _trace_query,
    TraceReply.TYPE: _trace_reply,
}


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def decode(body: bytes, allowed: Iterable[MessageClass]) -> Message:
    """Parse and validate one message whose class is in ``allowed`` (FROM_NODE or
    FROM_HALOD); raise ControlError (``bad_message``, ``unsupported_version``) otherwise."""
    try:
        # UTF-8 only, and no NaN/Infinity: what encode() can send back (a relayed or
        # re-encoded message must stay JSON; found by fuzzing).
        msg = json.loads(body.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _bad("not a JSON message") from None
    if not isinstance(msg, dict):
        raise _bad("a message is a JSON object")
    kind = msg.get("type")
    if not isinstance(kind, str) or kind not in {cls.TYPE for cls in allowed}:
        raise _bad(f"unexpected message type {str(kind)[:40]!r}")
    return _PARSERS[kind](msg)


def decode_from_node(body: bytes) -> NodeMessage:
    """A message a node sent (HaloD's side)."""
    return cast(NodeMessage, decode(body, FROM_NODE))


def decode_from_halod(body: bytes) -> HaloDMessage:
    """A message HaloD sent (the node's side)."""
    return cast(HaloDMessage, decode(body, FROM_HALOD))


# -- the hand-off --------------------------------------------------------------------------


def escaped_size(text: str) -> int:
    """Bytes ``text`` takes as a JSON string in a control message, which escapes each
    non-ASCII character as ``\\uXXXX`` and each quote and backslash: up to 12 bytes a
    character, so a payload's length in characters is not its size on the wire."""
    return len(json.dumps(text))


def handoff_messages(
    to: str, done: Iterable[int], entries: Iterable[WireDict], chunk: int = HANDOFF_CHUNK,
    users: Iterable[WireDict] = (),
) -> list[Handoff]:  # fmt: skip
    """An old owner's exported mailboxes (orbited.node.hub.export_entry) as ``handoff``
    messages of about ``chunk`` bytes each; a large mailbox is split across messages
    (same key and stream, later events). The last message names the ``done`` routes and
    carries the per-user entries ``users`` (docs/halod-protocol.md, "Hand-off").

    A message's size counts what it sends: each event (its payload as escaped in the
    message), each entry's other members, an entry's ``trace`` (sent with the first part
    of a split mailbox only; a trace of more than half a chunk is left out, as a trace
    must never cost a mailbox) and the last message's ``users``."""
    batches: list[list[WireDict]] = []
    sizes: list[int] = []
    batch: list[WireDict] = []
    size = 0

    def flush() -> None:
        nonlocal batch, size
        batches.append(batch)
        sizes.append(size)
        batch, size = [], 0

    def piece(head: WireDict, part: list[Any], trace: object) -> WireDict:
        out = {**head, "events": part}
        if trace:
            out["trace"] = trace
        return out

    for entry in entries:
        trace = entry.get("trace")
        head = {k: v for k, v in entry.items() if k not in ("events", "trace")}
        overhead = len(_ENCODER.encode(head)) + 16  # its members, "events":[] and commas
        trace_cost = len(_ENCODER.encode(trace)) + 10 if trace else 0
        if trace_cost > chunk // 2:
            trace, trace_cost = None, 0
        if batch and size + overhead + trace_cost > chunk:
            flush()
        size += overhead + trace_cost
        part: list[Any] = []
        for event in entry["events"]:
            cost = escaped_size(event[1]) + 16
            if size + cost > chunk and (part or batch):
                if part:
                    batch.append(piece(head, part, trace))
                    trace = None  # the first part carried it
                flush()
                size += overhead + (trace_cost if trace else 0)
                part = []
            part.append(event)
            size += cost
        batch.append(piece(head, part, trace))
        if size > chunk:
            flush()
    per_user = tuple(users)
    users_cost = len(_ENCODER.encode(list(per_user))) if per_user else 0
    if batch and size + users_cost > chunk:
        flush()
    if batch or not batches or (users_cost and sizes[-1] + users_cost > chunk):
        flush()  # the users go in a message of their own when the last one is full
    last = len(batches) - 1
    finished = tuple(sorted(done))
    return [
        Handoff(
            to, finished if i == last else (), tuple(mailboxes), per_user if i == last else ()
        )  # fmt: skip
        for i, mailboxes in enumerate(batches)
    ]


# -- tracing -------------------------------------------------------------------------------


def fit_trace_reply(qid: int, answer: WireDict, limit: int = MAX_MESSAGE // 2) -> TraceReply:
    """The ``trace_reply`` for ``answer``, at most ``limit`` bytes encoded: when larger, the
    oldest records go first (``dispatches`` and ``notes`` of every key, by ``t``), then
    whole keys from the end, and ``truncated`` is set. ``answer`` is not changed."""
    size = len(encode(TraceReply(qid, answer)))
    if size <= limit:
        return TraceReply(qid, answer)
    given = answer.get("keys")
    keys: list[Any] = [dict(k) if isinstance(k, dict) else k for k in given or ()
                       ] if isinstance(given, list) else []  # fmt: skip
    items: list[tuple[float, int, str, int, int]] = []  # (t, key index, list, index, bytes)
    for k, key in enumerate(keys):
        if not isinstance(key, dict):
            continue
        for member in ("dispatches", "notes"):
            rows = key.get(member)
            if not isinstance(rows, list):
                continue
            key[member] = list(rows)
            for i, row in enumerate(rows):
                t = row.get("t") if isinstance(row, dict) else None
                when = float(t) if isinstance(t, int | float) and not isinstance(t, bool) else 0.0
                items.append((when, k, member, i, len(_ENCODER.encode(row)) + 1))
    items.sort()
    dropped: set[tuple[int, str, int]] = set()
    for _when, k, member, i, cost in items:
        if size <= limit:
            break
        dropped.add((k, member, i))
        size -= cost
    for k, key in enumerate(keys):
        for member in ("dispatches", "notes"):
            rows = key.get(member) if isinstance(key, dict) else None
            if isinstance(rows, list):
                key[member] = [r for i, r in enumerate(rows) if (k, member, i) not in dropped]
    reply = TraceReply(qid, {**answer, "keys": keys, "truncated": True})
    size = len(encode(reply))
    if size > limit:  # key headers alone are too many: drop keys from the end
        while keys and size > limit:
            size -= len(_ENCODER.encode(keys.pop())) + 1
        reply = TraceReply(qid, {**answer, "keys": keys, "truncated": True})
    return reply
