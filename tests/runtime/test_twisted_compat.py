"""Each private Twisted or autobahn name orbited.runtime.twisted_compat relies on, checked
against the installed versions: an upgrade that renames or changes one fails here, in a
second, instead of in a node (or only in the slow real-process tests).

What is pinned, and by which test:
- ``FileDescriptor.dataBuffer`` / ``offset`` / ``_tempDataLen`` (unsent_bytes): a real
  loopback TCP connection whose reader is paused;
- ``tcp.Connection.socket`` / ``TLS`` / ``dataBuffer`` / ``offset`` / ``_tempDataLen`` and
  ``ProtocolWrapper.write`` (write_through, writev_through): a real loopback connection,
  a partial write through a small send buffer, closing and TLS-flagged connections;
- ``internet.TCPServer._port`` (listening_port): a started TCPServer;
- ``tcp.Port.transport`` / ``numberAccepts`` / ``sessionno`` / ``_buildAddr`` /
  ``doRead``, ``tcp.Server.server`` / ``connectionLost`` and ``_AbstractServer._getPort``
  (CountedPort, CountedTCPServer): real loopback sockets (IPv4 and IPv6) accepted in a
  burst, refused, taken over by another protocol and closed, TCP_NODELAY inherited, an
  accept error left to Twisted;
- ``HTTPChannel._respondToBadRequestAndDisconnect`` / ``_receivedHeaderSize`` /
  ``_receivedHeaderCount`` (HookedHTTPChannel): malformed heads fed to a channel;
- autobahn's ``send_queue`` / ``_perMessageCompress`` (autobahn_send_idle), its logging
  through the instance's ``log`` (NoDebugLogger) and its module-global ``pformat``
  (lazy_autobahn_pformat): a WebSocket handshake on a StringTransport.
"""

from __future__ import annotations

import base64
import hashlib
import pprint
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import autobahn.websocket.protocol as autobahn_protocol
import pytest
import pytest_twisted
import txaio
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.compress import PerMessageDeflateOffer, PerMessageDeflateOfferAccept
from twisted.application import internet
from twisted.internet import defer, reactor, threads
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.web import http

from orbited.node.transports.websocket import text_frame_header
from orbited.runtime import twisted_compat
from orbited.runtime.twisted_compat import (
    HookedHTTPChannel,
    NoDebugLogger,
    autobahn_send_idle,
    close_delimited,
    lazy_autobahn_pformat,
    listening_port,
    unsent_bytes,
)

# -- unsent_bytes: FileDescriptor.dataBuffer, offset, _tempDataLen ----------------------


class _Collect(Protocol):
    def __init__(self) -> None:
        self.received = 0
        self.lost = defer.Deferred[None]()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.received += len(data)

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        self.lost.callback(None)


def _sleep(seconds: float) -> defer.Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


@pytest_twisted.inlineCallbacks
def test_unsent_bytes_counts_what_a_real_tcp_transport_has_not_handed_to_the_kernel():
    accepted: list[Protocol] = []

    class Server(Protocol):
        def connectionMade(self) -> None:  # noqa: N802
            accepted.append(self)

    port = reactor.listenTCP(0, Factory.forProtocol(Server), interface="127.0.0.1")
    client = _Collect()
    try:
        endpoint_port = port.getHost().port
        yield _connect(client, endpoint_port)
        while not accepted:
            yield _sleep(0.01)
        server = accepted[0].transport
        assert unsent_bytes(server) == 0  # nothing written yet
        client.transport.pauseProducing()  # the reader stops reading: the kernel fills up
        size = 32 * 1024 * 1024  # far more than loopback's socket buffers hold
        server.write(b"x" * size)
        # Written, not yet sent: all of it waits in _tempDataBuffer (_tempDataLen).
        assert unsent_bytes(server) == size
        yield _sleep(0.2)  # the reactor hands what the kernel takes over (dataBuffer, offset)
        held = unsent_bytes(server)
        assert held is not None and 0 < held < size
        # Through a ProtocolWrapper (the node's socket gate wraps every connection).
        wrapper = ProtocolWrapper(WrappingFactory(Factory()), Protocol())
        wrapper.transport = server
        assert unsent_bytes(wrapper) == held
        client.transport.resumeProducing()
        for _ in range(500):
            if client.received == size:
                break
            yield _sleep(0.01)
        assert client.received == size
        assert unsent_bytes(server) == 0  # everything went out: offset caught up
    finally:
        if client.transport is not None:
            client.transport.loseConnection()
            yield client.lost
        yield port.stopListening()


def _connect(protocol: Protocol, port: int) -> defer.Deferred[Any]:
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    return connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), protocol)


def test_unsent_bytes_is_none_for_a_transport_of_another_kind():
    assert unsent_bytes(StringTransport()) is None
    assert unsent_bytes(object()) is None


# -- listening_port: internet.TCPServer._port -------------------------------------------


def test_listening_port_is_the_port_a_started_tcpserver_listens_on():
    service = internet.TCPServer(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    with pytest.raises(RuntimeError, match="not listening"):
        listening_port(service)
    service.startService()
    try:
        address = listening_port(service).getHost()
        assert address.host == "127.0.0.1" and address.port != 0
        # It is the real listening socket: a connection to it is accepted.
        with socket.create_connection(("127.0.0.1", address.port), timeout=5):
            pass
    finally:
        service.stopService()


# -- CountedPort / CountedTCPServer: Port.transport, Server.server, _getPort -------------


class _Refusing(Factory):
    """Builds a protocol for the first ``n`` connections, then refuses (None)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.built: list[Protocol] = []

    def buildProtocol(self, addr: Any) -> Protocol | None:  # type: ignore[override]  # noqa: N802
        if len(self.built) >= self.n:
            return None
        p = Protocol()
        p.factory = self
        self.built.append(p)
        return p


@pytest_twisted.inlineCallbacks
def test_a_counted_tcpserver_counts_each_socket_from_accept_to_close():
    events: list[str] = []
    factory = _Refusing(2)
    service = twisted_compat.CountedTCPServer(
        0, factory, on_open=lambda: events.append("open"),
        on_close=lambda: events.append("close"), interface="127.0.0.1",
    )  # fmt: skip
    service.startService()
    peers = []
    try:
        port = listening_port(service)
        assert isinstance(port, twisted_compat.CountedPort)
        address = port.getHost()
        for _ in range(3):
            peers.append(socket.create_connection(("127.0.0.1", address.port), timeout=5))
        for _ in range(100):
            if len(factory.built) == 2 and events == ["open", "open"]:
                break
            yield _sleep(0.01)
        # The factory's own protocol on the TCP transport (no wrapper); the refused
        # third socket was never counted.
        assert events == ["open", "open"]
        transport = factory.built[0].transport
        assert isinstance(transport, twisted_compat.CountedServer)
        assert transport.protocol is factory.built[0]
        # A protocol taking the connection over: the close is still counted, once.
        other = Protocol()
        transport.protocol = other
        other.makeConnection(transport)
        peers[0].close()
        for _ in range(100):
            if events.count("close") == 1:
                break
            yield _sleep(0.01)
        assert events == ["open", "open", "close"]
        factory.built[1].transport.loseConnection()
        for _ in range(100):
            if events.count("close") == 2:
                break
            yield _sleep(0.01)
        assert events == ["open", "open", "close", "close"]
    finally:
        for peer in peers:
            peer.close()
        yield service.stopService()
    assert service._port is None or not service._port.connected


class _Flaky:
    """A listening socket whose next accept() fails once with ``errno``."""

    def __init__(self, real: socket.socket, errno: int) -> None:
        self.real, self.errno = real, errno

    def accept(self) -> Any:
        if self.errno:
            errno, self.errno = self.errno, 0
            raise OSError(errno, "injected")
        return self.real.accept()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
@pytest_twisted.inlineCallbacks
def test_a_counted_port_accepts_bursts_with_nodelay_and_leaves_errors_to_twisted(host):
    import errno

    if host == "::1" and not socket.has_ipv6:
        pytest.skip("no IPv6")
    opened: list[int] = []
    factory = _Refusing(1000)
    service = twisted_compat.CountedTCPServer(
        0, factory, on_open=lambda: opened.append(1), on_close=lambda: None,
        interface=host, nodelay=True,
    )  # fmt: skip
    try:
        service.startService()
    except Exception:  # noqa: BLE001 - no loopback IPv6 here
        pytest.skip(f"cannot listen on {host}")
    peers = []
    try:
        port = listening_port(service)
        address = (host, port.getHost().port)
        # A burst queued before the reactor looks: one doRead takes them all.
        peers += [socket.create_connection(address, timeout=5) for _ in range(30)]
        for _ in range(200):
            if len(factory.built) == 30:
                break
            yield _sleep(0.01)
        assert len(factory.built) == len(opened) == 30
        transport = factory.built[0].transport
        assert port.nodelay_inherited is True
        assert transport.getTcpNoDelay()  # inherited from the listening socket
        peer_host = transport.getPeer().host
        assert peer_host == host  # the peer's address, as Port.doRead gives it
        transport.setTcpNoDelay(False)
        assert not transport.getTcpNoDelay()
        transport.setTcpNoDelay(True)
        assert transport.getTcpNoDelay()
        # An accept error other than "no more" is Twisted's to handle (ECONNABORTED:
        # logged, skipped); the port goes on accepting.
        port.socket = _Flaky(port.socket, errno.ECONNABORTED)
        peers.append(socket.create_connection(address, timeout=5))
        for _ in range(200):
            if len(factory.built) == 31:
                break
            if not port.socket.errno:  # the error was taken: connect once more
                peers.append(socket.create_connection(address, timeout=5))
            yield _sleep(0.02)
        assert len(factory.built) >= 31 and port.socket.errno == 0
        port.socket = port.socket.real
    finally:
        for peer in peers:
            peer.close()
        yield service.stopService()


# -- HookedHTTPChannel: HTTPChannel's private bad-request hook and head counters --------


class _Recording(HookedHTTPChannel):
    """Records the hook's calls with the state at that moment, then answers as Twisted."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[bool, int]] = []

    def bad_request(self) -> None:
        self.calls.append((self.at_request_line(), self.header_count()))
        super().bad_request()


@pytest.fixture
def channel() -> Iterator[_Recording]:
    site_channel = _Recording()
    site_channel.requestFactory = http.Request  # type: ignore[assignment]
    site_channel.callLater = Clock().callLater  # its timeouts: no reactor
    site_channel.makeConnection(StringTransport())
    yield site_channel


def test_the_hook_is_called_for_a_malformed_request_line(channel):
    channel.dataReceived(b"NOT A REQUEST LINE AT ALL\r\n")
    assert len(channel.calls) == 1
    # Not overridden further: Twisted's own answer, so the hook replaced nothing else.
    assert channel.transport.value() == b"HTTP/1.1 400 Bad Request\r\n\r\n"


def test_the_hook_is_called_past_max_headers_with_the_count(channel):
    channel.maxHeaders = 2
    channel.dataReceived(b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n")
    assert channel.calls == [(False, 3)]


def test_the_hook_is_called_for_a_bad_content_length(channel):
    channel.dataReceived(b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n")
    assert len(channel.calls) == 1 and channel.calls[0][1] == 0


def test_the_hook_is_called_past_total_headers_size(channel):
    channel.totalHeadersSize = 100
    channel.dataReceived(b"GET /" + b"a" * 200 + b" HTTP/1.1\r\n")
    assert len(channel.calls) == 1


def test_at_request_line_and_header_count_follow_the_head(channel):
    assert channel.at_request_line() and channel.header_count() == 0
    channel.dataReceived(b"GET / HTTP/1.1\r\n")
    assert not channel.at_request_line() and channel.header_count() == 0
    channel.dataReceived(b"A: 1\r\nB: 2\r\n")
    assert channel.header_count() == 1  # a header line is parsed when the next one starts
    channel.dataReceived(b"\r\n")  # the request is complete: the counters start again
    assert channel.at_request_line() and channel.header_count() == 0
    assert channel.calls == []


# -- autobahn ---------------------------------------------------------------------------

HANDSHAKE_KEY = base64.b64encode(b"0123456789abcdef")


def _handshake(extensions: bytes = b"") -> bytes:
    head = (
        b"GET /ws HTTP/1.1\r\nHost: example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: " + HANDSHAKE_KEY + b"\r\nSec-WebSocket-Version: 13\r\n"
    )
    if extensions:
        head += b"Sec-WebSocket-Extensions: " + extensions + b"\r\n"
    return head + b"\r\n"


class _RecordingLog:
    """Stands in for an autobahn protocol's ``log``: records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        def record(format: str | None = None, **kwargs: Any) -> None:  # noqa: A002
            self.calls.append((level, format or "", kwargs))

        return record


@pytest.fixture
def clock() -> Iterator[Clock]:
    """autobahn's timers (handshake timeouts, queued sends) on a Clock, via txaio."""
    saved = txaio.config.loop
    txaio.config.loop = Clock()
    try:
        yield txaio.config.loop
    finally:
        txaio.config.loop = saved


def _open(log: Any = None, compress: bool = False) -> WebSocketServerProtocol:
    factory = WebSocketServerFactory()
    factory.protocol = WebSocketServerProtocol
    if compress:
        factory.setProtocolOptions(
            perMessageCompressionAccept=lambda offers: next(
                (
                    PerMessageDeflateOfferAccept(o)
                    for o in offers
                    if isinstance(o, PerMessageDeflateOffer)
                ),
                None,
            )  # fmt: skip
        )
    proto = factory.buildProtocol(None)
    if log is not None:
        proto.log = log
    proto.makeConnection(StringTransport())
    proto.dataReceived(_handshake(b"permessage-deflate" if compress else b""))
    assert proto.state == proto.STATE_OPEN
    accept = base64.b64encode(
        hashlib.sha1(HANDSHAKE_KEY + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
    )
    assert accept in proto.transport.value()  # the handshake was answered
    proto.transport.clear()
    return proto


def test_send_idle_on_an_open_connection_and_raw_frames_match_send_message(clock):
    proto = _open()
    assert autobahn_send_idle(proto)
    # The fast path writes frames itself: they must be the bytes sendMessage writes.
    for payload in (b"", b"hello", b"x" * 200, b"y" * 70_000):
        proto.sendMessage(payload)
        assert proto.transport.value() == text_frame_header(len(payload)) + payload
        proto.transport.clear()


def test_send_idle_is_false_while_autobahn_has_queued_bytes(clock):
    proto = _open()
    proto.sendData(b"abc", chopsize=1)  # a chopped send: queued, one chunk per turn
    assert proto.transport.value() == b"a"
    assert not autobahn_send_idle(proto)  # a raw write now would overtake "bc"
    clock.advance(1)
    clock.advance(1)
    assert proto.transport.value() == b"abc"
    clock.advance(1)
    assert autobahn_send_idle(proto)


def test_send_idle_is_false_when_compression_was_negotiated(clock):
    proto = _open(compress=True)
    assert not autobahn_send_idle(proto)  # frames need compressing: sendMessage only


def test_autobahn_logs_through_the_instance_log(clock):
    log = _RecordingLog()
    proto = _open(log)
    assert any(level == "debug" for level, _, _ in log.calls)
    # So NoDebugLogger on the instance silences them and keeps the rest.
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        quiet = NoDebugLogger("test", source=proto)
        quiet.debug("not emitted {x}", x=1)
        quiet.warn("emitted")
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [e["log_level"] for e in events if e.get("log_namespace") == "test"] == [LogLevel.warn]


def test_autobahn_pformat_is_the_module_global_it_formats_its_options_with(clock):
    # In a clean interpreter: the patch target exists and is pprint's pformat.
    check = (
        "import pprint, autobahn.websocket.protocol as m; "
        "assert m.pformat is pprint.pformat, m.pformat"
    )
    subprocess.run([sys.executable, "-c", check], check=True)
    saved = autobahn_protocol.pformat
    try:
        lazy_autobahn_pformat()
        lazy_autobahn_pformat()  # idempotent
        assert autobahn_protocol.pformat is twisted_compat._LazyPformat
        log = _RecordingLog()
        _open(log)
        # The option table handed to the debug call is the lazy object, not a string
        # already pretty-printed; formatted, it is what pformat gave.
        (attrs,) = [kw["attrs"] for _, _, kw in log.calls if "attrs" in kw]
        assert not isinstance(attrs, str)
        text = str(attrs)
        assert "openHandshakeTimeout" in text and text == pprint.pformat(attrs.obj)
    finally:
        autobahn_protocol.pformat = saved


# -- quiet_factories: Factory.noisy, set on Twisted's base classes ----------------------


def test_quiet_factories_turns_off_the_start_and_stop_lines(monkeypatch):
    from twisted.internet.protocol import AbstractDatagramProtocol

    # monkeypatch restores both class attributes after the test.
    monkeypatch.setattr(Factory, "noisy", True)
    monkeypatch.setattr(AbstractDatagramProtocol, "noisy", True)

    def lines() -> list[str]:
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        try:
            factory = Factory()
            factory.doStart()
            factory.doStop()
        finally:
            globalLogPublisher.removeObserver(events.append)
        return [e.get("log_format", "") for e in events]

    assert any("Starting factory" in line for line in lines())  # what noisy controls
    twisted_compat.quiet_factories()
    assert Factory.noisy is False and AbstractDatagramProtocol.noisy is False
    assert not any("factory" in line.lower() for line in lines())


# -- write_through / writev_through: tcp.Connection's dataBuffer, offset, _tempDataLen,
#    socket, connected, disconnecting, TLS; ProtocolWrapper.write ----------------------


class _Accepted(Protocol):
    def connectionMade(self) -> None:  # noqa: N802
        self.factory.made.callback(self)  # type: ignore[attr-defined]


@defer.inlineCallbacks
def _pair(wrap: bool = False) -> Any:
    """A real loopback TCP connection: (server-side transport, listening port, peer
    socket, the tcp.Connection under it). ``wrap``: behind a pass-through
    ProtocolWrapper, as the node's socket gate puts every browser connection."""
    factory = Factory.forProtocol(_Accepted)
    factory.made = defer.Deferred()  # type: ignore[attr-defined]
    listen = WrappingFactory(factory) if wrap else factory
    port = reactor.listenTCP(0, listen, interface="127.0.0.1")
    peer = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
    proto = yield factory.made
    transport = proto.transport
    tcp = transport.transport if wrap else transport
    return transport, port, peer, tcp


@defer.inlineCallbacks
def _close(transport: Any, port: Any, peer: socket.socket) -> Any:
    peer.close()
    transport.abortConnection()
    yield port.stopListening()
    yield _sleep(0)


def _recv(peer: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = peer.recv(n - len(out))
        assert chunk, "connection closed early"
        out += chunk
    return out


@pytest_twisted.inlineCallbacks
def test_tcp_connection_keeps_its_send_buffer_in_the_private_attributes_write_through_reads():
    transport, port, peer, tcp = yield _pair()
    try:
        assert isinstance(tcp.dataBuffer, bytes | bytearray | memoryview)
        assert isinstance(tcp.offset, int) and isinstance(tcp._tempDataLen, int)
        assert tcp.TLS is False  # startTLS sets it (then write goes through the TLS layer)
        assert isinstance(tcp.socket, socket.socket) and tcp.socket.gettimeout() == 0.0
        assert tcp.socket is tcp.getHandle()
        assert twisted_compat.can_write_through(transport)
        # What write-through avoids: write() only buffers until the next reactor turn.
        transport.write(b"abc")
        assert tcp._tempDataLen == 3 and unsent_bytes(transport) == 3
        assert not twisted_compat.can_write_through(transport)  # queued: keep the order
        yield _sleep(0.05)
        assert _recv(peer, 3) == b"abc"
        assert twisted_compat.can_write_through(transport)
    finally:
        yield _close(transport, port, peer)


@pytest.mark.parametrize("wrap", [False, True])
@pytest_twisted.inlineCallbacks
def test_write_through_sends_at_once_when_nothing_is_queued(wrap):
    transport, port, peer, tcp = yield _pair(wrap)
    try:
        assert twisted_compat.write_through(transport, b"hello ") is True
        twisted_compat.writev_through(transport, [b"wor", b"ld"])
        # No reactor turn in between: the bytes are already on the wire.
        assert unsent_bytes(transport) == 0 and tcp.dataBuffer == b""
        assert _recv(peer, 11) == b"hello world"
    finally:
        yield _close(transport, port, peer)


@pytest.mark.parametrize("vector", [False, True])
@pytest_twisted.inlineCallbacks
def test_a_partial_write_leaves_the_rest_to_twisted_in_order(vector):
    transport, port, peer, tcp = yield _pair()
    try:
        tcp.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        big = bytes(range(256)) * 4096  # 1 MB: more than the kernel takes at once
        if vector:
            twisted_compat.writev_through(transport, [big[:1000], big[1000:]])
        else:
            assert twisted_compat.write_through(transport, big) is False  # not all sent
        held = unsent_bytes(transport)
        assert held is not None and 0 < held < len(big)  # partly sent, the rest queued
        assert not twisted_compat.can_write_through(transport)
        assert twisted_compat.write_through(transport, b"TAIL") is False  # queued behind
        assert unsent_bytes(transport) == held + 4
        got = bytearray()
        reading = threads.deferToThread(lambda: got.extend(_recv(peer, len(big) + 4)))
        yield reading
        assert bytes(got) == big + b"TAIL"
    finally:
        yield _close(transport, port, peer)


@pytest_twisted.inlineCallbacks
def test_no_write_through_once_the_connection_is_closing_or_tls():
    transport, port, peer, tcp = yield _pair()
    try:
        tcp.TLS = True  # as startTLS leaves it: bytes must go through the TLS layer
        assert not twisted_compat.can_write_through(transport)
        tcp.TLS = False
        transport.loseConnection()
        assert tcp.disconnecting and not twisted_compat.can_write_through(transport)
    finally:
        yield _close(transport, port, peer)
    # After abortConnection nothing more is sent (tcp.Connection._aborting).
    transport, port, peer, tcp = yield _pair()
    try:
        transport.abortConnection()
        assert tcp._aborting and not twisted_compat.can_write_through(transport)
        assert twisted_compat.write_through(transport, b"AFTER") is False
    finally:
        yield _close(transport, port, peer)


def test_transports_of_another_kind_get_write_and_write_sequence():
    plain = StringTransport()
    assert not twisted_compat.can_write_through(plain)
    assert twisted_compat.write_through(plain, b"a") is False  # not known to be sent
    twisted_compat.writev_through(plain, [b"b", b"c"])
    assert plain.value() == b"abc"

    class Encrypting(ProtocolWrapper):  # a wrapper that changes the bytes (like TLS)
        def write(self, data: bytes) -> None:
            super().write(data.upper())

    wrapper = Encrypting(WrappingFactory(Factory()), Protocol())
    wrapper.transport = StringTransport()
    assert not twisted_compat.can_write_through(wrapper)
    twisted_compat.write_through(wrapper, b"x")
    assert wrapper.transport.value() == b"X"


def test_a_ticker_that_never_started_stops_cleanly():
    # A MultiService stops every child when an earlier child fails to start (a port in use).
    from twisted.internet.task import Clock

    from orbited.runtime.twisted_compat import Ticker

    calls: list[int] = []
    never = Ticker(1.0, lambda: calls.append(1))
    assert never.stopService() is None and not never.running
    ran = Ticker(1.0, lambda: calls.append(1))
    ran.clock = Clock()
    ran.startService()
    ran.clock.advance(1.0)
    stopped = ran.stopService()
    ran.clock.advance(5.0)
    assert calls == [1, 1] and stopped.called and not ran.running


def test_close_delimited_answers_without_chunks_and_closes_after_the_response():
    """twisted.web chunks every HTTP/1.1 response without Content-Length, deciding by
    ``Request.clientproto`` at the first write; close_delimited relies on that and on
    ``HTTPChannel.persistent`` (the iframe transport's document, streaming.py)."""
    from twisted.internet.testing import StringTransport
    from twisted.web import resource, server

    class Streamed(resource.Resource):
        isLeaf = True

        def render_GET(self, request):  # noqa: N802
            close_delimited(request)
            request.write(b"first ")
            request.write(b"second")
            request.finish()
            return server.NOT_DONE_YET

    channel = server.Site(Streamed()).buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    head, _, body = transport.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 ")
    assert b"transfer-encoding" not in head.lower() and b"connection: close" in head.lower()
    assert body == b"first second"  # no chunk framing: the body ends with the connection
    assert transport.disconnecting
