"""HaloD's built-in proxy (halod/dataplane/proxy.py) on a MemoryReactor: connection
bookkeeping that the soak test (bench/soak.py) would see as a slow fd leak."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from halod.dataplane import Owner, Ports
from halod.dataplane.proxy import BROWSER, ProxyDataPlane

OWNER = Owner("n1", ("127.0.0.2", 8000), ("127.0.0.2", 9000))


def accept(proxy: ProxyDataPlane, route: int = 1):  # noqa: ANN201
    factory = proxy.factories[(route, BROWSER)]
    server = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
    server.makeConnection(StringTransport())
    return server


def make_proxy() -> tuple[ProxyDataPlane, MemoryReactorClock]:
    reactor = MemoryReactorClock()
    proxy = ProxyDataPlane(Ports("127.0.0.1", 8100, 9100, 2), reactor)
    proxy.start({1: OWNER, 2: OWNER})
    return proxy, reactor


def test_browser_gone_before_the_node_answers_closes_the_node_side() -> None:
    proxy, reactor = make_proxy()
    server = accept(proxy)
    host, port, client_factory, *_ = reactor.tcpClients[-1]
    assert (host, port) == OWNER.browser
    server.connectionLost(None)  # the browser gave up while we were connecting
    client = client_factory.buildProtocol(IPv4Address("TCP", *OWNER.browser))
    node_side = StringTransport()
    client.makeConnection(node_side)
    assert node_side.disconnecting  # not left open for ever
    assert proxy.stats()["connections"] == 0


def test_normal_forwarding_still_wires_both_sides() -> None:
    proxy, reactor = make_proxy()
    server = accept(proxy)
    _, _, client_factory, *_ = reactor.tcpClients[-1]
    client = client_factory.buildProtocol(IPv4Address("TCP", *OWNER.browser))
    node_side = StringTransport()
    client.makeConnection(node_side)
    assert not node_side.disconnecting
    server.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
    assert node_side.value() == b"GET / HTTP/1.1\r\n\r\n"
    assert proxy.stats()["connections"] == 1
    server.connectionLost(None)
    assert node_side.disconnecting and proxy.stats()["connections"] == 0
