"""Blocking web-app client: send events to connection keys anywhere in a cluster.

For WSGI apps and scripts. Recipients of one event are grouped by route (docs/hashing.md)
and one SP REQ request goes per route, all of an address's pipelined before any reply is
read. Our REQ follows nng's semantics (random start id with the MSB set, replies matched
by id). On a connection loss or time-out — and, with a HaloDCluster, on a ``moved`` answer
(HaloD gave the route to another node; the route port now leads there) — the connection
is closed and the unanswered requests (same event id, so a node ignores a duplicate) are
resent in their order on a new one, as RetryPolicy says (orbited/client/retry.py).
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

from orbited.client.cluster import Cluster
from orbited.client.retry import RetryPolicy
from orbited.core.keys import ConnectionKey
from orbited.sp import wire
from orbited.sp.reqrep import RequestIds


def event_body(
    event_id: str, keys: list[ConnectionKey], data: object, ack: float | None = None
) -> bytes:
    """The SP event request for one route's keys (docs/protocol.md); ``ack``: seconds the
    node may wait for the browser's acknowledgement before answering (acknowledged mode)."""
    request = {"id": event_id, "to": [list(k) for k in keys], "data": data}
    if ack is not None:
        request["ack"] = ack
    return json.dumps(
        request,
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode()


def results_for(reply: dict, keys: list[ConnectionKey]) -> dict[ConnectionKey, dict]:
    """Each key's result from a node's reply; an error reply becomes an error per key."""
    if not reply.get("ok"):
        error = reply.get("error", {})
        return {k: {"status": "error", "code": error.get("code"), "error": error.get("message")}
                for k in keys}  # fmt: skip
    return dict(zip(keys, reply["results"], strict=True))


def moved_keys(cluster: Cluster, results: dict[ConnectionKey, dict]) -> list[ConnectionKey]:
    """Keys worth resending: answered ``moved`` by a node behind a port that follows moves."""
    if not cluster.follows_moves:
        return []
    return [k for k, result in results.items() if result.get("status") == "moved"]


@dataclass
class Request:
    """One route's share of an event: resent, for the keys not yet answered, until every
    key has a result or the retry policy gives up."""

    event_id: str
    keys: list[ConnectionKey]  # still to be answered
    data: object
    ack: float | None
    started: float  # monotonic time of the first attempt
    resends: int = 0
    results: dict[ConnectionKey, dict] = field(default_factory=dict)

    def body(self) -> bytes:
        return event_body(self.event_id, self.keys, self.data, self.ack)

    def answer(self, reply: dict, cluster: Cluster) -> bool:
        """Record a node's reply; True if some keys were answered ``moved`` and must be
        resent through the route port (they stay in ``keys``)."""
        results = results_for(reply, self.keys)
        self.results.update(results)
        self.keys = moved_keys(cluster, results)
        return bool(self.keys)

    def give_up(self, error: str | None, code: str | None = None) -> None:
        """No more resends: the keys still unanswered get ``error`` (None: they keep the
        last answer, ``moved``)."""
        if error is not None:
            result = {"status": "error", "error": error}
            if code is not None:
                result["code"] = code
            self.results.update((k, dict(result)) for k in self.keys)
        self.keys = []


@dataclass
class _Connection:
    address: tuple[str, int]
    timeout: float
    sock: socket.socket | None = None
    sp: wire.SPConnection = field(default_factory=lambda: wire.SPConnection(wire.REQ, wire.REP))

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
    ) -> None:
        """``timeout``: seconds to wait for a reply on one connection; resends follow
        RetryPolicy(retry_budget, backoff, max_backoff, retries) (docs/client-python.md)."""
        self.cluster = cluster
        self.timeout = timeout
        self.policy = RetryPolicy(retry_budget, backoff, max_backoff, retries)
        self._ids = RequestIds()
        self._connections: dict[tuple[str, int], _Connection] = {}

    def close(self) -> None:
        for conn in self._connections.values():
            conn.close()
        self._connections.clear()

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(
        self, to: Iterable[ConnectionKey | tuple[str, str, str] | list[str]], data: object,
        event_id: str | None = None, ack: float | None = None,
    ) -> dict[ConnectionKey, dict]:  # fmt: skip
        """Deliver ``data`` to every key; returns each key's result (docs/protocol.md).

        A route that cannot be reached within the retry budget gives its keys
        ``{"status": "error", ...}``. ``ack``: the acknowledged mode — each node answers
        once the browsers confirmed (``acked``) or after ``ack`` seconds (``unacked``);
        keep ``timeout`` above it.
        """
        event_id = event_id or uuid.uuid4().hex
        keys = [ConnectionKey(*k) for k in to]
        # One request per route, grouped by the address that serves it.
        pending: dict[tuple[str, int], list[Request]] = {}
        for route, route_keys in self.cluster.group_by_route(keys).items():
            pending.setdefault(self.cluster.sp_address(route), []).append(
                Request(event_id, route_keys, data, ack, 0.0)
            )
        results: dict[ConnectionKey, dict] = {}
        for address, requests in pending.items():
            self._exchange(address, requests)
            for request in requests:
                results.update(request.results)
        return {k: results[k] for k in keys}

    def _exchange(self, address: tuple[str, int], requests: list[Request]) -> None:
        """Send ``requests`` over the connection to ``address`` until each is answered or
        given up; in order, so a key's events reach its node in the order sent."""
        conn = self._connections.setdefault(address, _Connection(address, self.timeout))
        started = time.monotonic()
        for request in requests:
            request.started = started
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
            except (OSError, wire.SPProtocolError) as e:
                failures += 1
                error = f"{address}: {e}"
            conn.close()
            pause = self.policy.pause(failures)
            resend_at = time.monotonic() + pause
            for request in todo:
                if self.policy.allows(request.started, request.resends, resend_at):
                    request.resends += 1
                else:
                    request.give_up(error)
            if pause and any(r.keys for r in requests):
                time.sleep(pause)

    def _attempt(self, conn: _Connection, todo: list[Request]) -> None:
        """One round on one connection: write every request, read every reply. Raises
        _Moved (after reading what was already there) when a reply said ``moved``: the
        connection leads to a node that no longer owns the route."""
        sock = conn.open()
        waiting: dict[int, Request] = {self._ids.next(): r for r in todo}
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
