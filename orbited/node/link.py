"""The node's link to HaloD (docs/halod-protocol.md): register, heartbeat, obey assignments.

A twisted.application ClientService keeps the control connection up (reconnecting with
backoff); each connection registers the node, heartbeats at the interval HaloD names,
and hands assignments and 'route moved' notices to the hub, which tells browsers on lost
routes to reconnect. Losing HaloD changes nothing for browsers: the node keeps serving
the routes it has until HaloD says otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, assert_never

from twisted.application import internet, service
from twisted.internet import task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IProtocol, IReactorTCP, IReactorTime, ITCPTransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from orbited.core.control import (
    CONTROL_PROTOCOL,
    MAX_MESSAGE,
    Assign,
    ControlError,
    Error,
    ErrorCode,
    HaloDMessage,
    Handoff,
    Heartbeat,
    HeartbeatAck,
    Leave,
    NodeMessage,
    Register,
    RouteMove,
    RouteMoved,
    Welcome,
    decode_from_halod,
    encode,
    handoff_messages,
)
from orbited.core.routes import Role
from orbited.core.settings import parse_sp_address
from orbited.node.hub import Hub
from orbited.sp.wire import SPConnection, SPProtocolError, encode_message

# Errors after which this node holds no routes: HaloD has given them to others.
_ROUTES_GONE = frozenset({ErrorCode.FAILED, ErrorCode.ID_CLAIMED, ErrorCode.ID_MISMATCH})


def _fitting(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Leave out events too large for one control message (only possible when
    max_payload is raised near MAX_MESSAGE): the browser then sees a gap."""
    limit = MAX_MESSAGE // 2
    for entry in entries:
        if any(len(event[1]) > limit for event in entry["events"]):
            entry["events"] = [e for e in entry["events"] if len(e[1]) <= limit]
    return entries


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

    def connectionMade(self) -> None:  # noqa: N802
        setnodelay = getattr(self.transport, "setTcpNoDelay", None)
        if setnodelay is not None:
            setnodelay(True)
        self.transport.write(self._sp.initial_bytes())
        self.send(self.link.register_message())

    def send(self, message: NodeMessage) -> None:
        self.transport.write(encode_message(encode(message)))

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        try:
            for body in self._sp.receive(data):
                self._handle(decode_from_halod(body))
        except (SPProtocolError, ControlError) as e:
            self.log.error("HaloD sent something unexpected ({e}); reconnecting", e=e)
            self.transport.abortConnection()

    def _handle(self, msg: HaloDMessage) -> None:
        link = self.link
        match msg:
            case HeartbeatAck():
                self._last_ack = link.clock.seconds()
            case Welcome():
                self.interval = msg.heartbeat_interval
                self._missed_allowed = msg.missed_heartbeats
                link.assigned(msg, total=msg.total_routes)
                self._start_heartbeats()
            case Assign():
                link.assigned(msg)
            case RouteMoved():
                self._routes_moved(msg.moves)
            case Handoff():
                n = link.hub.handoff_received(list(msg.mailboxes), msg.done)
                if msg.done:
                    self.log.info("hand-off of routes {routes} complete", routes=list(msg.done))
                elif n:
                    self.log.debug("{n} mailboxes handed over", n=n)
            case Error():
                link.refused(msg.code, msg.message)
            case _:
                assert_never(msg)

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
        evicted = hub.route_moved(moves, [r for rs in targets.values() for r in rs], exports)
        for to, routes in targets.items():
            mine = [e for e in exports if e["route"] in set(routes)]
            for message in handoff_messages(to, routes, _fitting(mine)):
                self.send(message)
            self.log.info(
                "routes {routes} moved to {to}: {n} mailboxes handed over",
                routes=routes, to=to, n=len(mine),
            )  # fmt: skip
        self.log.info(
            "HaloD moved routes {routes} away; {n} keys told to reconnect",
            routes=sorted(moves), n=evicted,
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
        self.send(Heartbeat(self._seq, hub.attached, hub.mailboxes))

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()


class HaloDLink(service.MultiService):
    """Keeps this node registered with HaloD. ``addresses()`` gives the (browser, sp)
    addresses HaloD should forward to, known once the listeners are bound."""

    log = Logger()

    def __init__(
        self, hub: Hub, name: str, halod: str, addresses: Callable[[], tuple[str, str]],
        capacity: int, reactor: IReactorTCP, secret: str | None = None,
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
        host, port = parse_sp_address(halod)
        factory = Factory.forProtocol(lambda: LinkProtocol(self))
        factory.noisy = False  # it "starts" on every reconnect
        self.client = internet.ClientService(
            TCP4ClientEndpoint(reactor, host, port, timeout=5),
            factory,
            retryPolicy=internet.backoffPolicy(initialDelay=0.2, maxDelay=2.0),
            clock=self.clock,
        )
        self.client.setServiceParent(self)
        # Until HaloD says otherwise this node serves nothing (it may be a spare).
        hub.owned = frozenset()

    def register_message(self) -> Register:
        browser, sp = self.addresses()
        return Register(self.node_name, browser, sp, self.capacity, self.node_id, self.secret)

    def assigned(self, msg: Welcome | Assign, total: int | None = None) -> None:
        self.node_id, self.role = msg.node_id, msg.role
        evicted = self.hub.assign(msg.routes, total, msg.incoming)
        self.log.info(
            "HaloD: {role} node {id}, {n} routes; {evicted} keys told to reconnect",
            role=self.role.value, id=self.node_id, n=len(msg.routes), evicted=evicted,
        )  # fmt: skip

    def refused(self, code: str, message: str) -> None:
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
