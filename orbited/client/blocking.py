"""Blocking web-app client: send events to connection keys anywhere in a cluster.

For WSGI apps and scripts. Recipients of one event are grouped by route (docs/hashing.md)
and one SP REQ request goes per route, all pipelined before any reply is read. Our REQ
follows nng's semantics (random start id with the MSB set, replies matched by id); on a
connection loss or time-out the same requests (same event id, so the node ignores a
duplicate) are resent on a new connection, ``retries`` times with backoff. Keys a node
answers ``moved`` for (HaloD moved their route) are resent through the route's port, which
now leads to the new owner, when the cluster is a HaloDCluster.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

from orbited.client.cluster import Cluster
from orbited.keys import ConnectionKey
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
        retries: int = 3,
        backoff: float = 0.2,
    ) -> None:
        self.cluster = cluster
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
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

        A route that cannot be reached gives its keys ``{"status": "error", ...}``.
        ``ack``: the acknowledged mode — each node answers once the browsers confirmed
        (``acked``) or after ``ack`` seconds (``unacked``); keep ``timeout`` above it.
        """
        event_id = event_id or uuid.uuid4().hex
        keys = [ConnectionKey(*k) for k in to]
        results = self._send_once(keys, data, event_id, ack)
        for attempt in range(self.retries):
            moved = moved_keys(self.cluster, results)
            if not moved:
                break
            time.sleep(self.backoff * 2**attempt)  # the data plane follows within moments
            results.update(self._send_once(moved, data, event_id, ack))
        return {k: results[k] for k in keys}

    def _send_once(
        self, keys: list[ConnectionKey], data: object, event_id: str, ack: float | None = None
    ) -> dict[ConnectionKey, dict]:
        # One request per route, grouped by the address that serves it.
        pending: dict[tuple[str, int], dict[int, tuple[bytes, list[ConnectionKey]]]] = {}
        for route, route_keys in self.cluster.group_by_route(keys).items():
            body = event_body(event_id, route_keys, data, ack)
            request_id = self._ids.next()
            pending.setdefault(self.cluster.sp_address(route), {})[request_id] = (body, route_keys)
        results: dict[ConnectionKey, dict] = {}
        for address, requests in pending.items():
            results.update(self._exchange(address, requests))
        return results

    def _exchange(
        self, address: tuple[str, int], requests: dict[int, tuple[bytes, list[ConnectionKey]]]
    ) -> dict[ConnectionKey, dict]:
        conn = self._connections.setdefault(address, _Connection(address, self.timeout))
        results: dict[ConnectionKey, dict] = {}
        waiting = dict(requests)
        last_error: Exception | None = None
        for attempt in range(self.retries + 1):
            if not waiting:
                break
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                sock = conn.open()
                sock.sendall(b"".join(
                    wire.encode_message(RequestIds.encode(rid) + body)
                    for rid, (body, _) in waiting.items()
                ))  # fmt: skip
                deadline = time.monotonic() + self.timeout
                while waiting:
                    sock.settimeout(max(0.01, deadline - time.monotonic()))
                    data = sock.recv(65536)
                    if not data:
                        raise ConnectionError("node closed the connection")
                    for reply in conn.sp.receive(data):
                        if len(reply) < 4:
                            raise ConnectionError("reply shorter than a request id")
                        rid = int.from_bytes(reply[:4], "big")
                        entry = waiting.pop(rid, None)
                        if entry is None:
                            continue  # a late reply to an earlier attempt: nng drops it too
                        results.update(results_for(json.loads(reply[4:]), entry[1]))
            except (OSError, wire.SPProtocolError) as e:
                last_error = e
                conn.close()
        for _, route_keys in waiting.values():
            for key in route_keys:
                results[key] = {"status": "error", "error": f"{address}: {last_error}"}
        return results
