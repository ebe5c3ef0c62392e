"""Signed, ordered, retried, bounded webhooks: the node → web app notices.

Presence (orbited.node.presence) and the offline hook (orbited.node.offline) queue their
notices here. A ``WebhookQueue`` keeps notices in order (``serial`` increases per node
process), POSTs them as signed JSON batches (``{"node": ..., "events": [...]}``), one
request at a time, retries a batch with backoff and then drops it (logged), and keeps
at most ``max_queue`` notices waiting (the oldest dropped, logged). Nothing that queues
a notice ever waits for the receiver. A notice still waiting can be cancelled: it is
then never sent (the offline hook's ``cancel`` of a ``needs_push`` nobody has seen yet).
See docs/protocol.md, "Presence webhooks" and "Offline webhooks".
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
from collections import deque
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from orbited.core.settings import check_fields

SIGNATURE_HEADER = b"x-orbited-signature"
# Bytes of a receiver's answer body read (and dropped) at most: past it the connection is
# closed, the answer's status still counting. A receiver has nothing to say in a body.
MAX_ANSWER = 64 * 1024
# ``serial``s for every webhook of this process (presence and offline notices to one
# receiver never share one): docs/protocol.md, "Presence webhooks".
SERIALS = itertools.count(1)

# POST one body; fires True when the receiver took it (a 2xx answer), False otherwise.
Poster = Callable[[bytes], "defer.Deferred[bool]"]


def sign(secret: bytes, body: bytes) -> str:
    """The X-Orbited-Signature value: ``sha256=`` + hex HMAC-SHA256 of the body."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class WebhookConfig:
    url: str
    max_queue: int = 10_000  # notices waiting; beyond it the oldest are dropped (and logged)
    batch: int = 100  # notices per POST
    timeout: float = 5.0  # seconds per POST, the whole exchange
    retries: int = 5  # attempts per batch before it is dropped (and logged)
    backoff: float = 0.5  # seconds before the 2nd attempt, doubling after each failure (0 ok)

    def __post_init__(self) -> None:
        check_fields(
            self, positive=("max_queue", "batch", "timeout", "retries"), nonnegative=("backoff",)
        )


class Notice:
    """One notice: its JSON object (``fields``, ``serial`` and ``time`` included). It reads
    like that object (``notice["key"]``)."""

    __slots__ = ("fields", "cancelled", "waiting")

    def __init__(self, fields: dict[str, object]) -> None:
        self.fields = fields
        self.cancelled = False
        self.waiting = True  # in the queue, not yet taken into a POST

    def __getitem__(self, name: str) -> object:
        return self.fields[name]

    def __repr__(self) -> str:
        return f"Notice({self.fields!r}, cancelled={self.cancelled})"


class _Answer(Protocol):
    """A receiver's answer body: read and dropped, at most MAX_ANSWER bytes (then, or when
    ``stop`` is called, the connection is closed: nothing more is read). ``done`` fires
    (None) once the body ended or was cut."""

    def __init__(self) -> None:
        self.done: defer.Deferred[None] = defer.Deferred()
        self.size = 0

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.size += len(data)
        if self.size > MAX_ANSWER:
            self.stop()

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        if not self.done.called:
            self.done.callback(None)

    def stop(self) -> None:
        """Close the connection (the transport a response hands its body protocol stops
        the HTTP connection's transport: no more bytes are read)."""
        transport: Any = self.transport  # (a TransportProxyProducer: an IPushProducer)
        if transport is not None:
            transport.stopProducing()
        if not self.done.called:
            self.done.callback(None)


class WebhookQueue:
    """The notices of one webhook URL. ``name`` names it in the logs ("presence",
    "offline"). ``post`` replaces the HTTP POST (tests); by default an Agent on
    ``reactor`` posts to ``config.url``."""

    log = Logger()

    def __init__(
        self,
        config: WebhookConfig,
        secret: bytes,
        node: str,
        reactor: IReactorTime,
        name: str = "webhook",
        post: Poster | None = None,
        serials: Iterator[int] | None = None,
    ) -> None:
        self.config = config
        self.secret = secret
        self.node = node
        self.reactor = reactor
        self.name = name
        self.queue: deque[Notice] = deque()
        self.sent = 0  # notices a receiver took
        self.dropped = 0  # notices lost: queue overflow, or a batch out of retries
        self._cancelled = 0  # cancelled notices still in ``queue`` (skipped when sent)
        self._serials = serials if serials is not None else SERIALS
        self._sending = False
        self._poster = post
        self._agent = Agent(reactor, connectTimeout=config.timeout)

    @property
    def waiting(self) -> int:
        """Notices waiting to be sent (cancelled ones not counted)."""
        return len(self.queue) - self._cancelled

    def push(self, fields: dict[str, object]) -> Notice:
        """Queue a notice (``serial`` and ``time`` are added); returns at once."""
        fields["serial"] = next(self._serials)
        fields["time"] = self.reactor.seconds()
        notice = Notice(fields)
        queue = self.queue
        queue.append(notice)
        while len(queue) - self._cancelled > self.config.max_queue:
            old = queue.popleft()
            old.waiting = False
            if old.cancelled:
                self._cancelled -= 1
                continue
            self.dropped += 1
            if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                self.log.warn("{name} queue full: {n} notices dropped", name=self.name,
                              n=self.dropped)  # fmt: skip
        if not self._sending:
            self._sending = True
            self.reactor.callLater(0, self._send_next)
        return notice

    def cancel(self, notice: Notice) -> bool:
        """Withdraw a notice that is still waiting; False if it has left (being sent,
        sent, or dropped) or was cancelled already."""
        if not notice.waiting or notice.cancelled:
            return False
        notice.cancelled = True
        self._cancelled += 1
        return True

    def _take(self) -> list[Notice]:
        """The next batch: up to ``batch`` waiting notices, cancelled ones left out."""
        queue, size = self.queue, self.config.batch
        batch: list[Notice] = []
        while queue and len(batch) < size:
            notice = queue.popleft()
            notice.waiting = False
            if notice.cancelled:
                self._cancelled -= 1
            else:
                batch.append(notice)
        return batch

    @defer.inlineCallbacks
    def _send_next(self) -> Generator[defer.Deferred[Any], Any, None]:
        try:
            while self.queue:
                # Out of the queue while in flight: an overflow drops only waiting
                # notices, and later notices never overtake this batch.
                batch = self._take()
                if not batch:
                    continue
                events = [notice.fields for notice in batch]
                body = json.dumps({"node": self.node, "events": events}).encode()
                ok = False
                for attempt in range(self.config.retries):
                    if attempt:
                        delay = self.config.backoff * 2 ** (attempt - 1)
                        yield task.deferLater(self.reactor, delay)
                    ok = yield self._post(body)
                    if ok:
                        break
                if ok:
                    self.sent += len(batch)
                else:
                    self.dropped += len(batch)
                    self.log.warn(
                        "{name} webhook {url}: no 2xx answer in {tries} attempts (unreachable, "
                        "an error or a redirect, which is not followed); dropped {n} notices",
                        name=self.name, url=self.config.url, tries=self.config.retries,
                        n=len(batch),
                    )  # fmt: skip
        finally:
            self._sending = False

    def _post(self, body: bytes) -> defer.Deferred[bool]:
        """POST one batch; fires True on a 2xx answer, False on anything else (never an
        error). The time-out covers the whole exchange, body included, and ends it: the
        request is cancelled, or the answer's connection closed, so a stalled or endless
        answer neither wedges the queue nor holds a socket or memory past it."""
        if self._poster is not None:
            posted = self._poster(body)
            posted.addTimeout(self.config.timeout, self.reactor)
            posted.addErrback(self._failed)
            return posted
        result: defer.Deferred[bool] = defer.Deferred()
        answer: list[_Answer] = []  # the body reader, once the answer's head came

        def finish(ok: bool) -> None:
            if not result.called:
                if timer.active():
                    timer.cancel()
                result.callback(ok)

        def timed_out() -> None:
            finish(False)
            if answer:
                answer[0].stop()
            else:
                request.cancel()  # no head yet: Agent aborts the connection

        def got(response: IResponse) -> None:
            reader = _Answer()
            answer.append(reader)
            response.deliverBody(reader)
            if result.called:  # (the head came as the attempt timed out)
                reader.stop()
            reader.done.addCallback(lambda _: finish(200 <= response.code < 300))

        def failed(failure: Failure) -> None:
            self._failed(failure)
            finish(False)

        timer = self.reactor.callLater(self.config.timeout, timed_out)
        headers = Headers({b"content-type": [b"application/json"],
                           SIGNATURE_HEADER: [sign(self.secret, body).encode()]})  # fmt: skip
        # maybeDeferred: the agent may raise at once (e.g. https:// without TLS support),
        # which must count as a failed attempt, not end the send loop.
        request = defer.maybeDeferred(self._agent.request, b"POST", self.config.url.encode(),
                                      headers, FileBodyProducer(BytesIO(body)))  # fmt: skip
        request.addCallbacks(got, failed)
        return result

    def _failed(self, failure: Failure) -> bool:
        self.log.debug("{name} POST failed: {f}", name=self.name, f=failure)
        return False
