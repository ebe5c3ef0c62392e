"""The built-in proxy's worker process: the 2×N route ports, outside HaloD.

``python -m halod.dataplane.proxy_worker --socket PATH --host H --browser-base B
--sp-base S --routes N`` (HaloD starts it, detached in a session of its own; see
halod/dataplane/proxy.py and docs/halod.md, "The built-in proxy").

Why a process of its own: forwarding bytes costs CPU per byte and per connection, and
in HaloD's reactor it delayed heartbeats (false failovers) while HaloD's death closed
every proxied connection. Here the forwarding has its own reactor and core, HaloD's
control plane never waits behind traffic, and a worker outlives a HaloD that crashes
or restarts: it keeps forwarding with the last table it was given, until a HaloD
re-attaches and sends the current one. It has no orphan timeout: it forwards until a
HaloD stops it (``stop``), SIGTERM, or a HaloD with another port layout replaces it.

``Forwarder`` is the data path (twisted.protocols.portforward's producer/consumer
wiring, as before: a slow side pauses reading on the other, so nothing buffers without
bound). ``ControlServer`` is the UNIX socket HaloD talks to (halod/dataplane/
proxy_protocol.py); one HaloD at a time, a newer connection replaces an older one.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.internet import defer, task, tcp
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IPushProducer,
    IReactorTCP,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, ServerFactory
from twisted.logger import ILogFilterPredicate, LogEvent, Logger, PredicateResult
from twisted.protocols import basic, portforward
from zope.interface import implementer

from halod.dataplane import proxy_protocol as pp
from halod.dataplane.base import Owner, Ports
from orbited.runtime.twisted_compat import write_through

BROWSER, SP = "browser", "sp"
STATS_INTERVAL = 0.25  # seconds between pushes of changed counts
KEEPALIVE = 1.0  # a stats message at least this often, changed or not (HaloD's liveness check)
CONNECT_TIMEOUT = 5  # seconds to reach a route's owner before the browser side is closed


class _Client(portforward.ProxyClient):
    noisy = False
    transport: ITCPTransport
    peer: _Server | None

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        # As the node writes events (orbited.runtime.twisted_compat.write_through): on an
        # idle peer socket the bytes go out now, not on the next reactor turn after an
        # EPOLLOUT round trip; a partial write falls back to transport.write, whose
        # producer wiring still pauses this side while the peer is slow.
        if self.peer is not None:
            write_through(self.peer.transport, data)

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
    # ProxyServer declares a ProxyFactory, for its fixed host and port; connectionMade
    # here asks the RouteFactory for the route's owner instead.
    factory: RouteFactory  # type: ignore[assignment]
    peer: _Client | None
    gone = False  # connectionLost ran

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.peer is not None:
            write_through(self.peer.transport, data)  # as _Client.dataReceived

    def connectionMade(self) -> None:  # noqa: N802
        target = self.factory.target()
        if target is None:
            self.factory.forwarder.refused += 1
            self.transport.loseConnection()
            return
        reactor = self.factory.forwarder.reactor
        setnodelay = getattr(self.transport, "setTcpNoDelay", None)
        if setnodelay is not None:
            setnodelay(True)
        self.factory.add(self)
        self.transport.pauseProducing()  # nothing is read until the node is connected
        client = self.clientProtocolFactory()
        client.setServer(self)
        host, port = target
        reactor.connectTCP(host, port, client, timeout=CONNECT_TIMEOUT)

    def connectionLost(self, reason: object = None) -> None:  # noqa: N802
        self.gone = True
        self.factory.discard(self)
        super().connectionLost(reason)


if TYPE_CHECKING:  # generic only in the Twisted mypy sees; 24.7 (our lowest) is not
    _RouteFactoryBase = ServerFactory[_Server]
else:
    _RouteFactoryBase = ServerFactory


class RouteFactory(_RouteFactoryBase):
    noisy = False
    protocol = _Server

    def __init__(self, forwarder: Forwarder, route: int, side: str) -> None:
        self.forwarder = forwarder
        self.route = route
        self.side = side
        self.connections: set[_Server] = set()

    def add(self, conn: _Server) -> None:
        self.connections.add(conn)
        self.forwarder.changed.add(self.route)

    def discard(self, conn: _Server) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            self.forwarder.changed.add(self.route)

    def target(self) -> tuple[str, int] | None:
        owner = self.forwarder.owners.get(self.route)
        if owner is None:
            return None
        return owner.browser if self.side == BROWSER else owner.sp


class Forwarder:
    """The route ports: each accepted connection goes to its route's owner at that moment;
    connections of a route whose owner changed are cut ``close_delay`` later."""

    log = Logger()

    def __init__(self, ports: Ports, reactor: IReactorTCP) -> None:
        self.ports = ports
        self.reactor = reactor
        self.clock: IReactorTime = reactor  # type: ignore[assignment]
        self.owners: dict[int, Owner | None] = {}
        self.factories: dict[tuple[int, str], RouteFactory] = {}
        self.listening: list[IListeningPort] = []
        self._pending: set[IDelayedCall] = set()
        self.changed: set[int] = set()  # routes whose counts changed since the last push
        self.refused = 0
        self.cut = 0

    def start(self, owners: dict[int, Owner | None]) -> None:
        """Open the route ports (raises CannotListenError if one is taken)."""
        self.owners = dict(owners)
        try:
            for route in range(1, self.ports.routes + 1):
                for side, port in (
                    (BROWSER, self.ports.browser(route)), (SP, self.ports.sp(route))
                ):  # fmt: skip
                    factory = self.factories[(route, side)] = RouteFactory(self, route, side)
                    # Twisted declares listenTCP's factory as a bare ServerFactory, i.e.
                    # ServerFactory[_ProtoWithFactory], which no factory of a concrete
                    # protocol matches (not even twisted.web's Site).
                    listening = self.reactor.listenTCP(
                        port, factory,  # type: ignore[arg-type]
                        backlog=1024, interface=self.ports.host,
                    )  # fmt: skip
                    self.listening.append(listening)
        except Exception:
            for listening in self.listening:
                listening.stopListening()
            self.listening.clear()
            raise

    def apply(self, owners: dict[int, Owner | None], close_delay: float) -> list[int]:
        """New connections follow ``owners`` now; moved routes' connections are cut later."""
        moved = pp.moved(self.owners, owners, self.ports.routes)
        self.owners = dict(owners)
        doomed = [
            conn
            for route in moved
            for side in (BROWSER, SP)
            for conn in self.factories[(route, side)].connections
        ]
        if doomed:
            call = self.clock.callLater(close_delay, self._cut, doomed)
            self._pending.add(call)
        return moved

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

    def counts(self, routes: set[int] | None = None) -> pp.Counts:
        wanted = range(1, self.ports.routes + 1) if routes is None else sorted(routes)
        return {
            r: (
                len(self.factories[(r, BROWSER)].connections),
                len(self.factories[(r, SP)].connections),
            )  # fmt: skip
            for r in wanted
            if (r, BROWSER) in self.factories
        }

    def stats(self) -> dict[str, Any]:
        counts = self.counts()
        return {
            "routes": {str(r): {BROWSER: b, SP: s} for r, (b, s) in counts.items()},
            "connections": sum(b + s for b, s in counts.values()),
            "refused": self.refused,
            "cut": self.cut,
        }


@implementer(IPushProducer)
class ControlProtocol(basic.Int32StringReceiver):
    """The worker's end of one HaloD connection."""

    MAX_LENGTH = pp.MAX_MESSAGE
    log = Logger()
    transport: tcp.Connection  # a UNIX socket's (unix.Server is a tcp.Server)
    paused = False  # the socket's send buffer is full (HaloD is not reading): skip pushes

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def connectionMade(self) -> None:  # noqa: N802
        self.transport.registerProducer(self, True)
        self.worker.attached(self)

    def connectionLost(self, reason: object = None) -> None:  # noqa: N802
        self.worker.detached(self)

    def lengthLimitExceeded(self, length: int) -> None:  # noqa: N802
        self.log.warn("control message of {n} bytes is too long: closing", n=length)
        self.transport.abortConnection()

    def stringReceived(self, data: bytes) -> None:  # noqa: N802
        try:
            message = pp.decode(data, self.worker.ports.routes)
        except pp.ProtocolError as e:
            self.log.warn("bad control message ({error}): closing", error=e)
            self.transport.loseConnection()
            return
        self.worker.received(self, message)

    def send(self, message: pp.Message) -> None:
        self.sendString(pp.encode(message))

    def pauseProducing(self) -> None:  # noqa: N802
        self.paused = True

    def resumeProducing(self) -> None:  # noqa: N802
        self.paused = False

    def stopProducing(self) -> None:  # noqa: N802
        self.paused = True


class ControlFactory(Factory):
    noisy = False

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def buildProtocol(self, addr: object) -> ControlProtocol:  # noqa: N802
        return ControlProtocol(self.worker)


class Worker:
    """The process: a Forwarder plus the control socket; exits on ``stop`` or SIGTERM."""

    log = Logger()

    def __init__(self, ports: Ports, socket_path: Path, reactor: Any) -> None:
        self.ports = ports
        self.layout = pp.Layout.of(ports)
        self.socket_path = socket_path
        self.pid_path = socket_path.with_suffix(".pid")
        self.reactor = reactor
        self.forwarder = Forwarder(ports, reactor)
        self.control: ControlProtocol | None = None
        self.control_port: IListeningPort | None = None
        self.seq = 0
        self.listening = False
        self.stopping = False
        self.exit_code = 0
        self._last_push = 0.0
        self._pusher = task.LoopingCall(self._push)
        self._pusher.clock = reactor

    # -- HaloD's connection -----------------------------------------------------------------

    def attached(self, conn: ControlProtocol) -> None:
        if self.control is not None:
            self.log.info("a newer HaloD connection replaces the older one")
            self.control.transport.loseConnection()
        self.control = conn
        self.log.info("HaloD attached")
        conn.send(pp.Hello(os.getpid(), self.layout, self.listening, self.seq))
        if self.listening:
            self._push_full()

    def detached(self, conn: ControlProtocol) -> None:
        if self.control is conn:
            self.control = None
            if not self.stopping:
                self.log.info("HaloD detached: forwarding goes on with table {seq}", seq=self.seq)

    def received(self, conn: ControlProtocol, message: pp.Message) -> None:
        if conn is not self.control:
            return
        if isinstance(message, pp.Table):
            self._table(conn, message)
        elif isinstance(message, pp.Stop):
            self.log.info("HaloD asked the worker to stop")
            self.stop()
        else:
            self.log.warn("unexpected {type} from HaloD: closing", type=type(message).__name__)
            conn.transport.loseConnection()

    def _table(self, conn: ControlProtocol, table: pp.Table) -> None:
        if not self.listening:
            try:
                self.forwarder.start(table.owners)
            except Exception as e:
                self.log.error("cannot open the route ports: {error}", error=e)
                conn.send(pp.Error(f"cannot open the route ports: {e}"))
                self.stop(exit_code=2)
                return
            self.listening = True
            self._pusher.start(STATS_INTERVAL, now=False)
            self.log.info(
                "listening on {host}: browser ports {b}.., SP ports {s}.. ({n} routes)",
                host=self.ports.host, b=self.ports.browser_base, s=self.ports.sp_base,
                n=self.ports.routes,
            )  # fmt: skip
        else:
            moved = self.forwarder.apply(table.owners, table.close_delay)
            if moved:
                self.log.info("table {seq}: {n} routes moved", seq=table.seq, n=len(moved))
        self.seq = table.seq
        conn.send(pp.Applied(table.seq))
        self._push_full()

    # -- counts -------------------------------------------------------------------------------

    def _push_full(self) -> None:
        if self.control is None or not self.listening:
            return
        self.forwarder.changed.clear()
        self._last_push = self.reactor.seconds()
        f = self.forwarder
        self.control.send(pp.Stats(True, f.counts(), f.refused, f.cut))

    def _push(self) -> None:
        conn = self.control
        if conn is None or conn.paused:
            return  # counts keep; the next push (or a new HaloD's hello) carries them
        f = self.forwarder
        now = self.reactor.seconds()
        if f.changed or now - self._last_push >= KEEPALIVE:
            changed, f.changed = f.changed, set()
            self._last_push = now
            conn.send(pp.Stats(False, f.counts(changed), f.refused, f.cut))

    # -- life ---------------------------------------------------------------------------------

    def listen_control(self) -> None:
        """Bind the control socket (mode 600) and write the pid file beside it."""
        os.umask(0o077)
        self.socket_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)
        self.control_port = self.reactor.listenUNIX(
            str(self.socket_path), ControlFactory(self), mode=0o600
        )
        self.pid_path.write_text(f"{os.getpid()}\n")

    def stop(self, exit_code: int = 0) -> None:
        """End the process (the reactor's shutdown runs ``shutdown``)."""
        if not self.stopping:
            self.stopping = True
            self.exit_code = exit_code
            self.reactor.stop()

    def shutdown(self) -> defer.Deferred[Any]:
        """Before the reactor stops (``stop``, SIGTERM, SIGINT): close the route ports and
        the control socket, remove the socket and pid files if they are still ours."""
        self.stopping = True
        if self._pusher.running:
            self._pusher.stop()
        try:
            if self.pid_path.read_text().strip() == str(os.getpid()):  # not a newer worker's
                self.pid_path.unlink()
        except OSError:
            pass
        if self.control is not None:
            self.control.transport.loseConnection()
        stopped = [self.forwarder.stop()]
        if self.control_port is not None:  # Twisted removes the socket file
            stopped.append(defer.maybeDeferred(self.control_port.stopListening))
        return defer.gatherResults(stopped, consumeErrors=True)


def _start_logging() -> None:
    """Info and up to stderr (HaloD points it at ``proxy/worker.log``), without Twisted's
    per-port "starting on" / "Port Closed" lines: 2×N of each per start and stop."""
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    from orbited.runtime.logs import quiet_factories

    quiet_factories()

    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
    observer = FilteringLogObserver(textFileLogObserver(sys.stderr), [predicate, _NoPortLines()])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


@implementer(ILogFilterPredicate)
class _NoPortLines:
    """Drops Twisted's "... starting on <port>" and "(... Closed)" lines."""

    def __call__(self, event: LogEvent) -> PredicateResult:
        text = " ".join(str(m) for m in event.get("message", ()))
        if " starting on " in text or (text.startswith("(") and text.endswith(" Closed)")):
            return PredicateResult.no
        return PredicateResult.maybe


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m halod.dataplane.proxy_worker")
    parser.add_argument("--socket", required=True, type=Path, help="control socket path")
    parser.add_argument("--host", required=True)
    parser.add_argument("--browser-base", required=True, type=int)
    parser.add_argument("--sp-base", required=True, type=int)
    parser.add_argument("--routes", required=True, type=int)
    args = parser.parse_args(argv)

    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import reactor

    _start_logging()
    _raise_fd_limit()
    ports = Ports(args.host, args.browser_base, args.sp_base, args.routes)
    worker = Worker(ports, args.socket, reactor)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # no terminal: HaloD's session may end
    reactor.addSystemEventTrigger("before", "shutdown", worker.shutdown)  # SIGTERM, SIGINT

    def begin() -> None:
        try:
            worker.listen_control()
        except Exception as e:
            worker.log.error("cannot open the control socket {path}: {error}",
                             path=str(args.socket), error=e)  # fmt: skip
            worker.stop(exit_code=2)

    reactor.callWhenRunning(begin)
    reactor.run()
    return worker.exit_code


if __name__ == "__main__":
    sys.exit(main())
