"""The hub's own CPU per event, in one process, without sockets.

    .venv/bin/python -m bench.hubcost [--keys 1000] [--events 10000] [--reps 5] [--batch 20]
    .venv/bin/python -m bench.hubcost --fanout 10000 [--reps 5]
    .venv/bin/python -m bench.hubcost --attach 5000 [--reps 5]

One-recipient event requests (the SP request bodies ``bench dispatch`` sends) go through
``Hub.handle_requests`` (``handle_request`` one by one in a tree without it) to keys whose
attached sink accepts every frame at once (no I/O), ``--batch`` requests per delivery
batch as the SP server hands one read's over: request parsing,
dedup memory, mailbox, frames, reply. Prints the best of ``--reps`` runs in µs of CPU
(``time.process_time``) per event. To measure another commit's hub, run this file as a
script with that work tree first on the path:
``PYTHONPATH=<work tree> .venv/bin/python bench/hubcost.py`` (docs/performance.md,
"Per-event path").

``--fanout N``: instead, requests to N keys each (``bench dispatch fanout``'s request),
one per delivery batch, to sinks that keep their frame's bytes, WebSocket-framed, and
join them at the batch's end as the lean front's do (no socket); prints µs of CPU per
recipient, the best of ``--reps`` requests, the real reactor as the clock.

``--attach N``: the hub's part of an accept and of a long-poll delivery, the real reactor
as the clock, µs of CPU each (the best of ``--reps`` rounds of N keys): ``cold``, an
attach of a key with no mailbox (a new WebSocket); ``poll``, one long-poll delivery's
hub work for a key whose poll is held: an event request to it (the held poll takes the
event), the poll's detach and the next poll's attach resuming from the event (``last``);
``event`` alone, the same request to a key attached by a WebSocket-like sink (as the
default run, with the real reactor).

Every mode runs with the node's garbage-collector settings (orbited.node.collector.tune:
young collections every 20 000 allocations, not 700), as a node does.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from typing import Any

from twisted.internet.task import Clock

from orbited.core.keys import ConnectionKey
from orbited.node.hub import Hub, HubConfig


class AcceptingSink:
    wants_pings = True
    last_write = 0.0
    kind = "ws"

    def deliver(self, out: list[Any]) -> bool:
        return True

    def replaced(self) -> None:
        pass

    def reconnect(self, reason: str, route: int | None = None, spread: float | None = None) -> None:
        pass

    def closed(self, code: int, reason: str) -> None:
        pass


class BatchingSink:
    """A sink as the lean front's: frames its bytes, enlists once per batch, joins at
    the flush (orbited.node.flush's contract), writes nothing."""

    wants_pings = True
    kind = "ws"

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.pending: list[bytes] | None = None
        self.last_write = 0.0
        self.written = 0

    def deliver(self, out: list[Any]) -> bool:
        data = b"".join(b"\x81%c%s" % (len(f.data), f.data) if len(f.data) < 126
                        else b"\x81\x7e%s%s" % (len(f.data).to_bytes(2, "big"), f.data)
                        for f in out)  # fmt: skip
        self.last_write = self.hub.now()
        if self.pending is None:
            if not self.hub.enlist(self):
                self.written += len(data)
                return True
            self.pending = [data]
        else:
            self.pending.append(data)
        return True

    def flush(self) -> None:
        pending, self.pending = self.pending, None
        if pending:
            self.written += len(pending[0] if len(pending) == 1 else b"".join(pending))

    def replaced(self) -> None:
        pass

    def reconnect(self, reason: str, route: int | None = None, spread: float | None = None) -> None:
        pass

    def closed(self, code: int, reason: str) -> None:
        pass


def fanout(keys: int, reps: int) -> None:
    from twisted.internet import reactor

    hub = Hub(reactor, HubConfig(), epoch="ep")
    targets = [ConnectionKey(f"c{i}", "b", "/bench") for i in range(keys)]
    for key in targets:
        hub.attach(key, BatchingSink(hub), None)
    to = [list(k) for k in targets]
    bodies = [
        json.dumps({"id": f"fan-{i}", "to": to, "data": {"t": time.time(), "ph": "f", "n": i}},
                   separators=(",", ":")).encode()
        for i in range(reps + 1)
    ]  # fmt: skip
    best = float("inf")
    for i, body in enumerate(bodies):
        started = time.process_time()
        with hub.batch():
            hub.handle_request(body)
        if i:  # the first is a warm-up
            best = min(best, (time.process_time() - started) / keys * 1e6)
    print(f"{best:.2f} µs of CPU per recipient (best of {reps} requests to {keys} keys)")


class PollSink(AcceptingSink):
    """A held long-poll: takes the frames of one delivery (the hello, then an event)."""

    kind = "poll"
    wants_pings = False

    def __init__(self) -> None:
        self.frames: list[Any] = []

    def deliver(self, out: list[Any]) -> bool:
        self.frames.extend(out)
        return True


def attach(n: int, reps: int) -> None:
    from twisted.internet import reactor

    from orbited.node.mailbox import Position

    def body(i: int, key: ConnectionKey) -> bytes:
        return json.dumps({"id": f"{i:x}-{time.time()}", "to": [list(key)],
                           "data": {"t": time.time(), "ph": "m", "n": i}}).encode()  # fmt: skip

    cold = poll = event = float("inf")
    for rep in range(reps + 1):
        hub = Hub(reactor, HubConfig(), epoch="ep")
        keys = [ConnectionKey(f"u{rep}-{i}", "s", "/x") for i in range(n)]
        sinks = [PollSink() for _ in keys]
        started = time.process_time()
        for key, sink in zip(keys, sinks, strict=True):
            hub.attach(key, sink, None)
        took = (time.process_time() - started) / n * 1e6
        # One long-poll delivery per key: the event, the poll's detach, the next attach.
        bodies = [body(i, key) for i, key in enumerate(keys)]
        nexts = [PollSink() for _ in keys]
        handle, detach, attach_ = hub.handle_request, hub.detach, hub.attach
        started = time.process_time()
        for key, sink, nxt, b in zip(keys, sinks, nexts, bodies, strict=True):
            with hub.batch():
                handle(b)
            detach(key, sink)
            frame = sink.frames[-1]
            if frame.seq is None:
                raise SystemExit(f"the held poll of {key} got no event")
            attach_(key, nxt, Position(frame.stream, frame.seq))
        cycle = (time.process_time() - started) / n * 1e6
        bodies = [body(n + i, key) for i, key in enumerate(keys)]
        for key in keys:
            hub.attach(key, AcceptingSink(), None)
        started = time.process_time()
        for b in bodies:
            with hub.batch():
                handle(b)
        one = (time.process_time() - started) / n * 1e6
        hub.shutdown("bench")
        if rep:  # the first is a warm-up
            cold, poll, event = min(cold, took), min(poll, cycle), min(event, one)
    print(f"cold attach {cold:.2f} µs, long-poll delivery {poll:.2f} µs, "
          f"1:1 event {event:.2f} µs of CPU (best of {reps} × {n})")  # fmt: skip


def main() -> None:
    from orbited.node import collector

    collector.tune()  # the node's garbage-collector settings (orbited.node.collector)
    p = argparse.ArgumentParser(prog="python -m bench.hubcost", description=__doc__.split("\n")[0])
    p.add_argument("--keys", type=int, default=1000)
    p.add_argument("--events", type=int, default=10_000, help="events per repetition")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--batch", type=int, default=20, help="requests per delivery batch")
    p.add_argument("--fanout", type=int, default=0, help="recipients per request (fan-out)")
    p.add_argument("--attach", type=int, default=0, help="keys: attach and long-poll costs")
    args = p.parse_args()
    if args.attach:
        attach(args.attach, args.reps)
        return
    if args.fanout:
        fanout(args.fanout, args.reps)
        return
    hub = Hub(Clock(), HubConfig(), epoch="ep")
    keys = [ConnectionKey(f"c{i}", "s", "/x") for i in range(args.keys)]
    for key in keys:
        hub.attach(key, AcceptingSink(), None)
    total = args.events * (args.reps + 1)
    bodies = [
        json.dumps({"id": f"{i:x}-{time.time()}", "to": [list(keys[i % args.keys])],
                    "data": {"t": time.time(), "ph": "m", "n": i}}).encode()
        for i in range(total)
    ]  # fmt: skip
    scope = getattr(hub, "batch", None)  # (a tree before the delivery batch has none)
    handle = hub.handle_request
    many = getattr(hub, "handle_requests", None)  # (nor one before handle_requests)

    def run(part: list[bytes]) -> None:
        for start in range(0, len(part), args.batch):
            with scope() if scope is not None else nullcontext():
                if many is not None:
                    many(part[start : start + args.batch])
                    continue
                for body in part[start : start + args.batch]:
                    handle(body)

    run(bodies[: args.events])  # warm-up
    best = float("inf")
    for rep in range(1, args.reps + 1):
        part = bodies[rep * args.events : (rep + 1) * args.events]
        started = time.process_time()
        run(part)
        best = min(best, (time.process_time() - started) / len(part) * 1e6)
    print(f"{best:.2f} µs of CPU per event (best of {args.reps} × {args.events})")


if __name__ == "__main__":
    main()
