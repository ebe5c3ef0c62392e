"""The node's link to HaloD (docs/halod-protocol.md): register, heartbeat, obey assignments.

A twisted.application ClientService keeps the control connection up (reconnecting with
backoff); each connection registers the node, heartbeats at the interval HaloD names,
and hands assignments and 'route moved' notices to the hub, which tells browsers on lost
routes to reconnect. Losing HaloD changes nothing for browsers: the node keeps serving
the routes it has until HaloD says otherwise.

Several HaloD addresses (HaloD on etcd: one leads, the others follow): each connection
goes to the next address; a follower answers ``error not_leader`` (naming the leader's
control address when it knows it), and the next connection goes there. An ``assign`` or
``welcome`` older than the table version this node holds is not obeyed
(docs/halod-protocol.md, "Several HaloD").

Load and tracing (docs/halod-protocol.md): ``register`` announces the features
``trace`` and ``load``; each heartbeat carries the hub's ``load_report`` (counters, the
ack-latency samples since the previous beat, attached connections per route), and a
``trace_query`` is answered with the hub's ``trace_answer``.

Hash versions (docs/hashing.md): ``register`` names the versions this node speaks;
``welcome`` and ``assign`` carry the cluster's, which the hub applies; ``rehash`` moves the
cluster to another version, and this node hands every key whose route moved to the
route's owner (docs/halod.md, "Rehash").
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any, assert_never

from twisted.application import internet, service
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IReactorTCP,
    IReactorTime,
    IStreamClientEndpoint,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from orbited.core.control import (
    CONTROL_PROTOCOL,
    FEATURES,
    MAX_MESSAGE,
    NAME,
    Assign,
    ControlError,
    Error,
    ErrorCode,
    HaloDMessage,
    Handoff,
    Heartbeat,
    HeartbeatAck,
    HeartbeatLoad,
    Leave,
    NodeMessage,
    Register,
    Rehash,
    RouteMove,
    RouteMoved,
    TraceQuery,
    Welcome,
    decode_from_halod,
    encode,
    escaped_size,
    fit_trace_reply,
    halod_addresses,
    handoff_messages,
)
from orbited.core.hashing import HASH_VERSIONS
from orbited.core.routes import Role
from orbited.core.settings import ConfigError, parse_sp_address
from orbited.node.hub import Hub
from orbited.runtime.twisted_compat import write_through
from orbited.sp.wire import SPConnection, SPProtocolError, encode_message

# Errors after which this node holds no routes: HaloD has given them to others.
_ROUTES_GONE = frozenset({ErrorCode.FAILED, ErrorCode.ID_CLAIMED, ErrorCode.ID_MISMATCH})
# A heartbeat's ``load`` names every route's attached count (``routes_full``) on the first
# beat of a connection, after each assignment, and every FULL_LOAD_EVERY-th beat (HaloD
# merges the deltas in between, and a lost count heals within this many beats).
FULL_LOAD_EVERY = 30


def _fitting(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Leave out events too large for one control message (only possible when
    max_payload is raised near MAX_MESSAGE): the browser then sees a gap. A gap is one
    range ending at the mailbox's ``evicted`` (docs/protocol.md, "Mailboxes and
    resume"), so ``evicted`` becomes the highest seq left out and the events before it
    go too, as if the old owner's limits had evicted them: a seq missing without a gap
    would read as replaced by a latest-value event, not lost."""
    limit = MAX_MESSAGE // 2
    for entry in entries:
        events = entry["events"]
        lost = max((e[0] for e in events if _too_large(e[1], limit)), default=None)
        if lost is not None:
            entry["events"] = [e for e in events if e[0] > lost]
            entry["evicted"] = max(entry.get("evicted") or 0, lost)
    return entries


def _too_large(text: str, limit: int) -> bool:
    """Is a payload (JSON text, kept as UTF-8 with non-ASCII characters as they are)
    larger than ``limit`` bytes once escaped in a control message, which writes each
    non-ASCII character as ``\\uXXXX`` (up to 12 bytes a character)? Only a payload
    that could be is encoded to find out."""
    return len(text) * 12 + 2 > limit and escaped_size(text) > limit


_FROM = b',"from":"'


def relayed_from(body: bytes) -> str | None:
    """The sender's name HaloD appends to a relayed ``handoff`` (its last member:
    ``…,"from":"name"}``); None when HaloD added none (an older HaloD)."""
    at = body.rfind(_FROM)
    if at < 0:
        return None
    tail = body[at + len(_FROM) :].rstrip()
    if not tail.endswith(b'"}'):
        return None
    name = tail[:-2].decode("utf-8", "replace")
    return name if NAME.fullmatch(name) else None


class LinkProtocol(Protocol):
    log = Logger()
    transport: ITCPTransport  # set by makeConnection

    def __init__(self, link: HaloDLink) -> None:
        self.link = link
        self._sp = SPConnection(CONTROL_PROTOCOL, CONTROL_PROTOCOL, MAX_MESSAGE)
        self._heartbeat: task.LoopingCall | None = None
        self._seq = 0
        self._last_ack = 0.0
        self._last_beat = 0.0
        self._missed_allowed = 3
        self.interval = 1.0
        self._full_load = True  # the next heartbeat's load names every route

    def connectionMade(self) -> None:  # noqa: N802
        setnodelay = getattr(self.transport, "setTcpNoDelay", None)
        if setnodelay is not None:
            setnodelay(True)
        self.transport.write(self._sp.initial_bytes())
        self.send(self.link.register_message())

    def send(self, message: NodeMessage) -> None:
        # Written through when the socket is idle: a planned move's hand-off leaves now,
        # not after the rest of the reactor turn (every moved browser's reconnect frame).
        write_through(self.transport, encode_message(encode(message)))

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        try:
            for body in self._sp.receive(data):
                msg = decode_from_halod(body)
                if isinstance(msg, Handoff):
                    self._handoff(msg, relayed_from(body))
                else:
                    self._handle(msg)
        except (SPProtocolError, ControlError) as e:
            self.log.error("HaloD sent something unexpected ({e}); reconnecting", e=e)
            self.transport.abortConnection()

    def _handle(self, msg: HaloDMessage) -> None:
        link = self.link
        match msg:
            case HeartbeatAck():
                self._last_ack = link.clock.seconds()
            case Welcome():
                if not link.welcome_current(msg):
                    # An older table than ours: a HaloD that no longer leads. Try the next.
                    self.transport.abortConnection()
                    return
                self.interval = msg.heartbeat_interval
                self._missed_allowed = msg.missed_heartbeats
                link.assigned(msg, total=msg.total_routes)
                self._full_load = True
                self._start_heartbeats()
            case Assign():
                if link.stale(msg):
                    return
                link.assigned(msg)
                self._full_load = True
            case RouteMoved():
                self._routes_moved(msg.moves)
            case Rehash():
                if link.stale(msg):
                    return
                self._rehash(msg)
            case Handoff():
                self._handoff(msg, None)
            case Error():
                link.refused(msg.code, msg.message, msg.leader)
            case TraceQuery():
                self._trace(msg)
            case _:
                assert_never(msg)

    def _trace(self, msg: TraceQuery) -> None:
        """Answer HaloD's trace query with this node's records (the JSON of its
        ``/orbited/trace``), cut to half a control message, oldest records first."""
        try:
            answer = self.link.hub.trace_answer(
                user=msg.user, session=msg.session, location=msg.location, event=msg.event,
                limit=msg.limit,
            )  # fmt: skip
            reply = fit_trace_reply(msg.qid, answer)
        except Exception:
            # A fault in the trace must not cost the control connection (and the routes).
            self.log.failure("trace query {qid} failed", qid=msg.qid)
            failed = {"node": self.link.node_name, "keys": [], "error": "internal_error"}
            reply = fit_trace_reply(msg.qid, failed)
        self.send(reply)

    def _handoff(self, msg: Handoff, sender: str | None) -> None:
        """Mailboxes from ``sender`` (the name HaloD adds when it relays; None from an
        older HaloD): a route held for a rehash completes once every peer sent ``done``."""
        n = self.link.hub.handoff_received(list(msg.mailboxes), msg.done, sender, msg.users)
        if msg.done:
            self.log.info("hand-off of routes {routes} from {sender} done",
                          routes=list(msg.done), sender=sender or "HaloD")  # fmt: skip
        elif n:
            self.log.debug("{n} mailboxes handed over", n=n)

    def _routes_moved(self, entries: tuple[RouteMove, ...]) -> None:
        """Evict the moved routes' keys; for moves to a live node, send their mailboxes
        (through HaloD) in the same reactor turn, so no event accepted here is left out."""
        hub = self.link.hub
        moves = {m.route: m.sp for m in entries}
        targets: dict[str, list[int]] = {}
        for m in entries:
            if m.handoff and m.name is not None:
                targets.setdefault(m.name, []).append(m.route)
        exports: list[dict[str, Any]] = []
        users: list[dict[str, Any]] = []  # held wildcard events, offline watches

        def send_handoffs() -> None:  # before the browsers are told to reconnect
            for to, routes in targets.items():
                mine = [e for e in exports if e["route"] in set(routes)]
                theirs = [u for u in users if u.get("route") in set(routes)]
                for message in handoff_messages(to, routes, _fitting(mine), users=theirs):
                    self.send(message)
                self.log.info(
                    "routes {routes} moved to {to}: {n} mailboxes handed over",
                    routes=routes, to=to, n=len(mine),
                )  # fmt: skip

        handed = [r for rs in targets.values() for r in rs]
        owners = {m.route: m.name for m in entries if m.name is not None}  # for key traces
        evicted = hub.route_moved(moves, handed, exports, users, exported=send_handoffs,
                                  owners=owners)  # fmt: skip
        self.log.info(
            "HaloD moved routes {routes} away; {n} keys told to reconnect",
            routes=sorted(moves), n=evicted,
        )  # fmt: skip

    def _rehash(self, msg: Rehash) -> None:
        """The cluster's hash version changed: the hub exports the keys whose new route
        another node owns; every other owner gets a hand-off (perhaps empty) whose ``done``
        names its routes, so it knows this node has sent all it had for them. A node that
        owns no route (a spare, a drained node) sends only what it has: owners wait for
        each other's ``done`` only."""
        link = self.link
        link.table_version = msg.version
        users: dict[str, list[dict[str, Any]]] = {}  # per owner: holds, offline watches
        exports = link.hub.rehash(msg.hash_version, msg.owners, me=link.node_name, users=users)
        peers: dict[str, list[int]] = {}
        for m in msg.owners:
            if m.name is not None and m.name != link.node_name:
                peers.setdefault(m.name, []).append(m.route)
        owner = any(m.name == link.node_name for m in msg.owners)
        sent = 0
        for peer, routes in peers.items():
            entries, theirs = exports.get(peer, []), users.get(peer, [])
            if not owner and not entries and not theirs:
                continue  # a spare (or drained node) has nothing to hand; owners wait on owners
            sent += len(entries)
            for message in handoff_messages(peer, routes, _fitting(entries), users=theirs):
                self.send(message)
        self.log.info(
            "HaloD: rehash to hash version {v}; {n} mailboxes handed to {peers} nodes",
            v=msg.hash_version, n=sent, peers=len(peers),
        )  # fmt: skip

    def _start_heartbeats(self) -> None:
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
        self._last_ack = self._last_beat = self.link.clock.seconds()
        self._heartbeat = task.LoopingCall(self._beat)
        self._heartbeat.clock = self.link.clock
        self._heartbeat.start(self.interval, now=False)

    def _beat(self) -> None:
        now = self.link.clock.seconds()
        silent = now - self._last_ack
        # A beat a whole interval late means this node's reactor was busy: acks may sit
        # unread, so HaloD is not blamed this time.
        late = now - self._last_beat > 2 * self.interval
        self._last_beat = now
        if silent > self._missed_allowed * self.interval and not late:
            self.log.warn("HaloD silent for {s:.1f}s; reconnecting", s=silent)
            self.transport.abortConnection()
            return
        self._seq += 1
        # Live connections and mailboxes apart: a drained node is done when its browsers
        # are gone, though their mailboxes linger (docs/halod.md, "Draining").
        # Both are counters (gauges() scans every key: ≈ 22 ms at 100 000 keys, per beat).
        hub = self.link.hub
        full = self._full_load or self._seq % FULL_LOAD_EVERY == 0
        self._full_load = False
        try:
            load: HeartbeatLoad | None = HeartbeatLoad.from_wire(hub.load_report(full))
        except ControlError as e:  # a hub bug: the beat still goes, without its load
            self.log.error("heartbeat load not sent: {e}", e=e.message)
            load = None
            self._full_load = True
        self.send(Heartbeat(self._seq, hub.attached, hub.mailboxes, load))

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()


@implementer(IStreamClientEndpoint)
class HaloDEndpoints:
    """Connects to one HaloD address after another (the ``halod`` list); ``prefer`` makes
    the next connection go to a given address (a follower's not_leader hint)."""

    def __init__(self, reactor: IReactorTCP, addresses: Sequence[str], timeout: float = 5
                 ) -> None:  # fmt: skip
        if not addresses:
            raise ValueError("at least one HaloD address")
        self.reactor = reactor
        self.addresses = [parse_sp_address(a) for a in addresses]
        self.timeout = timeout
        self.index = -1  # the address of the latest connection
        self._preferred: tuple[str, int] | None = None

    def prefer(self, address: str) -> bool:
        """Connect to ``address`` next (False: not a tcp://host:port address)."""
        try:
            self._preferred = parse_sp_address(address)
        except ConfigError:
            return False
        return True

    def next(self) -> tuple[str, int]:
        preferred, self._preferred = self._preferred, None
        if preferred is not None:
            if preferred in self.addresses:
                self.index = self.addresses.index(preferred)
            return preferred
        self.index = (self.index + 1) % len(self.addresses)
        return self.addresses[self.index]

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        host, port = self.next()
        return TCP4ClientEndpoint(self.reactor, host, port, timeout=self.timeout).connect(factory)

    def __repr__(self) -> str:  # ClientService logs its endpoint
        return "HaloD " + ", ".join(f"tcp://{h}:{p}" for h, p in self.addresses)


class HaloDLink(service.MultiService):
    """Keeps this node registered with HaloD. ``addresses()`` gives the (browser, sp)
    addresses HaloD should forward to, known once the listeners are bound. ``halod`` is
    one control address or several (HaloD on etcd): the link finds the leader."""

    log = Logger()

    def __init__(
        self, hub: Hub, name: str, halod: str | Sequence[str],
        addresses: Callable[[], tuple[str, str]], capacity: int, reactor: IReactorTCP,
        secret: str | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.hub = hub
        self.node_name = name  # not the service's ``name``
        self.addresses = addresses
        self.capacity = capacity
        self.secret = secret
        self.clock: IReactorTime = reactor  # type: ignore[assignment]
        self.node_id: int | None = None
        self.role: Role | None = None
        self.table_version: int | None = None  # of the last welcome/assign obeyed
        self._misses = 0  # connections in a row that found no leader (or a stale one)
        self._stale_welcomes = 0
        halods = halod_addresses(halod) if isinstance(halod, str) else list(halod)
        self.endpoints = HaloDEndpoints(reactor, halods)
        factory = Factory.forProtocol(lambda: LinkProtocol(self))
        factory.noisy = False  # it "starts" on every reconnect
        if len(halods) == 1:
            policy = internet.backoffPolicy(initialDelay=0.2, maxDelay=2.0)
        else:  # a new leader appears within the lease TTL: keep looking often
            policy = self._retry_delay(
                internet.backoffPolicy(
                    initialDelay=0.1, maxDelay=0.5, jitter=lambda: random.random() * 0.1
                )
            )
        self.client = internet.ClientService(
            self.endpoints, factory, retryPolicy=policy, clock=self.clock
        )
        self.client.setServiceParent(self)
        # Until HaloD says otherwise this node serves nothing (it may be a spare).
        hub.owned = frozenset()

    def register_message(self) -> Register:
        browser, sp = self.addresses()
        return Register(self.node_name, browser, sp, self.capacity, self.node_id, self.secret,
                        HASH_VERSIONS, FEATURES)  # fmt: skip

    def _retry_delay(self, backoff: Callable[[int], float]) -> Callable[[int], float]:
        """Several HaloDs: the first round through the addresses goes fast (50–150 ms
        apart), then 0.1 s growing to 0.5 s (plus up to 0.1 s), so a node finds a new
        leader within about half a second of its election."""
        count = len(self.endpoints.addresses)

        def delay(attempt: int) -> float:
            n = max(attempt, self._misses)
            if n <= count:
                return 0.05 + random.random() * 0.1
            return backoff(n - count)

        return delay

    def stale(self, msg: Welcome | Assign | Rehash) -> bool:
        """Older than the table this node holds: ignore it (HaloD on etcd: a message of a
        leader already replaced)."""
        held = self.table_version
        if msg.version is None or held is None or msg.version >= held:
            return False
        self.log.warn(
            "HaloD sent a {type} of table version {v}, older than this node's {held}: "
            "ignored", type=msg.TYPE, v=msg.version, held=held,
        )  # fmt: skip
        return True

    def welcome_current(self, msg: Welcome) -> bool:
        """A welcome older than this node's table is refused once per other HaloD address
        (the next one may lead); when every HaloD answers so, the store was reset or
        restored from a backup: obeyed, with a warning."""
        if not self.stale(msg):
            self._stale_welcomes = 0
            return True
        self._stale_welcomes += 1
        if self._stale_welcomes < len(self.endpoints.addresses):
            self._misses += 1
            return False
        self.log.warn("every HaloD holds an older table than this node: obeying it")
        self._stale_welcomes = 0
        self.table_version = None
        return True

    def assigned(self, msg: Welcome | Assign, total: int | None = None) -> None:
        self._misses = 0
        if msg.version is not None:
            self.table_version = msg.version
        self.node_id, self.role = msg.node_id, msg.role
        self.hub.set_hash_version(msg.hash_version)  # before the routes: keys map by it
        evicted = self.hub.assign(msg.routes, total, msg.incoming)
        if self.node_id is None:  # a spare has no node id until it takes routes
            self.log.info(
                "HaloD: {role} node (no id yet), {n} routes; {evicted} keys told to reconnect",
                role=self.role.value, n=len(msg.routes), evicted=evicted,
            )  # fmt: skip
        else:
            self.log.info(
                "HaloD: {role} node {id}, {n} routes; {evicted} keys told to reconnect",
                role=self.role.value, id=self.node_id, n=len(msg.routes), evicted=evicted,
            )  # fmt: skip

    def refused(self, code: str, message: str, leader: str | None = None) -> None:
        if code == ErrorCode.NOT_LEADER:  # a following HaloD: try the leader (or the next)
            self._misses += 1
            if leader is not None and self.endpoints.prefer(leader):
                self.log.info("{message}; trying {leader}", message=message, leader=leader)
            else:
                self.log.info("{message}; trying the next HaloD", message=message)
            return
        self.log.error("HaloD refused this node: {code}: {message}", code=code, message=message)
        if code in _ROUTES_GONE:
            # HaloD gave our routes away; register afresh on the next connection.
            self.node_id, self.role = None, None
            self.hub.assign([])

    def leave(self) -> None:
        """The node is stopping: HaloD hands its routes over at once instead of waiting
        for the grace period."""
        d = self.client.whenConnected(failAfterFailures=1)
        d.addCallback(_send_leave)
        d.addErrback(lambda _: None)


def _send_leave(proto: IProtocol) -> None:
    assert isinstance(proto, LinkProtocol)
    proto.send(Leave())
