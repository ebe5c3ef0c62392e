"""The built-in data plane: a Twisted TCP proxy on the 2×N route ports.

Each accepted connection is forwarded to the route's owner at that moment, with
twisted.protocols.portforward's producer/consumer wiring (a slow side pauses reading on
the other, so the proxy never buffers without bound). A route without an owner accepts
and closes at once. When a route's owner changes, its open connections are closed after
``close_delay`` seconds: long enough for the old node's reconnect frames to pass.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorTCP, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import portforward

from halod.dataplane import Owner, Ports

BROWSER, SP = "browser", "sp"


class _Client(portforward.ProxyClient):
    noisy = False

    def connectionMade(self) -> None:  # noqa: N802
        if self.peer is None or self.peer.gone:
            # The accepted side closed while we were connecting to the node: portforward
            # would wire us to a dead transport and keep this connection open forever
            # (an fd here and a connection at the node, per browser that gave up early).
            self.peer = None
            self.transport.loseConnection()
            return
        setnodelay = getattr(self.transport, "setTcpNoDelay", None)
        if setnodelay is not None:
            setnodelay(True)
        super().connectionMade()


class _ClientFactory(portforward.ProxyClientFactory):
    noisy = False
    protocol = _Client


class _Server(portforward.ProxyServer):
    """One accepted connection on a route port."""

    noisy = False
    clientProtocolFactory = _ClientFactory
    factory: RouteFactory
    gone = False  # connectionLost ran

    def connectionMade(self) -> None:  # noqa: N802
        target = self.factory.target()
        if target is None:
            self.factory.proxy.refused += 1
            self.transport.loseConnection()
            return
        self.reactor = self.factory.proxy.reactor
        setnodelay = getattr(self.transport, "setTcpNoDelay", None)
        if setnodelay is not None:
            setnodelay(True)
        self.factory.connections.add(self)
        self.transport.pauseProducing()  # nothing is read until the node is connected
        client = self.clientProtocolFactory()
        client.setServer(self)
        host, port = target
        self.reactor.connectTCP(host, port, client, timeout=5)

    def connectionLost(self, reason: object = None) -> None:  # noqa: N802
        self.gone = True
        self.factory.connections.discard(self)
        super().connectionLost(reason)


class RouteFactory(Factory):
    noisy = False
    protocol = _Server

    def __init__(self, proxy: ProxyDataPlane, route: int, side: str) -> None:
        self.proxy = proxy
        self.route = route
        self.side = side
        self.connections: set[_Server] = set()

    def target(self) -> tuple[str, int] | None:
        owner = self.proxy.owners.get(self.route)
        if owner is None:
            return None
        return owner.browser if self.side == BROWSER else owner.sp


class ProxyDataPlane:
    log = Logger()

    def __init__(self, ports: Ports, reactor: IReactorTCP, close_delay: float = 1.0) -> None:
        self.ports = ports
        self.reactor = reactor
        self.clock: IReactorTime = reactor  # type: ignore[assignment]
        self.close_delay = close_delay
        self.owners: dict[int, Owner | None] = {}
        self.factories: dict[tuple[int, str], RouteFactory] = {}
        self.listening: list[IListeningPort] = []
        self._pending: set[IDelayedCall] = set()
        self.refused = 0
        self.cut = 0

    def start(self, owners: dict[int, Owner | None]) -> None:
        self.owners = dict(owners)
        for route in range(1, self.ports.routes + 1):
            for side, port in ((BROWSER, self.ports.browser(route)), (SP, self.ports.sp(route))):
                factory = self.factories[(route, side)] = RouteFactory(self, route, side)
                self.listening.append(
                    self.reactor.listenTCP(port, factory, backlog=1024, interface=self.ports.host)
                )

    def apply(self, owners: dict[int, Owner | None]) -> None:
        moved = [r for r in range(1, self.ports.routes + 1) if owners.get(r) != self.owners.get(r)]
        self.owners = dict(owners)
        doomed = [
            conn
            for route in moved
            for side in (BROWSER, SP)
            for conn in self.factories[(route, side)].connections
        ]
        if doomed:
            call = self.clock.callLater(self.close_delay, self._cut, doomed)
            self._pending.add(call)

    def _cut(self, doomed: list[_Server]) -> None:
        self._pending = {c for c in self._pending if c.active()}
        for conn in doomed:
            if conn.transport is not None and conn.connected:
                self.cut += 1
                conn.transport.loseConnection()
                if conn.peer is not None:
                    conn.peer.transport.loseConnection()

    def stop(self) -> defer.Deferred[Any]:
        for call in self._pending:
            if call.active():
                call.cancel()
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in self.listening])

    def stats(self) -> dict[str, Any]:
        per_route = {
            str(route): {
                side: len(self.factories[(route, side)].connections) for side in (BROWSER, SP)
            }
            for route in range(1, self.ports.routes + 1)
        }
        return {
            "backend": "proxy",
            "host": self.ports.host,
            "browser_base": self.ports.browser_base,
            "sp_base": self.ports.sp_base,
            "routes": per_route,
            "connections": sum(sum(v.values()) for v in per_route.values()),
            "refused": self.refused,
            "cut": self.cut,
        }
