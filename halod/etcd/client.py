"""A non-blocking etcd v3 client: the JSON gateway (halod.etcd.wire) over twisted.web.client.

One request at a time per call, on a persistent connection pool; on a connection failure or
a member that cannot serve (etcd's UNAVAILABLE: no raft leader, leader changed) the next
endpoint is tried, round after round, until the client's ``timeout`` has passed. A request
that may have reached etcd (the connection broke after sending, or etcd answered
UNAVAILABLE) is retried only when it is idempotent (range, keepalive, revoke; a repeated
grant leaves at most an unused lease that expires); a txn then fails with
:class:`Ambiguous`, and the caller, who knows what it wrote, reads back. Watches are
streams of their own (no pool), one JSON message a line.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, cast

from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.error import ConnectError, ConnectingCancelledError, DNSLookupError
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    FileBodyProducer,
    HTTPConnectionPool,
    RequestTransmissionFailed,
    readBody,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse

from halod.etcd import wire

HEADERS = {b"content-type": [b"application/json"]}


class Unavailable(Exception):
    """No endpoint answered (every one refused, timed out or broke the connection)."""


class Ambiguous(Unavailable):
    """A txn was sent but no reply came (the connection broke or timed out): etcd may or
    may not have applied it. Read back to know."""


def _producer(body: wire.JSON) -> IBodyProducer:
    from io import BytesIO

    return cast(IBodyProducer, cast(Any, FileBodyProducer)(BytesIO(json.dumps(body).encode())))


def _failure(e: BaseException) -> Failure:
    return cast(Failure, cast(Any, Failure)(e))


class EtcdClient:
    log = Logger()

    def __init__(self, reactor: Any, endpoints: Sequence[str], timeout: float = 5.0) -> None:
        if not endpoints:
            raise ValueError("etcd: at least one endpoint")
        self.reactor = reactor
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.timeout = timeout
        self._current = 0
        self._pool = cast(Any, HTTPConnectionPool)(reactor, persistent=True)
        self._pool.maxPersistentPerHost = 4
        self._agent = cast(Any, Agent)(reactor, pool=self._pool, connectTimeout=timeout)
        self._stream_agent = cast(Any, Agent)(reactor, connectTimeout=timeout)
        self._watches: list[Watch] = []

    # -- unary calls -----------------------------------------------------------------------

    @inlineCallbacks
    def _call(self, path: str, body: wire.JSON, idempotent: bool = True) -> Any:
        """POST ``body``; the reply's JSON. Tries the endpoints in turn until ``timeout``
        has passed since the call began (a short pause after each full round)."""
        errors: dict[str, str] = {}  # endpoint: its most telling error
        deadline = self.reactor.seconds() + self.timeout

        def failed(where: str, e: BaseException) -> None:
            if where not in errors or not isinstance(e, CancelledError | ConnectingCancelledError):
                errors[where] = repr(e)

        def summary() -> str:
            why = "; ".join(f"{w}: {e}" for w, e in errors.items()) or "timed out"
            return f"no etcd endpoint answered {path} within {self.timeout} s ({why})"

        attempt, pause = 0, 0.02
        while True:
            left = deadline - self.reactor.seconds()
            if left <= 0:
                raise Unavailable(summary())
            if attempt and attempt % len(self.endpoints) == 0:
                yield deferLater(self.reactor, min(pause, left), lambda: None)
                pause = min(pause * 2, 0.2)
            index = (self._current + attempt) % len(self.endpoints)
            attempt += 1
            where = self.endpoints[index]
            d = self._agent.request(b"POST", (where + path).encode(), Headers(HEADERS),
                                    _producer(body))  # fmt: skip
            d.addTimeout(max(left, 0.01), self.reactor)
            try:
                response = yield d
                data = yield readBody(response)
            except (ConnectError, DNSLookupError, RequestTransmissionFailed) as e:
                failed(where, e)  # not sent: safe to send elsewhere
                continue
            except Exception as e:  # sent, then broken or timed out
                failed(where, e)
                if not idempotent:
                    raise Ambiguous(summary()) from None
                continue
            try:
                reply = json.loads(data)
            except ValueError:
                raise wire.ProtocolError(f"{path}: not JSON: {data[:80]!r}") from None
            if isinstance(reply, dict) and reply.get("code") == wire.UNAVAILABLE:
                # "leader changed", "no leader", "timed out": this member cannot serve now
                errors[where] = str(reply.get("message"))
                if not idempotent:
                    raise Ambiguous(summary())
                continue
            self._current = index
            return reply

    def range(self, key: bytes, range_end: bytes | None = None,
              revision: int = 0) -> Deferred[wire.RangeResult]:  # fmt: skip
        d = self._call("/v3/kv/range", wire.range_request(key, range_end, revision))
        return d.addCallback(wire.decode_range)

    def txn(self, compare: Sequence[wire.Compare], success: Sequence[wire.Op],
            failure: Sequence[wire.Op] = ()) -> Deferred[wire.TxnResult]:  # fmt: skip
        d = self._call("/v3/kv/txn", wire.txn_request(compare, success, failure), False)
        return d.addCallback(wire.decode_txn)

    def grant(self, ttl: int) -> Deferred[wire.Lease]:
        return self._call("/v3/lease/grant", wire.lease_grant_request(ttl)).addCallback(
            wire.decode_lease
        )

    def keepalive(self, lease: int) -> Deferred[wire.Lease]:
        """Renew once; the reply's ``ttl`` is 0 when the lease no longer exists."""
        return self._call("/v3/lease/keepalive", wire.lease_id_request(lease)).addCallback(
            wire.decode_lease
        )

    def revoke(self, lease: int) -> Deferred[None]:
        def done(body: object) -> None:
            try:
                wire.check(body)
            except wire.EtcdError as e:
                if e.code != wire.NOT_FOUND:  # already gone: what we wanted
                    raise

        return self._call("/v3/lease/revoke", wire.lease_id_request(lease)).addCallback(done)

    # -- watch -----------------------------------------------------------------------------

    def watch(self, key: bytes, range_end: bytes | None, start_revision: int,
              on_message: Callable[[wire.WatchMessage], None]) -> Watch:  # fmt: skip
        """Stream changes from ``start_revision`` on; see :class:`Watch`."""
        w = Watch(self, wire.watch_request(key, range_end, start_revision), on_message)
        self._watches.append(w)

        def forget(result: object) -> object:
            self._watches.remove(w)
            return result

        w.done.addBoth(forget)
        return w

    def close(self) -> Deferred[None]:
        for w in list(self._watches):
            w.cancel()
        closed: Deferred[None] = cast(Any, self._pool).closeCachedConnections()
        return closed


class _Lines(Protocol):
    def __init__(self, watch: Watch) -> None:
        self.watch = watch
        self.buffer = wire.LineBuffer()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        try:
            for body in self.buffer.feed(data):
                self.watch._message(body)
        except Exception as e:
            self.watch._fail(_failure(e))

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        self.watch._fail(reason)


class Watch:
    """A running watch. ``created`` fires once etcd has accepted it (after which every change
    from the start revision on reaches ``on_message`` in order); ``done`` fires with a Failure
    when the stream ends for any reason — a cancelled watch (``compact_revision`` > 0: the
    start revision was compacted), a lost member, ``cancel()`` — and the owner decides whether
    to resync and watch again."""

    def __init__(self, client: EtcdClient, body: wire.JSON,
                 on_message: Callable[[wire.WatchMessage], None]) -> None:  # fmt: skip
        self.on_message = on_message
        self.created: Deferred[wire.WatchMessage] = Deferred()
        self.done: Deferred[None] = Deferred()
        self._protocol: _Lines | None = None
        self._cancelled = False
        self._start(client, body)

    @inlineCallbacks
    def _start(self, client: EtcdClient, body: wire.JSON) -> Any:
        errors = []
        for attempt in range(len(client.endpoints)):
            index = (client._current + attempt) % len(client.endpoints)
            url = (client.endpoints[index] + "/v3/watch").encode()
            d = client._stream_agent.request(b"POST", url, Headers(HEADERS), _producer(body))
            d.addTimeout(client.timeout, client.reactor)
            try:
                response: IResponse = yield d
            except Exception as e:
                errors.append(f"{client.endpoints[index]}: {e!r}")
                continue
            if self._cancelled:
                cast(Any, response).deliverBody(Protocol())  # and drop it
                return
            self._protocol = _Lines(self)
            cast(Any, response).deliverBody(self._protocol)
            return
        self._fail(_failure(Unavailable("; ".join(errors))))

    def _message(self, body: object) -> None:
        message = wire.decode_watch(body)
        if message.created and not self.created.called:
            self.created.callback(message)
        if message.canceled:
            why = f"watch cancelled by etcd (compact revision {message.compact_revision})"
            self._fail(_failure(WatchCancelled(why, message.compact_revision)))
            return
        if message.events:
            self.on_message(message)

    def _fail(self, reason: Failure) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            cast(Any, self._protocol.transport).stopProducing()
        if not self.created.called:
            self.created.errback(reason)
            self.created.addErrback(lambda _: None)
        if not self.done.called:
            self.done.errback(reason)

    def cancel(self) -> None:
        self._cancelled = True
        self._fail(_failure(WatchCancelled("cancelled", 0)))


class WatchCancelled(Exception):
    def __init__(self, why: str, compact_revision: int) -> None:
        super().__init__(why)
        self.compact_revision = compact_revision
