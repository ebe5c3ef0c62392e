"""The hub's CPU for an event addressed to a user vs the same deliveries as single-key events.

    .venv/bin/python -m bench user [--users 200] [--events 2000] [--reps 3] [--batch 20]
                                   [--connections 1,3,10] [--json FILE] [--quick]

In one process, without sockets, like ``bench.hubcost``: each of ``--users`` users has k
keys attached (k from ``--connections``), on sinks that accept every frame at once, and
the same user events are sent three ways through ``Hub.handle_request``, ``--batch``
requests per delivery batch as the SP server opens them:

- **wildcard**: one request ``to: [["u", "*", "*"]]`` per user event (k deliveries);
- **per key**: k requests, one per key, each ``to: [key]`` (what a web app without user
  addressing sends);
- **listed**: one request listing the k keys;
- **latest**: the wildcard with a latest-value tag per user (``"latest": "state:<user>"``):
  each event replaces the user's previous one, delivered but not acknowledged, in each
  key's mailbox (docs/protocol.md, "Latest-value events").

Each user event costs: request parsing, dedup memory, k mailbox appends, k frames and the
reply. Prints, per k, µs of CPU (``time.process_time``) per user event and per delivered
frame for each way (best of ``--reps``), and the ratios wildcard/per key and listed/per
key, latest / wildcard; and wildcard at k = 1 against a single-key event (per key at
k = 1). One run: the
machine must be quiet for the figures to mean anything (bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock

from bench.report import machine
from orbited.core.keys import ConnectionKey
from orbited.node.hub import Hub, HubConfig

WAYS = ("wildcard", "per_key", "listed", "latest")


class AcceptingSink:
    """A transport that takes every frame at once (no I/O)."""

    wants_pings = True
    last_write = 0.0

    def __init__(self) -> None:
        self.frames = 0

    def deliver(self, out: list[Any]) -> bool:
        self.frames += len(out)
        return True

    def replaced(self) -> None:
        pass

    def reconnect(self, reason: str, route: int | None = None) -> None:
        pass

    def closed(self, code: int, reason: str) -> None:
        raise AssertionError(f"a bench sink was closed: {code} {reason}")


def user_keys(users: int, k: int) -> dict[str, list[ConnectionKey]]:
    return {f"u{k}-{u}": [ConnectionKey(f"u{k}-{u}", f"s{i}", f"/t{i}") for i in range(k)]
            for u in range(users)}  # fmt: skip


def bodies(way: str, keys: dict[str, list[ConnectionKey]], events: int, tag: str) -> list[bytes]:
    """The request bodies for ``events`` user events, round-robin over the users."""
    users = list(keys)
    out: list[bytes] = []
    for n in range(events):
        user = users[n % len(users)]
        data = {"t": n, "ph": "m", "text": "hello"}
        extra: dict[str, str] = {}
        if way in ("wildcard", "latest"):
            requests = [[[user, "*", "*"]]]
            if way == "latest":
                extra["latest"] = f"state:{user}"
        elif way == "listed":
            requests = [[list(k) for k in keys[user]]]
        else:
            requests = [[list(k)] for k in keys[user]]
        for i, to in enumerate(requests):
            request = {"id": f"{tag}-{way}-{n}-{i}", "to": to, "data": data, **extra}
            out.append(json.dumps(request, separators=(",", ":")).encode())
    return out


def measure(k: int, users: int, events: int, reps: int, batch: int) -> dict[str, Any]:
    """µs of CPU per user event and per frame, for each way, with k keys per user."""
    figures: dict[str, Any] = {"connections": k}
    for way in WAYS:
        # A fresh hub per way: mailboxes and dedup memory start alike.
        hub = Hub(Clock(), HubConfig(), epoch="ep")
        keys = user_keys(users, k)
        sinks = []
        for key in (key for ks in keys.values() for key in ks):
            sinks.append(AcceptingSink())
            hub.attach(key, sinks[-1], None)
        scope: Callable[[], AbstractContextManager[Any]] = getattr(hub, "batch", nullcontext)
        handle = hub.handle_request
        per_event = len(bodies(way, keys, 1, "probe"))

        def run(part: list[bytes], scope=scope, handle=handle) -> None:
            for start in range(0, len(part), batch):
                with scope():
                    for body in part[start : start + batch]:
                        reply = handle(body)
                        if b'"ok":true' not in reply:  # type: ignore[operator]
                            raise SystemExit(f"the hub refused a request: {reply!r}")

        run(bodies(way, keys, events, "warm"))
        best = float("inf")
        for rep in range(reps):
            part = bodies(way, keys, events, f"r{rep}")
            frames_before = sum(s.frames for s in sinks)
            started = time.process_time()
            run(part)
            spent = time.process_time() - started
            frames = sum(s.frames for s in sinks) - frames_before
            if frames != events * k:
                raise SystemExit(f"{way}, k={k}: {frames} frames for {events * k} deliveries")
            best = min(best, spent)
        figures[way] = {
            "us_per_user_event": round(best / events * 1e6, 2),
            "us_per_frame": round(best / (events * k) * 1e6, 2),
            "requests_per_user_event": per_event,
        }
    per_key = figures["per_key"]["us_per_user_event"]
    figures["wildcard_vs_per_key"] = round(figures["wildcard"]["us_per_user_event"] / per_key, 3)
    figures["listed_vs_per_key"] = round(figures["listed"]["us_per_user_event"] / per_key, 3)
    figures["latest_vs_wildcard"] = round(
        figures["latest"]["us_per_user_event"] / figures["wildcard"]["us_per_user_event"], 3
    )
    return figures


def table(results: list[dict[str, Any]]) -> Iterator[str]:
    yield (f"{'k':>3}  {'wildcard µs':>12} {'per key µs':>11} {'listed µs':>10} "
           f"{'latest µs':>10}  {'µs/frame w/p/l':>20}  {'wildcard/per key':>16} "
           f"{'listed/per key':>14} {'latest/wildcard':>15}")  # fmt: skip
    for r in results:
        w, p, li, la = (r[way] for way in WAYS)
        per_frame = f"{w['us_per_frame']}/{p['us_per_frame']}/{li['us_per_frame']}"
        yield (f"{r['connections']:>3}  {w['us_per_user_event']:>12} "
               f"{p['us_per_user_event']:>11} {li['us_per_user_event']:>10} "
               f"{la['us_per_user_event']:>10}  {per_frame:>20}  "
               f"{r['wildcard_vs_per_key']:>16} {r['listed_vs_per_key']:>14} "
               f"{r['latest_vs_wildcard']:>15}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench user", description=__doc__.split("\n")[0])
    p.add_argument("--users", type=int, default=200)
    p.add_argument("--events", type=int, default=2000, help="user events per repetition")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--batch", type=int, default=20, help="requests per delivery batch")
    p.add_argument("--connections", default="1,3,10", help="k: keys per user, comma-separated")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--quick", action="store_true", help="a smoke run (tiny counts)")
    args = p.parse_args(argv)
    if args.quick:
        args.users, args.events, args.reps = 10, 50, 1
    try:
        ks = [int(k) for k in args.connections.split(",")]
    except ValueError:
        p.error("--connections is a comma-separated list of integers")
    if min(ks) < 1 or args.users < 1 or args.events < 1 or args.reps < 1 or args.batch < 1:
        p.error("--connections, --users, --events, --reps and --batch must be at least 1")
    facts = machine()
    results = [measure(k, args.users, args.events, args.reps, args.batch) for k in ks]
    for line in table(results):
        print(line)
    single = next((r for r in results if r["connections"] == 1), None)
    summary: dict[str, Any] = {
        "results": results, "users": args.users, "events": args.events, "reps": args.reps,
        "batch": args.batch, "machine": facts,
    }  # fmt: skip
    if single is not None:
        ratio = round(single["wildcard"]["us_per_user_event"]
                      / single["per_key"]["us_per_user_event"], 3)  # fmt: skip
        summary["wildcard_k1_vs_single_key"] = ratio
        print(f"wildcard to a user with 1 connection / a single-key event: {ratio}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
