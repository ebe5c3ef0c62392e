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
from typing import TYPE_CHECKING, Any, Literal

from orbited.core.keys import ConnectionKey, Selector
from orbited.core.settings import check_fields
from orbited.core.tracecontext import parse_traceparent

if TYPE_CHECKING:
    from orbited.node.events import DispatchResult, EventRequest, RecipientResult

__all__ = [
    "MODES",
    "Dispatch",
    "KeyTrace",
    "Note",
    "Record",
    "TraceConfig",
    "Tracer",
    "record_json",
]

Mode = Literal["off", "all", "users"]
MODES: tuple[Mode, ...] = ("off", "all", "users")
# The node's ``trace`` default (orbited.node.config): "off", by the rule of
# docs/performance.md, "Tracing cost" (in process tracing costs more than 1 µs per
# recipient). A Tracer that exists traces every key unless its mode is "users".
DEFAULT_MODE: Mode = "off"


@dataclass(frozen=True)
class TraceConfig:
    mode: Mode = "all"
    per_key: int = 16  # dispatch records kept per key (a ring)
    notes_per_key: int = 16  # other happenings kept per key (a ring)
    keys: int = 10_000  # keys traced at most; the least recently active one is forgotten
    users: frozenset[str] = frozenset()  # mode "users": only these users' keys
    keep: float = 3600.0  # seconds a key's trace outlives its last activity

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"trace must be one of {', '.join(MODES)}")
        check_fields(self, positive=("per_key", "notes_per_key", "keys", "keep"))


# One event request, shared by the records of its recipients (compared by identity: each
# request's is its own object): a plain tuple (t, event, digest, ack_wait, trace_id), with
# ``digest`` the request digest (bytes) or its wire form (str, imported). Plain tuples
# (and records holding only them, strings and numbers) are left alone by the cyclic
# garbage collector once it has seen them; a NamedTuple, or an Enum inside, would keep a
# full trace (160 000 records) in every full collection. The observer token is
# ``(dispatch, recipients)``: records keep only the first (not the request's parsed keys).
Dispatch = tuple[Any, ...]
D_T, D_EVENT, D_DIGEST, D_ACK, D_TRACE = 0, 1, 2, 3, 4


def request_id(d: Dispatch) -> str:
    """The digest's first 8 bytes in hex: the same for a resend of the request."""
    digest = d[D_DIGEST]
    return digest if isinstance(digest, str) else digest[:8].hex()


# A record (what one request did for one key) is a tuple, built in one step per recipient
# (a class's __init__ costs several times as much, and this is per recipient), and
# replaced (``_set``) when a later happening (a replay, an ack, an acknowledged-mode
# outcome, a hand-off) changes a field: the fields by index. ``handed`` is "out:<node>"
# when the event went unwritten to another node with its mailbox (that node writes it).
DISPATCH, NODE, ROUTE, STATUS, SEQ, STREAM, DROPPED = 0, 1, 2, 3, 4, 5, 6
WRITTEN, TRANSPORT, REWRITTEN, ACKED, OUTCOME, HANDED = 7, 8, 9, 10, 11, 12
Record = tuple[Any, ...]


def _set(record: Record, **fields: Any) -> Record:
    """``record`` with some fields changed (by the names of the index constants)."""
    out = list(record)
    for name, value in fields.items():
        out[_FIELDS[name]] = value
    return tuple(out)


_FIELDS = {
    "written": WRITTEN, "transport": TRANSPORT, "rewritten": REWRITTEN, "acked": ACKED,
    "outcome": OUTCOME, "handed": HANDED,
}  # fmt: skip


def record_json(record: Record) -> dict[str, Any]:
    """A record's JSON form (the trace answer's ``dispatches``, a hand-off's ``trace``)."""
    d: Dispatch = record[DISPATCH]
    return {
        "t": d[D_T], "event": d[D_EVENT], "request": request_id(d), "node": record[NODE],
        "route": record[ROUTE], "status": str(record[STATUS]), "seq": record[SEQ],
        "stream": record[STREAM], "dropped": record[DROPPED], "ack_wait": d[D_ACK],
        "written": record[WRITTEN], "transport": record[TRANSPORT],
        "rewritten": record[REWRITTEN], "acked": record[ACKED], "outcome": record[OUTCOME],
        "handed": record[HANDED], "trace_id": d[D_TRACE],
    }  # fmt: skip


def _record(
    d: Dispatch, node: str, route: int | None, status: str, seq: int | None,
    stream: str | None = None, dropped: int = 0,
) -> Record:  # fmt: skip
    return (d, node, route, status, seq, stream, dropped, None, None, 0, None, None, None)


# A note (a happening to a key that is not a dispatch) is a flat tuple (t, what, name1,
# value1, name2, value2, ...): no dict per note (they are kept by the ten thousand).
Note = tuple[Any, ...]


def _note(t: float, what: str, detail: dict[str, Any]) -> Note:
    return (t, what, *[x for item in detail.items() for x in item])


def note_json(note: Note) -> dict[str, Any]:
    out = {"t": note[0], "what": note[1]}
    out.update(zip(note[2::2], note[3::2], strict=True))
    return out


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


# A key's trace as a hand-off carries it, at most: its newest records and notes. A record
# is about 350 bytes of JSON (at most ~1.3 KB with a 128-character id that escapes), a
# note about 100: a few KB per key, however large trace_per_key is.
EXPORT_RECORDS = 16
EXPORT_NOTES = 8

# Seconds between two moves of a busy key to the LRU's young end: ``keys`` and ``keep``
# forget by last activity to within this (one dict operation per key per second, not per
# event; Tracer.recipient spells it as a literal).
REFRESH = 1.0


class Tracer:
    """Per-key traces (see the module doc); the hub's DeliveryObserver when tracing is on."""

    def __init__(self, config: TraceConfig, node: str) -> None:
        self.config = config
        self.node = node
        self._per_key = config.per_key
        self._keys: OrderedDict[ConnectionKey, KeyTrace] = OrderedDict()
        self._users = config.users if config.mode == "users" else None
        self.evicted_keys = 0  # forgotten to stay within ``keys`` (not by ``keep``)
        self.import_dropped = 0  # malformed hand-off trace entries ignored

    # -- bookkeeping ----------------------------------------------------------------------

    def _trace(self, key: ConnectionKey, now: float) -> KeyTrace | None:
        """The key's trace, marked active (None: not traced)."""
        kt = self._keys.get(key)
        if kt is None:
            return self._new(key, now)
        if now - kt.last_active > REFRESH:
            self._keys.move_to_end(key)
            kt.last_active = now
        return kt

    def _new(self, key: ConnectionKey, now: float) -> KeyTrace | None:
        users = self._users
        if users is not None and key[0] not in users:
            return None
        keys = self._keys
        self._forget_idle(now)
        if len(keys) >= self.config.keys:
            keys.popitem(last=False)
            self.evicted_keys += 1
        kt = keys[key] = KeyTrace(now)
        return kt

    def _forget_idle(self, now: float) -> None:
        keys, horizon = self._keys, now - self.config.keep
        while keys:
            key, kt = next(iter(keys.items()))
            if kt.last_active >= horizon:
                break
            del keys[key]

    def _add(self, kt: KeyTrace, record: Record) -> None:
        records = kt.records
        records.append(record)
        if len(records) > self._per_key:
            del records[0]

    @staticmethod
    def _find(kt: KeyTrace, d: Dispatch) -> int | None:
        """The index of the newest record of ``d`` in the key's ring."""
        records = kt.records
        for i in range(len(records) - 1, -1, -1):
            if records[i][DISPATCH] is d:
                return i
        return None

    # -- the observer (orbited.node.observe) ---------------------------------------------

    def dispatched(self, request: EventRequest, now: float) -> tuple[Dispatch, tuple[Any, ...]]:
        parent = request.traceparent
        trace_id = None
        if parent is not None:
            context = parse_traceparent(parent)
            trace_id = None if context is None else context.trace_id
        return (now, request[0], request[3], request[4], trace_id), request[1]

    def recipient(
        self, token: Any, key: ConnectionKey, route: int | None, status: str, seq: int | None,
        stream: str | None, dropped: int, transport: str | None, now: float,
    ) -> None:  # fmt: skip
        # Per recipient: _trace and _add written out (a call each costs what the rest does).
        kt = self._keys.get(key)
        if kt is None:
            kt = self._new(key, now)
            if kt is None:
                return
        elif now - kt.last_active > 1.0:  # REFRESH (a literal: no global lookup)
            self._keys.move_to_end(key)
            kt.last_active = now
        records = kt.records
        records.append((
            token[0], self.node, route, status, seq, stream, dropped,
            None if transport is None else now, transport, 0, None, None, None,
        ))  # fmt: skip
        if len(records) > self._per_key:
            del records[0]

    def answered(self, token: Any, outcome: DispatchResult, now: float) -> None:
        d: Dispatch = token[0]
        if d[3] is None and not outcome[2]:  # neither acknowledged mode nor a resend
            return
        pairs = self._pairs(token[1], outcome.results)
        if outcome.duplicate:
            for key, result in pairs:
                kt = self._trace(key, now)
                if kt is not None:
                    self._add(kt, _record(d, self.node, None, "duplicate", result.seq))
            return
        for key, result in pairs:
            found = self._keys.get(key)
            at = None if found is None else self._find(found, d)
            if found is not None and at is not None:
                found.records[at] = _set(found.records[at], outcome=str(result.status))

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
        records = kt.records
        for i, record in enumerate(records):
            seq = record[SEQ]
            if record[STREAM] == stream and seq is not None and first <= seq <= last:
                if record[WRITTEN] is None:
                    records[i] = _set(record, written=now, transport=transport)
                else:
                    records[i] = _set(record, rewritten=record[REWRITTEN] + 1)

    def acked(self, key: ConnectionKey, stream: str, upto: int, now: float) -> None:
        kt = self._keys.get(key)
        if kt is None:
            return
        # Every record, not back to the first one acknowledged: records a hand-off imports
        # go before this node's own, which an earlier ack may already have marked.
        records = kt.records
        for i, record in enumerate(records):
            seq = record[SEQ]
            if record[STREAM] == stream and seq is not None and seq <= upto:
                if record[ACKED] is None:
                    records[i] = _set(record, acked=now)

    def noted(self, key: ConnectionKey, what: str, now: float, **detail: Any) -> None:
        kt = self._trace(key, now)
        if kt is None:
            return
        notes = kt.notes
        notes.append(_note(now, what, detail))
        if len(notes) > self.config.notes_per_key:
            del notes[0]
        if what == "moved" and detail.get("handed"):
            to = detail.get("owner")
            handed = "out" if to is None else f"out:{to}"
            kt.records = [_set(r, handed=handed) if self._handed_with(r) else r for r in kt.records]

    def _handed_with(self, record: Record) -> bool:
        """Does this node's record stand for an event that travels unwritten with the
        mailbox (stored here, not yet written): the new owner writes it, if anyone does."""
        return (
            record[NODE] == self.node and record[HANDED] is None and record[SEQ] is not None
            and record[STREAM] is not None and record[WRITTEN] is None
        )  # fmt: skip

    # -- hand-off ---------------------------------------------------------------------------

    def export(self, key: ConnectionKey) -> list[dict[str, Any]]:
        """The key's newest records and notes (at most EXPORT_RECORDS and EXPORT_NOTES,
        whatever ``per_key``: a hand-off message must stay small, and this node keeps
        its own copy to answer queries) as JSON objects for a hand-off entry's ``trace``;
        this node's records of events that travel unwritten are marked handed ``out``
        (the new owner names itself)."""
        kt = self._keys.get(key)
        if kt is None:
            return []
        out = []
        for record in kt.records[-EXPORT_RECORDS:]:
            entry = record_json(record)
            if self._handed_with(record):
                entry["handed"] = "out"
            out.append(entry)
        out.extend({"node": self.node, **note_json(n)} for n in kt.notes[-EXPORT_NOTES:])
        return out

    def import_(self, key: ConnectionKey, wire: list[Any], origin: str | None, now: float) -> None:
        """A hand-off's ``trace`` for ``key``: records (marked handed out from their node
        to this one) go before this node's own; malformed entries are dropped (counted).
        Idempotent: a large mailbox comes in several entries, each with the whole trace."""
        kt = self._trace(key, now)
        if kt is None:
            return
        records: list[Record] = []
        notes: list[Note] = []
        have = {_identity(r) for r in kt.records}
        have_notes = set(kt.notes)
        for entry in wire:
            parsed = _parse_entry(entry, self.node)
            if parsed is None:
                self.import_dropped += 1
            elif type(parsed[0]) is tuple:  # a record (its dispatch); a note starts with t
                if _identity(parsed) not in have:
                    have.add(_identity(parsed))
                    records.append(parsed)
            elif parsed not in have_notes:  # (t, what, ...): a note
                have_notes.add(parsed)
                notes.append(parsed)
        if records:
            merged = sorted(records + kt.records, key=lambda r: r[DISPATCH][D_T])
            kt.records = merged[-self._per_key :]
        if notes:
            merged_notes = sorted(notes + kt.notes, key=lambda n: n[0])
            kt.notes = merged_notes[-self.config.notes_per_key :]

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
        records = [r for r in kt.records if event is None or r[DISPATCH][D_EVENT] == event]
        if limit is not None:
            records = records[-limit:] if limit else []
        return {
            "dispatches": [record_json(r) for r in records],
            "notes": [note_json(n) for n in kt.notes],
        }

    def gauges(self) -> dict[str, int]:
        """Sizes (/orbited/health): counted here, not kept per event."""
        traces = self._keys.values()
        return {
            "traced_keys": len(self._keys),
            "trace_records": sum(len(kt.records) for kt in traces),
            "trace_notes": sum(len(kt.notes) for kt in traces),
            "trace_evicted_keys": self.evicted_keys,
        }


def _identity(record: Record) -> tuple[Any, ...]:
    """What makes a record the same one when it arrives twice: request, node, status, seq."""
    return request_id(record[DISPATCH]), record[NODE], str(record[STATUS]), record[SEQ]


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
        return _note(float(entry["t"]), what, detail)
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
    d = (float(entry["t"]), entry["event"], entry["request"], floats[0], strs[3])
    node = entry["node"]
    handed = strs[4]
    if handed == "out":  # the sender's unwritten event: this node writes it, if anyone
        handed = f"out:{me}"
    return (
        d, node, route, entry["status"], seq, strs[0], dropped, floats[1], strs[1], rewritten,
        floats[2], strs[2], handed,
    )  # fmt: skip
