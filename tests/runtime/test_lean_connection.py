"""orbited.runtime.twisted_compat.LeanConnection (the browser front's transport) on real
loopback sockets in this process's reactor (pytest-twisted), against what ``tcp.Server``
does and the front relies on: write-through and queueing in order, writes after
``loseConnection`` sent before the FIN, ``abortConnection`` resetting a turn later, the
peer's end of stream, an error in the protocol logged and the connection lost, the
socket counted once from accept to close, the hand-over to a ``tcp.Server``
(``to_twisted``) and every connection lost when the reactor stops (in a child process).
Pins CPython's ``socket._accept`` (the lean accept loop's) and ``tcp.Server``'s
constructor (``to_twisted``)."""

from __future__ import annotations

import _socket
import inspect
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable, Generator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, tcp, threads
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from orbited.runtime import twisted_compat
from orbited.runtime.twisted_compat import (
    LeanConnection,
    listening_port,
    unsent_bytes,
    write_through,
)


class Recorder(Protocol):
    """Keeps what it reads; ``fail`` makes dataReceived raise."""

    fail = False

    def __init__(self, factory: LeanFactory) -> None:
        self.factory = factory
        self.data = b""
        self.reads: list[str] = []
        self.lost: list[Failure] = []

    def connectionMade(self) -> None:  # noqa: N802
        self.factory.built.append(self)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.data += data
        # Read in the accept itself (first_read), or on a reactor wake-up of its own?
        self.reads.append(
            "accept" if any(f.function == "first_read" for f in inspect.stack()) else "reactor"
        )
        if self.fail:
            raise RuntimeError("boom in dataReceived")

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: N802, B008
        self.lost.append(reason)


class LeanFactory(Factory):
    fail_next = False  # the next protocol raises in dataReceived

    def __init__(self) -> None:
        self.built: list[Recorder] = []
        self.addrs: list[Any] = []
        self.kind: type[Recorder] = Recorder

    def buildProtocol(self, addr: Any) -> Recorder:  # type: ignore[override]  # noqa: N802
        self.addrs.append(addr)
        p = self.kind(self)
        if LeanFactory.fail_next:
            LeanFactory.fail_next = False
            p.fail = True
        return p


def _wait(predicate: Callable[[], bool], what: str, seconds: float = 5.0) -> defer.Deferred[None]:
    @defer.inlineCallbacks
    def poll() -> Generator[defer.Deferred[None], None, None]:
        for _ in range(int(seconds * 100)):
            if predicate():
                return
            yield deferLater(reactor, 0.01, lambda: None)
        raise AssertionError(f"timed out waiting for {what}")

    return poll()


class Listener:
    def __init__(self, defer_accept: int = 0, host: str = "127.0.0.1") -> None:
        self.events: list[str] = []
        self.factory = LeanFactory()
        self.host = host
        self.service = twisted_compat.CountedTCPServer(
            0, self.factory, on_open=lambda: self.events.append("open"),
            on_close=lambda: self.events.append("close"), interface=host,
            nodelay=True, lean=True, defer_accept=defer_accept,
        )  # fmt: skip
        self.service.startService()
        self.port = listening_port(self.service).getHost().port
        self.peers: list[socket.socket] = []

    @defer.inlineCallbacks
    def connect(self) -> Generator[Any, Any, tuple[socket.socket, Recorder]]:
        n = len(self.factory.built)
        peer = socket.create_connection((self.host, self.port), timeout=5)
        self.peers.append(peer)
        yield _wait(lambda: len(self.factory.built) > n, "the accept")
        return peer, self.factory.built[n]

    def stop(self) -> Any:
        for peer in self.peers:
            peer.close()
        return self.service.stopService()


def _recv_n(peer: socket.socket, n: int) -> bytes:
    """Run in a thread (the reactor must go on sending): ``n`` bytes from ``peer``."""
    peer.settimeout(10)
    out = b""
    while len(out) < n:
        chunk = peer.recv(n - len(out))
        assert chunk, "closed early"
        out += chunk
    return out


def _recv_until_eof(peer: socket.socket) -> bytes:
    out = b""
    while True:
        chunk = peer.recv(65536)
        if not chunk:
            return out
        out += chunk


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
@pytest_twisted.inlineCallbacks
def test_accepts_reads_writes_through_and_counts_a_peer_close_once(host):
    try:
        listener = Listener(host=host)
    except Exception:  # noqa: BLE001 - no loopback IPv6 here
        pytest.skip(f"cannot listen on {host}")
    try:
        peer, proto = yield listener.connect()
        conn = proto.transport
        assert type(conn) is LeanConnection
        # Accepted by the C-level socket._accept into a plain _socket.socket.
        assert type(conn.socket) is _socket.socket
        assert listener.factory.addrs == [None]  # no address object built per accept
        assert listener.events == ["open"]
        peer_host, peer_port = peer.getsockname()[:2]
        assert (conn.getPeer().host, conn.getPeer().port) == (peer_host, peer_port)
        assert type(conn.getPeer()) is (IPv6Address if ":" in host else IPv4Address)
        assert conn.getHost().port == listener.port
        assert conn.getTcpNoDelay()  # inherited from the listening socket
        peer.sendall(b"GET / HTTP/1.1\r\n\r\n")
        yield _wait(lambda: proto.data == b"GET / HTTP/1.1\r\n\r\n", "the bytes read")
        # Nothing queued: the kernel takes it at once, nothing left in user space.
        assert write_through(conn, b"hello ") is True
        conn.writeSequence([b"wor", b"ld"])  # queued, sent when writable
        assert unsent_bytes(conn) == 5
        assert write_through(conn, b"!") is False  # behind the queue: order kept
        got = yield threads.deferToThread(_recv_n, peer, 12)
        assert got == b"hello world!"
        yield _wait(lambda: unsent_bytes(conn) == 0, "the queue drained")
        peer.close()  # the peer's end of stream (no half-close): the connection is lost
        yield _wait(lambda: bool(proto.lost), "connectionLost")
        assert proto.lost[0].check(ConnectionDone)
        assert listener.events == ["open", "close"]
        assert conn.fileno() == -1 and not conn.connected
        conn.write(b"late")  # after the close: ignored, as tcp.Server does
        assert unsent_bytes(conn) == 0
    finally:
        yield listener.stop()


@pytest_twisted.inlineCallbacks
def test_a_partial_write_queues_the_rest_and_lose_connection_flushes_it_first():
    listener = Listener()
    try:
        peer, proto = yield listener.connect()
        conn = proto.transport
        conn.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        big = bytes(range(256)) * 4096  # 1 MB: more than the kernel takes at once
        assert write_through(conn, big) is False
        held = unsent_bytes(conn)
        assert 0 < held <= len(big)
        assert write_through(conn, b"TAIL") is False
        assert unsent_bytes(conn) == held + 4
        conn.loseConnection()
        assert conn.disconnecting and not proto.lost  # never lost inside the call
        conn.write(b"AFTER")  # as tcp.Server: still sent before the FIN
        peer.settimeout(10)
        got = yield threads.deferToThread(_recv_until_eof, peer)
        assert got == big + b"TAIL" + b"AFTER"
        yield _wait(lambda: bool(proto.lost), "connectionLost")
        assert proto.lost[0].check(ConnectionDone)
        assert listener.events == ["open", "close"]
    finally:
        yield listener.stop()


@pytest_twisted.inlineCallbacks
def test_abort_drops_the_queue_resets_and_is_lost_a_turn_later():
    listener = Listener()
    try:
        peer, proto = yield listener.connect()
        conn = proto.transport
        conn.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        conn.write(b"x" * 1_000_000)
        conn.abortConnection()
        conn.abortConnection()  # twice: once
        assert not proto.lost  # a reactor turn later, as tcp.Connection.abortConnection
        assert write_through(conn, b"AFTER-ABORT") is False  # never sent
        yield _wait(lambda: bool(proto.lost), "connectionLost")
        assert len(proto.lost) == 1 and proto.lost[0].check(ConnectionAborted)
        assert listener.events == ["open", "close"]
        peer.settimeout(5)
        reset = False
        try:
            while peer.recv(65536):
                pass
        except ConnectionResetError:
            reset = True
        assert reset  # SO_LINGER 0: a reset, not a FIN after the queue
        # Nothing queued: a write-through after the abort is not sent either.
        peer2, proto2 = yield listener.connect()
        proto2.transport.abortConnection()
        assert write_through(proto2.transport, b"AFTER-ABORT") is False
        yield _wait(lambda: bool(proto2.lost), "connectionLost")
        peer2.settimeout(5)
        try:
            got = peer2.recv(100)
        except ConnectionResetError:
            got = b""
        assert got == b""
    finally:
        yield listener.stop()


@pytest_twisted.inlineCallbacks
def test_an_error_in_the_protocol_is_logged_and_loses_only_that_connection():
    listener = Listener()
    logged: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        peer, proto = yield listener.connect()
        other_peer, other = yield listener.connect()
        proto.fail = True
        peer.sendall(b"x")
        yield _wait(lambda: bool(proto.lost), "connectionLost")
        assert proto.lost[0].check(RuntimeError)
        failures = [e.get("log_failure") or e.get("failure") for e in logged]
        assert any(f is not None and f.check(RuntimeError) for f in failures)
        other_peer.sendall(b"still here")
        yield _wait(lambda: other.data == b"still here", "the other connection reads on")
        assert listener.events == ["open", "open", "close"]
    finally:
        globalLogPublisher.removeObserver(logged.append)
        yield listener.stop()


@pytest_twisted.inlineCallbacks
def test_a_send_error_loses_the_connection_later_never_inside_write():
    listener = Listener()
    try:
        peer, proto = yield listener.connect()
        conn = proto.transport
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        peer.close()  # a reset
        for _ in range(3):
            write_through(conn, b"y" * 1000)  # EPIPE/ECONNRESET: no exception here
        assert not proto.lost or proto.lost[0].check(ConnectionDone, ConnectionLost)
        yield _wait(lambda: bool(proto.lost), "connectionLost")
        assert len(proto.lost) == 1 and proto.lost[0].check(ConnectionDone, ConnectionLost)
        assert listener.events == ["open", "close"]
    finally:
        yield listener.stop()


@pytest_twisted.inlineCallbacks
def test_to_twisted_hands_the_socket_and_its_queue_to_a_tcp_server_counted_once():
    listener = Listener()
    try:
        peer, proto = yield listener.connect()
        conn = proto.transport
        conn.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        first = b"a" * 500_000
        write_through(conn, first)
        assert unsent_bytes(conn) > 0
        server = conn.to_twisted()
        proto.transport = server
        assert isinstance(server, tcp.Server) and server.protocol is proto
        assert not conn.connected and unsent_bytes(conn) == 0
        server.write(b"then")
        peer.sendall(b"read by the tcp.Server")
        yield _wait(lambda: proto.data == b"read by the tcp.Server", "a read after the move")
        server.loseConnection()
        got = yield threads.deferToThread(_recv_until_eof, peer)
        assert got == first + b"then"
        yield _wait(lambda: bool(proto.lost), "connectionLost")
        assert listener.events == ["open", "close"]  # counted in once, out once
    finally:
        yield listener.stop()


@pytest_twisted.inlineCallbacks
def test_with_defer_accept_a_request_is_read_in_its_accept_and_a_silent_socket_still_comes():
    listener = Listener(defer_accept=1)
    try:
        port = listening_port(listener.service)
        assert port.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) > 0
        # A request sent with the handshake: accepted with its bytes, read in the accept.
        peer = socket.create_connection(("127.0.0.1", listener.port), timeout=5)
        listener.peers.append(peer)
        peer.sendall(b"GET / HTTP/1.1\r\n\r\n")
        yield _wait(lambda: len(listener.factory.built) == 1, "the accept")
        proto = listener.factory.built[0]
        assert proto.data == b"GET / HTTP/1.1\r\n\r\n" and proto.reads == ["accept"]
        peer.sendall(b"more")
        yield _wait(lambda: proto.data.endswith(b"more"), "the next read")
        assert proto.reads == ["accept", "reactor"]
        # An error in that first read: logged, that connection lost, the listener fine.
        logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(logged.append)
        try:
            LeanFactory.fail_next = True
            bad = socket.create_connection(("127.0.0.1", listener.port), timeout=5)
            listener.peers.append(bad)
            bad.sendall(b"x")
            yield _wait(lambda: len(listener.factory.built) == 2, "the accept")
            failing = listener.factory.built[1]
            yield _wait(lambda: bool(failing.lost), "connectionLost")
            assert failing.lost[0].check(RuntimeError) and failing.reads == ["accept"]
            assert any((e.get("log_failure") or e.get("failure")) is not None for e in logged)
        finally:
            globalLogPublisher.removeObserver(logged.append)
        # A socket that sends nothing is still accepted: after the defer (1 s: the
        # kernel retransmits its SYN-ACK and takes the peer's ACK of it; later if that
        # ACK is late, as under load), so the wait here is generous.
        silent = socket.create_connection(("127.0.0.1", listener.port), timeout=5)
        listener.peers.append(silent)
        yield _wait(lambda: len(listener.factory.built) == 3, "the silent accept", 60.0)
        assert listener.factory.built[2].data == b""
        assert listener.events.count("open") == 3
    finally:
        LeanFactory.fail_next = False
        yield listener.stop()


class _Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.transport.write(b"echo:" + data)


class _HandOver(Recorder):
    """Hands its socket to an echoing protocol on a tcp.Server, then raises."""

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        server = self.transport.to_twisted()
        echo = _Echo()
        server.protocol = echo
        echo.makeConnection(server)
        echo.dataReceived(data)
        raise RuntimeError("boom after the hand-over")


@pytest.mark.parametrize("defer_accept", [0, 1])
@pytest_twisted.inlineCallbacks
def test_an_error_after_a_hand_over_loses_the_tcp_server_and_counts_it_out(defer_accept):
    """The read that hands the socket to a tcp.Server (the front's hand-off to
    twisted.web) raises afterwards: logged, and the connection is lost as a tcp.Server's
    would be (closed, counted out), not left registered to nobody. ``defer_accept``:
    on the accept's own read (first_read) or on the reactor's."""
    listener = Listener(defer_accept=defer_accept)
    logged: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(logged.append)

    listener.factory.kind = _HandOver
    try:
        peer = socket.create_connection(("127.0.0.1", listener.port), timeout=5)
        listener.peers.append(peer)
        if not defer_accept:
            yield _wait(lambda: len(listener.factory.built) == 1, "the accept")
        peer.sendall(b"x")
        got = yield threads.deferToThread(_recv_until_eof, peer)
        assert got in (b"", b"echo:x")  # queued before the loss: sent, or dropped; then EOF
        yield _wait(lambda: listener.events == ["open", "close"], "the socket counted out")
        failures = [e.get("log_failure") or e.get("failure") for e in logged]
        assert any(f is not None and f.check(RuntimeError) for f in failures)
    finally:
        globalLogPublisher.removeObserver(logged.append)
        yield listener.stop()


def test_every_lean_connection_is_lost_and_uncounted_when_the_reactor_stops(tmp_path):
    script = textwrap.dedent(
        """
        import socket, sys
        from twisted.internet import reactor
        from twisted.internet.protocol import Factory, Protocol
        from orbited.runtime import twisted_compat

        events = []
        class P(Protocol):
            def connectionLost(self, reason):
                events.append("lost:" + type(reason.value).__name__)
        class F(Factory):
            def buildProtocol(self, addr):
                return P()
        service = twisted_compat.CountedTCPServer(
            0, F(), on_open=lambda: events.append("open"),
            on_close=lambda: events.append("close"), interface="127.0.0.1", lean=True)
        service.startService()
        port = twisted_compat.listening_port(service).getHost().port
        peers = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        reactor.callLater(0.3, reactor.stop)
        reactor.run()
        print(sorted(events))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, check=True)  # fmt: skip
    assert out.stdout.strip() == str(
        sorted(["open", "open", "lost:ConnectionLost", "lost:ConnectionLost", "close", "close"])
    ), out.stderr
