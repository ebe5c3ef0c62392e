"""The one module that touches private Twisted and autobahn names.

Each use here is a measured win or the only hook upstream offers, and each has a test in
tests/runtime/test_twisted_compat.py (``LeanConnection`` and the lean accept loop: in
tests/runtime/test_lean_connection.py) that fails when the installed Twisted, autobahn or
CPython changes what it relies on, so an upgrade breaks a fast unit test, not a node in
production. Nothing else in orbited/ or halod/ may use a private upstream name
(tests/test_layout.py checks it).
"""

from __future__ import annotations

import _socket
import socket
import struct
from collections.abc import Callable
from pprint import pformat
from typing import TYPE_CHECKING, Any

from twisted.application import internet, service
from twisted.internet import main, tcp
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionAborted
from twisted.internet.interfaces import IListeningPort, IReadWriteDescriptor, ITCPTransport
from twisted.internet.protocol import AbstractDatagramProtocol, Factory
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.python import log
from twisted.python.failure import Failure
from twisted.web import http
from zope.interface import implementer

if TYPE_CHECKING:  # autobahn is imported by the node's WebSocket code, not by HaloD's
    from autobahn.websocket.protocol import WebSocketProtocol


def unsent_bytes(transport: object) -> int | None:
    """Bytes written to a Twisted TCP transport and not yet taken by the kernel (its
    user-space send buffer), or None for a transport of another kind.

    Twisted has no public query for it; ``twisted.internet.abstract.FileDescriptor``
    keeps ``dataBuffer`` (bytes being written), ``offset`` (how much of it went out) and
    ``_tempDataLen`` (bytes queued in ``_tempDataBuffer`` since). A ProtocolWrapper (the
    node's socket gate, TLS) is looked through to the transport it wraps."""
    if type(transport) is LeanConnection:
        return transport.unsent()
    while isinstance(transport, ProtocolWrapper):
        transport = transport.transport
    try:
        return int(
            len(transport.dataBuffer)  # type: ignore[attr-defined]
            - transport.offset  # type: ignore[attr-defined]
            + transport._tempDataLen  # type: ignore[attr-defined]
        )
    except AttributeError:
        return None


# -- write-through ----------------------------------------------------------------------

_WOULD_BLOCK = (BlockingIOError, InterruptedError)


def _socket_transport(transport: object) -> Any:
    """The ``tcp.Connection`` under ``transport`` when bytes sent on its socket reach the
    peer exactly as ``transport.write`` would send them, else None. A ProtocolWrapper
    (the node's socket gate) is looked through only when it does not override ``write``:
    TLS (``TLSMemoryBIOProtocol``) does, and its bytes must be encrypted first; so does a
    ``tcp.Connection`` after ``startTLS`` (its ``TLS`` flag)."""
    while isinstance(transport, ProtocolWrapper):
        if type(transport).write is not ProtocolWrapper.write:
            return None
        transport = transport.transport
    if not isinstance(transport, tcp.Connection) or transport.TLS:
        return None  # not plain TCP: StringTransport, startTLS, a UNIX socket, ...
    return transport


def can_write_through(transport: object) -> bool:
    """True if ``transport`` is a plain TCP connection (or a pass-through wrapper of one)
    with nothing queued in user space, still open and not closing: bytes sent straight
    on its socket now keep their order with everything written before."""
    tcp = _socket_transport(transport)
    return tcp is not None and _idle(tcp)


def _idle(tcp: Any) -> bool:
    return bool(
        not tcp._tempDataLen
        and tcp.offset == len(tcp.dataBuffer)
        and tcp.connected
        and not tcp.disconnecting
        and not tcp._aborting  # abortConnection: nothing more is sent
    )


def write_through(transport: Any, data: bytes) -> bool:
    """Write ``data`` to ``transport``, sending it on the socket at once when the
    transport has nothing queued (no reactor turn, no EPOLLOUT arming); whatever the
    kernel does not take (a partial write, EAGAIN) goes to ``transport.write`` and
    leaves as usual. Any other transport (TLS, tests, after ``loseConnection``), or a
    queued one, gets ``transport.write(data)``: the order of bytes is always kept.
    True when the kernel took all of ``data`` now (nothing of this transport is queued
    in user space: ``unsent_bytes`` is 0), False otherwise.

    Twisted's ``write`` only buffers (``_tempDataBuffer``) and sends on the next reactor
    turn (``doWrite``); its send path is ``FileDescriptor.dataBuffer`` / ``offset`` /
    ``_tempDataLen``, which this reads. A socket error other than EAGAIN is left to
    Twisted: the bytes go through ``transport.write`` and its next ``doWrite`` sees the
    error and loses the connection as it would have."""
    if type(transport) is LeanConnection:
        return transport.send_now(data)
    tcp = _socket_transport(transport)
    if tcp is None or not _idle(tcp):
        transport.write(data)
        return False
    try:
        sent = tcp.socket.send(data)
    except _WOULD_BLOCK:
        sent = 0
    except OSError:
        sent = 0
    if sent < len(data):
        tcp.write(data[sent:] if sent else data)
        return False
    return True


def writev_through(transport: Any, parts: list[bytes]) -> None:
    """``write_through`` for several pieces in one ``sendmsg`` (a writev: no join)."""
    tcp = _socket_transport(transport)
    if tcp is None or not _idle(tcp):
        transport.writeSequence(parts)
        return
    try:
        sent = tcp.socket.sendmsg(parts)
    except _WOULD_BLOCK:
        sent = 0
    except OSError:
        sent = 0
    total = sum(map(len, parts))
    if sent < total:
        rest = b"".join(parts)
        tcp.write(rest[sent:] if sent else rest)


class Ticker(internet.TimerService):
    """A ``TimerService`` that may be stopped without having been started.

    A ``MultiService`` stops every child when an earlier one fails to start (a port in
    use), and ``TimerService.stopService`` then raises AttributeError: its ``_loop`` is
    made in ``startService`` (Twisted 26.10). The process would print that traceback
    after its clear "cannot start" line."""

    def stopService(self):  # noqa: ANN201, N802
        if "_loop" not in self.__dict__:
            return service.Service.stopService(self)
        return super().stopService()


# -- the lean connection: a browser socket without tcp.Server ------------------------------

_CONNECTION_DONE = main.CONNECTION_DONE
_CONNECTION_LOST = main.CONNECTION_LOST
_RECV_SIZE = 65536  # tcp.Connection.bufferSize


@implementer(IReadWriteDescriptor, ITCPTransport)
class LeanConnection:
    """An accepted TCP socket registered with the reactor directly (an
    ``IReadWriteDescriptor``), feeding one protocol: what ``tcp.Server`` does for the
    browser front's hot requests, without what the front never uses. Measured on the
    accept floor (a server answering every request with a fixed 101), it costs ≈ 23 µs
    less per accepted connection than listenTCP's ``tcp.Server`` (docs/performance.md,
    "Accepts, fourth pass"): no ``logstr``/``repstr``/address objects built per
    connection, no ``_tempDataBuffer``/``dataBuffer`` pair, one call from the reactor
    to ``protocol.dataReceived``.

    Kept from ``tcp.Server`` exactly: ``write``/``writeSequence`` queue in user space
    and leave when the socket is writable; writes after ``loseConnection`` are still
    sent before the close; ``loseConnection`` closes (FIN, ``shutdown``) once the queue
    is empty, ``abortConnection`` drops the queue and resets (``SO_LINGER`` 0) a reactor
    turn later; the end of the peer's stream (no half-close) or a socket error loses the
    connection (``connectionLost`` with ``ConnectionDone`` / ``ConnectionLost``), never
    synchronously inside ``write``; an exception in the protocol is logged by the
    reactor and loses the connection; reactor stop loses every connection. Added:
    ``send_now`` (write-through: the bytes go to the socket at once when nothing is
    queued) and ``unsent`` (bytes queued in user space).

    Not offered: producers (``registerProducer``), half-close, TLS. A protocol that
    needs them (twisted.web, when the front hands a request off) gets the socket as a
    ``tcp.Server`` (``to_twisted``)."""

    __slots__ = ("socket", "fd", "protocol", "port", "reactor", "addr", "out", "connected",
                 "disconnecting", "disconnected", "writing", "aborting", "adopted",
                 "__weakref__")  # fmt: skip

    def __init__(self, skt: _socket.socket, protocol: Any, addr: Any, port: CountedPort,
                 reactor: Any) -> None:  # fmt: skip
        self.socket = skt
        self.fd = skt.fileno()
        self.protocol = protocol
        self.port = port
        self.reactor = reactor
        self.addr = addr
        self.out: bytearray | None = None  # bytes queued in user space
        self.connected = 1
        self.disconnecting = 0
        self.disconnected = 0
        self.writing = False
        self.aborting = False
        self.adopted: tcp.Server | None = None  # after to_twisted

    # IFileDescriptor
    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:  # noqa: N802
        return "LeanConnection"

    def doRead(self) -> Any:  # noqa: N802
        if self.aborting:
            return None
        try:
            data = self.socket.recv(_RECV_SIZE)
        except _WOULD_BLOCK:
            return None
        except OSError:
            return _CONNECTION_LOST
        if not data:
            return _CONNECTION_DONE
        self.protocol.dataReceived(data)
        return None

    def first_read(self) -> None:
        """Read at once after the accept, not a reactor turn later: a browser sends its
        request with the handshake's last packet, so it is usually there already (then
        no wake-up and no dispatch of its own). As the reactor reads: an exception is
        logged and loses the connection, as does the end of the stream."""
        try:
            why = self.doRead()
        except BaseException:
            failure = Failure()
            log.err(failure, "reading a new connection")
        else:
            if why is None:
                return
            failure = Failure(why)
        self.connectionLost(failure)

    def doWrite(self) -> Any:  # noqa: N802
        out = self.out
        if self.aborting:
            return None
        if out:
            try:
                sent = self.socket.send(out)
            except _WOULD_BLOCK:
                return None
            except OSError:
                return _CONNECTION_LOST
            del out[:sent]
            if out:
                return None
            self.out = None
        if self.writing:
            self.writing = False
            self.reactor.removeWriter(self)
        if self.disconnecting:
            return _CONNECTION_DONE
        return None

    def connectionLost(self, reason: Failure) -> None:  # noqa: N802
        """The reactor's (or abortConnection's) call, once: close the socket, tell the
        protocol, uncount the socket. After ``to_twisted`` (an exception in the read that
        handed the socket over): the ``tcp.Server`` is lost instead, as it would have been
        had it read those bytes itself."""
        adopted = self.adopted
        if adopted is not None:
            self.adopted = None
            adopted.connectionLost(reason)  # (once: tcp.Connection checks)
            return
        if self.disconnected:
            return
        self.disconnected = 1
        self.connected = 0
        reactor = self.reactor
        reactor.removeReader(self)
        if self.writing:
            self.writing = False
            reactor.removeWriter(self)
        self.out = None
        skt = self.socket
        try:
            if reason.check(ConnectionAborted):
                skt.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            else:
                skt.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            skt.close()
        except OSError:
            pass
        self.fd = -1
        protocol = self.protocol
        self.protocol = None
        try:
            protocol.connectionLost(reason)
        finally:
            self.port.on_close()

    # ITransport
    def send_now(self, data: bytes) -> bool:
        """Write ``data``, on the socket at once when nothing is queued (write-through);
        True when the kernel took all of it (nothing queued in user space)."""
        if self.out is not None or self.disconnecting or not self.connected or self.aborting:
            self.write(data)
            return False
        try:
            sent = self.socket.send(data)
        except _WOULD_BLOCK:
            sent = 0
        except OSError:
            sent = 0  # the next doWrite sees the error and loses the connection
        if sent == len(data):
            return True
        self.write(data[sent:] if sent else data)
        return False

    def write(self, data: bytes) -> None:
        if not self.connected or not data or self.aborting:
            return  # (after abortConnection: never sent, as tcp.Connection)
        out = self.out
        if out is None:
            self.out = bytearray(data)
        else:
            out += data
        if not self.writing:
            self.writing = True
            self.reactor.addWriter(self)

    def writeSequence(self, data: Any) -> None:  # noqa: N802
        self.write(b"".join(data))

    def unsent(self) -> int:
        out = self.out
        return 0 if out is None else len(out)

    def loseConnection(self) -> None:  # noqa: N802
        if self.connected and not self.disconnecting:
            self.disconnecting = 1
            self.reactor.removeReader(self)
            if not self.writing:
                self.writing = True
                self.reactor.addWriter(self)  # doWrite then reports the end

    def abortConnection(self) -> None:  # noqa: N802
        if self.disconnected or self.aborting:
            return
        self.aborting = True
        reactor = self.reactor
        reactor.removeReader(self)
        if self.writing:
            self.writing = False
            reactor.removeWriter(self)
        reactor.callLater(0, self.connectionLost, Failure(ConnectionAborted()))

    def getPeer(self) -> IPv4Address | IPv6Address:  # noqa: N802
        return self.port._buildAddr(_peer_address(self.addr))

    def getHost(self) -> IPv4Address | IPv6Address:  # noqa: N802
        return self.port.getHost()

    def getTcpNoDelay(self) -> bool:  # noqa: N802
        return bool(self.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    def setTcpNoDelay(self, enabled: bool) -> None:  # noqa: N802
        if enabled and self.port.nodelay_inherited:
            return  # on since accept
        try:
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, enabled)
        except OSError:
            pass

    def getTcpKeepAlive(self) -> bool:  # noqa: N802
        return bool(self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE))

    def setTcpKeepAlive(self, enabled: bool) -> None:  # noqa: N802
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, enabled)

    def loseWriteConnection(self) -> None:  # noqa: N802
        raise NotImplementedError("no half-close on a LeanConnection")

    def to_twisted(self) -> tcp.Server:
        """This socket as a ``tcp.Server`` feeding the same protocol (for a protocol that
        needs what this class does not offer): reading and queued bytes move over, the
        socket stays counted once. This object is inert afterwards."""
        reactor = self.reactor
        reactor.removeReader(self)
        if self.writing:
            self.writing = False
            reactor.removeWriter(self)
        port = self.port
        session = port.sessionno
        port.sessionno = session + 1
        raw = self.socket
        skt = socket.socket(raw.family, raw.type, raw.proto, fileno=raw.detach())
        server = AdoptedServer(skt, self.protocol, self.addr, port, session, reactor)
        out = self.out
        if out:
            server.write(bytes(out))
        if self.disconnecting:
            server.loseConnection()
        self.out = None
        self.protocol = None
        self.connected = 0
        self.disconnected = 1  # inert: the reactor no longer knows it
        # The fd is the tcp.Server's now: the reactor, should the read that called this
        # raise, must not find it through this object (it would unregister the server).
        self.fd = -1
        self.adopted = server
        return server


_LINGER_RESET = struct.pack("ii", 1, 0)
_RawSocket = _socket.socket  # what socket.socket wraps (LeanConnection needs no more)
_STREAM = int(socket.SOCK_STREAM)


def _peer_address(addr: Any) -> Any:
    """``accept``'s address as ``Port.doRead`` passes it on: an IPv6 one with the
    scope ID by name."""
    if len(addr) == 4:
        host = socket.getnameinfo(addr, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)
        return (host[0], *addr[1:])
    return addr


# -- a listener that counts its sockets ---------------------------------------------------


class CountedServer(tcp.Server):
    """The accepted side of a ``CountedPort``'s connection: it tells the port when it
    was made and when it is lost, whatever protocol it feeds by then (a protocol may take
    the connection over: ``transport.protocol = other``)."""

    server: CountedPort

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.server.on_open()

    def connectionLost(self, reason: Any) -> None:  # noqa: N802
        try:
            super().connectionLost(reason)
        finally:
            self.server.on_close()

    nodelay_off = False  # turned off on this connection since (setTcpNoDelay(False))

    def setTcpNoDelay(self, enabled: bool) -> None:  # noqa: N802
        if enabled and not self.nodelay_off and self.server.nodelay_inherited:
            return  # on since accept: no setsockopt per connection
        self.nodelay_off = not enabled
        super().setTcpNoDelay(enabled)


class AdoptedServer(CountedServer):
    """A ``CountedServer`` for a socket a ``LeanConnection`` already counted (its
    ``to_twisted``): counted out when lost, not counted in again."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        tcp.Server.__init__(self, *args, **kwargs)


class CountedPort(tcp.Port):
    """A TCP listening port whose accepted connections call ``on_open`` once made and
    ``on_close`` once lost, with no wrapper protocol between the socket and the
    factory's protocol (a ``ProtocolWrapper`` costs, per connection, an object, zope's
    ``directlyProvides`` and one more call on every read and write).

    Twisted's ``Port`` builds each connection's transport from its ``transport`` class
    attribute (``tcp.Server``), which has no public hook for either moment; this relies
    on that attribute, on ``Server.server`` (the port) and on ``Server.connectionLost``
    being called once per accepted connection.

    ``nodelay``: TCP_NODELAY is set on the listening socket, which accepted sockets
    inherit (Linux, the BSDs); checked on the first one accepted (``nodelay_inherited``),
    after which ``setTcpNoDelay(True)`` costs no system call. ``doRead`` accepts as
    ``Port.doRead`` does, without its per-call log buffer and generator; any accept
    error other than "no more" is left to ``Port.doRead`` (EMFILE recovery, logging).

    ``lean``: each accepted socket becomes a ``LeanConnection`` instead of a
    ``tcp.Server``, and the factory's ``buildProtocol`` is called with None instead of
    the peer's address (``transport.getPeer()`` builds it when asked): for a factory
    whose protocols need nothing of a transport beyond what ``LeanConnection`` offers
    (or call ``to_twisted`` first); each is read at once after its accept
    (``LeanConnection.first_read``).

    ``defer_accept`` (seconds, Linux): TCP_DEFER_ACCEPT on the listening socket, so a
    connection is accepted once its first bytes have arrived (or, without any, once
    that long has passed): with ``lean``, the accept and the first read are one wake-up
    of the reactor instead of two. For protocols whose client speaks first (HTTP)."""

    transport = CountedServer

    def __init__(self, port: int, factory: Factory[Any], backlog: int, interface: str,
                 reactor: Any, on_open: Callable[[], None], on_close: Callable[[], None],
                 nodelay: bool = False, lean: bool = False,
                 defer_accept: int = 0) -> None:  # fmt: skip
        super().__init__(port, factory, backlog, interface, reactor)
        self.on_open = on_open
        self.on_close = on_close
        self.nodelay = nodelay
        self.lean = lean
        self.defer_accept = defer_accept
        self.nodelay_inherited: bool | None = False if not nodelay else None

    def startListening(self) -> None:  # noqa: N802
        super().startListening()
        if self.nodelay:
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.defer_accept and hasattr(socket, "TCP_DEFER_ACCEPT"):  # Linux
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, self.defer_accept)

    def doRead(self) -> None:  # noqa: N802
        try:
            listening = self.socket
            accept = listening.accept
            # Lean: the C-level accept (``socket._accept``: the fd and address) and a
            # plain ``_socket.socket``, without socket.socket's Python-level set-up and
            # its enum conversions of family and type (≈ 2 µs per socket).
            raw_accept = listening._accept  # type: ignore[union-attr]
            family = int(listening.family)
            factory: Any = self.factory
            lean = self.lean
            reactor = self.reactor
            limit = self.numberAccepts
            accepted = 0
            while accepted < limit:
                try:
                    if lean:
                        fd, addr = raw_accept()
                        skt = _RawSocket(family, _STREAM, 0, fd)
                    else:
                        skt, addr = accept()
                except BlockingIOError:
                    break
                except OSError:
                    tcp.Port.doRead(self)  # Twisted's handling of this error
                    return
                accepted += 1
                if self.nodelay_inherited is None:
                    self.nodelay_inherited = bool(
                        skt.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                    )
                if lean:
                    protocol = factory.buildProtocol(None)
                    if protocol is None:
                        skt.close()
                        continue
                    skt.setblocking(False)
                    conn = LeanConnection(skt, protocol, addr, self, reactor)
                    self.on_open()
                    reactor.addReader(conn)
                    protocol.makeConnection(conn)
                    conn.first_read()
                    continue
                addr = _peer_address(addr)
                protocol = factory.buildProtocol(self._buildAddr(addr))
                if protocol is None:
                    skt.close()
                    continue
                session = self.sessionno
                self.sessionno = session + 1
                protocol.makeConnection(
                    self.transport(skt, protocol, addr, self, session, self.reactor)
                )
            # Port.doRead's scaling of the accepts per call
            if accepted == limit:
                self.numberAccepts = limit + 20
            else:
                self.numberAccepts = max(1, accepted)
        except BaseException:
            log.deferr()


class CountedTCPServer(internet.TCPServer):
    """``internet.TCPServer`` listening through a ``CountedPort`` (same arguments: port,
    factory, backlog, interface, reactor; plus ``on_open`` and ``on_close``).
    ``_AbstractServer._getPort`` (private) is where the service makes its port.
    ``nodelay``, ``lean`` and ``defer_accept``: as ``CountedPort``'s."""

    def __init__(self, port: int, factory: Factory[Any], *, on_open: Callable[[], None],
                 on_close: Callable[[], None], backlog: int = 50, interface: str = "",
                 reactor: Any = None, nodelay: bool = False, lean: bool = False,
                 defer_accept: int = 0) -> None:  # fmt: skip
        super().__init__(port, factory, backlog=backlog, interface=interface, reactor=reactor)
        self.on_open = on_open
        self.on_close = on_close
        self.nodelay = nodelay
        self.lean = lean
        self.defer_accept = defer_accept

    def _getPort(self) -> CountedPort:  # noqa: N802
        from twisted.internet import reactor as global_reactor

        port, factory = self.args
        clock = self.reactor if self.reactor is not None else global_reactor
        listening = CountedPort(port, factory, self.kwargs["backlog"],
                                self.kwargs["interface"], clock, self.on_open,
                                self.on_close, self.nodelay, self.lean,
                                self.defer_accept)  # fmt: skip
        listening.startListening()
        return listening


def listening_port(server: internet.TCPServer) -> IListeningPort:
    """The listening port of a started ``TCPServer`` service (to learn the address an
    ephemeral port got). twisted.application.internet keeps it in ``_port`` and offers no
    public accessor. Raises RuntimeError if the service is not listening."""
    port: IListeningPort | None = server._port
    if port is None:
        raise RuntimeError("the TCPServer service is not listening (not started)")
    return port


def quiet_factories() -> None:
    """Turn off Twisted's "Starting factory" / "Stopping factory" lines for every factory
    in this process (orbited.runtime.logs re-exports it; every process Orbited starts
    calls it).

    ``noisy`` is Twisted's own switch for them (``Factory.noisy``, per class or instance);
    setting the base classes' default covers the factories of every library (HTTP
    clients, autobahn, twisted.web) at once, whatever log observer is in use (ours, or
    twistd's own), instead of one ``noisy = False`` per factory. A process-wide change
    to Twisted's classes, hence here."""
    Factory.noisy = False
    AbstractDatagramProtocol.noisy = False


# -- autobahn -------------------------------------------------------------------------


class NoDebugLogger(Logger):
    """A logger for an autobahn protocol instance (``protocol.log = NoDebugLogger(...)``)
    that drops debug calls outright and keeps warnings and errors.

    autobahn logs at debug level on every send, through the instance's ``log`` attribute
    (a class attribute made by txaio); building those calls costs more than the send.
    Replacing ``log`` on the instance relies on autobahn calling ``self.log.<level>``."""

    def debug(self, format: str | None = None, **kwargs: object) -> None:  # noqa: A002
        pass


class _LazyPformat:
    """pformat that runs only if the log line is actually written."""

    __slots__ = ("obj",)

    def __init__(self, obj: object) -> None:
        self.obj = obj

    def __str__(self) -> str:
        return pformat(self.obj)

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


def lazy_autobahn_pformat() -> None:
    """Make autobahn's option-table dump lazy (process-wide; idempotent).

    On every new connection ``WebSocketProtocol._connectionMade`` logs its whole option
    table with ``self.log.debug("...", attrs=pformat(...))``, pretty-printing it whether or
    not debug logging is on: most of the cost of accepting a WebSocket. This replaces the
    module-global ``pformat`` of ``autobahn.websocket.protocol`` with a lazy one. Called by
    the node when it builds its WebSocket resource, not at import. (autobahn's
    ``Timings.__str__`` also uses that global; the node never enables trackTimings.)"""
    # The global is typed as pprint.pformat, which returns str: autobahn only passes the
    # result to a log call, where the lazy object formats itself.
    import autobahn.websocket.protocol as _autobahn_protocol  # only where WebSockets are

    _autobahn_protocol.pformat = _LazyPformat  # type: ignore[assignment]


def autobahn_send_idle(protocol: WebSocketProtocol) -> bool:
    """True when frames written straight to ``protocol.transport`` go out exactly as
    ``sendMessage`` would send them: nothing waits in autobahn's own send queue
    (``send_queue``, filled by chopped or synchronous sends) and no per-message
    compression was negotiated (``_perMessageCompress`` is None). autobahn has no public
    query for either."""
    return not protocol.send_queue and protocol._perMessageCompress is None


# -- twisted.web ----------------------------------------------------------------------


def close_delimited(request: Any) -> None:
    """Answer ``request`` (not yet written) without chunked framing: its body ends where
    the connection closes, and the connection closes after it. For a response that must
    end when the connection does: a browser fires an iframe's ``load`` when a
    close-delimited document's connection ends (a killed node, a proxy that closes), not
    when a chunked one is cut in the middle (Chromium 156).

    twisted.web chunks every HTTP/1.1 response without ``Content-Length``, deciding at the
    first write by ``Request.clientproto``, with no option: an HTTP/1.0 status line (a
    server may answer with a lower minor version, RFC 9110 2.5) and a channel that is
    not persistent give this response framing (tests/runtime/test_twisted_compat.py)."""
    request.clientproto = b"HTTP/1.0"
    request.setHeader(b"connection", b"close")
    request.channel.persistent = False


class HookedHTTPChannel(http.HTTPChannel):
    """twisted.web's HTTPChannel with public names for the private hook and state an HTTP
    listener enforcing its own request-head limits needs (orbited.runtime.web)."""

    def bad_request(self) -> None:
        """Called for every request head twisted.web will not read: a bad request line or
        header, more than ``maxHeaders`` headers, more than ``totalHeadersSize`` bytes, a
        bad Content-Length or Transfer-Encoding. Twisted's answer (a bare "400 Bad
        Request", then close) unless overridden.

        Twisted routes all of those through ``_respondToBadRequestAndDisconnect``, its
        only hook for them and a private one."""
        super()._respondToBadRequestAndDisconnect()

    def _respondToBadRequestAndDisconnect(self) -> None:  # noqa: N802
        self.bad_request()

    def at_request_line(self) -> bool:
        """True while no line of the current request head has been read: the next line
        is a request line. (``_receivedHeaderSize`` counts the head's bytes so far and is
        reset to 0 after each request; HTTPChannel's docstring documents it.)"""
        return self._receivedHeaderSize == 0

    def handling_request(self) -> bool:
        """True from a request's whole head and body until its response is complete:
        bytes read meanwhile belong to the next request (``_handlingRequest``, which
        ``allContentReceived`` sets and ``requestDone`` clears)."""
        return bool(self._handlingRequest)

    def header_count(self) -> int:
        """Header lines of the current request head parsed so far
        (``_receivedHeaderCount``, compared with ``maxHeaders``)."""
        count: int = self._receivedHeaderCount
        return count
