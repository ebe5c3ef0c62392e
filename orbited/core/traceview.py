"""Reading per-key delivery traces (pure): merging the answers of several nodes into one
view per key, and the verdict sentence for an event ("did alice get event 42?").

A node's trace answer (its ``GET /orbited/trace`` and ``trace_reply``, docs/operations.md,
"Tracing a delivery") lists keys, each with its ``dispatches`` (records: one per event
request and key) and ``notes`` (what happened to the key's mailbox and transport). HaloD's
``/trace``, the ``orbited trace`` command and the dashboard read them through this module,
so they say the same thing in the same words. Records and notes are data from nodes: this
module reads them defensively (a missing or mistyped field is treated as absent) and never
trusts them to be well formed; escaping for display is the caller's.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeGuard

Json = dict[str, Any]

# Record statuses (orbited.node.trace): the dispatch's result for the key on that node.
DELIVERED, QUEUED, HELD = "delivered", "queued", "held"
NO_CONNECTION, MOVED, FULL, LIMITED, DUPLICATE = (
    "no_connection", "moved", "full", "limited", "duplicate"
)  # fmt: skip


def clock(t: object) -> str:
    """``t`` (seconds since the epoch) as UTC ``HH:MM:SS.mmm``; ``?`` if it is not a time."""
    if not _num(t):
        return "?"
    try:
        return datetime.fromtimestamp(float(t), UTC).strftime("%H:%M:%S.%f")[:-3]
    except (OverflowError, OSError, ValueError):
        return "?"


def _num(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _t(row: Mapping[str, Any]) -> float:
    t = row.get("t")
    return float(t) if _num(t) else 0.0


def _str(row: Mapping[str, Any], name: str) -> str | None:
    value = row.get(name)
    return value if isinstance(value, str) else None


def _int(row: Mapping[str, Any], name: str) -> int | None:
    value = row.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def key_text(key: object) -> str:
    """A key as compact JSON ``["alice","3f9a","/chat"]`` (control characters escaped;
    any other value: its repr)."""
    if isinstance(key, list) and all(isinstance(p, str) for p in key):
        return json.dumps(key, ensure_ascii=False, separators=(",", ":"))
    return repr(key)


# -- merging the answers of several nodes ---------------------------------------------------


def merge_keys(answers: Mapping[str, Mapping[str, Any]]) -> list[Json]:
    """One entry per key from the answers of the nodes named by ``answers``' keys: every
    node's records merged by time and de-duplicated by ``(node, request, seq)`` (a record
    handed over appears on the old and the new owner), notes merged by time with the
    answering node added as ``node`` when a note names none, and ``nodes`` the per-key
    header each node sent (its entry without ``dispatches`` and ``notes``). ``owner_now``
    is a node that still holds the key's mailbox (``here``), None if none does; ``route``
    the route any node reported. Keys in order of their first appearance."""
    merged: dict[tuple[str, ...], Json] = {}
    for node, answer in answers.items():
        keys = answer.get("keys")
        if not isinstance(keys, list):
            continue
        for entry in keys:
            if not isinstance(entry, dict):
                continue
            key = entry.get("key")
            if not isinstance(key, list) or not all(isinstance(p, str) for p in key):
                continue
            into = merged.setdefault(
                tuple(key),
                {"key": list(key), "route": None, "owner_now": None, "dispatches": [],
                 "notes": [], "nodes": {}},
            )  # fmt: skip
            if into["route"] is None and _int(entry, "route") is not None:
                into["route"] = entry["route"]
            if entry.get("here") is True and into["owner_now"] is None:
                into["owner_now"] = node
            into["nodes"][node] = {
                k: v for k, v in entry.items() if k not in ("dispatches", "notes", "key")
            }
            for row in _rows(entry.get("dispatches")):
                into["dispatches"].append(row if "node" in row else {**row, "node": node})
            for row in _rows(entry.get("notes")):
                into["notes"].append(row if "node" in row else {**row, "node": node})
    for into in merged.values():
        # The same record from two nodes (handed over): one row, the copy that got furthest
        # (the new owner's, once it wrote or saw the ack), with what only the other copy
        # knows filled in (the old owner's ``outcome``: what the web app was told).
        best: dict[tuple[Any, ...], int] = {}
        unique: list[Json] = []
        for row in sorted(into["dispatches"], key=_t):
            ident = (_str(row, "node"), _str(row, "request"), _int(row, "seq"), _str(row, "event"))
            at = best.get(ident) if ident[1] is not None else None
            if at is None:
                best[ident] = len(unique)
                unique.append(row)
            else:
                ahead, behind = (
                    (row, unique[at]) if _further(row, unique[at]) else (unique[at], row)
                )
                unique[at] = {**behind, **{k: v for k, v in ahead.items() if v is not None}}
        into["dispatches"] = unique
        # A note carried in a hand-off comes back from both nodes, the new owner's copy
        # perhaps without the node it happened on: once is enough (the same time, kind
        # and details; the first copy kept).
        seen: set[str] = set()
        notes: list[Json] = []
        for note in sorted(into["notes"], key=_t):
            mark = json.dumps({k: v for k, v in note.items() if k != "node"}, sort_keys=True,
                              default=repr)  # fmt: skip
            if mark not in seen:
                seen.add(mark)
                notes.append(note)
        into["notes"] = notes
    return list(merged.values())


def _further(row: Mapping[str, Any], than: Mapping[str, Any]) -> bool:
    """Did ``row`` get further than ``than`` (another copy of the same record)? On a tie,
    the copy that names where it was handed (``out:n2``, the new owner's) wins over the
    old owner's bare ``out``."""
    a, b = _rank(row)[0], _rank(than)[0]
    if a != b:
        return a > b
    return len(_str(row, "handed") or "") > len(_str(than, "handed") or "")


def _rows(value: object) -> list[Json]:
    return [r for r in value if isinstance(r, dict)] if isinstance(value, list) else []


# -- the verdict ---------------------------------------------------------------------------


def _writer(row: Mapping[str, Any]) -> str:
    """The node that wrote a record's event: its node, or the node it was handed to when
    the write came after a hand-off (a replay on the new owner). ``handed`` is ``out``
    on the old owner (which does not know the new one's name) and ``out:<new owner>``
    once the new owner imported it."""
    handed = _str(row, "handed") or ""
    if handed.startswith("out:") and row.get("written") is not None:
        return handed[4:]
    return _str(row, "node") or "?"


def gone_verb(failed: Mapping[str, Any]) -> str:
    """How a node of HaloD's ``failed_nodes`` went: "left" (it said so, SIGTERM) or
    "failed"; either way its records went with its process."""
    return "left" if failed.get("why") == "left" else "failed"


def _failed_note(nodes: Iterable[str], failed: Sequence[Mapping[str, Any]]) -> str:
    """ "; n3 failed at T (why): records it held after that are lost with its process"."""
    names = set(nodes)
    parts = []
    for f in failed:
        name = _str(f, "name")
        if name in names:
            why = _str(f, "why")
            parts.append(
                f"; {name} {gone_verb(f)} at {clock(f.get('at'))}"
                + (f" ({why})" if why and why != "left" else "")
                + ": what it held after that is lost with its process"
            )  # fmt: skip
    return "".join(parts)


_RANK = {DUPLICATE: 0, LIMITED: 1, FULL: 1, NO_CONNECTION: 1, MOVED: 1, HELD: 2, QUEUED: 2,
         DELIVERED: 3}  # fmt: skip


def _rank(row: Mapping[str, Any]) -> tuple[int, float]:
    """How far a record got: acknowledged > written > stored > refused > duplicate; later
    wins a tie."""
    if row.get("acked") is not None or row.get("outcome") == "acked":
        level = 5
    elif row.get("written") is not None or row.get("status") == DELIVERED:
        level = 4
    else:
        level = _RANK.get(_str(row, "status") or "", 0)
    return level, _t(row)


def verdict(
    event: str, key_records: Sequence[Mapping[str, Any]], notes: Sequence[Mapping[str, Any]],
    failed: Sequence[Mapping[str, Any]] = (),
) -> str:  # fmt: skip
    """What became of ``event`` for one key, in one sentence, from the key's records
    (of any events: only ``event``'s are read), its notes and the failed nodes
    (``[{"name", "at", "why"}]``, HaloD's ``failed_nodes``). The cases of
    docs/operations.md, "Tracing a delivery"."""
    rows = sorted((r for r in key_records if r.get("event") == event), key=_t)
    if not rows:
        gone = [f for f in failed if _str(f, "name")]
        tail = "".join(
            f", or it was on {f['name']}, which {gone_verb(f)} at {clock(f.get('at'))}"
            for f in gone
        )
        return (
            f"no node has a record of event {event} for this key: it never reached the "
            "cluster, tracing was off (the nodes' default: trace = off), or the key fell out "
            f"of the trace (trace_keys, trace_keep){tail}"
        )
    best = max(rows, key=_rank)
    level, _ = _rank(best)
    node = _str(best, "node") or "?"
    after = _t(best)
    if level == 5:
        writer = _writer(best)
        written = best.get("written")
        how = _str(best, "transport") or "the browser"
        handed = " (after the hand-off)" if writer != node else ""
        acked = best.get("acked")
        when = f" at {clock(written)}" if written is not None else ""
        told = _str(best, "outcome")
        late = (
            f"; the web app was told {told} (its wait ended before the ack)"
            if told in ("unacked", "moved") else ""
        )  # fmt: skip
        at = f" {clock(acked)}" if acked is not None else ""
        return f"written to {how} on {writer}{when}{handed}, acknowledged{at}{late}"
    if level == 4:
        writer = _writer(best)
        written = best.get("written") if best.get("written") is not None else best.get("t")
        how = _str(best, "transport") or "the browser"
        handed = " (after the hand-off)" if writer != node else ""
        text = f"written to {how} on {writer} at {clock(written)}{handed}"
        outcome = _str(best, "outcome")
        if outcome == "unacked":
            wait = best.get("ack_wait")
            within = f" within {wait:g} s" if _num(wait) else ""
            text += f", not acknowledged{within} (the web app was told unacked)"
        elif outcome == "moved":
            text += ", not acknowledged before its route moved (the web app was told moved)"
        else:
            text += ", not acknowledged yet"
        return text + _failed_note([writer], failed)
    status = _str(best, "status") or "?"
    route = best.get("route")
    if status in (QUEUED, HELD):
        where = "held for the route's incoming hand-off" if status == HELD else "queued"
        text = f"{where} on {node} at {clock(best.get('t'))} and never written (browser away)"
        return text + _fate(best, notes, after) + _failed_note([node], failed)
    if status == NO_CONNECTION:
        return (
            f"not stored: {node} had no mailbox for this key at {clock(best.get('t'))} "
            "(the browser was not connected within linger)"
        )
    if status == FULL:
        return (
            f"refused by {node} at {clock(best.get('t'))}: its mailbox memory was full "
            "(mailbox_total_bytes)"
        )
    if status == LIMITED:
        return f"refused by {node} at {clock(best.get('t'))}: the user's rate limit (user_rate)"
    if status == MOVED:
        return (
            f"refused by {node} at {clock(best.get('t'))}: route {route} had moved; the web "
            "app had to resend it to the new owner, and no node has a record of that resend"
        )
    if status == DUPLICATE:
        return (
            f"a resend, seen as a duplicate on {node} at {clock(best.get('t'))}; the first "
            "send's records are gone"
        ) + _failed_note([node], failed)  # fmt: skip
    return f"{status} on {node} at {clock(best.get('t'))}"


def _fate(row: Mapping[str, Any], notes: Sequence[Mapping[str, Any]], since: float) -> str:
    """What happened to a stored, unwritten event later, from the notes of the nodes that
    held its mailbox (the record's node, then the one it was handed to): handed over,
    then evicted (a ``gap``), its stream reset, its mailbox expired or dropped; or still
    waiting."""
    seq = _int(row, "seq")
    node = _str(row, "node")
    handed = _str(row, "handed") or ""
    holders = {node, handed[4:] if handed.startswith("out:") else None}
    anyone = handed == "out"  # handed to a node it does not name: read every node's notes
    said: list[str] = []
    for note in sorted(notes, key=_t):
        if _t(note) < since:
            continue
        where = _str(note, "node")
        if not anyone and where is not None and node is not None and where not in holders:
            continue
        what = _str(note, "what")
        when = clock(note.get("t"))
        first, last = _int(note, "first"), _int(note, "last")
        covered = (
            seq is not None and first is not None and last is not None and first <= seq <= last
        )
        if what == "moved":
            route = note.get("route")
            if note.get("handed") is not True:
                said.append(f"then route {route} moved at {when} without a hand-off: the "
                            "mailbox was dropped")  # fmt: skip
                break
            to = _str(note, "owner") or _str(note, "to")  # the name, else the SP address
            said.append(f"then route {route} moved and the mailbox was handed over"
                        + (f" to {to}" if to else ""))  # fmt: skip
            owner = _str(note, "owner")
            if owner is not None:
                holders.add(owner)
            else:
                anyone = True
            continue
        if what == "gap" and covered:  # the browser resumed past it
            said.append("gone before it was written (evicted by the mailbox limits, or left "
                        f"out of a hand-off): the browser got gap {first}-{last} at "
                        f"{when}")  # fmt: skip
            break
        if what == "evicted" and covered:
            said.append(f"evicted by the mailbox limits at {when}: the browser gets gap "
                        f"{first}-{last}")  # fmt: skip
            break
        if what == "reset":
            said.append(f"its stream was reset at {when}: events before the reset are lost "
                        "to the browser")  # fmt: skip
            break
        if what == "expired":
            said.append(f"the mailbox expired at {when} (the browser did not come back "
                        "within linger)")  # fmt: skip
            break
    if not said:
        if handed.startswith("out:"):
            said.append(f"then handed to {handed[4:]}")
        elif handed == "out":
            said.append("then handed to the route's new owner")
        else:
            said.append("still waiting for the browser")
    elif said[-1].startswith("then route") and "handed over" in said[-1]:
        said.append("still waiting for the browser there")
    return "; " + "; ".join(said)


def verdicts(
    keys: Sequence[Mapping[str, Any]], event: str | None,
    failed: Sequence[Mapping[str, Any]] = (),
) -> list[Json]:  # fmt: skip
    """``[{"event", "key", "text"}]`` for merged keys (``merge_keys``): the queried
    ``event`` for each key, or each key's newest event when none was asked for; a single
    entry with ``key`` None when no key is traced at all."""
    out: list[Json] = []
    for entry in keys:
        records = _rows(entry.get("dispatches"))
        notes = _rows(entry.get("notes"))
        which = event
        if which is None:
            newest = max(records, key=_t, default=None)
            which = _str(newest, "event") if newest is not None else None
            if which is None:
                continue
        out.append({"event": which, "key": entry.get("key"),
                    "text": verdict(which, records, notes, failed)})  # fmt: skip
    if not keys:
        gone = "".join(
            f"; {f['name']} {gone_verb(f)} at {clock(f.get('at'))} and its records are lost"
            for f in failed if _str(f, "name")
        )  # fmt: skip
        what = f"event {event}" if event is not None else "any event"
        out.append({"event": event, "key": None,
                    "text": f"no node has a record of {what} for this user: it never reached "
                            "the cluster, tracing was off (the nodes' default: trace = off), or "
                            f"the keys fell out of the trace{gone}"})  # fmt: skip
    return out
