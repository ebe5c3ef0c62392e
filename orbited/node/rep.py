"""Twisted REP server: moves bytes between TCP and the sans-I/O SP cores.

Each request's payload goes to a handler returning the reply payload (or a Deferred of
it); replies are written in whatever order they complete, each prefixed with its request's
backtrace. Protocol errors close the connection, as nng does (docs/sp.md, "Errors").

Half-close: a peer that sends its requests and then FIN (shutdown(SHUT_WR)) gets every
reply before the connection is closed (IHalfCloseableProtocol: without it Twisted closes
the socket as soon as reading sees the FIN, dropping replies not yet written).

Backpressure: the protocol registers itself as the transport's streaming producer, so
when a web app stops reading replies and our send buffer fills, we stop reading its
requests; likewise while too many requests are unanswered.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, cast
from typing import Protocol as TypingProtocol

from twisted.internet import defer
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from orbited.runtime.twisted_compat import unsent_bytes, write_through
from orbited.sp.reqrep import MAX_HOPS, MAX_REQUEST, RepConnection, encode_reply
from orbited.sp.wire import SPProtocolError

_LENGTH = struct.Struct(">Q")  # a reply's length prefix (orbited.sp.wire)

RequestHandler = Callable[[bytes], "bytes | defer.Deferred[bytes]"]
# A handler of several requests at once (one read's, in order): each one's reply, in
# order, as RequestHandler gives it, or None for a request it drops; it answers every
# request itself (an exception escaping it drops the requests it was given, logged).
# Without one, RepProtocol hands the requests to its RequestHandler one by one.
ManyHandler = Callable[[list[bytes]], "Sequence[bytes | defer.Deferred[bytes] | None]"]
# Opens a delivery batch around one read's requests (Hub.batch, orbited.node.flush).
BatchScope = Callable[[], AbstractContextManager[None]]


class TCPTransport(TypingProtocol):
    """What the web-app protocols (RepProtocol, legacy OrbitProtocol) use of their
    transport: a Twisted TCP connection is ITCPTransport, IConsumer and IPushProducer at
    once, which zope interfaces cannot say in one type."""

    def write(self, data: bytes) -> None: ...
    def writeSequence(self, data: list[bytes]) -> None: ...  # noqa: N802
    def loseConnection(self) -> None: ...  # noqa: N802
    def abortConnection(self) -> None: ...  # noqa: N802
    def getPeer(self) -> object: ...  # noqa: N802
    def registerProducer(self, producer: object, streaming: bool) -> None: ...  # noqa: N802
    def pauseProducing(self) -> None: ...  # noqa: N802
    def resumeProducing(self) -> None: ...  # noqa: N802


@dataclass(frozen=True)
class RepLimits:
    """The REP server's limits; these defaults are the node's (NodeConfig's sp_* keys,
    docs/operations.md, read them from here)."""

    max_message: int = MAX_REQUEST  # bytes per request; larger closes the connection
    header_timeout: float = 10.0  # seconds a peer has to send its SP header (nng: 10 s)
    max_hops: int = MAX_HOPS
    max_inflight: int = 1024  # unanswered requests per connection before we stop reading
    max_connections: int = 1000  # connections at once; a new one past it is closed at once


class RepState(Enum):
    """A REP connection's life: it reads and answers requests (OPEN); the peer sent FIN
    and the requests it sent are being answered before the close (DRAINING); done
    (CLOSED: closed by us or by the peer, or aborted for a protocol error)."""

    OPEN = "open"
    DRAINING = "draining"
    CLOSED = "closed"


@implementer(IPushProducer, IHalfCloseableProtocol)
class RepProtocol(Protocol):
    log = Logger()
    server: RepFactory | None = None  # the factory that built it (its connection count)
    transport: TCPTransport  # type: ignore[assignment]  # set by makeConnection (TCP)

    def __init__(
        self,
        handler: RequestHandler,
        limits: RepLimits,
        clock: IReactorTime,
        batch: BatchScope | None = None,
        many: ManyHandler | None = None,
    ) -> None:
        self._handler = handler
        self._many: ManyHandler = many or self._each
        self._batch: BatchScope = batch or nullcontext
        self._limits = limits
        self._clock = clock
        self._sp = RepConnection(max_message=limits.max_message, max_hops=limits.max_hops)
        self._header_timer: IDelayedCall | None = None
        self._inflight = 0
        # Received (backtrace, payload), waiting to be handled: one read's requests, and
        # those waiting for an in-flight slot (reading is paused meanwhile).
        self._held: deque[tuple[bytes, bytes]] = deque()
        self._running = False  # inside _run_held (a reply there must not re-enter it)
        self._writes_blocked = False  # the transport's send buffer is full
        self._reading_paused = False
        self.state = RepState.OPEN

    @property
    def dropped_requests(self) -> int:
        """Requests dropped for too many backtrace words (docs/sp.md, "Errors")."""
        return self._sp.dropped

    @property
    def closed(self) -> bool:
        return self.state is RepState.CLOSED

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def reading_paused(self) -> bool:
        return self._reading_paused

    def unsent(self) -> int:
        """Reply bytes written and not yet taken by the kernel."""
        return unsent_bytes(self.transport) or 0

    def connectionMade(self) -> None:
        if self.server is not None:
            self.server.connections.add(self)
        setnodelay = getattr(self.transport, "setTcpNoDelay", None)
        if setnodelay is not None:
            setnodelay(True)
        self.transport.registerProducer(self, True)
        self.transport.write(self._sp.initial_bytes())
        self._header_timer = self._clock.callLater(self._limits.header_timeout, self._no_header)

    def _no_header(self) -> None:
        self._header_timer = None
        self._close(f"no SP header within {self._limits.header_timeout:g}s")

    def _close(self, reason: str) -> None:
        if self.closed:
            return
        self.state = RepState.CLOSED
        self.log.warn(
            "SP connection from {peer} closed: {reason}", peer=self._peer(), reason=reason
        )
        # Abort: a peer breaking the protocol gets no more bytes, and buffered replies it
        # may never read do not keep the connection alive.
        self.transport.abortConnection()

    def _peer(self) -> str:
        try:
            peer = self.transport.getPeer()
            return f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"
        except Exception:
            return "?"

    def dataReceived(self, data: bytes) -> None:
        if self.state is RepState.CLOSED:
            return
        sp = self._sp
        dropped = sp.dropped
        try:
            requests = sp.receive_requests(data)
        except SPProtocolError as e:
            self._close(str(e))
            return
        if self._header_timer is not None and sp.header_received:
            self._header_timer.cancel()
            self._header_timer = None
        if sp.dropped != dropped:
            self.log.debug("dropped {n} request(s) with too many hops", n=sp.dropped - dropped)
        if requests:
            self._held.extend(requests)
            self._run_held()

    def _run_held(self) -> None:
        """Handle received requests while fewer than max_inflight are unanswered; the rest
        wait here (one read's worth at most: reading is paused meanwhile)."""
        self._running = True
        try:
            self._handle_held()
        finally:
            self._running = False
        self._update_reading()
        self._close_if_answered()

    # IHalfCloseableProtocol
    def readConnectionLost(self) -> None:  # noqa: N802
        """The peer sent FIN: it sends nothing more but may still read. Requests received
        in full are answered; a partial message or header is dropped."""
        if self.state is RepState.OPEN:
            self.state = RepState.DRAINING
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        self._close_if_answered()

    def writeConnectionLost(self) -> None:  # noqa: N802
        self.transport.loseConnection()

    def _close_if_answered(self) -> None:
        if self.state is RepState.DRAINING and not self._held and not self._inflight:
            self.state = RepState.CLOSED
            if self.server is not None:  # its slot is free now (sp_max_connections)
                self.server.connections.discard(self)
            # loseConnection, not abort: the replies written are sent before the close.
            self.transport.loseConnection()

    def _handle_held(self) -> None:
        """The requests of one read, in one delivery batch: what they deliver to one
        browser connection leaves in one write when the batch ends; then their replies,
        in one write, before this returns (a reply leaves after the deliveries it
        reports, and the web app is woken once the browsers have been)."""
        replies: list[bytes] = []  # length, backtrace, payload, length, ...
        try:
            with self._batch():
                self._handle_held_batch(replies)
        finally:  # (a batch end that raises keeps the replies of what was handled)
            if replies and self.state is not RepState.CLOSED:
                # Joined, not a writev: small pieces cost the kernel more per byte than
                # one copy here; at once when nothing is queued (write-through).
                write_through(self.transport, b"".join(replies))

    def _handle_held_batch(self, replies: list[bytes]) -> None:
        """Handle held requests while in-flight slots last, as many at once as there are
        free slots (each request takes one at most); the replies ready now go to
        ``replies``, the others leave as they complete."""
        held = self._held
        many = self._many
        max_inflight = self._limits.max_inflight
        closed = RepState.CLOSED
        pack = _LENGTH.pack
        add = replies.append
        while held and self._inflight < max_inflight and self.state is not closed:
            taken = [held.popleft() for _ in range(min(max_inflight - self._inflight,
                                                       len(held)))]  # fmt: skip
            try:
                results = many([payload for _, payload in taken])
            except Exception:
                self.log.failure("request handler raised; dropping {n} requests", n=len(taken))
                continue
            for (backtrace, _), result in zip(taken, results, strict=True):
                if isinstance(result, bytes):  # (isinstance of Deferred, an ABC, costs more)
                    add(pack(len(backtrace) + len(result)))
                    add(backtrace)
                    add(result)
                elif result is not None:  # (None: dropped, _each)
                    self._track(backtrace, result)

    def _each(self, bodies: list[bytes]) -> list[bytes | defer.Deferred[bytes] | None]:
        """The ManyHandler of a RequestHandler: each body to it in turn; one that raises
        is dropped (None), logged, and the others are still handled."""
        handler = self._handler
        out: list[bytes | defer.Deferred[bytes] | None] = []
        for body in bodies:
            try:
                out.append(handler(body))
            except Exception:
                self.log.failure("request handler raised; dropping request")
                out.append(None)
        return out

    def _track(self, backtrace: bytes, d: defer.Deferred[bytes]) -> None:
        self._inflight += 1
        self._update_reading()
        d.addCallbacks(self._reply_later, self._handler_failed, callbackArgs=(backtrace,))

    def _reply_later(self, reply: bytes, backtrace: bytes) -> None:
        self._inflight -= 1
        if not self.closed:
            write_through(self.transport, encode_reply(backtrace, reply))
            self._after_reply()

    def _after_reply(self) -> None:
        if self._held and not self._running:  # (a reply inside _run_held: it goes on)
            self._run_held()
        else:
            self._update_reading()
            if not self._running:
                self._close_if_answered()

    def _handler_failed(self, failure: Failure) -> None:
        self._inflight -= 1
        self.log.failure("request handler failed; dropping request", failure)
        if not self.closed:
            self._after_reply()

    def _update_reading(self) -> None:
        if self.state is not RepState.OPEN:  # (resuming would read the FIN again)
            return
        pause = (
            self._writes_blocked or self._inflight >= self._limits.max_inflight or bool(self._held)
        )
        if pause != self._reading_paused:
            self._reading_paused = pause
            if pause:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()

    # IPushProducer: the transport calls these when its send buffer fills and drains.
    def pauseProducing(self) -> None:  # noqa: N802
        self._writes_blocked = True
        self._update_reading()

    def resumeProducing(self) -> None:  # noqa: N802
        self._writes_blocked = False
        self._update_reading()

    def stopProducing(self) -> None:  # noqa: N802
        self.state = RepState.CLOSED

    def connectionLost(self, reason: Failure | None = None) -> None:  # noqa: N802
        self.state = RepState.CLOSED
        if self.server is not None:
            self.server.connections.discard(self)
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None


if TYPE_CHECKING:  # generic only in the Twisted mypy sees; 24.7 (our lowest) is not
    _RepFactoryBase = Factory["RepProtocol"]
else:
    _RepFactoryBase = Factory


class RepFactory(_RepFactoryBase):
    log = Logger()
    noisy = False

    def __init__(
        self,
        handler: RequestHandler,
        limits: RepLimits | None = None,
        clock: IReactorTime | None = None,
        batch: BatchScope | None = None,
        many: ManyHandler | None = None,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor

            clock = cast(IReactorTime, reactor)
        self.handler = handler
        self.batch = batch  # Hub.batch: deliveries of one read coalesced per connection
        self.many = many  # Hub.handle_requests: one read's requests handled together
        self.limits = limits or RepLimits()
        self.clock: IReactorTime = clock
        self.connections: set[RepProtocol] = set()
        self.refused = 0

    def buildProtocol(self, addr: IAddress | None) -> RepProtocol | None:  # noqa: N802
        if len(self.connections) >= self.limits.max_connections:
            # None: the port closes the socket at once. nng dialers retry (with backoff),
            # so a web app gets in as soon as another connection goes.
            self.refused += 1
            self.log.warn(
                "SP connection from {peer} closed: sp_max_connections ({n}) reached",
                peer=getattr(addr, "host", "?"),
                n=self.limits.max_connections,
            )
            return None
        proto = RepProtocol(self.handler, self.limits, self.clock, self.batch, self.many)
        proto.factory = proto.server = self
        return proto

    def stats(self) -> dict[str, int]:
        """For /orbited/health: connections, refusals, and those whose reading is paused
        (backpressure: too many requests in flight, or replies not read)."""
        return {
            "sp_connections": len(self.connections),
            "sp_refused": self.refused,
            "sp_paused": sum(1 for c in self.connections if c.reading_paused),
            "sp_inflight": sum(c.inflight for c in self.connections),
            "sp_unsent_bytes": sum(c.unsent() for c in self.connections),
        }
