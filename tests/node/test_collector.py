"""Garbage-collector settings (orbited.node.collector): frozen once at start-up, never
after; a closed browser connection's objects (a protocol<->transport cycle) are still
freed once the node has tuned the collector."""

from __future__ import annotations

import gc
import socket
import weakref
from collections.abc import Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from orbited.core.keys import ConnectionKey
from orbited.core.tokens import issue_token
from orbited.node import collector
from orbited.node.config import NodeConfig
from orbited.node.service import NodeService
from tests.conftest import SECRET


@pytest.fixture
def fresh_collector(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This test process's collector as it was, afterwards (tune() is process-wide)."""
    threshold = gc.get_threshold()
    monkeypatch.setattr(collector, "_tuned", False)
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


class Cycle:
    def __init__(self) -> None:
        self.me = self


def test_tune_freezes_once_and_sets_the_thresholds(fresh_collector):
    before = Cycle()
    assert collector.tune() is True
    assert gc.get_threshold() == collector.THRESHOLD
    frozen = gc.get_freeze_count()
    assert frozen > 0
    ref = weakref.ref(before)
    del before
    gc.collect()
    assert ref() is not None  # alive at start-up: frozen, never collected
    burst = [Cycle() for _ in range(1000)]  # e.g. a burst of connections
    assert collector.tune() is False  # a later call freezes nothing
    assert gc.get_freeze_count() <= frozen  # (frozen objects may die: fewer, never more)
    refs = [weakref.ref(c) for c in burst]
    del burst
    gc.collect()
    assert all(r() is None for r in refs)  # created after start-up: collected


def _sse(port: int, token: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(f"GET /orbited/sse?token={token} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return sock


@pytest_twisted.inlineCallbacks
def test_a_closed_connection_is_freed_after_the_node_tuned_the_collector(tmp_path, fresh_collector):
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    config = NodeConfig(
        http="127.0.0.1:0", sp="tcp://127.0.0.1:0", secret_file=str(secret), create_secret=False
    )
    node = NodeService(config, reactor)
    node.startService()
    try:
        yield deferLater(reactor, 0, lambda: None)
        assert gc.get_threshold() == collector.THRESHOLD  # the node tuned it at start
        frozen = gc.get_freeze_count()
        key = ConnectionKey("gc", "s", "/t")
        port = int(node.http_address.rsplit(":", 1)[1])
        sock = _sse(port, issue_token(SECRET, key, ttl=60))
        for _ in range(200):
            if node.hub.is_attached(key, getattr(node.hub._slots.get(key), "sink", None)):
                break
            yield deferLater(reactor, 0.01, lambda: None)
        sink = node.hub._slots[key].sink
        assert sink is not None
        kind = type(sink)  # (a slotted sink may have no weak references: count them)
        del sink
        gc.collect()
        assert sum(type(o) is kind for o in gc.get_objects()) == 1
        assert collector.tune() is False  # a second start-up in this process: no freeze
        assert gc.get_freeze_count() <= frozen  # (frozen objects may die: fewer, never more)
        sock.close()
        for _ in range(200):
            if node.hub._slots[key].sink is None:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        yield deferLater(reactor, 0.05, lambda: None)
        gc.collect()
        # The closed connection's objects (a protocol<->transport cycle) were freed.
        assert sum(type(o) is kind for o in gc.get_objects()) == 0
    finally:
        yield node.stopService()
