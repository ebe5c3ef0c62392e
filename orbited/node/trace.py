"""Per-key delivery tracing (sans-I/O): what became of each event for each key, in memory.

The hub (orbited.node.hub) calls a ``Tracer`` through the observer contract of
orbited.node.observe. For each traced key it keeps the last ``per_key`` dispatch records
(one per event request that named the key: its status, seq, write time and transport,
ack time, acknowledged-mode outcome, hand-off) and the last ``notes_per_key`` notes
(attach, detach, reset, gap, expired, moved, handed in, ...). At most ``keys`` keys are
traced: the least recently active one is forgotten, and so is one idle for ``keep``
seconds. Nothing of the payload is kept. ``query`` answers "did alice get event 42?"
(the node's ``GET /orbited/trace`` and HaloD's ``trace_query``; docs/operations.md,
"Tracing a delivery"). ``export`` / ``import_`` carry a key's trace in a hand-off, each
record keeping the node that made it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from orbited.core.keys import ConnectionKey, Selector
from orbited.core.settings import check_fields
from orbited.core.tracecontext import parse_traceparent

if TYPE_CHECKING:
    from orbited.node.events import DispatchResult, EventRequest, RecipientResult

__all__ = ["MODES", "Dispatch", "KeyTrace", "Note", "Record", "TraceConfig", "Tracer"]

Mode = Literal["off", "all", "users"]
MODES: tuple[Mode, ...] = ("off", "all", "users")
DEFAULT_MODE: Mode = "all"


@dataclass(frozen=True)
class TraceConfig:
    mode: Mode = DEFAULT_MODE
    per_key: int = 16  # dispatch records kept per key (a ring)
    notes_per_key: int = 16  # other happenings kept per key (a ring)
    keys: int = 10_000  # keys traced at most; the least recently active one is forgotten
    users: frozenset[str] = frozenset()  # mode "users": only these users' keys
    keep: float = 3600.0  # seconds a key's trace outlives its last activity

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"trace must be one of {', '.join(MODES)}")
        check_fields(self, positive=("per_key", "notes_per_key", "keys", "keep"))


class Dispatch:
    """One event request, shared by the records of its recipients."""

    __slots__ = ("t", "event", "request", "ack_wait", "trace_id", "recipients", "targets")

    def __init__(
        self, t: float, event: str, request: str, ack_wait: float | None,
        trace_id: str | None, recipients: int, targets: tuple[Any, ...] = (),
    ) -> None:  # fmt: skip
        self.t = t
        self.event = event
        self.request = request  # the request digest's first 8 bytes in hex: same for a resend
        self.ack_wait = ack_wait
        self.trace_id = trace_id
        self.recipients = recipients
        self.targets = targets  # the request's recipients (keys and wildcards), for answered


class Record:
    """What one request did for one key."""

    __slots__ = (
        "dispatch", "node", "route", "status", "seq", "stream", "dropped", "written",
        "transport", "rewritten", "acked", "outcome", "handed",
    )  # fmt: skip

    def __init__(
        self, dispatch: Dispatch, node: str, route: int | None, status: str, seq: int | None,
        stream: str | None, dropped: int,
    ) -> None:  # fmt: skip
        self.dispatch = dispatch
        self.node = node
        self.route = route
        self.status = status
        self.seq = seq
        self.stream = stream
        self.dropped = dropped
        self.written: float | None = None
        self.transport: str | None = None
        self.rewritten = 0  # written again after a reconnect (replays)
        self.acked: float | None = None
        self.outcome: str | None = None  # acknowledged mode: the reply's status for the key
        self.handed: str | None = None  # "out:<node>" once carried to another node

    def to_json(self) -> dict[str, Any]:
        d = self.dispatch
        return {
            "t": d.t, "event": d.event, "request": d.request, "node": self.node,
            "route": self.route, "status": self.status, "seq": self.seq, "stream": self.stream,
            "dropped": self.dropped, "ack_wait": d.ack_wait, "written": self.written,
            "transport": self.transport, "rewritten": self.rewritten, "acked": self.acked,
            "outcome": self.outcome, "handed": self.handed, "trace_id": d.trace_id,
        }  # fmt: skip


class Note(NamedTuple):
    t: float
    what: str
    detail: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"t": self.t, "what": self.what, **self.detail}


class KeyTrace:
    __slots__ = ("records", "notes", "last_active")

    def __init__(self, now: float) -> None:
        self.records: list[Record] = []
        self.notes: list[Note] = []
        self.last_active = now


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _opt_str(v: Any, n: int = 256) -> bool:
    return v is None or (isinstance(v, str) and len(v) <= n)


class Tracer:
    """Per-key traces (see the module doc); the hub's DeliveryObserver when tracing is on."""

    def __init__(self, config: TraceConfig, node: str) -> None:
        self.config = config
        self.node = node
        self._keys: OrderedDict[ConnectionKey, KeyTrace] = OrderedDict()
        self._users = config.users if config.mode == "users" else None
        self._records = 0
        self._notes = 0
        self.evicted_keys = 0  # forgotten to stay within ``keys`` (not by ``keep``)
        self.import_dropped = 0  # malformed hand-off trace entries ignored

    # -- bookkeeping ----------------------------------------------------------------------

    def _trace(self, key: ConnectionKey, now: float) -> KeyTrace | None:
        """The key's trace, made the most recently active (None: not traced)."""
        keys = self._keys
        kt = keys.get(key)
        if kt is not None:
            keys.move_to_end(key)
            kt.last_active = now
            return kt
        users = self._users
        if users is not None and key[0] not in users:
            return None
        self._forget_idle(now)
        if len(keys) >= self.config.keys:
            _, old = keys.popitem(last=False)
            self._drop(old)
            self.evicted_keys += 1
        kt = keys[key] = KeyTrace(now)
        return kt

    def _drop(self, kt: KeyTrace) -> None:
        self._records -= len(kt.records)
        self._notes -= len(kt.notes)

    def _forget_idle(self, now: float) -> None:
        keys, horizon = self._keys, now - self.config.keep
        while keys:
            key, kt = next(iter(keys.items()))
            if kt.last_active >= horizon:
                break
            del keys[key]
            self._drop(kt)

    def _add(self, kt: KeyTrace, record: Record) -> None:
        records = kt.records
        records.append(record)
        if len(records) > self.config.per_key:
            del records[0]
        else:
            self._records += 1

    def _find(self, kt: KeyTrace, d: Dispatch) -> Record | None:
        for record in reversed(kt.records):
            if record.dispatch is d:
                return record
        return None

    # -- the observer (orbited.node.observe) ---------------------------------------------

    def dispatched(self, request: EventRequest, now: float) -> Dispatch:
        parent = request.traceparent
        context = None if parent is None else parse_traceparent(parent)
        return Dispatch(
            now, request.event_id, request.digest[:8].hex(), request.ack,
            None if context is None else context.trace_id, len(request.recipients),
            request.recipients,
        )  # fmt: skip

    def recipient(
        self, token: Any, key: ConnectionKey, route: int, status: str, seq: int | None,
        stream: str | None, dropped: int, transport: str | None, now: float,
    ) -> None:  # fmt: skip
        kt = self._trace(key, now)
        if kt is None:
            return
        if status != "held" and kt.records:  # a held delivery that ran: update its record
            last = kt.records[-1]
            if last.dispatch is token and last.status == "held":
                kt.records.pop()
                self._records -= 1
        record = Record(token, self.node, route, status, seq, stream, dropped)
        if transport is not None:
            record.written = now
            record.transport = transport
        self._add(kt, record)

    def answered(self, token: Any, outcome: DispatchResult, now: float) -> None:
        d: Dispatch = token
        if outcome.duplicate:
            for key, result in self._pairs(d.targets, outcome.results):
                kt = self._trace(key, now)
                if kt is not None:
                    self._add(kt, Record(d, self.node, None, "duplicate", result.seq, None, 0))
            return
        if d.ack_wait is None and not any(r.status == "limited" for r in outcome.results):
            return
        for key, result in self._pairs(d.targets, outcome.results):
            status = str(result.status)
            if status == "limited":
                kt = self._trace(key, now)
                if kt is not None:
                    self._add(kt, Record(d, self.node, None, "limited", None, None, 0))
                continue
            found = self._keys.get(key)
            record = None if found is None else self._find(found, d)
            if record is not None:
                record.outcome = status

    @staticmethod
    def _pairs(
        targets: tuple[Any, ...], results: tuple[RecipientResult, ...]
    ) -> list[tuple[ConnectionKey, RecipientResult]]:
        """Each key of a request with its result (a wildcard's keys from its ``keys``)."""
        out: list[tuple[ConnectionKey, RecipientResult]] = []
        for target, result in zip(targets, results, strict=False):
            if type(target) is Selector:
                out.extend(result.keys or ())
            else:
                out.append((target, result))
        return out

    def written(
        self, key: ConnectionKey, stream: str, first: int, last: int, transport: str, now: float
    ) -> None:
        kt = self._keys.get(key)
        if kt is None:
            return
        for record in kt.records:
            seq = record.seq
            if record.stream == stream and seq is not None and first <= seq <= last:
                if record.written is None:
                    record.written = now
                    record.transport = transport
                else:
                    record.rewritten += 1

    def acked(self, key: ConnectionKey, stream: str, upto: int, now: float) -> None:
        kt = self._keys.get(key)
        if kt is None:
            return
        for record in reversed(kt.records):
            seq = record.seq
            if record.stream != stream or seq is None or seq > upto:
                continue
            if record.acked is not None:
                break  # the ones before it were acknowledged by then
            record.acked = now

    def noted(self, key: ConnectionKey, what: str, now: float, **detail: Any) -> None:
        kt = self._trace(key, now)
        if kt is None:
            return
        notes = kt.notes
        notes.append(Note(now, what, detail))
        if len(notes) > self.config.notes_per_key:
            del notes[0]
        else:
            self._notes += 1
        if what == "moved" and detail.get("handed"):
            for record in kt.records:
                if record.node == self.node and record.handed is None:
                    record.handed = "out"

    # -- hand-off ---------------------------------------------------------------------------

    def export(self, key: ConnectionKey) -> list[dict[str, Any]]:
        """The key's records and notes as JSON objects for a hand-off entry's ``trace``."""
        kt = self._keys.get(key)
        if kt is None:
            return []
        out = [r.to_json() for r in kt.records]
        for entry in out:
            if entry["node"] == self.node and entry["handed"] is None:
                entry["handed"] = "out"
        out.extend(n.to_json() for n in kt.notes)
        return out

    def import_(self, key: ConnectionKey, wire: list[Any], origin: str | None, now: float) -> None:
        """A hand-off's ``trace`` for ``key``: records (marked handed out from their node
        to this one) go before this node's own; malformed entries are dropped (counted)."""
        kt = self._trace(key, now)
        if kt is None:
            return
        records: list[Record] = []
        notes: list[Note] = []
        for entry in wire:
            parsed = _parse_entry(entry, self.node)
            if parsed is None:
                self.import_dropped += 1
            elif isinstance(parsed, Record):
                records.append(parsed)
            else:
                notes.append(parsed)
        if records:
            merged = sorted(records + kt.records, key=lambda r: r.dispatch.t)
            kt.records = merged[-self.config.per_key :]
        if notes:
            merged_notes = sorted(notes + kt.notes, key=lambda n: n.t)
            kt.notes = merged_notes[-self.config.notes_per_key :]
        self._recount()

    def _recount(self) -> None:
        self._records = sum(len(kt.records) for kt in self._keys.values())
        self._notes = sum(len(kt.notes) for kt in self._keys.values())

    # -- queries ----------------------------------------------------------------------------

    def keys_of(
        self, user: str, session: str | None, location: str | None, now: float
    ) -> list[tuple[ConnectionKey, KeyTrace]]:
        """The traced keys matching ``user`` (and ``session``/``location`` when given)."""
        self._forget_idle(now)
        return [
            (key, kt)
            for key, kt in self._keys.items()
            if key[0] == user
            and (session is None or key[1] == session)
            and (location is None or key[2] == location)
        ]

    @staticmethod
    def key_json(kt: KeyTrace, event: str | None, limit: int | None) -> dict[str, Any]:
        """``dispatches`` (oldest first) and ``notes`` of a key's trace, for ``event``
        only when given, the newest ``limit`` when given."""
        records = [r for r in kt.records if event is None or r.dispatch.event == event]
        if limit is not None:
            records = records[-limit:] if limit else []
        return {
            "dispatches": [r.to_json() for r in records],
            "notes": [n.to_json() for n in kt.notes],
        }

    def gauges(self) -> dict[str, int]:
        return {
            "traced_keys": len(self._keys),
            "trace_records": self._records,
            "trace_notes": self._notes,
            "trace_evicted_keys": self.evicted_keys,
        }


_RECORD_STR = ("event", "request", "node", "status")


def _parse_entry(entry: Any, me: str) -> Record | Note | None:
    """A hand-off trace entry: a record (it has ``request``) or a note (``what``)."""
    if not isinstance(entry, dict) or not _num(entry.get("t")):
        return None
    if "what" in entry:
        what = entry["what"]
        if not isinstance(what, str) or len(what) > 32:
            return None
        detail = {
            k: v for k, v in entry.items()
            if k not in ("t", "what") and isinstance(k, str)
            and (v is None or isinstance(v, str | int | float | bool))
        }  # fmt: skip
        return Note(float(entry["t"]), what, detail)
    try:
        if not all(isinstance(entry[k], str) and 0 < len(entry[k]) <= 256 for k in _RECORD_STR):
            return None
        route, seq, dropped = entry["route"], entry.get("seq"), entry.get("dropped", 0)
        if not all(v is None or _int(v) for v in (route, seq)) or not _int(dropped):
            return None
        floats = [entry.get(k) for k in ("ack_wait", "written", "acked")]
        if not all(v is None or _num(v) for v in floats):
            return None
        strs = [entry.get(k) for k in ("stream", "transport", "outcome", "trace_id", "handed")]
        if not all(_opt_str(v) for v in strs):
            return None
        rewritten = entry.get("rewritten", 0)
        if not _int(rewritten):
            return None
    except KeyError:
        return None
    d = Dispatch(float(entry["t"]), entry["event"], entry["request"], floats[0], strs[3], 0)
    record = Record(d, entry["node"], route, entry["status"], seq, strs[0], dropped)
    record.written, record.acked = floats[1], floats[2]
    record.transport, record.outcome, record.rewritten = strs[1], strs[2], rewritten
    handed = strs[4]
    record.handed = f"out:{me}" if handed in (None, "out") and record.node != me else handed
    return record
