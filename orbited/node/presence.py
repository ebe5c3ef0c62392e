"""Presence webhooks: tell the web app when a key comes online and when it is gone for good.

A key *signs on* when the node creates its mailbox (first connection) and *signs off* when
the mailbox expires after the linger time, so a transport reconnect within the linger
time causes no signoff/signon flap. Notices queue in order (bounded) and are POSTed as
signed JSON batches, one request at a time, with retries; dispatch never waits for them.
See docs/protocol.md, "Presence webhooks".
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections import deque
from collections.abc import Generator
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from orbited.core.keys import ConnectionKey
from orbited.core.settings import check_fields

SIGNATURE_HEADER = b"x-orbited-signature"


def sign(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class PresenceConfig:
    url: str
    max_queue: int = 10_000  # notices waiting; beyond it the oldest are dropped (and logged)
    batch: int = 100  # notices per POST
    timeout: float = 5.0
    retries: int = 5  # attempts per batch before it is dropped (and logged)
    backoff: float = 0.5

    def __post_init__(self) -> None:
        check_fields(self, positive=("max_queue", "batch", "timeout", "retries", "backoff"))


def _read_ok(response: IResponse) -> defer.Deferred[bool]:
    """Read the whole answer (so the connection can be reused), then: was it a 2xx?"""
    return readBody(response).addCallback(lambda _: 200 <= response.code < 300)


class PresenceNotifier:
    log = Logger()

    def __init__(
        self, config: PresenceConfig, secret: bytes, node: str, reactor: IReactorTime
    ) -> None:
        self.config = config
        self.secret = secret
        self.node = node
        self.reactor = reactor
        self.queue: deque[dict[str, object]] = deque()
        self.sent = 0
        self.dropped = 0
        self._serial = 0
        self._sending = False
        self._agent = Agent(reactor, connectTimeout=config.timeout)

    def notify(self, kind: str, key: ConnectionKey) -> None:
        """Queue a signon/signoff notice; returns at once."""
        self._serial += 1
        self.queue.append({"type": kind, "key": key.to_json(), "serial": self._serial,
                           "time": self.reactor.seconds()})  # fmt: skip
        if len(self.queue) > self.config.max_queue:
            self.queue.popleft()
            self.dropped += 1
            if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                self.log.warn("presence queue full: {n} notices dropped", n=self.dropped)
        if not self._sending:
            self._sending = True
            self.reactor.callLater(0, self._send_next)

    @defer.inlineCallbacks
    def _send_next(self) -> Generator[defer.Deferred[Any], Any, None]:
        while self.queue:
            # Out of the queue while in flight: an overflow drops only waiting notices,
            # and later notices never overtake this batch.
            batch = [self.queue.popleft() for _ in range(min(self.config.batch, len(self.queue)))]
            body = json.dumps({"node": self.node, "events": batch}).encode()
            ok = False
            for attempt in range(self.config.retries):
                if attempt:
                    yield task.deferLater(self.reactor, self.config.backoff * 2 ** (attempt - 1))
                ok = yield self._post(body)
                if ok:
                    break
            if ok:
                self.sent += len(batch)
            else:
                self.dropped += len(batch)
                self.log.warn("presence webhook {url} unreachable; dropped {n} notices",
                              url=self.config.url, n=len(batch))  # fmt: skip
        self._sending = False

    def _post(self, body: bytes) -> defer.Deferred[bool]:
        """POST one batch; fires True on a 2xx answer, False on anything else. The time-out
        covers the whole exchange, body included, so a stalled receiver cannot wedge us."""
        headers = Headers({b"content-type": [b"application/json"],
                           SIGNATURE_HEADER: [sign(self.secret, body).encode()]})  # fmt: skip
        request = self._agent.request(b"POST", self.config.url.encode(), headers,
                                      FileBodyProducer(BytesIO(body)))  # fmt: skip
        answered: defer.Deferred[bool] = request.addCallback(_read_ok)
        answered.addTimeout(self.config.timeout, self.reactor)
        answered.addErrback(self._failed)
        return answered

    def _failed(self, failure: Failure) -> bool:
        self.log.debug("presence POST failed: {f}", f=failure)
        return False
