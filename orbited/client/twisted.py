"""Twisted web-app client (Deferred-based): the same behaviour as the blocking client.

One persistent SP REQ connection per node address, many requests in flight on it
(replies matched by request id), one request per route of an event; a request that times
out or loses its connection is resent on a new connection with the same event id,
``retries`` times with backoff (docs/client-python.md).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable

from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IReactorTCP
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from orbited.client.blocking import event_body, moved_keys, results_for
from orbited.client.cluster import Cluster
from orbited.keys import ConnectionKey
from orbited.sp import wire
from orbited.sp.reqrep import RequestIds


class _ReqProtocol(Protocol):
    def __init__(self) -> None:
        self.sp = wire.SPConnection(wire.REQ, wire.REP, max_message=64 * 1024 * 1024)
        self.waiting: dict[int, defer.Deferred[bytes]] = {}
        self.lost = False

    def connectionMade(self) -> None:  # noqa: N802
        self.transport.setTcpNoDelay(True)
        self.transport.write(wire.encode_header(wire.REQ))

    def request(self, request_id: int, body: bytes) -> defer.Deferred[bytes]:
        d: defer.Deferred[bytes] = defer.Deferred(lambda _: self.waiting.pop(request_id, None))
        self.waiting[request_id] = d
        self.transport.write(wire.encode_message(RequestIds.encode(request_id) + body))
        return d

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        try:
            replies = self.sp.receive(data)
        except wire.SPProtocolError:
            self.transport.abortConnection()
            return
        for reply in replies:
            if len(reply) < 4:
                self.transport.abortConnection()  # as nng's REQ does
                return
            d = self.waiting.pop(int.from_bytes(reply[:4], "big"), None)
            if d is not None:  # unknown ids (late replies) are dropped, like nng
                d.callback(reply[4:])

    def connectionLost(self, reason: Failure = None) -> None:  # noqa: N802
        self.lost = True
        waiting, self.waiting = self.waiting, {}
        for d in waiting.values():
            d.errback(ConnectionError("connection to the node lost"))


class TwistedClient:
    def __init__(
        self,
        cluster: Cluster,
        reactor: IReactorTCP | None = None,
        timeout: float = 5.0,
        retries: int = 3,
        backoff: float = 0.2,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.cluster = cluster
        self.reactor = reactor
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self._ids = RequestIds()
        self._connections: dict[tuple[str, int], _ReqProtocol] = {}
        self._connecting: dict[tuple[str, int], list[defer.Deferred[_ReqProtocol]]] = {}
        self._closed = False

    def close(self) -> None:
        self._closed = True  # requests in flight give up instead of reconnecting
        for proto in self._connections.values():
            proto.transport.loseConnection()
        self._connections.clear()

    def _protocol(self, address: tuple[str, int]) -> defer.Deferred[_ReqProtocol]:
        """The connection to ``address``; concurrent callers share one connect."""
        proto = self._connections.get(address)
        if proto is not None and not proto.lost:
            return defer.succeed(proto)
        waiter: defer.Deferred[_ReqProtocol] = defer.Deferred()
        if address in self._connecting:
            self._connecting[address].append(waiter)
            return waiter
        self._connecting[address] = [waiter]

        def done(result: _ReqProtocol | Failure) -> None:
            if isinstance(result, _ReqProtocol):
                self._connections[address] = result
            for w in self._connecting.pop(address):
                if isinstance(result, Failure):
                    w.errback(result)
                else:
                    w.callback(result)

        endpoint = TCP4ClientEndpoint(self.reactor, *address, timeout=self.timeout)
        endpoint.connect(Factory.forProtocol(_ReqProtocol)).addBoth(done)
        return waiter

    @defer.inlineCallbacks
    def _request(self, address: tuple[str, int], body: bytes):  # noqa: ANN202
        last_error: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                yield task.deferLater(self.reactor, self.backoff * 2 ** (attempt - 1))
            if self._closed:
                last_error = ConnectionError("client closed")
                break
            proto = None
            try:
                proto = yield self._protocol(address)
                d = proto.request(self._ids.next(), body)
                d.addTimeout(self.timeout, self.reactor)
                reply = yield d
                return json.loads(reply)
            except Exception as e:  # connect failure, lost connection, time-out
                last_error = e
                if proto is not None and not proto.lost:
                    proto.transport.abortConnection()  # a hung node: start afresh
        return {
            "ok": False,
            "error": {"code": "unreachable", "message": f"{address}: {last_error!r}"},
        }

    @defer.inlineCallbacks
    def send(  # noqa: ANN201 (inlineCallbacks: the caller gets a Deferred of the dict)
        self,
        to: Iterable[ConnectionKey | tuple[str, str, str] | list[str]],
        data: object,
        event_id: str | None = None,
        ack: float | None = None,
    ):
        """Deferred firing with {key: result} (docs/protocol.md); never errbacks for an
        unreachable node: its keys get {"status": "error", ...}."""
        event_id = event_id or uuid.uuid4().hex
        keys = [ConnectionKey(*k) for k in to]
        results = yield self._send_once(keys, data, event_id, ack)
        for attempt in range(self.retries):
            moved = moved_keys(self.cluster, results)
            if not moved or self._closed:
                break
            yield task.deferLater(self.reactor, self.backoff * 2**attempt)
            results.update((yield self._send_once(moved, data, event_id, ack)))
        return {k: results[k] for k in keys}

    @defer.inlineCallbacks
    def _send_once(self, keys: list[ConnectionKey], data: object, event_id: str,
                   ack: float | None = None):  # noqa: ANN202  # fmt: skip
        routes = list(self.cluster.group_by_route(keys).items())
        replies = yield defer.gatherResults([
            self._request(self.cluster.sp_address(route),
                          event_body(event_id, route_keys, data, ack))
            for route, route_keys in routes
        ])  # fmt: skip
        results: dict[ConnectionKey, dict] = {}
        for (_, route_keys), reply in zip(routes, replies, strict=True):
            results.update(results_for(reply, route_keys))
        return results
