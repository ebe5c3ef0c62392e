"""The web-app clients' resend policy (orbited/client/retry.py) with plain values, and the
Twisted client's per-address queue driven by a memory reactor and a clock: what is
written on which connection, in which order, and when it is dialled again."""

from __future__ import annotations

import json

import pytest
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from orbited.client import HaloDCluster
from orbited.client.retry import RetryPolicy
from orbited.client.twisted import TwistedClient
from orbited.core.keys import ConnectionKey
from orbited.sp import wire
from orbited.sp.reqrep import RequestIds
from tests.conftest import keys_on_routes


def test_moved_answers_in_a_row_pause_briefly_and_never_longer():
    policy = RetryPolicy(budget=5.0, backoff=0.05, max_backoff=0.3)
    assert [policy.pause(n, moved=True) for n in range(1, 6)] == [0.0] + [0.01] * 4


def test_the_first_resend_goes_at_once_then_backoff_doubles_to_its_cap():
    policy = RetryPolicy(budget=5.0, backoff=0.05, max_backoff=0.3)
    assert [policy.pause(n) for n in range(1, 7)] == [0.0, 0.05, 0.1, 0.2, 0.3, 0.3]


def test_resends_stop_at_the_budget_or_the_retries_cap():
    policy = RetryPolicy(budget=5.0)
    assert policy.allows(started=100.0, resends=50, at=105.0)
    assert not policy.allows(started=100.0, resends=0, at=105.01)
    capped = RetryPolicy(budget=5.0, retries=2)
    assert capped.allows(100.0, 1, 100.1) and not capped.allows(100.0, 2, 100.1)
    assert not RetryPolicy(budget=0.0).allows(100.0, 0, 100.01)


def test_negative_settings_are_refused():
    for bad in ({"budget": -1}, {"backoff": -0.1}, {"retries": -1}, {"moved_pause": -0.01}):
        with pytest.raises(ValueError):
            RetryPolicy(**bad)


# -- the Twisted client's queue, over memory connections ------------------------------------


class Node:
    """The far end of the connections the client dials: what it was sent, and replies."""

    def __init__(self, reactor: MemoryReactorClock) -> None:
        self.reactor = reactor
        self.connections: list[tuple[object, StringTransport, wire.SPConnection]] = []

    def dials(self) -> int:
        return len(self.reactor.tcpClients)

    def accept(self) -> None:
        """Complete the latest dial."""
        factory = self.reactor.tcpClients[-1][2]
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(wire.encode_header(wire.REP))
        self.connections.append((proto, transport, wire.SPConnection(wire.REP, wire.REQ)))

    def refuse(self) -> None:
        factory = self.reactor.tcpClients[-1][2]
        factory.clientConnectionFailed(self.reactor.connectors[-1],
                                       Failure(ConnectionRefusedError()))  # fmt: skip

    def requests(self, index: int = -1) -> list[tuple[int, dict]]:
        """(request id, request) written so far on a connection, in order."""
        _, transport, sp = self.connections[index]
        messages = sp.receive(transport.value())
        transport.clear()
        return [(int.from_bytes(m[:4], "big"), json.loads(m[4:])) for m in messages]

    def reply(self, request_id: int, results: list[dict], index: int = -1) -> None:
        proto = self.connections[index][0]
        body = json.dumps({"ok": True, "results": results}).encode()
        proto.dataReceived(wire.encode_message(RequestIds.encode(request_id) + body))

    def lose(self, index: int = -1) -> None:
        self.connections[index][0].connectionLost(Failure(ConnectionDone()))


@pytest.fixture
def setup():
    reactor = MemoryReactorClock()
    client = TwistedClient(HaloDCluster("127.0.0.1", 9000, 8000), reactor, timeout=5.0,
                           backoff=0.05, retry_budget=1.0)  # fmt: skip
    return reactor, client, Node(reactor), keys_on_routes([3])[0]


def results(d) -> dict[ConnectionKey, dict]:
    out = []
    d.addCallback(out.append)
    assert out, "the send has not finished"
    return out[0]


def test_a_lost_connection_resends_in_order_with_later_sends_behind(setup):
    reactor, client, node, key = setup
    first, second = client.send([key], 1, "e1"), client.send([key], 2, "e2")
    assert node.dials() == 1 and reactor.tcpClients[0][:2] == ("127.0.0.1", 9002)
    node.accept()
    assert [r["id"] for _, r in node.requests()] == ["e1", "e2"]  # pipelined
    node.lose()
    assert node.dials() == 2  # at once: the first resend does not wait
    third = client.send([key], 3, "e3")  # made while the new connection is being set up
    node.accept()
    sent = node.requests()
    assert [r["id"] for _, r in sent] == ["e1", "e2", "e3"]  # e3 never overtakes
    for request_id, _ in sent:
        node.reply(request_id, [{"status": "delivered", "seq": 1}])
    assert [results(d)[key]["status"] for d in (first, second, third)] == ["delivered"] * 3


def test_moved_redials_at_once_then_every_moved_pause_never_longer(setup):
    reactor, client, node, key = setup
    sending = client.send([key], 1, "e1")
    node.accept()
    ((request_id, _),) = node.requests()
    node.reply(request_id, [{"status": "moved"}])
    assert node.connections[0][1].disconnecting or not node.connections[0][1].connected
    assert node.dials() == 2  # no backoff after `moved`
    node.accept()
    ((request_id, request),) = node.requests()
    assert request["id"] == "e1"
    node.reply(request_id, [{"status": "moved"}])  # the route port still leads to the old node
    assert node.dials() == 2  # a second failure in a row waits, `moved_pause` (0.01 s)
    reactor.advance(0.01)
    assert node.dials() == 3
    node.accept()
    ((request_id, _),) = node.requests()
    node.reply(request_id, [{"status": "moved"}])  # the data plane lags: never longer
    reactor.advance(0.01)
    assert node.dials() == 4
    node.accept()
    ((request_id, _),) = node.requests()
    node.reply(request_id, [{"status": "delivered", "seq": 4}])
    assert results(sending)[key] == {"status": "delivered", "seq": 4}


def test_the_budget_ends_in_an_error_and_the_client_keeps_working(setup):
    reactor, client, node, key = setup  # retry_budget 1 s, backoff 0.05 s (max 0.5 s)
    sending = client.send([key], 1, "e1")
    dialled_at = []
    while not sending.called:
        if node.dials() > len(dialled_at):
            dialled_at.append(round(reactor.seconds(), 2))
            node.refuse()
        else:  # to the next timer: the pause before dialling again
            reactor.advance(min(c.getTime() for c in reactor.getDelayedCalls()) - reactor.seconds())
        assert reactor.seconds() < 5, "never gave up"
    # At once, then after 0.05, 0.1, 0.2, 0.4 s; the next (0.5 s later) would pass 1 s.
    assert dialled_at == [0.0, 0.0, 0.05, 0.15, 0.35, 0.75]
    result = results(sending)[key]
    assert result["status"] == "error" and result["code"] == "unreachable", result
    later = client.send([key], 2, "e2")  # a fresh request has its own budget
    node.accept()
    ((request_id, _),) = node.requests()
    node.reply(request_id, [{"status": "no_connection"}])
    assert results(later)[key] == {"status": "no_connection"}


def test_a_send_behind_another_ones_moved_still_gets_a_result(setup):
    """Two sends on one connection; the budget has run out when the first is answered
    `moved`: the connection is dropped and both requests are given up. The first keeps its
    `moved`; the second, never answered, must get an error result, not errback with a
    bare KeyError (docs/client-python.md: the Deferred never errbacks for that)."""
    reactor, client, node, key = setup  # retry_budget 1 s
    first, second = client.send([key], 1, "e1"), client.send([key], 2, "e2")
    node.accept()
    (first_id, _), _ = node.requests()
    reactor.advance(1.5)  # past the budget, before the timeout (5 s)
    node.reply(first_id, [{"status": "moved", "route": 3}])
    assert results(first)[key] == {"status": "moved", "route": 3}
    result = results(second)[key]
    assert result["status"] == "error" and result["code"] == "unreachable", result
