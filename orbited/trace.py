"""``orbited trace``: what became of a user's events, from the nodes' delivery traces.

    orbited trace --user alice [--session S --location L | --key JSON] [--event 42]
                  [--url http://127.0.0.1:7601 | --state-dir .orbited-cluster]
                  [--operator-key-file FILE]                  HaloD's /trace (the default)
    orbited trace --user alice --node http://127.0.0.1:8000 --key-file FILE
                                                              one node's /orbited/trace
                  [--limit N] [--json]

HaloD's ``GET /trace`` asks every connected node and merges their answers; ``--node``
asks one node directly (a standalone node, or one node of a cluster). Either way the
output is one table per key, the incidents that moved its route, and a verdict per event
(orbited.core.traceview: the same words as HaloD and the dashboard). docs/operations.md,
"Tracing a delivery", explains how to read it. Exit status: 0 when something was traced,
1 when nothing was (with ``--event``: no record of that event; the verdict says why) or
HaloD / the node did not answer, 2 for usage.
:func:`trace_lines` and :func:`node_view` are the pure part.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from orbited.core.control import trace_query
from orbited.core.keys import ConnectionKey, KeyError_
from orbited.core.routes import format_ranges
from orbited.core.tokens import load_secret
from orbited.core.traceview import clock, gone_verb, key_text, merge_keys, verdicts
from orbited.whereis import DEFAULT_STATE_DIR, DEFAULT_STATUS, cluster_status

OPERATOR_KEY_ENV = "HALOD_OPERATOR_KEY_FILE"  # the operator key file's default
TIMEOUT = 5.0  # seconds for HaloD's or the node's answer (HaloD waits trace_timeout for nodes)

Json = dict[str, Any]


class TraceError(Exception):
    """HaloD or the node could not be asked, or refused; the message says why."""


def _clean(value: object) -> str:
    """A value from a node as terminal text: control characters escaped (a key part or
    an event id is the web app's data, and must not move the cursor or colour a line)."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _num(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _delta(t: object, later: object) -> str:
    """``later`` relative to ``t`` as ``+182ms`` (``+0.3ms`` under 1 ms)."""
    if not _num(later):
        return "-"
    if not _num(t):
        return clock(later)
    ms = (float(later) - float(t)) * 1000.0  # type: ignore[arg-type]
    return f"+{ms:.1f}ms" if abs(ms) < 10 else f"+{ms:.0f}ms"


# -- the pure part --------------------------------------------------------------------------


def node_view(answer: Mapping[str, Any], name: str, query: Mapping[str, Any]) -> Json:
    """One node's ``/orbited/trace`` answer in the form of HaloD's ``/trace``, so both
    print (and ``--json`` reads) the same way."""
    keys = merge_keys({name: answer})
    event = query.get("event")
    return {
        "query": dict(query), "asked": [name], "answered": [name], "missing": [],
        "failed_nodes": [], "keys": keys, "incidents": [],
        "verdicts": verdicts(keys, event if isinstance(event, str) else None),
        "mode": answer.get("mode"), "truncated": bool(answer.get("truncated")),
    }  # fmt: skip


def _header(entry: Mapping[str, Any]) -> str:
    route = entry.get("route")
    owner = entry.get("owner_now")
    where = f", now on {_clean(owner)}" if owner else ", no node holds its mailbox"
    parts = [f"key {key_text(entry.get('key'))}  route {_clean(route)}{where}"]
    nodes = entry.get("nodes")
    here = nodes.get(owner) if isinstance(nodes, dict) and owner else None
    if isinstance(here, dict):
        if here.get("stream"):
            parts.append(f"stream {_clean(here['stream'])}")
        parts.append(f"attached {_clean(here['attached'])}" if here.get("attached")
                     else "not attached")  # fmt: skip
        if here.get("last_seq") is not None:
            parts.append(f"acked {_clean(here.get('acked'))} of {_clean(here['last_seq'])}")
        if here.get("lingering_until") is not None:
            parts.append(f"lingering until {clock(here['lingering_until'])}")
    return " · ".join(parts)


_COLUMNS = ("TIME", "NODE", "EVENT", "REQUEST", "STATUS", "SEQ", "WRITTEN", "ACKED", "NOTE")


def _record_row(r: Mapping[str, Any]) -> tuple[str, ...]:
    t = r.get("t")
    written = "-"
    if r.get("written") is not None:
        written = f"{_delta(t, r.get('written'))} {_clean(r.get('transport') or '?')}"
        if _num(r.get("rewritten")) and r["rewritten"] > 0:
            written += " (replay)"
    acked = _delta(t, r.get("acked")) if r.get("acked") is not None else "-"
    outcome = r.get("outcome")
    if isinstance(outcome, str) and outcome != "acked":
        acked = outcome if acked == "-" else f"{acked} {outcome}"
    note = []
    handed = r.get("handed")
    if handed == "out":
        note.append("handed out")
    elif isinstance(handed, str) and handed.startswith("out:"):
        note.append(f"handed out to {_clean(handed[4:])}")
    elif isinstance(handed, str) and handed.startswith("in:"):
        note.append(f"handed in from {_clean(handed[3:])}")
    if _num(r.get("dropped")) and r["dropped"] > 0:
        note.append(f"{r['dropped']} older evicted")
    if r.get("trace_id"):
        note.append(f"trace {_clean(r['trace_id'])}")
    request = r.get("request")
    return (
        clock(t), _clean(r.get("node", "?")), _clean(r.get("event", "?")),
        _clean(request[:8]) if isinstance(request, str) else "-", _clean(r.get("status", "?")),
        "-" if r.get("seq") is None else _clean(r.get("seq")), written, acked, "; ".join(note),
    )  # fmt: skip


_NOTE_SKIP = ("t", "what", "node")


def _note_row(n: Mapping[str, Any]) -> tuple[str, ...]:
    detail = " ".join(f"{_clean(k)}={_clean(v)}" for k, v in n.items() if k not in _NOTE_SKIP)
    text = _clean(n.get("what", "?")) + (f" {detail}" if detail else "")
    return (clock(n.get("t")), _clean(n.get("node", "?")), "", "", "", "", "", "", text)


def _incident_line(i: Mapping[str, Any]) -> str:
    moves = [m for m in i.get("moves") or [] if isinstance(m, dict)]
    routes = sorted({m["route"] for m in moves if isinstance(m.get("route"), int)})
    to = sorted({str(m.get("new")) for m in moves if m.get("new")})
    parts = [f"incident {_clean(i.get('id'))}: {_clean(i.get('kind'))} {_clean(i.get('node'))}"]
    if i.get("reason"):
        parts[0] += f" ({_clean(i['reason'])})"
    if routes:
        parts.append(f"routes {format_ranges(routes)}" + (f" → {_clean(','.join(to))}"
                                                             if to else ""))  # fmt: skip
    if _num(i.get("handoff_s")):
        parts.append(f"hand-off {i['handoff_s'] * 1000:.0f} ms")
    if _num(i.get("browsers_moved")):
        back = i.get("browsers_back")
        took = f" {i['back_s']:.2f} s" if _num(i.get("back_s")) else ""
        parts.append(f"{_clean(back if back is not None else '?')}/{i['browsers_moved']} "
                     f"browsers back{took}")  # fmt: skip
    when = i.get("first_sign")
    return f"{clock(when)}  --   " + " · ".join(parts)


def _table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]  # fmt: skip


def trace_lines(answer: Mapping[str, Any]) -> list[str]:
    """HaloD's ``/trace`` answer (or ``node_view``'s) as text: per key a header, its
    records and notes by time, the incidents that touched its route; then the verdicts,
    the nodes that did not answer and the failed ones whose records are lost."""
    lines: list[str] = []
    keys = [k for k in answer.get("keys") or [] if isinstance(k, dict)]
    incidents = [i for i in answer.get("incidents") or [] if isinstance(i, dict)]
    for entry in keys:
        lines.append(_header(entry))
        timed: list[tuple[float, tuple[str, ...]]] = []
        for r in entry.get("dispatches") or []:
            if isinstance(r, dict):
                timed.append((float(r["t"]) if _num(r.get("t")) else 0.0, _record_row(r)))
        for n in entry.get("notes") or []:
            if isinstance(n, dict):
                timed.append((float(n["t"]) if _num(n.get("t")) else 0.0, _note_row(n)))
        timed.sort(key=lambda x: x[0])
        if timed:
            lines += _table([_COLUMNS, *(row for _, row in timed)])
        else:
            lines.append("(no records)")
        route = entry.get("route")
        for i in incidents:
            if any(isinstance(m, dict) and m.get("route") == route for m in i.get("moves") or []):
                lines.append(_incident_line(i))
        lines.append("")
    for v in answer.get("verdicts") or []:
        if not isinstance(v, dict):
            continue
        who = key_text(v.get("key")) if v.get("key") is not None else "this user"
        lines.append(f"event {_clean(v.get('event') or '-')} → {who}: {_clean(v.get('text'))}")
    for m in answer.get("missing") or []:
        if isinstance(m, dict):
            lines.append(f"{_clean(m.get('name'))} did not answer: {_clean(m.get('why'))}")
    for f in answer.get("failed_nodes") or []:
        if isinstance(f, dict):
            why = f", {_clean(f['why'])}" if f.get("why") and f["why"] != "left" else ""
            lines.append(f"records of {_clean(f.get('name'))} ({gone_verb(f)} "
                         f"{clock(f.get('at'))}{why}) are lost with its process")  # fmt: skip
    cut = answer.get("truncated")
    if cut:  # true (one node's answer), or the names of the nodes whose answer was cut
        who = f" on {_clean(', '.join(map(str, cut)))}" if isinstance(cut, list) else ""
        lines.append(f"(truncated{who}: the oldest records were left out to fit a control "
                     "message; ask with --event or --limit)")  # fmt: skip
    return lines


def traced(answer: Mapping[str, Any], event: str | None = None) -> bool:
    """Does the answer hold any record or note? With ``event`` (``--event``): a record of
    that event (a key's attach and detach notes say nothing of it)."""
    return any(
        isinstance(k, dict)
        and (k.get("dispatches") if event is not None else k.get("dispatches") or k.get("notes"))
        for k in answer.get("keys") or []
    )


# -- asking --------------------------------------------------------------------------------


def _get(url: str, key: bytes | None) -> Json:
    """GET ``url`` (with ``Authorization: Bearer key``); the JSON object, or TraceError
    naming the HTTP error the answer's ``error`` object describes."""
    headers = {"accept": "application/json"}
    if key is not None:
        headers["authorization"] = "Bearer " + key.decode("ascii", "replace")
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as r:
            body = json.load(r)
    except urllib.error.HTTPError as e:
        try:
            error = json.load(e).get("error")
        except (ValueError, AttributeError):
            error = None
        raise _HTTPError(e.code, error if isinstance(error, dict) else {}, url) from None
    except (OSError, ValueError) as e:
        raise TraceError(f"cannot reach {url}: {e}") from None
    if not isinstance(body, dict) or not isinstance(body.get("keys"), list):
        raise TraceError(f"{url} did not answer a trace")
    return body


class _HTTPError(TraceError):
    def __init__(self, status: int, error: Mapping[str, Any], url: str) -> None:
        code = error.get("code") or "error"
        message = error.get("message") or ""
        super().__init__(f"{url}: {status} {_clean(code)}" + (f": {_clean(message)}" if message
                                                              else ""))  # fmt: skip
        self.status = status
        self.error = error


def ask_halod(base: str, query: Mapping[str, Any], key: bytes | None) -> Json:
    """HaloD's merged answer; a follower's 409 ``not_leader`` is followed to the leader
    it names, once."""
    params = urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
    try:
        return _get(f"{base.rstrip('/')}/trace?{params}", key)
    except _HTTPError as e:
        leader = e.error.get("leader")
        status = leader.get("status") if isinstance(leader, dict) else None
        if e.status != 409 or not isinstance(status, str) or not status:
            raise
        url = status if "://" in status else f"http://{status}"
        return _get(f"{url.rstrip('/')}/trace?{params}", key)


def ask_node(base: str, query: Mapping[str, Any], key: bytes) -> Json:
    """One node's answer; its 404 means the trace endpoint is off there."""
    params = urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
    try:
        return _get(f"{base.rstrip('/')}/orbited/trace?{params}", key)
    except _HTTPError as e:
        if e.status == 404:
            raise TraceError(f"{e} (the node's trace endpoint is off: set its "
                             "trace_key_file)") from None  # fmt: skip
        raise


# -- the command ---------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    from orbited.runtime.commands import ArgumentParser

    p = ArgumentParser(
        prog="orbited trace",
        description="What became of a user's events: every node's delivery records for the "
        "user's keys, through HaloD's /trace (asks every node) or one node's /orbited/trace "
        "(--node), with a verdict per event (docs/operations.md, 'Tracing a delivery').",
    )
    p.add_argument("--user", help="the user whose keys to trace")
    p.add_argument("--session", help="only this session's keys")
    p.add_argument("--location", help="only this location's keys")
    p.add_argument("--key", help='one key as JSON, e.g. \'["alice", "", "/chat"]\'')
    p.add_argument("--event", help="the event id to give a verdict for (default: each "
                   "key's newest)")  # fmt: skip
    p.add_argument("--limit", type=int, help="records per key and node (default: all kept)")
    p.add_argument("--url", help=f"HaloD's status_http (default: the cluster's in --state-dir, "
                   f"else {DEFAULT_STATUS})")  # fmt: skip
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                   help="an `orbited cluster`'s state directory "
                   f"(default: {DEFAULT_STATE_DIR})")  # fmt: skip
    p.add_argument("--operator-key-file", type=Path,
                   help=f"HaloD's operator key (default: ${OPERATOR_KEY_ENV}, else the "
                   "cluster's in --state-dir, else none)")  # fmt: skip
    p.add_argument("--node", help="ask this node's browser port directly, e.g. "
                   "http://127.0.0.1:8000 (not HaloD)")  # fmt: skip
    p.add_argument("--key-file", type=Path, help="the node's trace key (trace_key_file); "
                   "needed with --node")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the answer as JSON")
    return p


def _query(args: argparse.Namespace) -> Json:
    """The query the flags name; ValueError says what is wrong."""
    user, session, location = args.user, args.session, args.location
    if args.key is not None:
        if any(x is not None for x in (user, session, location)):
            raise ValueError("give --key or --user [--session] [--location], not both")
        try:
            key = ConnectionKey.from_json(json.loads(args.key))
        except (ValueError, KeyError_) as e:
            raise ValueError(f"--key: {e}") from None
        user, session, location = key
    if user is None:
        raise ValueError("--user (or --key) is required")
    q = trace_query(0, user, session, location, args.event, args.limit)  # checks each part
    return {"user": q.user, "session": q.session, "location": q.location, "event": q.event,
            "limit": q.limit}  # fmt: skip


def _cluster_info(state_dir: Path) -> Json:
    try:
        info = json.loads((state_dir / "cluster.json").read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _operator_key(args: argparse.Namespace, info: Mapping[str, Any]) -> bytes | None:
    path = args.operator_key_file or os.environ.get(OPERATOR_KEY_ENV) or info.get(
        "operator_key_file")  # fmt: skip
    return None if not path else load_secret(Path(path))


def trace_command(argv: list[str]) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        query = _query(args)
    except ValueError as e:
        p.error(str(e))
    try:
        if args.node is not None:
            if args.key_file is None:
                p.error("--node needs --key-file (the node's trace_key_file)")
            name = urllib.parse.urlsplit(args.node).netloc or args.node
            raw = ask_node(args.node, query, load_secret(args.key_file))
            answer = node_view(raw, raw["node"] if isinstance(raw.get("node"), str) else name,
                               query)  # fmt: skip
        else:
            info = _cluster_info(args.state_dir)
            url = args.url or cluster_status(info) or DEFAULT_STATUS
            answer = ask_halod(url, query, _operator_key(args, info))
    except TraceError as e:
        print(f"orbited trace: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:  # a key file missing, unreadable or too short
        print(f"orbited trace: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(answer, indent=1, ensure_ascii=False))
    else:
        print("\n".join(trace_lines(answer)))
    return 0 if traced(answer, args.event) else 1
