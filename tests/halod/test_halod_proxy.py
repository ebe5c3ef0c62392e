"""HaloD's built-in proxy without processes: the worker's forwarding (Forwarder) on a
MemoryReactor, the control messages (proxy_protocol), the worker's and HaloD's ends of
the control socket on fake transports and a Clock. Real processes: test_halod_dataplane.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from halod.dataplane import proxy_protocol as pp
from halod.dataplane.base import Owner, Ports
from halod.dataplane.proxy import WATCH_PERIOD, ProxyDataPlane, _Control
from halod.dataplane.proxy_worker import BROWSER, SP, ControlProtocol, Forwarder, Worker

OWNER = Owner("n1", ("127.0.0.2", 8000), ("127.0.0.2", 9000))
OTHER = Owner("n2", ("127.0.0.3", 8000), ("127.0.0.3", 9000))
PORTS = Ports("127.0.0.1", 8100, 9100, 2)


def accept(forwarder: Forwarder, route: int = 1, side: str = BROWSER):  # noqa: ANN201
    factory = forwarder.factories[(route, side)]
    server = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
    server.makeConnection(StringTransport())
    return server


def make_forwarder() -> tuple[Forwarder, MemoryReactorClock]:
    reactor = MemoryReactorClock()
    forwarder = Forwarder(PORTS, reactor)
    forwarder.start({1: OWNER, 2: OWNER})
    return forwarder, reactor


def wire(forwarder: Forwarder, reactor: MemoryReactorClock, route: int = 1):  # noqa: ANN201
    """An accepted connection on ``route`` and its node side, connected."""
    server = accept(forwarder, route)
    _, _, client_factory, *_ = reactor.tcpClients[-1]
    client = client_factory.buildProtocol(IPv4Address("TCP", *OWNER.browser))
    node_side = StringTransport()
    client.makeConnection(node_side)
    return server, node_side


def test_browser_gone_before_the_node_answers_closes_the_node_side() -> None:
    forwarder, reactor = make_forwarder()
    server = accept(forwarder)
    host, port, client_factory, *_ = reactor.tcpClients[-1]
    assert (host, port) == OWNER.browser
    server.connectionLost(None)  # the browser gave up while we were connecting
    client = client_factory.buildProtocol(IPv4Address("TCP", *OWNER.browser))
    node_side = StringTransport()
    client.makeConnection(node_side)
    assert node_side.disconnecting  # not left open for ever
    assert forwarder.stats()["connections"] == 0


def test_normal_forwarding_still_wires_both_sides() -> None:
    forwarder, reactor = make_forwarder()
    server, node_side = wire(forwarder, reactor)
    assert not node_side.disconnecting
    server.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
    assert node_side.value() == b"GET / HTTP/1.1\r\n\r\n"
    assert forwarder.stats()["connections"] == 1
    server.connectionLost(None)
    assert node_side.disconnecting and forwarder.stats()["connections"] == 0


def test_a_move_cuts_only_the_moved_route_after_the_delay_and_redirects_new_ones() -> None:
    forwarder, reactor = make_forwarder()
    moved, _ = wire(forwarder, reactor, route=1)
    stays, _ = wire(forwarder, reactor, route=2)
    assert forwarder.apply({1: OTHER, 2: OWNER}, close_delay=1.5) == [1]
    reactor.advance(1.4)
    assert not moved.transport.disconnecting  # the old node's reconnect frames go first
    reactor.advance(0.2)
    assert moved.transport.disconnecting and not stays.transport.disconnecting
    assert forwarder.cut == 1
    accept(forwarder, route=1, side=SP)
    assert reactor.tcpClients[-1][:2] == OTHER.sp


def test_an_unowned_route_accepts_and_closes() -> None:
    forwarder, reactor = make_forwarder()
    forwarder.apply({1: None, 2: OWNER}, close_delay=0)
    server = accept(forwarder, route=1)
    assert server.transport.disconnecting and forwarder.refused == 1


# -- the control messages -----------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        pp.Hello(123, pp.Layout.of(PORTS), True, 7),
        pp.Applied(3),
        pp.Stats(False, {2: (5, 1)}, refused=4, cut=9),
        pp.Error("cannot open the route ports: address in use"),
        pp.Table(4, {1: OWNER, 2: None}, 1.5),
        pp.Stop(),
    ],
)
def test_messages_round_trip(message: pp.Message) -> None:
    assert pp.decode(pp.encode(message), routes=2) == message


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"\xff", "not JSON"),
        (b"[1]", "JSON object"),
        (b'{"v": 2, "type": "stop"}', "unsupported version"),
        (b'{"v": 1, "type": "dance"}', "unknown message type"),
        (b'{"v": 1, "type": "applied", "seq": "1"}', "seq"),
        (b'{"v": 1, "type": "table", "seq": 1, "close_delay": 1, "owners": {"3": null}}',
         "bad route"),
        (b'{"v": 1, "type": "table", "seq": 1, "close_delay": -1, "owners": {}}', "close_delay"),
        (b'{"v": 1, "type": "table", "seq": 1, "close_delay": 1, "owners": '
         b'{"1": {"name": "n", "browser": ["h", 0], "sp": ["h", 1]}}}', "browser"),
        (b'{"v": 1, "type": "stats", "full": true, "refused": 0, "cut": 0, '
         b'"counts": {"1": [1, -1]}}', "counts"),
        (b'{"v": 1, "type": "hello", "pid": 1, "seq": 0, "listening": 1, "layout": '
         b'{"host": "h", "browser_base": 1, "sp_base": 2, "routes": 1}}', "listening"),
    ],
)  # fmt: skip
def test_bad_messages_are_refused_with_a_reason(body: bytes, error: str) -> None:
    with pytest.raises(pp.ProtocolError, match=error):
        pp.decode(body, routes=2)


def test_a_hello_of_another_version_still_decodes() -> None:
    """HaloD must be able to read an old worker's hello to replace it."""
    body = json.loads(pp.encode(pp.Hello(5, pp.Layout.of(PORTS), True, 1)))
    body["v"] = 9
    assert pp.decode(json.dumps(body).encode()).version == 9


# -- the worker's end of the control socket ------------------------------------------------


def received(transport: StringTransport) -> list[pp.Message]:
    data, out = transport.value(), []
    transport.clear()
    while data:
        length = int.from_bytes(data[:4], "big")
        out.append(pp.decode(data[4 : 4 + length]))
        data = data[4 + length :]
    return out


def frame(message: pp.Message) -> bytes:
    body = pp.encode(message)
    return len(body).to_bytes(4, "big") + body


def attach_worker(worker: Worker) -> tuple[ControlProtocol, StringTransport]:
    conn = ControlProtocol(worker)
    transport = StringTransport()
    conn.makeConnection(transport)
    return conn, transport


def test_worker_opens_the_ports_on_the_first_table_and_reports_counts() -> None:
    reactor = MemoryReactorClock()
    worker = Worker(PORTS, Path("/nonexistent/worker.sock"), reactor)
    conn, transport = attach_worker(worker)
    (hello,) = received(transport)
    assert hello == pp.Hello(os.getpid(), pp.Layout.of(PORTS), False, 0)
    assert reactor.tcpServers == []  # nothing listens before HaloD sent a table
    conn.dataReceived(frame(pp.Table(1, {1: OWNER, 2: OWNER}, 0.5)))
    assert sorted(port for port, *_ in reactor.tcpServers) == [8100, 8101, 9100, 9101]
    assert received(transport) == [pp.Applied(1), pp.Stats(True, {1: (0, 0), 2: (0, 0)}, 0, 0)]
    accept(worker.forwarder, route=2)
    reactor.advance(0.25)
    assert received(transport) == [pp.Stats(False, {2: (1, 0)}, 0, 0)]  # only what changed
    reactor.advance(0.25)
    assert received(transport) == []
    reactor.advance(1.0)  # at least one message a second: HaloD's liveness check
    assert received(transport) == [pp.Stats(False, {}, 0, 0)]


def test_worker_keeps_its_table_when_halod_goes_and_applies_the_next_halods() -> None:
    reactor = MemoryReactorClock()
    worker = Worker(PORTS, Path("/nonexistent/worker.sock"), reactor)
    conn, transport = attach_worker(worker)
    conn.dataReceived(frame(pp.Table(1, {1: OWNER, 2: OWNER}, 0.5)))
    kept, _ = wire(worker.forwarder, reactor, route=1)
    moved, _ = wire(worker.forwarder, reactor, route=2)
    conn.connectionLost(None)  # HaloD died
    assert worker.control is None and worker.forwarder.owners[1] == OWNER
    conn2, transport2 = attach_worker(worker)
    assert received(transport2)[0] == pp.Hello(os.getpid(), pp.Layout.of(PORTS),
                                               True, 1)  # fmt: skip
    conn2.dataReceived(frame(pp.Table(2, {1: OWNER, 2: OTHER}, 0.5)))
    reactor.advance(0.5)
    assert moved.transport.disconnecting and not kept.transport.disconnecting


def test_worker_closes_a_connection_that_sends_garbage() -> None:
    reactor = MemoryReactorClock()
    worker = Worker(PORTS, Path("/nonexistent/worker.sock"), reactor)
    conn, transport = attach_worker(worker)
    conn.dataReceived(frame(pp.Applied(1)))  # a worker → HaloD message, from HaloD
    assert transport.disconnecting
    conn2, transport2 = attach_worker(worker)
    conn2.dataReceived(b"\x00\x00\x00\x03abc")
    assert transport2.disconnecting and reactor.tcpServers == []


# -- HaloD's end ---------------------------------------------------------------------------


def attach_halod(
    tmp_path: Path,
) -> tuple[ProxyDataPlane, _Control, StringTransport, MemoryReactorClock]:
    reactor = MemoryReactorClock()
    plane = ProxyDataPlane(PORTS, reactor, 1.0, directory=tmp_path)
    plane.owners = {1: OWNER, 2: OWNER}
    plane._dirty = True
    plane._watch.start(WATCH_PERIOD, now=False)
    conn = _Control(plane)
    transport = StringTransport()
    conn.makeConnection(transport)
    conn.dataReceived(frame(pp.Hello(4242, pp.Layout.of(PORTS), True, 5)))
    return plane, conn, transport, reactor


def test_halod_sends_one_table_at_a_time_and_coalesces_changes(tmp_path: Path) -> None:
    plane, conn, transport, _ = attach_halod(tmp_path)
    assert plane.stats()["worker"]["attached"] and plane.pid == 4242
    assert received(transport) == [pp.Table(6, {1: OWNER, 2: OWNER}, 1.0)]  # after its seq
    plane.apply({1: OTHER, 2: OWNER})
    plane.apply({1: OTHER, 2: OTHER})
    assert received(transport) == []  # table 6 is not applied yet: no second in flight
    assert not plane.stats()["worker"]["synced"]
    conn.dataReceived(frame(pp.Applied(6)))
    assert received(transport) == [pp.Table(7, {1: OTHER, 2: OTHER}, 1.0)]  # the latest only
    conn.dataReceived(frame(pp.Applied(7)) + frame(pp.Stats(True, {1: (3, 1)}, 2, 1)))
    stats = plane.stats()
    assert stats["worker"]["synced"] and stats["connections"] == 4
    assert stats["routes"]["2"] == {"browser": 0, "sp": 0}
    assert (stats["refused"], stats["cut"]) == (2, 1)


def test_halod_replaces_a_silent_worker_but_not_for_its_own_stall(tmp_path: Path) -> None:
    plane, conn, transport, reactor = attach_halod(tmp_path)
    reactor.advance(30)  # HaloD itself was stopped 30 s: the worker's messages wait unread
    assert not transport.disconnecting and plane.restarts == 0
    for _ in range(int(9 / WATCH_PERIOD)):
        reactor.advance(WATCH_PERIOD)
    assert not transport.disconnecting
    for _ in range(int(2 / WATCH_PERIOD)):
        reactor.advance(WATCH_PERIOD)
    assert transport.disconnecting and plane.restarts == 1  # silent 10 s: replaced
    assert plane.state == "starting"


def test_halod_replaces_a_worker_with_another_layout(tmp_path: Path) -> None:
    reactor = MemoryReactorClock()
    plane = ProxyDataPlane(PORTS, reactor, 1.0, directory=tmp_path)
    conn = _Control(plane)
    transport = StringTransport()
    conn.makeConnection(transport)
    other = pp.Layout("127.0.0.1", 8100, 9100, 3)
    conn.dataReceived(frame(pp.Hello(4242, other, True, 5)))
    assert received(transport) == [pp.Stop()] and transport.disconnecting
    assert plane._replacing == 4242 and plane.state != "running"


def test_proxy_on_exit_is_a_checked_key_that_keeps_the_worker_by_default(tmp_path: Path) -> None:
    from halod.config import HaloDConfig
    from orbited.core.settings import ConfigError

    db = str(tmp_path / "h.db")
    config = HaloDConfig.load(None, {"db": db})
    assert config.proxy_on_exit == "keep"  # a HaloD restart cuts nothing (docs/halod.md)
    keep = ProxyDataPlane.from_config(config, MemoryReactorClock())
    assert not keep.stop_on_exit
    keep.stop()  # (it holds proxy/'s lock until it stops)
    stop = HaloDConfig.load(None, {"db": db, "proxy_on_exit": "stop"})
    assert ProxyDataPlane.from_config(stop, MemoryReactorClock()).stop_on_exit
    with pytest.raises(ConfigError, match="proxy_on_exit is keep or stop"):
        HaloDConfig.load(None, {"db": db, "proxy_on_exit": "later"})


def test_metrics_export_the_workers_replaced(tmp_path: Path) -> None:
    from twisted.internet import task

    from halod.config import HaloDConfig
    from halod.server import HaloD

    halod = HaloD(HaloDConfig(db=str(tmp_path / "h.db"), dataplane="none"), task.Clock())
    assert "halod_dataplane_worker_restarts_total" not in halod.metrics()  # no worker
    plane = ProxyDataPlane(PORTS, MemoryReactorClock(), directory=tmp_path / "proxy")
    halod.dataplane = plane
    plane.restarts = 3  # what stats()["worker"]["restarts"] reports
    lines = halod.metrics().splitlines()
    assert "# TYPE halod_dataplane_worker_restarts_total counter" in lines
    assert any(line.startswith("# HELP halod_dataplane_worker_restarts_total ") for line in lines)
    assert "halod_dataplane_worker_restarts_total 3" in lines
    # nftables counts (port, old owner) pairs, not connections (docs/operations.md)
    assert (
        "# HELP halod_dataplane_cut_total Cut because their route moved: connections "
        "(proxy, HAProxy) or (route port, old owner) pairs (nftables)."
    ) in lines


def test_two_halods_whose_db_share_a_directory_do_not_share_a_worker(tmp_path: Path) -> None:
    """The worker's files are in proxy/ beside db: a second HaloD there would take the
    first's worker for a stale one and replace it, cutting every route connection. It is
    refused before it binds anything, until the first stops (or dies: the kernel drops
    the lock with the process)."""
    from halod.config import HaloDConfig

    first = ProxyDataPlane.from_config(HaloDConfig(db=str(tmp_path / "a.sqlite3")),
                                       MemoryReactorClock())  # fmt: skip
    other = HaloDConfig(db=str(tmp_path / "b.sqlite3"))
    with pytest.raises(ValueError, match="another HaloD uses .*give each HaloD a directory"):
        ProxyDataPlane.from_config(other, MemoryReactorClock())
    (tmp_path / "elsewhere").mkdir()
    ProxyDataPlane.from_config(HaloDConfig(db=str(tmp_path / "elsewhere" / "c.sqlite3")),
                               MemoryReactorClock()).stop()  # fmt: skip
    first.stop()
    ProxyDataPlane.from_config(other, MemoryReactorClock()).stop()
