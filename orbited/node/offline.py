"""The offline hook (sans-I/O): tell the web app an event needs a push, and when it no
longer does.

A request with ``offline`` asks the node to watch its event for each recipient *as
addressed* (an exact key, or a user/session selector). The recipient's watch sends a
``needs_push`` notice (orbited.node.webhook queues and POSTs it):

- ``no_connection``: at once, when the recipient has no connection here;
- ``unacked``: when no key the event reached has acknowledged it ``after`` seconds later;
- ``expired``: when every mailbox holding it expired unacknowledged before that.

A ``cancel`` follows a ``needs_push`` (``no_connection`` or ``unacked``) when a key
acknowledges the event later. A cancel whose ``needs_push`` is still waiting in the queue
withdraws it: neither is sent. There is at most one watch per (recipient, event id) at a
time, and at most ``limit`` watches (the oldest dropped, logged). One timer, armed at the
earliest deadline, serves every watch; the hub calls the methods below (``hub.offline``).
See docs/protocol.md, "Offline webhooks".
"""

from __future__ import annotations

import heapq
import json
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from orbited.core.keys import ConnectionKey, KeyError_, Recipient, Selector, parse_recipient
from orbited.core.settings import check_fields
from orbited.node.webhook import Notice, WebhookConfig

__all__ = ["OfflineConfig", "OfflineWatcher", "Watch", "WatchExport"]

STATS = (
    "offline_push",  # needs_push notices queued
    "offline_cancel",  # cancel notices queued
    "offline_withdrawn",  # needs_push withdrawn unsent: a cancel came while it waited
    "offline_watches_dropped",  # watches dropped by the limit (offline_watches)
)

Reason = Literal["no_connection", "unacked", "expired"]
State = Literal["waiting", "pushed", "done"]
KeySeq = tuple[ConnectionKey, int]  # a key and the seq the event has in its mailbox


@dataclass(frozen=True)
class OfflineConfig(WebhookConfig):
    """The offline webhook (the node keys offline_*): the queue's settings and the
    watches kept at most."""

    watches: int = 100_000  # watches at once; beyond it the oldest are dropped (and logged)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fields(self, positive=("watches",))


class NoticeQueue(Protocol):
    """What the watcher needs of orbited.node.webhook.WebhookQueue."""

    def push(self, fields: dict[str, object]) -> Notice: ...

    def cancel(self, notice: Notice) -> bool: ...


@dataclass(slots=True, eq=False)
class Watch:
    """One (recipient, event): where the event sits and what has been said about it."""

    target: Recipient
    eid: bytes  # the event id as encoded JSON, shared with the mailboxes (frames.event_id)
    due: float  # clock time of the unacked notice (while waiting)
    after: float  # the seconds asked for (a watch moved to a newer event keeps them)
    keys: list[KeySeq]  # the mailboxes holding the event, unacknowledged
    stream: str | None = None  # an exact key's mailbox stream (the notice carries it)
    held: bool = False  # a user hold's watch: keys come later (add_key), it ends by dropped()
    notice: Notice | None = None  # the needs_push, once queued (a cancel may withdraw it)
    reason: Reason | None = None  # the needs_push's reason, once pushed
    state: State = "waiting"


@dataclass(frozen=True)
class WatchExport:
    """A watch as it travels with a hand-off: ``left`` seconds until its unacked notice,
    or None when the needs_push was already sent (the new owner sends the cancel)."""

    target: Recipient
    eid: bytes
    left: float | None
    keys: tuple[KeySeq, ...] = ()
    stream: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return {
            "target": self.target.to_json(),
            "id": json.loads(self.eid),
            "left": self.left,
            "keys": [[key.to_json(), seq] for key, seq in self.keys],
            "stream": self.stream,
        }

    @classmethod
    def from_wire(cls, entry: object) -> WatchExport:
        """Raises ValueError on anything but the form ``to_wire`` writes."""
        if not isinstance(entry, dict) or not {"target", "id", "left"} <= entry.keys():
            raise ValueError("a watch is an object with target, id and left")
        try:
            target = parse_recipient(entry["target"])
        except KeyError_ as e:
            raise ValueError(f"watch target: {e}") from None
        event_id, left = entry["id"], entry["left"]
        if not isinstance(event_id, str) or not event_id:
            raise ValueError("watch id must be a non-empty string")
        if left is not None and (
            isinstance(left, bool) or not isinstance(left, int | float) or not left >= 0
        ):
            raise ValueError("watch left must be null or a number >= 0")
        keys = entry.get("keys", [])
        stream = entry.get("stream")
        if not isinstance(keys, list) or (stream is not None and not isinstance(stream, str)):
            raise ValueError("watch keys must be an array and stream a string or null")
        pairs = []
        for item in keys:
            if not isinstance(item, list) or len(item) != 2:
                raise ValueError("a watch key is [key, seq]")
            seq = item[1]
            if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
                raise ValueError("a watch seq must be a positive integer")
            try:
                pairs.append((ConnectionKey.from_json(item[0]), seq))
            except KeyError_ as e:
                raise ValueError(f"watch key: {e}") from None
        eid = json.dumps(event_id, separators=(",", ":"), ensure_ascii=False).encode()
        return cls(target, eid, None if left is None else float(left), tuple(pairs), stream)


class OfflineWatcher:
    """The watches of one node. ``queue`` takes the notices; ``clock`` is the hub's."""

    log = Logger()

    def __init__(
        self, queue: NoticeQueue, clock: IReactorTime, limit: int = 100_000,
        stats: dict[str, int] | None = None,
    ) -> None:  # fmt: skip
        """``stats``: the dict to count in (the hub's, so /orbited/health shows them)."""
        self.queue = queue
        self.clock = clock
        self.limit = limit
        # (target, eid) -> its watch, oldest first: at most one per pair, and the limit
        # drops from the front.
        self._by_target: dict[tuple[Recipient, bytes], Watch] = {}
        # key -> (seq, watch) in seq order (a mailbox's seqs only grow): an ack pops from
        # the front. Watches that ended through another key stay until popped (lazy).
        self._by_key: dict[ConnectionKey, deque[tuple[int, Watch]]] = {}
        self._heap: list[tuple[float, int, Watch]] = []  # deadlines; stale entries skipped
        self._made = 0  # heap tie-breaker
        self._waiting = 0
        self._timer: IDelayedCall | None = None
        self.stats = {} if stats is None else stats
        for name in STATS:
            self.stats.setdefault(name, 0)

    def __len__(self) -> int:
        return len(self._by_target)

    # -- what the hub calls ----------------------------------------------------------

    def watch(
        self, target: Recipient, eid: bytes, after: float, keys: Sequence[KeySeq],
        stream: str | None = None,
    ) -> Watch | None:  # fmt: skip
        """Watch an event stored for ``target`` at ``keys``: needs_push (unacked) if no
        key acknowledges it within ``after`` seconds. None if (target, eid) is watched
        already (a resend), or nothing was stored (then it is no_connection now)."""
        if (target, eid) in self._by_target:
            return None
        if not keys:
            return self.no_connection(target, eid, (), stream)
        due = self.clock.seconds() + after
        w = Watch(target, eid, due, after, list(keys), stream)
        self._add(w)
        self._schedule(w)
        return w

    def no_connection(
        self, target: Recipient, eid: bytes, keys: Sequence[KeySeq] = (),
        stream: str | None = None, held: bool = False,
    ) -> Watch | None:  # fmt: skip
        """needs_push (no_connection) now. The watch stays so that an ack at ``keys``
        (a mailbox kept for the event) sends the cancel; ``held``: the event waits in a
        user hold, so keys come later (``add_key``) and the watch stays until the hold
        ends (``dropped``). With neither, nothing is kept: the notice is all there is."""
        if (target, eid) in self._by_target:
            return None
        w = Watch(target, eid, 0.0, 0.0, list(keys), stream, held=held)
        self._add(w)
        self._push(w, "no_connection")
        if not keys and not held:
            self._end(w)
            return None
        return w

    def add_key(self, watch: Watch, key: ConnectionKey, seq: int) -> None:
        """A held event was appended to a new mailbox: an ack there now cancels."""
        if watch.state == "done":
            return
        watch.keys.append((key, seq))
        self._by_key.setdefault(key, deque()).append((seq, watch))

    def acked(self, key: ConnectionKey, seq_upto: int) -> None:
        """``key``'s browser has everything up to ``seq_upto``: its watches end (a cancel
        for those that were pushed)."""
        entries = self._by_key.get(key)
        if entries is None:
            return
        while entries and entries[0][0] <= seq_upto:
            _, w = entries.popleft()
            if w.state != "done":
                self._end(w, acked=True)
        if not entries:
            del self._by_key[key]

    def expired(self, key: ConnectionKey) -> None:
        """``key``'s mailbox is gone, its events unacknowledged. A watch whose last
        mailbox this was sends needs_push (expired) if it was still waiting; one already
        pushed ends (no cancel can come any more), unless a user hold still keeps it."""
        entries = self._by_key.pop(key, None)
        for seq, w in entries or ():
            if w.state == "done":
                continue
            w.keys = [pair for pair in w.keys if pair[0] != key]
            if w.keys or w.held:
                continue
            if w.state == "waiting":
                self._push(w, "expired", [(key, seq)])
            self._end(w)

    def moved(self, key: ConnectionKey, old_seq: int, new_seq: int, new_eid: bytes) -> None:
        """Latest-value: ``old_seq`` of ``key`` was replaced by ``new_seq`` (event
        ``new_eid``). A watch of the old event that sat only there follows the new one,
        so the web app hears of the newest value once: a waiting watch moves as it is;
        a pushed one sends cancel for the old id and watches the new. If the new event
        is watched for the same recipient already, the old watch just ends."""
        entries = self._by_key.get(key)
        if entries is None:
            return
        moving = [w for seq, w in entries if seq == old_seq and w.state != "done"]
        for w in moving:
            entries.remove((old_seq, w))
            w.keys = [pair for pair in w.keys if pair != (key, old_seq)]
            if w.keys:
                continue  # it still sits unacknowledged in another mailbox
            if (w.target, new_eid) in self._by_target:
                self._end(w, acked=True)
            elif w.state == "waiting":
                del self._by_target[(w.target, w.eid)]
                w.eid = new_eid
                w.keys = [(key, new_seq)]
                self._by_target[(w.target, new_eid)] = w
                entries.append((new_seq, w))
            else:  # pushed: cancel the old id, and the new one is what needs a push now
                self._end(w, acked=True)
                if w.reason == "no_connection":  # still no browser came for it
                    self.no_connection(w.target, new_eid, [(key, new_seq)], w.stream)
                else:
                    self.watch(w.target, new_eid, w.after, [(key, new_seq)], w.stream)
        if not entries:
            self._by_key.pop(key, None)

    def dropped(self, watch: Watch) -> None:
        """The user hold of ``watch`` ended. With no mailbox holding the event the watch
        ends without a notice; otherwise it goes on with those mailboxes (an ack there
        still cancels) and ends with them."""
        if watch.state == "done":
            return
        watch.held = False
        if not watch.keys:
            self._end(watch)

    def tick(self, now: float | None = None) -> None:
        """Send the unacked notices that are due, then re-arm the timer."""
        self._timer = None
        if now is None:
            now = self.clock.seconds()
        heap = self._heap
        while heap and heap[0][0] <= now:
            due, _, w = heapq.heappop(heap)
            if w.state == "waiting" and w.due == due:
                self._waiting -= 1
                self._push(w, "unacked")
        self._arm()

    def export(self, moving: Callable[[Recipient], bool]) -> list[WatchExport]:
        """The watches of the recipients ``moving`` selects (a hand-off), removed here."""
        now = self.clock.seconds()
        out = []
        for w in [w for w in self._by_target.values() if moving(w.target)]:
            left = max(0.0, w.due - now) if w.state == "waiting" else None
            out.append(WatchExport(w.target, w.eid, left, tuple(w.keys), w.stream))
            for key, seq in w.keys:
                entries = self._by_key.get(key)
                if entries is not None:
                    try:
                        entries.remove((seq, w))
                    except ValueError:
                        pass
                    if not entries:
                        del self._by_key[key]
            self._end(w)
        return out

    def restore(self, exported: Sequence[WatchExport]) -> list[Watch | None]:
        """Take over handed-over watches (None for a pair watched here already)."""
        restored: list[Watch | None] = []
        for e in exported:
            if (e.target, e.eid) in self._by_target:
                restored.append(None)
                continue
            keys = sorted(e.keys, key=lambda pair: pair[1])
            if e.left is None:
                w = Watch(e.target, e.eid, 0.0, 0.0, keys, e.stream, held=not keys)
                w.state = "pushed"
                self._add(w)
            else:
                w = Watch(e.target, e.eid, self.clock.seconds() + e.left, e.left, keys, e.stream)
                self._add(w)
                self._schedule(w)
            restored.append(w)
        return restored

    # -- inside --------------------------------------------------------------------------

    def _add(self, w: Watch) -> None:
        by_target = self._by_target
        by_target[(w.target, w.eid)] = w
        for key, seq in w.keys:
            entries = self._by_key.get(key)
            if entries is None:
                entries = self._by_key[key] = deque()
            if entries and entries[-1][0] > seq:  # (restored out of order: keep seq order)
                entries.append((seq, w))
                self._by_key[key] = deque(sorted(entries, key=lambda e: e[0]))
            else:
                entries.append((seq, w))
        while len(by_target) > self.limit:
            oldest = next(iter(by_target.values()))
            n = self.stats["offline_watches_dropped"] = self.stats["offline_watches_dropped"] + 1
            if n in (1, 10, 100) or n % 1000 == 0:
                self.log.warn("offline watches full ({limit}): {n} dropped",
                              limit=self.limit, n=n)  # fmt: skip
            self._end(oldest)

    def _schedule(self, w: Watch) -> None:
        self._waiting += 1
        self._made += 1
        heapq.heappush(self._compact(), (w.due, self._made, w))
        timer = self._timer
        if timer is None or not timer.active() or w.due < timer.getTime():
            self._arm()

    def _arm(self) -> None:
        """One timer, at the earliest waiting deadline (stale heap tops dropped first)."""
        heap = self._heap
        while heap and (heap[0][2].state != "waiting" or heap[0][2].due != heap[0][0]):
            heapq.heappop(heap)
        heap = self._compact()
        timer = self._timer
        if not heap:
            if timer is not None and timer.active():
                timer.cancel()
            self._timer = None
            return
        due = heap[0][0]
        if timer is not None and timer.active():
            if timer.getTime() <= due:
                return  # it fires first, and re-arms
            timer.cancel()
        self._timer = self.clock.callLater(max(0.0, due - self.clock.seconds()), self.tick)

    def _compact(self) -> list[tuple[float, int, Watch]]:
        """Drop the entries of watches that ended early once they outnumber the
        waiting ones (amortised: the heap stays within 2 x waiting + 64)."""
        heap = self._heap
        if len(heap) > 2 * self._waiting + 64:
            self._heap = heap = [e for e in heap if e[2].state == "waiting" and e[2].due == e[0]]
            heapq.heapify(heap)
        return heap

    def _end(self, w: Watch, acked: bool = False) -> None:
        """The watch is over. ``acked``: a key acknowledged the event, so a needs_push
        already queued is withdrawn, or a cancel follows the one sent."""
        if w.state == "waiting":
            self._waiting -= 1
        elif acked:  # pushed
            notice = w.notice
            if notice is not None and self.queue.cancel(notice):
                self.stats["offline_withdrawn"] += 1
            else:
                self.stats["offline_cancel"] += 1
                self.queue.push(self._fields("cancel", w))
        w.state = "done"
        w.notice = None
        if self._by_target.get((w.target, w.eid)) is w:
            del self._by_target[(w.target, w.eid)]

    def _push(self, w: Watch, reason: Reason, keys: Sequence[KeySeq] | None = None) -> None:
        fields = self._fields("needs_push", w)
        fields["reason"] = reason
        shown = w.keys if keys is None else keys
        if isinstance(w.target, Selector):
            fields["keys"] = [[key.to_json(), seq] for key, seq in shown]
        elif shown:
            fields["seq"] = shown[0][1]
            if w.stream is not None:
                fields["stream"] = w.stream
        w.notice = self.queue.push(fields)
        w.state = "pushed"
        w.reason = reason
        self.stats["offline_push"] += 1

    @staticmethod
    def _fields(kind: str, w: Watch) -> dict[str, object]:
        return {"type": kind, "key": w.target.to_json(), "id": json.loads(w.eid)}
