"""The delivery batch: frames for one browser connection coalesced per reactor turn
(sans-I/O; issue 20).

The SP REP server (orbited.node.rep) opens a batch around the requests of one read
(``with hub.batch():``, orbited.node.hub); while it is open, a sink that supports
batching keeps the bytes of its frames and *enlists* itself once; when the outermost
batch ends, every enlisted sink is flushed once, in the order they enlisted: one write
(one ``send`` system call, write-through) per connection however many events it got in
that read. Outside a batch (a browser's attach and its replay, keepalive pings, a
hand-off, an ack releasing a wait) nothing is deferred: sinks write at once. A
wildcard's keys (``["alice", "*", "*"]``) are ordinary deliveries: each of a user's tabs
enlists once and is flushed once per read, however many user events the read held.

The batch ends before the REP server's read handler returns, so before the reactor runs
anything else: no timer, no ``callLater(0)``, no other connection's read can come
between a delivery and its flush.

The Sink contract (orbited.node.hub.Sink), for transports:

- ``deliver(frames) -> bool``: True means the frames are the transport's now: written
  to it, or (inside a batch) kept by the sink and enlisted, to be written when the batch
  ends. The hub then counts the events as delivered (``Mailbox.mark_delivered``; they
  stay in the mailbox until the browser acknowledges them, so a connection lost between
  enlisting and flushing loses nothing: the browser resumes from its position). False:
  the sink cannot take them (closed, closing, found slow); they wait in the mailbox.
- A sink that batches: in ``deliver``, ``if hub.enlist(self):`` keep the encoded bytes
  (append to a pending list; call ``enlist`` only when that list goes from empty to
  non-empty: a sink is enlisted at most once per batch) and return True unless the
  connection is already known slow; else write now (``write_through``, or
  ``writev_through``, from orbited.runtime.twisted_compat). ``flush()`` (the batch's
  call) writes the pending bytes in one write-through and empties the list; it must
  cope with a connection that closed since it enlisted (drop the bytes: see above) and
  must not raise (an exception is logged, and the other sinks are still flushed).
- Slow consumers (``WriteQueueWatch``, ``max_write_queue``): call ``watch.wrote()``
  after each real write, i.e. in ``flush()`` for batched bytes and in ``deliver`` for
  bytes written at once, not per frame kept; inside a batch ``deliver`` returns
  ``not watch.fired``. A connection found slow in ``flush()`` is closed as today
  (4002 / cut); its events are in its mailbox.
- ``last_write`` (keepalive pings): set it from ``hub.now()``, the clock read once per
  batch, not from ``hub.clock.seconds()`` per delivery.
- A sink that does not batch (never calls ``enlist``) keeps working unchanged: it writes
  in ``deliver`` as before.

``DeliveryBatch`` is plain state: the hub owns one, tests drive it with fake sinks.
"""

from __future__ import annotations

from typing import Protocol

from twisted.logger import Logger

__all__ = ["DeliveryBatch", "Flushable"]


class Flushable(Protocol):
    """What a batch flushes: a sink with bytes pending (see the module docstring)."""

    def flush(self) -> None:
        """Write the pending bytes (one write) and forget them; never raise."""


class DeliveryBatch:
    """Nestable: only the outermost ``end`` flushes. ``now``: the time the outermost
    batch began (one clock read for all the requests of a read)."""

    __slots__ = ("_depth", "_pending", "now")
    log = Logger()

    def __init__(self) -> None:
        self._depth = 0
        self._pending: list[Flushable] = []
        self.now = 0.0

    @property
    def open(self) -> bool:
        return self._depth > 0

    def begin(self, now: float) -> bool:
        """Open (or nest) a batch; True if this is the outermost one."""
        self._depth += 1
        if self._depth == 1:
            self.now = now
            return True
        return False

    def enlist(self, sink: Flushable) -> bool:
        """Inside a batch: remember ``sink`` for the flush and return True (the sink keeps
        its bytes). Outside: False (the sink writes now)."""
        if not self._depth:
            return False
        self._pending.append(sink)
        return True

    def end(self) -> None:
        """Close a batch; the outermost flushes every enlisted sink once, in order. A sink
        enlisting while the flush runs is outside any batch and writes at once."""
        self._depth -= 1
        if self._depth:
            return
        pending = self._pending
        if not pending:
            return
        self._pending = []
        for sink in pending:
            try:
                sink.flush()
            except Exception:
                self.log.failure("flushing a browser connection failed")
