"""The browser listener's socket gate (orbited.node.transports.gate) on real loopback
sockets in this process's reactor (pytest-twisted): the cap, the count following the
socket across a protocol take-over, and nothing left counted after the sockets close."""

from __future__ import annotations

import socket
from collections.abc import Callable, Generator
from typing import Any

import pytest_twisted
from twisted.internet import defer, reactor, tcp
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater

from orbited.node.transports.gate import GatedTCPServer, SocketGate
from orbited.runtime.twisted_compat import LeanConnection, listening_port, unsent_bytes


class Client(Protocol):
    def __init__(self) -> None:
        self.lost = defer.Deferred[None]()
        self.data = b""

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        self.lost.callback(None)


class Server(Protocol):
    instances: list[Server]

    def connectionMade(self) -> None:  # noqa: N802
        self.instances.append(self)
        self.transport.write(b"hi")


def _wait(predicate: Callable[[], bool], what: str) -> defer.Deferred[None]:
    @defer.inlineCallbacks
    def poll() -> Generator[defer.Deferred[None], None, None]:
        for _ in range(500):
            if predicate():
                return
            yield deferLater(reactor, 0.01, lambda: None)
        raise AssertionError(f"timed out waiting for {what}")

    return poll()


@pytest_twisted.inlineCallbacks
def test_the_gate_caps_counts_and_follows_the_socket():
    accepted: list[Server] = []
    factory = Factory.forProtocol(type("S", (Server,), {"instances": accepted}))
    gate = SocketGate(2)
    service = GatedTCPServer(gate, 0, factory, interface="127.0.0.1")
    service.startService()
    clients: list[Client] = []
    try:
        port = listening_port(service).getHost().port
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        for _ in range(2):
            clients.append((yield connectProtocol(endpoint, Client())))
        yield _wait(lambda: len(accepted) == 2 and gate.open == 2, "two sockets counted")
        # No wrapper between the socket and the protocol: its transport is the TCP
        # connection itself.
        assert isinstance(accepted[0].transport, tcp.Server)
        assert unsent_bytes(accepted[0].transport) is not None
        yield _wait(lambda: all(c.data == b"hi" for c in clients), "both greetings")

        # Past the cap: closed at once, never given to the factory, counted as refused.
        third = yield connectProtocol(endpoint, Client())
        yield third.lost
        assert third.data == b"" and len(accepted) == 2
        assert (gate.open, gate.refused) == (2, 1)

        # A protocol taking the connection over (as twisted.web's channel does from the
        # browser front: the transport's protocol is replaced) leaves the socket counted
        # until it closes.
        transport = accepted[0].transport
        taken_over = Protocol()
        transport.protocol = taken_over
        taken_over.makeConnection(transport)
        assert gate.open == 2
        clients[0].transport.loseConnection()
        yield clients[0].lost
        yield _wait(lambda: gate.open == 1, "the closed socket to count out")

        # Room again: a new connection is admitted.
        clients.append((yield connectProtocol(endpoint, Client())))
        yield _wait(lambda: gate.open == 2 and len(accepted) == 3, "the new socket")
    finally:
        for client in clients:
            if client.transport is not None and client.transport.connected:
                client.transport.loseConnection()
                yield client.lost
        yield service.stopService()
    yield _wait(lambda: gate.open == 0, "every socket to count out")


class Speaking(Client):
    def connectionMade(self) -> None:  # noqa: N802
        self.transport.write(b"GET")


@pytest_twisted.inlineCallbacks
def test_the_gate_caps_and_counts_lean_connections_and_their_hand_over():
    """A factory asking for lean transports (the browser front): the same cap and count,
    the sockets as LeanConnections, and a hand-over to a tcp.Server (the front's
    hand-off to twisted.web) still counted once."""
    accepted: list[Server] = []
    factory = Factory.forProtocol(type("S", (Server,), {"instances": accepted}))
    factory.lean_transport = True  # type: ignore[attr-defined]
    gate = SocketGate(2)
    service = GatedTCPServer(gate, 0, factory, interface="127.0.0.1")
    service.startService()
    clients: list[Client] = []
    try:
        listening = listening_port(service)
        # Accepted once the client's first bytes are in (a browser speaks first).
        assert listening.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) > 0
        port = listening.getHost().port
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        for _ in range(2):
            clients.append((yield connectProtocol(endpoint, Speaking())))
        yield _wait(lambda: len(accepted) == 2 and gate.open == 2, "two sockets counted")
        assert all(type(s.transport) is LeanConnection for s in accepted)
        assert unsent_bytes(accepted[0].transport) == 0
        yield _wait(lambda: all(c.data == b"hi" for c in clients), "both greetings")

        third = yield connectProtocol(endpoint, Speaking())
        yield third.lost
        assert third.data == b"" and len(accepted) == 2
        assert (gate.open, gate.refused) == (2, 1)

        server = accepted[0].transport.to_twisted()
        accepted[0].transport = server
        assert isinstance(server, tcp.Server) and gate.open == 2
        clients[0].transport.loseConnection()
        yield clients[0].lost
        yield _wait(lambda: gate.open == 1, "the handed-over socket to count out")
        clients[1].transport.loseConnection()
        yield clients[1].lost
        yield _wait(lambda: gate.open == 0, "the lean socket to count out")
    finally:
        for client in clients:
            if client.transport is not None and client.transport.connected:
                client.transport.loseConnection()
                yield client.lost
        yield service.stopService()
    assert gate.open == 0
