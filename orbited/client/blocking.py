"""Blocking web-app client: send events to connection keys and users anywhere in a cluster.

For WSGI apps and scripts. Recipients of one event — keys, and selectors of a user's or a
session's every connection — are grouped by route (docs/hashing.md) and one SP REQ request
goes per route, all of an address's pipelined before any reply is read, every address at
the same time (a thread each from the client's pool, so a call waits for its slowest
address, not for their sum). A request larger than a node reads (``max_message``) is
given up, never sent: the node would close the connection on it. Our REQ follows
nng's semantics (random start id with the MSB set, replies matched by id). On a connection
loss or time-out — and, with a HaloDCluster, on a ``moved`` answer (HaloD gave the route
to another node; the route port now leads there) — the connection is closed and the
unanswered requests (same event id, so a node ignores a duplicate) are resent in their
order on a new one, as RetryPolicy says (orbited/client/retry.py). A cluster that follows
the hash version (HaloDCluster's ``"auto"``) switches when a node names another one, and
the recipients of that answer are grouped again and resent at once. With ``otel=True``
each send is an OpenTelemetry span whose trace context every request carries
(orbited/client/otel.py).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from orbited.client.cluster import Cluster, Recipient, RecipientLike, WildcardNeedsV2, recipient
from orbited.client.otel import ClientTracing, SendSpan, tracing
from orbited.client.retry import RetryPolicy
from orbited.core.hashing import route_of_user
from orbited.core.keys import ConnectionKey, Selector
from orbited.sp import wire
from orbited.sp.reqrep import MAX_REQUEST, RequestIds

# Rounds of grouping again after the hash version changed during one call: a rehash needs
# one; a second covers a rehash and its roll-back crossing one call.
MAX_REGROUPS = 2
# Addresses a BlockingClient talks to at once (its pool's threads): a HaloD's route ports
# are one address each.
MAX_PARALLEL = 64
Address = tuple[str, int]


def _wire(target: Recipient) -> list[str]:
    return target.to_json() if isinstance(target, Selector) else list(target)


def event_body(
    event_id: str, keys: Iterable[Recipient], data: object, ack: float | None = None, *,
    latest: str | None = None, offline: bool | float | None = None,
    hash_version: int | None = None, traceparent: str | None = None,
    tracestate: str | None = None,
) -> bytes:  # fmt: skip
    """The SP event request for one route's recipients (docs/protocol.md). ``ack``:
    seconds the node may wait for the browser's acknowledgement before answering
    (acknowledged mode); ``latest``: the coalescing tag of a latest-value event;
    ``offline``: ``True`` or seconds, the offline hook; ``hash_version``: the version the
    routes were computed with (the node answers ``hash_version_mismatch`` if it differs);
    ``traceparent``/``tracestate``: the W3C trace context of the sender's span.
    Fields left None are not sent."""
    request: dict[str, Any] = {"id": event_id, "to": [_wire(k) for k in keys], "data": data}
    if ack is not None:
        request["ack"] = ack
    if latest is not None:
        request["latest"] = latest
    if offline is not None:
        request["offline"] = offline
    if hash_version is not None:
        request["hash"] = hash_version
    if traceparent is not None:
        request["traceparent"] = traceparent
        if tracestate is not None:
            request["tracestate"] = tracestate
    return json.dumps(
        request,
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode()


def recipient_result(result: dict) -> dict:
    """One entry of a reply's ``results`` as the clients return it: a wildcard's
    ``"keys"`` list of ``{"key": [...], "status": ...}`` becomes a dict ConnectionKey →
    that key's result (without ``"key"``). Anything else is returned as it came."""
    keys = result.get("keys")
    if not isinstance(keys, list):
        return result
    try:
        by_key = {ConnectionKey(*e["key"]): {f: v for f, v in e.items() if f != "key"}
                  for e in keys}  # fmt: skip
    except (TypeError, KeyError):
        return result  # not the documented form: keep it as the node sent it
    return {**result, "keys": by_key}


def results_for(reply: dict, keys: list[Recipient]) -> dict[Recipient, dict]:
    """Each recipient's result from a node's reply; an error reply becomes an error per
    recipient (``code``, ``error`` and, for ``hash_version_mismatch``, the node's
    ``hash``)."""
    if not reply.get("ok"):
        error = reply.get("error") or {}
        result = {"status": "error", "code": error.get("code"), "error": error.get("message")}
        if "hash" in error:
            result["hash"] = error["hash"]
        return {k: dict(result) for k in keys}
    return {k: recipient_result(r) for k, r in zip(keys, reply["results"], strict=True)}


def moved_keys(cluster: Cluster, results: dict[Recipient, dict]) -> list[Recipient]:
    """Recipients worth resending: answered ``moved`` by a node behind a port that follows
    moves."""
    if not cluster.follows_moves:
        return []
    return [k for k, result in results.items() if result.get("status") == "moved"]


def unroutable(target: Recipient) -> dict:
    """The result of a selector under hash version 1 (never sent: its keys may be on any
    route)."""
    return {"status": "error", "code": WildcardNeedsV2.code, "error": str(WildcardNeedsV2())}


@dataclass
class Request:
    """One route's share of an event: resent, for the recipients not yet answered, until
    every one has a result or the retry policy gives up."""

    event_id: str
    keys: list[Recipient]  # still to be answered
    data: object
    ack: float | None
    started: float  # monotonic time of the first attempt
    latest: str | None = None
    offline: bool | float | None = None
    hash_version: int | None = None  # the version its routes were computed with
    # Selectors sent by an auto cluster on version 1 to their version-2 route, to find out
    # whether the cluster moved to 2 (Event.requests).
    probe: bool = False
    # The send's span (otel=True): its trace context goes into every request, resends too.
    span: SendSpan | None = None
    resends: int = 0
    results: dict[Recipient, dict] = field(default_factory=dict)
    # Answered under another hash version than the routes were computed with, which the
    # cluster now follows: to be grouped again and sent to their new routes.
    regroup: list[Recipient] = field(default_factory=list)
    _body: bytes | None = field(default=None, repr=False)  # for ``keys`` as they are

    def body(self) -> bytes:
        body = self._body
        if body is None:
            span = self.span
            body = self._body = event_body(
                self.event_id, self.keys, self.data, self.ack, latest=self.latest,
                offline=self.offline, hash_version=self.hash_version,
                traceparent=None if span is None else span.traceparent,
                tracestate=None if span is None else span.tracestate,
            )  # fmt: skip
        return body

    def oversized(self, max_message: int) -> bool:
        """Is this request's SP message (request id and body) over ``max_message``, the
        most a node reads (its ``sp_max_message``; past it the node closes the connection,
        docs/sp.md)? Then it is given up with ``payload_too_large``, never sent."""
        size = 4 + len(self.body())
        if size <= max_message:
            return False
        self.give_up(
            f"request of {size} bytes is over max_message ({max_message} bytes, the node's "
            "sp_max_message): a node closes the connection on it", "payload_too_large",
        )  # fmt: skip
        return True

    def resent(self, reason: str) -> None:
        """Count a resend (and note it on the send's span: ``moved``, ``connection_lost``
        or ``timeout``)."""
        self.resends += 1
        if self.span is not None:
            self.span.resend(reason)

    def answer(self, reply: dict, cluster: Cluster) -> bool:
        """Record a node's reply; True if some recipients were answered ``moved`` and must
        be resent through the same route port (they stay in ``keys``). Recipients answered
        under a hash version the cluster now follows instead go to ``regroup``."""
        results = results_for(reply, self.keys)
        if self.probe:
            if reply.get("ok"):  # a node routes with version 2: so does the cluster now
                cluster.follow_hash(self.hash_version)
            else:  # still version 1 (or another error): the selectors cannot be routed
                results = {k: unroutable(k) for k in self.keys}
                self.results.update(results)
                self.keys = []
                return False
        self._body = None  # the keys change below
        self.results.update(results)
        if not reply.get("ok"):
            error = reply.get("error") or {}
            if error.get("code") == "hash_version_mismatch" and self._switched(
                cluster, error.get("hash")
            ):
                self.regroup.extend(self.keys)
            self.keys = []
            return False
        again: list[Recipient] = []
        for target, result in results.items():
            if result.get("status") != "moved":
                continue
            if "hash" in result and self._switched(cluster, result["hash"]):
                self.regroup.append(target)
            elif cluster.follows_moves:
                again.append(target)
        self.keys = again
        return bool(again)

    def _switched(self, cluster: Cluster, version: object) -> bool:
        """The node named ``version``: is the cluster's version (after following it) not
        the one this request's routes were computed with?"""
        cluster.follow_hash(version)
        return cluster.hash_version != self.hash_version

    def give_up(self, error: str | None, code: str | None = None) -> None:
        """No more resends: the recipients still unanswered get ``error``. None: those
        answered ``moved`` keep that answer; those never answered (a request queued on
        the same connection as another one's ``moved``) get an error all the same, so
        every recipient of a send has a result."""
        for k in self.keys:
            if error is None and k in self.results:
                continue
            result = {"status": "error",
                      "error": error or "no reply within the retry budget"}  # fmt: skip
            if code is not None:
                result["code"] = code
            self.results[k] = result
        self.keys = []


@dataclass(frozen=True)
class Event:
    """What one ``send`` call sends: the same for every route and every round."""

    event_id: str
    data: object
    ack: float | None = None
    latest: str | None = None
    offline: bool | float | None = None
    span: SendSpan | None = None  # otel=True: the send's span

    def requests(
        self, cluster: Cluster, targets: list[Recipient], started: float
    ) -> tuple[list[tuple[Address, Request]], dict[Recipient, dict]]:
        """One request per route of ``targets`` under the cluster's current hash version,
        with its address; and the results of recipients that cannot be routed.

        A selector under version 1 cannot be routed: a fixed cluster refuses it at once;
        one that follows HaloD sends it to its user's version-2 route with ``"hash": 2``
        (a probe), so that an app addressing only users notices a rehash to 2 (the node
        refuses it while the cluster is still on 1)."""
        version = cluster.hash_version
        refused: dict[Recipient, dict] = {}
        groups: dict[tuple[int, int], list[Recipient]] = {}
        for target in dict.fromkeys(targets):
            if isinstance(target, Selector) and version < 2:
                if not cluster.follows_hash:
                    refused[target] = unroutable(target)
                    continue
                group = (route_of_user(target.user, cluster.routes), 2)
            else:
                group = (cluster.route_of(target), version)
            groups.setdefault(group, []).append(target)
        return [
            (cluster.sp_address(route), Request(
                self.event_id, route_targets, self.data, self.ack, started, latest=self.latest,
                offline=self.offline, hash_version=hashed, probe=hashed != version,
                span=self.span,
            ))
            for (route, hashed), route_targets in groups.items()
        ], refused  # fmt: skip


@dataclass
class _Connection:
    address: tuple[str, int]
    timeout: float
    sock: socket.socket | None = None
    sp: wire.SPConnection = field(default_factory=lambda: wire.SPConnection(wire.REQ, wire.REP))
    ids: RequestIds = field(default_factory=RequestIds)  # nng: a REQ socket's own ids

    def open(self) -> socket.socket:
        if self.sock is None:
            sock = socket.create_connection(self.address, timeout=self.timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(wire.encode_header(wire.REQ))
            self.sp = wire.SPConnection(wire.REQ, wire.REP, max_message=64 * 1024 * 1024)
            self.sock = sock
        return self.sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


MAX_IDLE = 8  # connections kept per address for the next calls (more are closed)


class _Pool:
    """The connections to one address. An exchange takes one for itself (a new one if
    none is free) and gives it back: calls from several threads never share a connection
    (they would read each other's replies) and never wait for each other (a hung node
    costs each call its own timeout, within its own budget)."""

    def __init__(self, address: tuple[str, int], timeout: float) -> None:
        self.address = address
        self.timeout = timeout
        self.free: list[_Connection] = []
        self.lock = threading.Lock()  # held for the list only, never across I/O

    def take(self) -> _Connection:
        with self.lock:
            if self.free:
                return self.free.pop()
        return _Connection(self.address, self.timeout)

    def give(self, conn: _Connection) -> None:
        with self.lock:
            if conn.sock is not None and len(self.free) < MAX_IDLE:
                self.free.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self.lock:
            free, self.free = self.free, []
        for conn in free:
            conn.close()


class BlockingClient:
    def __init__(
        self,
        cluster: Cluster,
        timeout: float = 5.0,
        retries: int | None = None,
        backoff: float = RetryPolicy.backoff,
        *,
        retry_budget: float = RetryPolicy.budget,
        max_backoff: float = RetryPolicy.max_backoff,
        otel: bool | ClientTracing = False,
        max_message: int = MAX_REQUEST,
    ) -> None:
        """``timeout``: seconds to wait for a reply on one connection; resends follow
        RetryPolicy(retry_budget, backoff, max_backoff, retries) (docs/client-python.md).
        ``otel``: an OpenTelemetry span per send (True: the global tracer provider; a
        ClientTracing: its own), orbited/client/otel.py. ``max_message``: the nodes'
        ``sp_max_message``; a larger request is given up, not sent."""
        self.cluster = cluster
        self.timeout = timeout
        self.policy = RetryPolicy(retry_budget, backoff, max_backoff, retries)
        self.tracing = tracing(otel)
        self.max_message = max_message
        self._connections: dict[tuple[str, int], _Pool] = {}  # by address
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0  # the process that made the pool (a forked one makes its own)
        self._connections_pid = os.getpid()  # and the connections (likewise)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
        pools, self._connections = self._connections, {}
        for pool in pools.values():
            pool.close()

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(
        self, to: Iterable[RecipientLike], data: object, event_id: str | None = None,
        ack: float | None = None, *, latest: str | None = None,
        offline: bool | float | None = None,
    ) -> dict[Recipient, dict]:  # fmt: skip
        """Deliver ``data`` to every recipient; returns each one's result (docs/protocol.md).

        A recipient is a ConnectionKey, a Selector, or its JSON form (``["alice", "*",
        "*"]``: every connection of alice; ``["alice", "s1", "*"]``: those of session
        s1). A selector's result is ``{"status": "matched", "keys": {key: result}}`` (or
        ``no_connection`` with ``"keys": {}``). A route that cannot be reached within the
        retry budget gives its recipients ``{"status": "error", ...}``. ``ack``: the
        acknowledged mode — each node answers once the browsers confirmed (``acked``) or
        after ``ack`` seconds (``unacked``); keep ``timeout`` above it. ``latest``: a
        latest-value tag; ``offline``: the offline hook (``True`` or seconds).
        """
        if event_id is None:  # ("" is sent as it is: the node refuses it, bad_request)
            event_id = uuid.uuid4().hex
        if self.tracing is None:
            return self._send(Event(event_id, data, ack, latest, offline),
                              [recipient(t) for t in to])  # fmt: skip
        to = list(to)
        span = self.tracing.start(event_id, len(to))
        try:
            targets = [recipient(t) for t in to]  # (a bad one raises: recorded on the span)
            results = self._send(Event(event_id, data, ack, latest, offline, span), targets)
        except BaseException as e:
            span.fail(e)
            raise
        span.finish(results)
        return results

    def _send(self, event: Event, targets: list[Recipient]) -> dict[Recipient, dict]:
        results: dict[Recipient, dict] = {}
        todo = list(dict.fromkeys(targets))
        # One retry budget for the call: a hash-version switch's next round does not
        # start it again (before, each round had a budget of its own).
        started = time.monotonic()
        for _ in range(1 + MAX_REGROUPS):
            planned, refused = event.requests(self.cluster, todo, started)
            if event.span is not None:
                event.span.requests(len(planned))
            results.update(refused)
            pending: dict[Address, list[Request]] = {}
            for address, request in planned:
                pending.setdefault(address, []).append(request)
            self._exchange_all(pending)
            todo = []
            for _, request in planned:
                results.update(request.results)
                todo += request.regroup
            if not todo:
                break
        return {t: results[t] for t in targets}

    def _exchange_all(self, pending: dict[Address, list[Request]]) -> None:
        """Each address's requests on its own connection (``_exchange``), the addresses
        at the same time, a thread each from the client's pool: a call waits for its
        slowest address (a dead node's retry budget, an acknowledged-mode wait) once, not
        once per address."""
        if len(pending) == 1:
            ((address, requests),) = pending.items()
            self._exchange(address, requests)
            return
        futures = []
        for address, requests in pending.items():
            try:
                futures.append(self._executor().submit(self._exchange, address, requests))
            except RuntimeError:  # close() shut that pool down meanwhile: on a new one
                futures.append(self._executor(renew=True).submit(self._exchange, address,
                                                                 requests))  # fmt: skip
        wait(futures)  # every one, before a failure of one is raised
        for future in futures:
            future.result()

    def _executor(self, renew: bool = False) -> ThreadPoolExecutor:
        """The client's pool of threads, made at its first use in this process (again after
        ``close``, or when ``renew``: a call running while another thread closed the client
        goes on rather than fail)."""
        pool = self._pool
        if renew or pool is None or self._pool_pid != os.getpid():
            pool = self._pool = ThreadPoolExecutor(MAX_PARALLEL, "orbited-client")
            self._pool_pid = os.getpid()
        return pool

    def _exchange(self, address: tuple[str, int], requests: list[Request]) -> None:
        """Send ``requests`` over the connection to ``address`` until each is answered or
        given up; in order, so a key's events reach its node in the order sent."""
        for request in requests:
            request.oversized(self.max_message)  # (then given up: no keys left to send)
        pool = self._pool_for(address)
        conn = pool.take()
        try:
            self._exchange_on(conn, address, requests)
        finally:
            pool.give(conn)

    def _pool_for(self, address: tuple[str, int]) -> _Pool:
        if self._connections_pid != os.getpid():
            # A forked child: connections (and locks) of its own; the parent's are left to
            # the parent. The new table goes in before the pid, so a thread that sees this
            # pid never sees the parent's table.
            self._connections = {}
            self._connections_pid = os.getpid()
        pools = self._connections
        pool = pools.get(address)
        if pool is None:
            pool = pools.setdefault(address, _Pool(address, self.timeout))
        return pool

    def _exchange_on(self, conn: _Connection, address: tuple[str, int],
                     requests: list[Request]) -> None:  # fmt: skip
        failures = 0
        while True:
            todo = [r for r in requests if r.keys]
            if not todo:
                return
            try:
                self._attempt(conn, todo)
                failures = 0  # every request answered
                continue
            except _Moved:
                failures += 1
                error = None  # given up: the keys keep their `moved` answer
                reason = "moved"
            except (OSError, wire.SPProtocolError) as e:
                failures += 1
                error = f"{address}: {e}"
                reason = "timeout" if isinstance(e, TimeoutError) else "connection_lost"
            conn.close()
            pause = self.policy.pause(failures, moved=reason == "moved")
            resend_at = time.monotonic() + pause
            for request in todo:
                if not request.keys:  # answered in full before the failure
                    continue
                if self.policy.allows(request.started, request.resends, resend_at):
                    request.resent(reason)
                else:
                    request.give_up(error)
            if pause and any(r.keys for r in requests):
                time.sleep(pause)

    def _attempt(self, conn: _Connection, todo: list[Request]) -> None:
        """One round on one connection: write every request, read every reply. Raises
        _Moved (after reading what was already there) when a reply said ``moved``: the
        connection leads to a node that no longer owns the route."""
        sock = conn.open()
        waiting: dict[int, Request] = {conn.ids.next(): r for r in todo}
        sock.sendall(b"".join(
            wire.encode_message(RequestIds.encode(rid) + r.body()) for rid, r in waiting.items()
        ))  # fmt: skip
        moved = False
        deadline = time.monotonic() + self.timeout
        while waiting and not moved:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("node closed the connection")
            for reply in conn.sp.receive(data):
                if len(reply) < 4:
                    raise ConnectionError("reply shorter than a request id")
                request = waiting.pop(int.from_bytes(reply[:4], "big"), None)
                if request is None:
                    continue  # a late reply to an earlier attempt: nng drops it too
                try:
                    answer = json.loads(reply[4:])
                except ValueError as e:
                    raise ConnectionError(f"reply is not JSON: {e}") from None
                moved |= request.answer(answer, self.cluster)
        if moved:
            raise _Moved


class _Moved(Exception):
    """A node answered ``moved`` over this connection: dial the route port again."""
