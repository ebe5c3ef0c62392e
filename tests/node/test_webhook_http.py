"""WebhookQueue's real HTTP POST (orbited.node.webhook) against receivers that misbehave
after their answer's head: the attempt's time-out ends the exchange (the connection is
closed, nothing more is read or kept), and a body past MAX_ANSWER is not read on
(docs/security.md, "Webhooks")."""

from __future__ import annotations

import itertools
from typing import Any

import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogPublisher

from orbited.node.webhook import MAX_ANSWER, WebhookConfig, WebhookQueue


class Streaming(Protocol):
    """Answers 200 with a huge Content-Length, then sends ``chunk`` every 10 ms until the
    client closes (or ``stop_after`` bytes were sent: then it finishes the body)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.loop: task.LoopingCall | None = None

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.loop is not None or b"\r\n\r\n" not in data:
            return
        s = self.server
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % s.length)
        self.loop = task.LoopingCall(self._more)
        self.loop.start(0.01)

    def _more(self) -> None:
        s = self.server
        if s.sent >= s.length:
            return
        n = min(len(s.chunk), s.length - s.sent)
        self.transport.write(s.chunk[:n])
        s.sent += n

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        if self.loop is not None and self.loop.running:
            self.loop.stop()
        self.server.closed_at = reactor.seconds()


class Server(Factory):
    def __init__(self, length: int, chunk: bytes) -> None:
        self.length, self.chunk, self.sent = length, chunk, 0
        self.closed_at: float | None = None

    def buildProtocol(self, addr: Any) -> Streaming:  # noqa: N802
        return Streaming(self)


def sleep(seconds: float) -> defer.Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


@defer.inlineCallbacks
def post_one(port: Any, timeout: float) -> Any:
    """One notice through a real WebhookQueue to ``port``, one attempt: the queue once
    that attempt is over (taken or dropped), within 5 s."""
    url = f"http://127.0.0.1:{port.getHost().port}/hook"
    queue = WebhookQueue(WebhookConfig(url, timeout=timeout, retries=1), b"k" * 32, "n1",
                         reactor, serials=itertools.count(1))  # fmt: skip
    queue.push({"type": "signon"})
    started = reactor.seconds()
    while queue.sent == queue.dropped == 0 and reactor.seconds() - started < 5:
        yield sleep(0.02)
    return queue


@pytest_twisted.inlineCallbacks
def test_an_answer_that_outlives_the_timeout_is_cut_and_not_kept():
    server = Server(100_000_000, b"x" * 100)  # 10 KB/s for ever: under MAX_ANSWER in time
    port = reactor.listenTCP(0, server, interface="127.0.0.1")
    critical: list[dict] = []

    def observe(event: dict) -> None:
        if event.get("log_level") is not None and event["log_level"].name == "critical":
            critical.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        started = reactor.seconds()
        queue = yield post_one(port, 0.5)
        assert queue.dropped == 1  # the attempt timed out: the batch is dropped
        yield sleep(0.5)
        assert server.closed_at is not None and server.closed_at - started < 1.5
        sent_then = server.sent
        yield sleep(0.5)
        assert server.sent == sent_then  # nothing more goes to (or is kept by) the node
    finally:
        globalLogPublisher.removeObserver(observe)
        yield port.stopListening()
    assert critical == []


@pytest_twisted.inlineCallbacks
def test_a_2xx_whose_body_is_past_the_limit_counts_and_is_not_read_on():
    server = Server(10 * MAX_ANSWER, b"y" * 8192)  # 80 KB/ 10 ms: past the limit at once
    port = reactor.listenTCP(0, server, interface="127.0.0.1")
    try:
        queue = yield post_one(port, 5)
        assert queue.sent == 1 and queue.dropped == 0
        yield sleep(0.2)
        assert server.closed_at is not None and server.sent < 10 * MAX_ANSWER
    finally:
        yield port.stopListening()
