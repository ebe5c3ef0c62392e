"""Browser connection limits (sans-I/O): how many at once, how fast, held polls, slow readers.

One ``BrowserLimits`` per node, shared by every browser transport. A transport calls
``check`` before it does any work for a new request (it raises ``Overloaded``, which the
transport answers with HTTP 503 + ``Retry-After`` or WebSocket close 4503), ``opened``
once it holds a connection and ``closed`` when that ends. The counters are what
/orbited/health shows under ``limits``. See docs/operations.md, "Limits".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from orbited.core.settings import FieldError, check_fields
from orbited.node.transports.common import BrowserRequestError
from orbited.runtime.web import HeadLimits


class Overloaded(BrowserRequestError):
    """503 ``overloaded``: the node is at a limit; try again after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(503, "overloaded", message)
        self.retry_after = max(1, math.ceil(retry_after))


MIN_WRITE_QUEUE = 64 * 1024  # a smaller queue would close browsers that merely resume


@dataclass(frozen=True)
class BrowserLimitsConfig:
    max_connections: int = 15_000  # WebSockets + SSE/iframe streams + open polls
    connect_rate: float = 2000.0  # new browser connections per second, sustained (0 = off)
    connect_burst: int = 10_000  # ... and at once
    max_pending_polls: int = 10_000  # held long-polls
    max_write_queue: int = 1024 * 1024  # unsent bytes per streaming connection
    # What the node reads from a browser (docs/protocol.md, "Errors (browser side)"):
    max_client_message: int = 4096  # bytes per WebSocket message (acks are ~25); close 1009
    max_request_line: int = HeadLimits.max_request_line  # then 414
    max_header_bytes: int = HeadLimits.max_header_bytes  # then 431
    max_headers: int = HeadLimits.max_headers  # then 431
    # A request body on the browser port (only an ack may carry one: a form of its query's
    # fields); then 413. The publish_http port reads up to sp_max_message instead.
    max_request_body: int = 4096

    def __post_init__(self) -> None:
        check_fields(
            self,
            positive=("max_connections", "connect_burst", "max_pending_polls", "max_write_queue",
                      "max_client_message", "max_request_line", "max_header_bytes", "max_headers",
                      "max_request_body"),
            nonnegative=("connect_rate",),
        )  # fmt: skip
        if self.max_write_queue < MIN_WRITE_QUEUE:
            raise FieldError(type(self), "max_write_queue", f"must be at least {MIN_WRITE_QUEUE}")


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; one per new connection."""

    def __init__(self, rate: float, burst: int, clock: IReactorTime) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.clock = clock
        self.tokens = float(burst)
        self.stamp = clock.seconds()

    def _refill(self) -> None:
        now = self.clock.seconds()
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self) -> bool:
        if self.rate <= 0:
            return True
        self._refill()
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def wait(self) -> float:
        """Seconds until the next token."""
        if self.rate <= 0:
            return 0.0
        self._refill()
        return max(0.0, (1 - self.tokens) / self.rate)


class BrowserLimits:
    def __init__(self, config: BrowserLimitsConfig, clock: IReactorTime) -> None:
        self.config = config
        self.bucket = TokenBucket(config.connect_rate, config.connect_burst, clock)
        self.connections = 0
        self.pending_polls = 0
        self.peak_connections = 0
        self.stats = {
            "refused_connections": 0,  # max_connections
            "refused_rate": 0,  # connect_rate
            "refused_polls": 0,  # max_pending_polls
            "slow_closes": 0,  # max_write_queue
        }

    def check(self, poll: bool = False, new: bool = True) -> None:
        """May a new browser request go on? Raises Overloaded if not. A poll that goes on
        from a position (``new`` False) takes no connect_rate token and is not refused by
        max_connections: a session's polls follow each other as fast as events come, are
        not a connect storm, and between two of them the session holds no connection, so
        a node full of WebSockets would lock it out (max_pending_polls bounds them)."""
        config = self.config
        if new and self.connections >= config.max_connections:
            self.stats["refused_connections"] += 1
            raise Overloaded(f"node at max_connections ({config.max_connections})", 5)
        if poll and self.pending_polls >= config.max_pending_polls:
            self.stats["refused_polls"] += 1
            raise Overloaded(f"node at max_pending_polls ({config.max_pending_polls})", 5)
        if new and not self.bucket.take():
            self.stats["refused_rate"] += 1
            raise Overloaded("node over connect_rate", self.bucket.wait())

    def opened(self, poll: bool = False) -> None:
        self.connections += 1
        if self.connections > self.peak_connections:
            self.peak_connections = self.connections
        if poll:
            self.pending_polls += 1

    def closed(self, poll: bool = False) -> None:
        self.connections -= 1
        if poll:
            self.pending_polls -= 1

    def slow(self) -> None:
        self.stats["slow_closes"] += 1

    def snapshot(self) -> dict[str, int]:
        return {
            "connections": self.connections,
            "peak_connections": self.peak_connections,
            "pending_polls": self.pending_polls,
            **self.stats,
        }


class QueueWatch:
    """Decides when one streaming connection's browser is too slow (``max_write_queue``).

    Bytes written in one reactor turn sit in the transport until the reactor next writes,
    so a fast browser may briefly show a large queue (a resume's replay, a burst): only a
    queue still over ``max_bytes`` ``GRACE`` seconds later, or over ``HARD`` times it at
    once (not counting the first write, the resume's replay, which mailbox_bytes bounds),
    makes ``on_slow`` run, once. ``measure`` returns the unsent bytes (None: unknown).

    Slotted, with ``measure``/``on_slow`` as methods: a sink subclasses it and is its own
    watch (no closures per connection); ``WriteQueueWatch`` takes them as callables.
    """

    __slots__ = ("first", "fired", "_call")
    GRACE = 1.0
    HARD = 4
    max_bytes: int
    clock: IReactorTime

    def __init__(self) -> None:
        self.first = True
        self.fired = False
        self._call: IDelayedCall | None = None

    def measure(self) -> int | None:
        raise NotImplementedError

    def on_slow(self, unsent: int) -> None:
        raise NotImplementedError

    def wrote(self) -> bool:
        """Call after each write; True if the connection was found slow (now closing)."""
        first, self.first = self.first, False
        if self.fired:
            return True
        unsent = self.measure()
        max_bytes = self.max_bytes
        if unsent is None or unsent <= max_bytes:
            return False
        if unsent > self.HARD * max_bytes and not first:
            self._fire(unsent)
            return True
        if self._call is None:
            self._call = self.clock.callLater(self.GRACE, self._recheck)
        return False

    def _recheck(self) -> None:
        self._call = None
        unsent = self.measure()
        if not self.fired and unsent is not None and unsent > self.max_bytes:
            self._fire(unsent)

    def _fire(self, unsent: int) -> None:
        self.stop()
        self.fired = True
        self.on_slow(unsent)

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


class WriteQueueWatch(QueueWatch):
    """A QueueWatch over callables (the twisted.web transports)."""

    def __init__(
        self,
        max_bytes: int,
        clock: IReactorTime,
        measure: Callable[[], int | None],
        on_slow: Callable[[int], None],
    ) -> None:
        super().__init__()
        self.max_bytes = max_bytes
        self.clock = clock
        self.measure = measure  # type: ignore[method-assign]
        self.on_slow = on_slow  # type: ignore[method-assign,assignment]
