"""Per-connection mailboxes (sans-I/O): sequence numbers, the resume buffer, limits.

Every event for a connection key gets the next sequence number of that key's mailbox.
The mailbox keeps recent events until the browser acknowledges them (or the limits evict
them) so a reconnecting browser resumes from its last seen position with no gap and no
duplicate. Each mailbox has a *stream* id, unique per node epoch and mailbox incarnation,
so a position from a lost mailbox can never be mistaken for one in a new mailbox.
See docs/protocol.md, "Mailboxes and resume".
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

from orbited.core.settings import check_fields

# \Z, not $: "$" also matches before a final newline, so "s.1:5\n" would pass.
_POSITION = re.compile(r"^([A-Za-z0-9_-]{1,64}\.[0-9a-z]{1,16}):([0-9]{1,15})\Z")


class PositionError(ValueError):
    pass


class Position(NamedTuple):
    """Where a browser is: the last sequence number it saw in a stream."""

    stream: str
    seq: int

    @classmethod
    def parse(cls, text: str) -> Position:
        match = _POSITION.match(text)
        if match is None:
            raise PositionError("position must look like <stream>:<seq>, e.g. aZ3x_Q.1f:42")
        stream, seq = match.groups()
        # (tuple.__new__: the NamedTuple's own __new__ is a Python call; every long-poll
        # and every resuming accept parses one)
        return tuple.__new__(cls, (stream, int(seq)))

    def __str__(self) -> str:
        return f"{self.stream}:{self.seq}"


@dataclass(frozen=True)
class MailboxLimits:
    max_events: int = 1000  # buffered events per key
    max_bytes: int = 1024 * 1024  # buffered payload bytes per key

    def __post_init__(self) -> None:
        check_fields(self, positive=("max_events", "max_bytes"))


_new = tuple.__new__


class Appended(NamedTuple):
    seq: int
    dropped: int  # undelivered events evicted to make room for this one
    replaced: int = 0  # latest-value: events of its tag this one superseded (cumulative)
    superseded: int | None = None  # the seq this one replaced in the mailbox, if any


# One buffered event: (seq, payload, id). ``id`` is the event request's id as encoded JSON
# (b'"evt-1"'), one bytes object per request shared by all its recipients' mailboxes, or
# None for an event without one (handed over by a node of the previous version).
Entry = tuple[int, bytes, bytes | None]

# A buffered latest-value event's tag: (seq, tag, replaced). ``tag`` is the request's
# ``latest`` as encoded JSON (like ids); ``replaced`` counts the events it superseded.
TagEntry = tuple[int, bytes, int]


def _seq(entry: Entry) -> int:
    return entry[0]


class Replay(NamedTuple):
    events: list[Entry]
    gap: tuple[int, int] | None  # first and last seq the browser can no longer get
    reset: bool  # the browser's stream is gone: everything before this stream is unknown
    since: int  # the events follow this seq (what the browser has, or was acknowledged)


class Mailbox:
    """One key's ordered event buffer. Payloads and ids are encoded JSON bytes, stored as
    given (not copied: a broadcast's recipients share them)."""

    __slots__ = (
        "stream", "limits", "next_seq", "acked", "delivered", "evicted", "_events", "_bytes",
        "_tags", "_tag_of",
    )  # fmt: skip

    def __init__(self, stream: str, limits: MailboxLimits) -> None:
        self.stream = stream
        self.limits = limits
        self.next_seq = 1
        self.acked = 0  # highest seq the browser confirmed it has
        self.delivered = 0  # highest seq written to a transport
        # Highest seq the limits removed (not an acknowledged or a replaced one): a
        # browser resuming before it has a gap (docs/protocol.md, "Mailboxes and resume").
        self.evicted = 0
        # No buffer until the first event, and none again once everything is acknowledged:
        # an empty deque is 760 bytes, most of an idle connection's mailbox (issue 20).
        self._events: deque[Entry] | tuple[()] = ()
        self._bytes = 0
        # Latest-value events (docs/protocol.md, "Latest-value events"), None until the
        # first: tag -> (seq of its buffered event, replaced count); seq -> tag.
        self._tags: dict[bytes, tuple[int, int]] | None = None
        self._tag_of: dict[int, bytes] | None = None

    @classmethod
    def restored(
        cls, stream: str, limits: MailboxLimits, next_seq: int, acked: int,
        events: list[Entry], evicted: int | None = None, tags: list[TagEntry] | tuple[()] = (),
    ) -> Mailbox:  # fmt: skip
        """A mailbox handed over by another node (a planned route move): same stream and
        sequence numbers, so a browser's position stays valid. Events beyond this node's
        limits are evicted oldest first, as append would. ``evicted``: the old owner's
        (None from a node without it: every seq before the first event counts as
        evicted, so a resume there reports a gap). ``tags``: the latest-value tags of
        ``events`` (``export_tags``)."""
        mailbox = cls(stream, limits)
        mailbox.next_seq = next_seq
        mailbox.acked = mailbox.delivered = min(acked, next_seq - 1)
        kept = [event for event in events if acked < event[0] < next_seq]
        kept.sort(key=_seq)
        if evicted is None:
            evicted = (kept[0][0] if kept else next_seq) - 1
        size = sum(len(event[1]) for event in kept)
        while kept and (len(kept) > limits.max_events or size > limits.max_bytes):
            old = kept.pop(0)
            size -= len(old[1])
            evicted = max(evicted, old[0])
        mailbox.evicted = min(evicted, next_seq - 1)
        if kept:
            mailbox._events = deque(kept)
            present = {event[0] for event in kept}
            for seq, tag, replaced in tags:
                if seq in present:
                    mailbox._set_tag(tag, seq, replaced)
        mailbox._bytes = size
        return mailbox

    def export(self) -> list[Entry]:
        """The buffered events not yet acknowledged, oldest first (for a hand-over)."""
        return [event for event in self._events if event[0] > self.acked]

    def export_tags(self) -> list[TagEntry]:
        """The latest-value tags of ``export()``'s events: (seq, tag, replaced)."""
        tag_of, tags = self._tag_of, self._tags
        if not tag_of or tags is None:
            return []
        return sorted((seq, tag, tags[tag][1]) for seq, tag in tag_of.items() if seq > self.acked)

    @property
    def tagged(self) -> bool:
        """Does the buffer hold a latest-value event (then frames need ``tag``)?"""
        return self._tag_of is not None

    def tag(self, seq: int) -> tuple[bytes, int] | None:
        """A buffered event's latest-value tag and replaced count; None if untagged."""
        tag_of = self._tag_of
        if tag_of is None:
            return None
        tag = tag_of.get(seq)
        if tag is None:
            return None
        assert self._tags is not None
        return tag, self._tags[tag][1]

    def _set_tag(self, tag: bytes, seq: int, replaced: int) -> None:
        if self._tags is None or self._tag_of is None:
            self._tags, self._tag_of = {}, {}
        self._tags[tag] = (seq, replaced)
        self._tag_of[seq] = tag

    def _untag(self, seq: int) -> None:
        """``seq`` left the buffer (acknowledged, evicted): forget its tag."""
        tag_of, tags = self._tag_of, self._tags
        if tag_of is None or tags is None:
            return
        tag = tag_of.pop(seq, None)
        if tag is not None and tags.get(tag, (0, 0))[0] == seq:
            del tags[tag]
        if not tag_of:
            self._tags = self._tag_of = None

    def __len__(self) -> int:
        return len(self._events)

    @property
    def buffered_bytes(self) -> int:
        return self._bytes

    @property
    def last_seq(self) -> int:
        return self.next_seq - 1

    def append(
        self, payload: bytes, event_id: bytes | None = None, tag: bytes | None = None
    ) -> Appended:
        """``event_id``: the request's id, encoded JSON (frames.event_id). ``tag``: a
        latest-value event's tag (encoded JSON too): the unacknowledged event of the same
        tag still buffered, if any, is removed (``superseded``); the new one gets the next
        seq as always."""
        if len(payload) > self.limits.max_bytes:
            raise ValueError("payload larger than the mailbox byte limit")
        seq = self.next_seq
        self.next_seq += 1
        events = self._events
        if not isinstance(events, deque):  # (): no buffer yet
            events = self._events = deque()
        replaced = 0
        superseded = None
        if tag is not None:
            old = None if self._tags is None else self._tags.get(tag)
            if old is not None and old[0] > self.acked:
                superseded = old[0]
                replaced = old[1] + 1
                at = bisect_left(events, superseded, key=_seq)
                if at < len(events) and events[at][0] == superseded:
                    self._bytes -= len(events[at][1])
                    del events[at]
                self._untag(superseded)
            self._set_tag(tag, seq, replaced)
        events.append((seq, payload, event_id))
        self._bytes += len(payload)
        dropped = 0
        limits = self.limits
        while len(events) > limits.max_events or self._bytes > limits.max_bytes:
            old_seq, old_payload, _ = events.popleft()
            self._bytes -= len(old_payload)
            self.evicted = old_seq
            if self._tag_of is not None:
                self._untag(old_seq)
            if old_seq > self.delivered:
                dropped += 1
        # (tuple.__new__: a NamedTuple's own __new__ is a Python call)
        return _new(Appended, (seq, dropped, replaced, superseded))

    def push(self, payload: bytes, event_id: bytes | None) -> int:
        """``append`` of an untagged event that evicts nothing: its seq, or 0 (and nothing
        changed) when the limits would evict an event for it, then ``append`` decides.
        The hub's per-recipient fast path: no result tuple to build."""
        events = self._events
        size = self._bytes + len(payload)
        limits = self.limits
        if size > limits.max_bytes:
            return 0
        if type(events) is not deque:  # (): no buffer yet
            events = self._events = deque()
        elif len(events) >= limits.max_events:
            return 0
        seq = self.next_seq
        self.next_seq = seq + 1
        events.append((seq, payload, event_id))
        self._bytes = size
        return seq

    def mark_delivered(self, seq: int) -> None:
        if seq > self.delivered:
            self.delivered = seq

    def ack(self, seq: int) -> None:
        """The browser has everything up to ``seq``: those events need not be kept."""
        last = self.next_seq - 1  # (last_seq and min(): two calls per long-poll)
        if seq > last:
            seq = last
        if seq <= self.acked:
            return
        self.acked = seq
        events = self._events
        if type(events) is not deque:  # (): nothing buffered
            return
        tagged = self._tag_of is not None
        while events and events[0][0] <= seq:
            old_seq, old, _ = events.popleft()
            self._bytes -= len(old)
            if tagged:
                self._untag(old_seq)
        if not events:
            self._events = ()  # free the buffer while the browser is idle

    def replay(self, after: Position | None) -> Replay:
        """Events a browser resuming from ``after`` has not seen, oldest first.

        ``after`` None is a fresh connection: it gets what was never acknowledged.
        A position in another stream (node restarted, mailbox expired) or beyond what this
        stream has sent is a reset: the browser gets everything still buffered.
        """
        reset = False
        if after is None:
            since = self.acked
        else:
            stream, since = after
            if stream != self.stream or since >= self.next_seq:
                reset = True
                since = 0
            elif since > self.acked:
                self.ack(since)
        # Seqs the limits evicted, or acknowledged ones a reset browser never saw, are a
        # gap; seqs replaced by a later latest-value event are not (the event that
        # replaced them follows, with its tag).
        evicted, acked = self.evicted, self.acked
        gap_end = evicted if evicted > acked else acked
        gap = (since + 1, gap_end) if since < gap_end else None
        # (Every attach replays: no comprehension for an empty buffer, and
        # tuple.__new__, not the NamedTuple's own __new__, a Python call.)
        buffered = self._events
        events = [e for e in buffered if e[0] > since] if buffered else []
        return _new(Replay, (events, gap, reset, since))
