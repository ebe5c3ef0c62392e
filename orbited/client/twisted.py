"""Twisted web-app client (Deferred-based): the same behaviour as the blocking client.

One persistent SP REQ connection per node address (per route with a HaloDCluster), many
requests in flight on it (replies matched by request id), one request per route of an
event. A connection loss, a time-out or (HaloDCluster) a ``moved`` answer closes the
connection; every request still unanswered on it is resent with the same event id, in the
order it was first sent, on a new connection, as RetryPolicy says (orbited/client/retry.py,
docs/client-python.md). Requests made meanwhile queue behind them: a later event to a key
never overtakes an earlier one being resent. Recipients answered under another hash version
(a rehash, with HaloDCluster's ``"auto"``) are grouped again and sent once their round is
answered. With ``otel=True`` each send is an OpenTelemetry span whose trace context
every request carries (orbited/client/otel.py). A request larger than a node reads
(``max_message``) is given up, never sent: the node would close the connection on it,
and with it every other request in flight there.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IDelayedCall, ITCPTransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from orbited.client.blocking import MAX_REGROUPS, Event, Request
from orbited.client.cluster import Cluster, Recipient, RecipientLike, recipient
from orbited.client.otel import ClientTracing, tracing
from orbited.client.retry import RetryPolicy
from orbited.sp import wire
from orbited.sp.reqrep import MAX_REQUEST, RequestIds

Address = tuple[str, int]


class _ReqProtocol(Protocol):
    """Bytes in and out for one connection; what they mean is its _Channel's business."""

    transport: ITCPTransport  # set by makeConnection before any other call

    def __init__(self, channel: _Channel) -> None:
        self.channel: _Channel | None = channel  # None once the channel gave up on it
        self.sp = wire.SPConnection(wire.REQ, wire.REP, max_message=64 * 1024 * 1024)

    def connectionMade(self) -> None:  # noqa: N802
        setnodelay = getattr(self.transport, "setTcpNoDelay", None)
        if setnodelay is not None:  # TCP (tests drive it over a memory transport)
            setnodelay(True)
        self.transport.write(wire.encode_header(wire.REQ))

    def request(self, request_id: int, body: bytes) -> None:
        self.transport.write(wire.encode_message(RequestIds.encode(request_id) + body))

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        try:
            replies = self.sp.receive(data)
        except wire.SPProtocolError:
            self.transport.abortConnection()
            return
        for reply in replies:
            if self.channel is None:
                return
            if len(reply) < 4:
                self.transport.abortConnection()  # as nng's REQ does
                return
            try:
                answer = json.loads(reply[4:])
            except ValueError:
                self.transport.abortConnection()
                return
            self.channel.reply(self, int.from_bytes(reply[:4], "big"), answer)

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        if self.channel is not None:
            self.channel.failed(self, "connection to the node lost")


@dataclass
class _Pending:
    request: Request
    done: defer.Deferred[None] = field(default_factory=defer.Deferred)
    timer: IDelayedCall | None = None


class _Channel:
    """The requests for one address, in the order they were made, and the connection
    they go over. Every unanswered request has been written on the current connection,
    in order; when it fails they are all written again, in order, on the next."""

    def __init__(self, client: TwistedClient, address: Address) -> None:
        self.client = client
        self.address = address
        self.queue: list[_Pending] = []  # unanswered, oldest first
        self.in_flight: dict[int, _Pending] = {}  # request id on self.proto → request
        self.proto: _ReqProtocol | None = None
        self.connecting = False
        self.retry: IDelayedCall | None = None
        self.failures = 0  # in a row, without a useful reply

    def submit(self, request: Request) -> defer.Deferred[None]:
        pending = _Pending(request)
        if self.client.closed:
            self._give_up(pending, "client closed")
            return pending.done
        if request.oversized(self.client.max_message):  # given up (payload_too_large)
            pending.done.callback(None)
            return pending.done
        self.queue.append(pending)
        if self.proto is not None:
            self._write(pending)
        elif not self.connecting and self.retry is None:
            self._connect()
        return pending.done

    def _connect(self) -> None:
        self.retry = None
        self.connecting = True
        endpoint = TCP4ClientEndpoint(self.client.reactor, *self.address,
                                      timeout=self.client.timeout)  # fmt: skip
        d = endpoint.connect(Factory.forProtocol(lambda: _ReqProtocol(self)))
        d.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, proto: _ReqProtocol) -> None:
        self.connecting = False
        if self.proto is not None:  # (never two connections to one address)
            proto.channel = None
            proto.transport.loseConnection()
            return
        if self.client.closed:
            proto.channel = None
            proto.transport.loseConnection()
            self._resend_or_give_up("client closed")
            return
        self.proto = proto
        for pending in list(self.queue):
            self._write(pending)

    def _connect_failed(self, failure: Failure) -> None:
        self.connecting = False
        self.failures += 1
        error = f"{self.address}: {failure.getErrorMessage()}"
        self._resend_or_give_up(error, "connection_lost")

    def _write(self, pending: _Pending) -> None:
        assert self.proto is not None
        request_id = self.client.ids.next()
        self.in_flight[request_id] = pending
        pending.timer = self.client.reactor.callLater(
            self.client.timeout, self.failed, self.proto, f"no reply in {self.client.timeout}s",
            "timeout",
        )  # fmt: skip
        self.proto.request(request_id, pending.request.body())

    def reply(self, proto: _ReqProtocol, request_id: int, answer: dict[str, Any]) -> None:
        if proto is not self.proto:
            return
        pending = self.in_flight.pop(request_id, None)
        if pending is None:
            return  # a late reply to an earlier attempt: nng drops it too
        self._stop_timer(pending)
        if pending.request.answer(answer, self.client.cluster):
            # `moved`: this connection leads to the route's old node. Dial again now.
            self.failed(proto, None, "moved")
            return
        self.failures = 0
        self.queue.remove(pending)
        pending.done.callback(None)

    def failed(
        self, proto: _ReqProtocol, error: str | None, reason: str = "connection_lost"
    ) -> None:
        """``proto`` lost its connection, timed out or answered ``moved`` (error None):
        drop it and resend every unanswered request, in order, on a new connection.
        ``reason``: ``connection_lost``, ``timeout`` or ``moved`` (for the send's span)."""
        if proto is not self.proto:
            return
        self.proto = None
        proto.channel = None
        if getattr(proto.transport, "connected", False):  # not once the connection is lost
            proto.transport.abortConnection()
        for pending in self.in_flight.values():
            self._stop_timer(pending)
        self.in_flight.clear()
        self.failures += 1
        self._resend_or_give_up(f"{self.address}: {error}" if error else None, reason)

    def _resend_or_give_up(self, error: str | None, reason: str = "connection_lost") -> None:
        policy = self.client.policy
        pause = policy.pause(self.failures, moved=reason == "moved")
        at = self.client.reactor.seconds() + pause
        for pending in list(self.queue):
            request = pending.request
            if self.client.closed:
                self._give_up(pending, "client closed")
            elif policy.allows(request.started, request.resends, at):
                request.resent(reason)
            else:
                self._give_up(pending, error)
        # A given-up send's callback may have sent again (an app's next call in an
        # inlineCallbacks loop): its submit has dialled already, and that connection
        # carries every request queued (before, a second one was dialled and the first
        # left open: one socket leaked per call given up).
        if not self.queue or self.proto is not None or self.connecting or self.retry is not None:
            return
        if pause:
            self.retry = self.client.reactor.callLater(pause, self._connect)
        else:
            self._connect()

    def _give_up(self, pending: _Pending, error: str | None) -> None:
        pending.request.give_up(error, "unreachable")
        if pending in self.queue:
            self.queue.remove(pending)
        pending.done.callback(None)

    @staticmethod
    def _stop_timer(pending: _Pending) -> None:
        if pending.timer is not None and pending.timer.active():
            pending.timer.cancel()
        pending.timer = None

    def close(self) -> None:
        if self.retry is not None and self.retry.active():
            self.retry.cancel()
            self.retry = None
            self._resend_or_give_up("client closed")
        if self.proto is not None:
            self.proto.transport.loseConnection()  # connectionLost gives the rest up


class TwistedClient:
    def __init__(
        self,
        cluster: Cluster,
        reactor: Any = None,
        timeout: float = 5.0,
        retries: int | None = None,
        backoff: float = RetryPolicy.backoff,
        *,
        retry_budget: float = RetryPolicy.budget,
        max_backoff: float = RetryPolicy.max_backoff,
        otel: bool | ClientTracing = False,
        max_message: int = MAX_REQUEST,
    ) -> None:
        """``reactor``: IReactorTCP and IReactorTime; ``timeout``: seconds to wait for a
        reply on one connection; resends follow RetryPolicy(retry_budget, backoff,
        max_backoff, retries) (docs/client-python.md); ``otel``: an OpenTelemetry span
        per send, and ``max_message``, as BlockingClient's."""
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.cluster = cluster
        self.reactor = reactor
        self.timeout = timeout
        self.policy = RetryPolicy(retry_budget, backoff, max_backoff, retries)
        self.tracing = tracing(otel)
        self.max_message = max_message
        self.ids = RequestIds()
        self.closed = False
        self._channels: dict[Address, _Channel] = {}

    def close(self) -> None:
        """Close every connection; requests still unanswered get their ``error``."""
        self.closed = True
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()

    @defer.inlineCallbacks
    def send(  # noqa: ANN201 (inlineCallbacks: the caller gets a Deferred of the dict)
        self,
        to: Iterable[RecipientLike],
        data: object,
        event_id: str | None = None,
        ack: float | None = None,
        *,
        latest: str | None = None,
        offline: bool | float | None = None,
    ):
        """Deferred firing with {recipient: result} (docs/protocol.md; recipients and
        options as BlockingClient.send); never errbacks for an unreachable node: its
        recipients get {"status": "error", "code": "unreachable", ...}."""
        if event_id is None:  # ("" is sent as it is: the node refuses it, bad_request)
            event_id = uuid.uuid4().hex
        to = list(to)
        span = None if self.tracing is None else self.tracing.start(event_id, len(to))
        event = Event(event_id, data, ack, latest, offline, span)
        results: dict[Recipient, dict] = {}
        try:
            targets = [recipient(t) for t in to]  # (a bad one raises: recorded on the span)
            todo = list(dict.fromkeys(targets))
            started = self.reactor.seconds()  # one retry budget for the call, every round
            for _ in range(1 + MAX_REGROUPS):
                planned, refused = event.requests(self.cluster, todo, started)
                if span is not None:
                    span.requests(len(planned))
                results.update(refused)
                yield defer.gatherResults([self._channel(address).submit(request)
                                           for address, request in planned])  # fmt: skip
                todo = []
                for _, request in planned:
                    results.update(request.results)
                    todo += request.regroup
                if not todo:
                    break
        except BaseException as e:
            if span is not None:
                span.fail(e)
            raise
        answer = {t: results[t] for t in targets}
        if span is not None:
            span.finish(answer)
        return answer

    def _channel(self, address: Address) -> _Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = _Channel(self, address)
        return channel
