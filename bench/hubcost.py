"""The hub's own CPU per event, in one process, without sockets.

    .venv/bin/python -m bench.hubcost [--keys 1000] [--events 10000] [--reps 5] [--batch 20]

One-recipient event requests (the SP request bodies ``bench dispatch`` sends) go through
``Hub.handle_request`` to keys whose attached sink accepts every frame at once (no I/O),
``--batch`` requests per delivery batch as the SP server opens them: request parsing,
dedup memory, mailbox, frames, reply. Prints the best of ``--reps`` runs in µs of CPU
(``time.process_time``) per event. To measure another commit's hub, run this file as a
script with that work tree first on the path:
``PYTHONPATH=<work tree> .venv/bin/python bench/hubcost.py`` (docs/performance.md,
"Per-event path").
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

    def deliver(self, out: list[Any]) -> bool:
        return True

    def replaced(self) -> None:
        pass

    def reconnect(self, reason: str) -> None:
        pass


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.hubcost", description=__doc__.split("\n")[0])
    p.add_argument("--keys", type=int, default=1000)
    p.add_argument("--events", type=int, default=10_000, help="events per repetition")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--batch", type=int, default=20, help="requests per delivery batch")
    args = p.parse_args()
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

    def run(part: list[bytes]) -> None:
        for start in range(0, len(part), args.batch):
            with scope() if scope is not None else nullcontext():
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
