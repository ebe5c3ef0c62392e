"""The web app of a load run: numbered events to every key, and which n each key accepted.

Owns the sending side of the chaos test, the data-plane failover benchmark and the soak
test (the browsers are bench/browsers.py; bench/chaos_report.py compares the two). Every
``--interval`` ms a round n (1, 2, ...) goes out: by default one SP request per route with
all that route's keys and data ``{"n": n, "t": send wall time, "k": "*"}``
(``orbited.client.twisted.TwistedClient``: many requests in flight, so a slow or dead route does
not hold back the others); with ``--per-key`` one request per key with ``"k": key id``;
with ``--users`` one request per route addressing each of that route's users as a whole,
``[user, "*", "*"]`` (docs/protocol.md, "Addressing a user or a session"; hash version 2
puts a user's keys on one route), and ``"k": "*"``: every key of the user gets the round.
A user's keys are recorded one by one from the ``matched`` reply
(bench/chaos_report.py, ``selector_statuses``): a key the node did not reach is
``unmatched`` (not accepted), so the per-key accounting is that of single-key events.

Each key's reply status per n is kept: ``delivered`` / ``queued`` / ``acked`` /
``unacked`` count as *accepted* (the node took the event: the browser must get it; an
``unacked`` event waits in a mailbox for ``linger``), ``no_connection``,
``moved``, ``error`` and ``unreachable`` do not. ``--resend N`` resends a route's keys that
got ``error`` / ``unreachable`` / ``moved`` up to N times (same event id and body, so a
node that did take it deduplicates) — on top of the client library's own retries.
``--ack-timeout S`` sends acknowledged-mode requests (``"ack": S``): the node answers
once the browser acknowledged (``acked``), or ``unacked`` after S seconds. Every waiting
request is in flight on its SP connection: keep routes × rounds/s × S under the node's
``sp_max_inflight`` (e.g. ``--routes 1`` against a single node).

    python -m bench.sender --node-sp tcp://127.0.0.1:9000 --prefix b --count 500 \\
        --interval 100 --duration 60 --report sender.json [--wait-for browsers-0.ready]
    python -m bench.sender --halod-sp-base 127.0.0.1:31000 --routes 24 ...

Report (JSON): ``run``, ``started``, ``ended``, ``rounds``, ``round_times`` (send time of
round n at index n−1), ``keys`` {key id: {"key", "route", "accepted": ranges,
"statuses": {status: ranges}}}, ``status_counts``, ``requests``, ``retries``,
``unfinished`` (requests still unanswered at the end), ``reply_latency`` and
``error_sample``. Ranges are [[lo, hi], ...] inclusive.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.browsers import BROADCAST, key_id, make_keys, read_keys, write_json
from bench.chaos_report import ACCEPTED_STATUSES, RangeSet, selector_statuses, spread
from orbited.client.cluster import Cluster, HaloDCluster, Node
from orbited.client.retry import RetryPolicy
from orbited.core.hashing import DEFAULT_ROUTES
from orbited.core.keys import ConnectionKey, Selector

RESENDABLE = frozenset({"error", "unreachable", "moved"})
Target = ConnectionKey | Selector  # a key, or (--users) a whole user
LATENCY_SAMPLES = 20_000


def classify(result: dict) -> str:
    """A reply result's status; the client's unreachable-node error gets its own name."""
    status = str(result.get("status", "error"))
    if status == "error" and result.get("code") == "unreachable":
        return "unreachable"
    return status


class _KeyRecord:
    __slots__ = ("key", "route", "accepted", "statuses")

    def __init__(self, key: ConnectionKey, route: int) -> None:
        self.key = key
        self.route = route
        self.accepted = RangeSet()
        self.statuses: dict[str, RangeSet] = {}


class Sender:
    """Rounds on a Twisted reactor through ``client`` (a TwistedClient or look-alike)."""

    def __init__(
        self,
        client: Any,
        cluster: Cluster,
        keys: Sequence[ConnectionKey],
        reactor: Any,
        interval: float = 0.1,
        per_key: bool = False,
        ack: float | None = None,
        resend: int = 0,
        resend_delay: float = 0.5,
        users: bool = False,
    ) -> None:
        self.client = client
        self.reactor = reactor
        self.interval = interval
        self.per_key = per_key
        self.ack = ack
        self.resend = resend
        self.resend_delay = resend_delay
        self.run_id = uuid.uuid4().hex[:12]
        self.records = {key_id(k): _KeyRecord(k, cluster.route_of(k)) for k in keys}
        self.users = users
        self.keys_of: dict[str, list[ConnectionKey]] = {}  # user -> its keys (--users)
        for k in keys:
            self.keys_of.setdefault(k.user, []).append(k)
        targets: list[Target] = [Selector(u, None) for u in self.keys_of] if users else [*keys]
        self.groups = list(cluster.group_by_route(targets).values())
        self.round_times: list[float] = []
        self.status_counts: Counter[str] = Counter()
        self.requests = 0
        self.retries = 0
        self.in_flight = 0
        self.latencies: list[float] = []
        self._latency_seen = 0
        self.error_sample: list[str] = []
        self.started = time.time()
        self.ended: float | None = None

    def round(self) -> None:
        n = len(self.round_times) + 1
        t = time.time()
        self.round_times.append(t)
        if self.per_key:
            for i, (kid, record) in enumerate(self.records.items()):
                self._send([record.key], {"n": n, "t": t, "k": kid}, f"{self.run_id}-{n}-{i}", n)
        else:
            data = {"n": n, "t": t, "k": BROADCAST}
            for keys in self.groups:  # one request per route, all in flight at once
                self._send(keys, data, f"{self.run_id}-{n}", n)

    def _send(
        self, keys: list[Target], data: dict, event_id: str, n: int, attempt: int = 0
    ) -> None:
        self.in_flight += 1
        self.requests += 1
        started = time.monotonic()
        d = self.client.send(keys, data, event_id=event_id, ack=self.ack)
        d.addCallback(self._replied, keys, data, event_id, n, attempt, started)
        d.addErrback(self._failed, keys, n)

    def _replied(
        self, results: dict, keys: list[Target], data: dict, event_id: str, n: int,
        attempt: int, started: float,
    ) -> None:  # fmt: skip
        self.in_flight -= 1
        self._latency(time.monotonic() - started)
        again: list[Target] = []
        for key, result in results.items():
            status = classify(result)
            if status in RESENDABLE and attempt < self.resend:
                again.append(key)
                continue
            if status in ("error", "unreachable") and len(self.error_sample) < 20:
                self.error_sample.append(f"n={n} {result}"[:200])
            if isinstance(key, Selector):
                statuses = selector_statuses(result, self.keys_of[key.user])
                for user_key, key_status in statuses.items():
                    self._record(ConnectionKey(*user_key), n, key_status)
            else:
                self._record(key, n, status)
        if again:
            # Same id, same data, same keys (a whole route failed together), so a node
            # that did take it the first time answers with its first reply.
            self.retries += 1
            self.reactor.callLater(
                self.resend_delay, self._send, again, data, event_id, n, attempt + 1
            )

    def _failed(self, failure: Any, keys: list[Target], n: int) -> None:
        # TwistedClient never errbacks for a dead node; this is a bug worth seeing.
        self.in_flight -= 1
        if len(self.error_sample) < 20:
            self.error_sample.append(f"n={n} errback {failure.getErrorMessage()}"[:200])
        for key in keys:
            if isinstance(key, Selector):
                for user_key in self.keys_of[key.user]:
                    self._record(user_key, n, "error")
            else:
                self._record(key, n, "error")

    def _record(self, key: ConnectionKey, n: int, status: str) -> None:
        record = self.records[key_id(key)]
        record.statuses.setdefault(status, RangeSet()).add(n)
        if status in ACCEPTED_STATUSES:
            record.accepted.add(n)
        self.status_counts[status] += 1

    def _latency(self, value: float) -> None:
        self._latency_seen += 1
        if len(self.latencies) < LATENCY_SAMPLES:
            self.latencies.append(value)
        elif (j := random.randrange(self._latency_seen)) < LATENCY_SAMPLES:
            self.latencies[j] = value

    def report(self) -> dict[str, Any]:
        return {
            "run": self.run_id,
            "started": self.started,
            "ended": self.ended or time.time(),
            "interval": self.interval,
            "ack": self.ack,
            "per_key": self.per_key,
            "users": self.users,
            "rounds": len(self.round_times),
            "round_times": self.round_times,
            "keys": {
                kid: {
                    "key": list(r.key),
                    "route": r.route,
                    "accepted": r.accepted.ranges(),
                    "statuses": {s: rs.ranges() for s, rs in sorted(r.statuses.items())},
                }
                for kid, r in self.records.items()
            },
            "status_counts": dict(self.status_counts),
            "requests": self.requests,
            "retries": self.retries,
            "unfinished": self.in_flight,
            "reply_latency": spread(self.latencies),
            "error_sample": self.error_sample,
            "cpu_seconds": time.process_time(),
        }


# -- processes ---------------------------------------------------------------------------


class SenderProcess:
    """For tests and benchmarks: ``python -m bench.sender`` as a subprocess."""

    def __init__(self, folder: Path, args: Sequence[str], name: str = "sender") -> None:
        self.report_file = Path(folder) / f"{name}.json"
        self.report_file.unlink(missing_ok=True)
        self.log_file = Path(folder) / f"{name}.log"
        log = self.log_file.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.sender", *args, "--report", str(self.report_file)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def wait(self, timeout: float = 60.0) -> dict:
        """Wait for the run to end by itself (--duration/--rounds); its report."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise RuntimeError(f"sender did not finish:\n{self.log_file.read_text()}") from None
        return self._report()

    def stop(self, timeout: float = 30.0) -> dict:
        """SIGTERM (stop sending, drain, report)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def _report(self) -> dict:
        if not self.report_file.exists():
            raise RuntimeError(f"sender wrote no report:\n{self.log_file.read_text()}")
        return json.loads(self.report_file.read_text())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.sender",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--node-sp", help="one node's SP address, tcp://host:port")
    where.add_argument(
        "--halod-sp-base", metavar="HOST:PORT", help="HaloD's SP port of route 1 (+r-1)"
    )
    p.add_argument("--routes", type=int, default=DEFAULT_ROUTES, help="route count (HaloD's)")
    p.add_argument("--prefix", default="b", help="keys are (PREFIX<i>, 's', '/bench')")
    p.add_argument("--count", type=int, default=250)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--keys-file", type=Path, help="JSON [[user, session, location], ...] instead")
    p.add_argument("--interval", type=float, default=100, help="ms between rounds")
    p.add_argument("--duration", type=float, default=0, help="seconds of sending")
    p.add_argument("--rounds", type=int, default=0, help="stop after this many rounds")
    p.add_argument("--per-key", action="store_true", help="one request per key, k = key id")
    p.add_argument("--users", action="store_true",
                   help='one [user, "*", "*"] per user, by route (hash version 2)')  # fmt: skip
    p.add_argument("--ack-timeout", type=float, help="acknowledged mode: request field ack=S")
    p.add_argument("--timeout", type=float, default=5.0, help="client time-out per request")
    p.add_argument(
        "--retries",
        type=int,
        default=None,
        help="cap on the client library's resends (default: its retry budget)",
    )
    p.add_argument(
        "--backoff", type=float, default=RetryPolicy.backoff, help="client library backoff"
    )
    p.add_argument(
        "--retry-budget",
        type=float,
        default=RetryPolicy.budget,
        help="client library: s after its first attempt a request is resent",
    )
    p.add_argument("--resend", type=int, default=0, help="our own resends of failed routes")
    p.add_argument("--resend-delay", type=float, default=0.5)
    p.add_argument("--drain", type=float, default=0, help="s to await replies at the end")
    p.add_argument("--wait-for", type=Path, action="append", default=[],
                   help="start once these files exist (browsers' ready files)")  # fmt: skip
    p.add_argument("--wait-timeout", type=float, default=120)
    p.add_argument("--progress", type=float, default=0, help="a counter line to stderr every S")
    p.add_argument("--report", type=Path, required=True)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.per_key and args.users:
        print("sender: --per-key and --users exclude each other", file=sys.stderr)
        return 2
    deadline = time.monotonic() + args.wait_timeout
    while not all(f.exists() for f in args.wait_for):
        if time.monotonic() > deadline:
            print(f"sender: gave up waiting for {args.wait_for}", file=sys.stderr)
            return 1
        time.sleep(0.05)

    from twisted.internet import reactor, task

    from orbited.client.twisted import TwistedClient

    if args.keys_file:
        keys = read_keys(args.keys_file)[args.offset : args.offset + args.count]
    else:
        keys = make_keys(args.prefix, args.count, args.offset)
    if args.node_sp:
        cluster: Cluster = Cluster([Node(args.node_sp, "http://unused")], routes=args.routes)
    else:
        host, _, port = args.halod_sp_base.rpartition(":")
        cluster = HaloDCluster(host, int(port), 0, routes=args.routes)
    timeout = args.timeout
    if args.ack_timeout is not None:  # the node may hold the reply that long
        timeout = max(timeout, args.ack_timeout + 2)
    client = TwistedClient(cluster, reactor, timeout=timeout, retries=args.retries,
                           backoff=args.backoff, retry_budget=args.retry_budget)  # fmt: skip
    sender = Sender(client, cluster, keys, reactor, args.interval / 1000, args.per_key,
                    args.ack_timeout, args.resend, args.resend_delay, args.users)  # fmt: skip
    # Long enough for every reply, resend and client retry of the last round by default.
    drain = args.drain or (max(timeout, args.retry_budget) + timeout
                           + args.resend * args.resend_delay + 2)  # fmt: skip
    state = {"stopping": False}

    def tick() -> None:
        sender.round()
        if args.rounds and len(sender.round_times) >= args.rounds:
            finish()

    loop = task.LoopingCall(tick)

    def finish() -> None:
        if state["stopping"]:
            return
        state["stopping"] = True
        sender.ended = time.time()
        if loop.running:
            loop.stop()
        give_up = time.monotonic() + drain

        def drained() -> None:
            if sender.in_flight and time.monotonic() < give_up:
                reactor.callLater(0.05, drained)
                return
            write_json(args.report, sender.report())
            client.close()
            reactor.stop()

        drained()

    def progress() -> None:
        print(
            f"sender t={time.time() - sender.started:.0f}s rounds={len(sender.round_times)} "
            f"in_flight={sender.in_flight} {dict(sender.status_counts)}",
            file=sys.stderr,
            flush=True,
        )

    def on_signal(*_: object) -> None:
        reactor.callFromThread(finish)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if args.progress > 0:
        task.LoopingCall(progress).start(args.progress, now=False)
    loop.start(args.interval / 1000, now=True)
    if args.duration > 0:
        reactor.callLater(args.duration, finish)
    reactor.run(installSignalHandlers=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
