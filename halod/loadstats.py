"""Per-node load figures from heartbeats: rates, ack latency, browsers per route.

Sans-I/O (time passed in). A heartbeat's optional ``load`` (docs/halod-protocol.md)
carries counters cumulative since the node started, the ack-latency samples since the
previous beat (sparse orbited.core.latency pairs) and attached connections per route
(deltas, or all routes with ``routes_full``). Rates are Δcount/Δt between consecutive
beats, smoothed (EWMA, ``RATE_WINDOW`` seconds); a counter that goes down, or a new
registration, starts a new baseline. Ack quantiles are over the last ``ACK_WINDOW``
seconds of histograms. Membership stays the strictly typed core: load is not membership.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from orbited.core.control import HeartbeatLoad
from orbited.core.latency import LatencyHistogram, Pairs, upper_ms

RATE_WINDOW = 5.0  # seconds: the EWMA's time constant
ACK_WINDOW = 30.0  # seconds of ack-latency histograms behind p50/p99
HISTORY = 120  # events/s points kept per node (one per beat)
SPARK = 60  # points the dashboard draws
RATES = ("events", "recipients", "delivered", "acked")


@dataclass
class NodeLoad:
    name: str
    epoch_started: float  # first beat of this registration
    last: dict[str, int] | None = None  # counters of the previous beat
    last_at: float | None = None
    rates: dict[str, float] = field(default_factory=dict)  # per second, smoothed
    history: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=HISTORY))
    ack_window: deque[tuple[float, Pairs]] = field(default_factory=deque)  # per beat
    routes: dict[int, int] = field(default_factory=dict)  # attached per route
    # The ack_window's samples added up (kept as beats come and go: reading it is O(1)).
    ack: LatencyHistogram = field(default_factory=LatencyHistogram)

    def observe(self, load: HeartbeatLoad, now: float) -> None:
        counters = load.counters()
        last, last_at = self.last, self.last_at
        if last is not None and last_at is not None and now > last_at:
            went_down = False
            for name, value in last.items():
                if counters.get(name, value) < value:
                    went_down = True
                    break
            if went_down:
                self.rates = {}  # the node started again: a new baseline
            else:
                dt = now - last_at
                alpha = 1.0 - math.exp(-dt / RATE_WINDOW)
                for name in RATES:
                    if name in counters and name in last:
                        rate = (counters[name] - last[name]) / dt
                        old = self.rates.get(name)
                        self.rates[name] = rate if old is None else old + alpha * (rate - old)
                if "events" in self.rates:  # rounded once here, drawn every second
                    self.history.append((now, round(self.rates["events"], 1)))
        self.last, self.last_at = counters, now
        if load.ack_hist:
            self.ack_window.append((now, load.ack_hist))
            self.ack.add(load.ack_hist)
        self._trim(now)
        if load.routes_full:
            self.routes = {r: n for r, n in load.routes.items() if n}
        else:
            for route, n in load.routes.items():
                if n:
                    self.routes[route] = n
                else:
                    self.routes.pop(route, None)

    def _trim(self, now: float) -> None:
        window, counts = self.ack_window, self.ack.counts
        while window and now - window[0][0] > ACK_WINDOW:
            for bucket, n in window.popleft()[1]:
                counts[bucket] -= n
                self.ack.count -= n

    def ack_histogram(self, now: float) -> LatencyHistogram:
        """The samples of the last ACK_WINDOW seconds (HaloD's own: read, do not change)."""
        self._trim(now)
        return self.ack

    def ack_quantiles(self, now: float) -> dict[str, float | None]:
        """``{"p50": ms, "p99": ms, "n": samples}`` over the last ACK_WINDOW seconds (the
        quantiles are bucket upper bounds; None without samples)."""
        hist = self.ack_histogram(now)
        return {"p50": hist.quantile(0.5), "p99": hist.quantile(0.99), "n": hist.count}

    def rate(self, name: str) -> float | None:
        value = self.rates.get(name)
        return None if value is None else round(value, 1)

    def spark(self) -> list[float]:
        """The last SPARK events/s points, oldest first."""
        start = max(0, len(self.history) - SPARK)
        return [v for _, v in islice(self.history, start, None)]

    def to_json(self, now: float) -> dict[str, Any]:
        ack = self.ack_quantiles(now)
        return {
            "events_per_s": self.rate("events"),
            "recipients_per_s": self.rate("recipients"),
            "deliveries_per_s": self.rate("delivered"),
            "acks_per_s": self.rate("acked"),
            "ack_p50_ms": ack["p50"],
            "ack_p99_ms": ack["p99"],
            "ack_samples": ack["n"],
            "spark": self.spark(),
            "routes": {str(r): n for r, n in sorted(self.routes.items())},
        }


class ClusterLoad:
    def __init__(self) -> None:
        self.nodes: dict[str, NodeLoad] = {}
        # Every ack-latency sample since this HaloD started (Prometheus counters: never
        # down), and their sum with each sample at its bucket's upper bound.
        self.ack_total = LatencyHistogram()
        self.ack_sum_s = 0.0

    def registered(self, name: str, now: float) -> None:
        """``name`` (re)registered: its counters start again."""
        self.nodes[name] = NodeLoad(name, now)

    def heartbeat(self, name: str, load: HeartbeatLoad | None, now: float) -> None:
        if load is None:
            return
        node = self.nodes.get(name)
        if node is None:
            node = self.nodes[name] = NodeLoad(name, now)
        node.observe(load, now)
        if load.ack_hist:
            self.ack_total.add(load.ack_hist)
            self.ack_sum_s += sum(n * upper_ms(b) for b, n in load.ack_hist) / 1000.0

    def gone(self, name: str) -> None:
        self.nodes.pop(name, None)

    def routes_by_node(self) -> dict[str, dict[int, int]]:
        return {name: dict(node.routes) for name, node in self.nodes.items()}

    def histogram(self, now: float) -> LatencyHistogram:
        """Every node's ack-latency samples of the last ACK_WINDOW seconds together."""
        merged = LatencyHistogram()
        for node in self.nodes.values():
            merged.merge(node.ack_histogram(now))
        return merged

    def totals(self, now: float) -> dict[str, Any]:
        """Cluster events/s and deliveries/s (sums of the nodes that report load; None
        when none does) and ack p50/p99 of the merged histograms."""

        def total(name: str) -> float | None:
            values = [n.rates[name] for n in self.nodes.values() if name in n.rates]
            return round(sum(values), 1) if values else None

        merged = self.histogram(now)
        return {
            "events_per_s": total("events"),
            "deliveries_per_s": total("delivered"),
            "ack_p50_ms": merged.quantile(0.5),
            "ack_p99_ms": merged.quantile(0.99),
            "ack_samples": merged.count,
        }
