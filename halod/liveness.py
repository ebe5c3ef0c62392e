"""Is a node that went quiet dead, or only its control link? (sans-I/O)

When a node's control connection closes, or it stops heartbeating, HaloD *probes* it: a
TCP connect to its browser and its SP address (halod.probe does the connecting). The
outcomes decide, by the table below, whether the node is failed over at once or keeps
its deadline (``grace`` after a disconnection; ``grace`` more after missed heartbeats)
while HaloD keeps probing it: again after FIRST_GAP seconds, the gap doubling up to
``probe_interval``. Time is passed in. Rules: docs/halod.md, "Detecting a dead node".

| cause \\ verdict | dead                 | unknown (time-out) | alive (answers)          |
|-----------------|----------------------|--------------------|--------------------------|
| disconnected    | fail now             | grace applies      | grace applies            |
| silent          | fail now             | fail now           | grace more (k×i + grace) |

- a port is **dead** when the connect is refused, reset or unreachable; it **answers**
  when the connect completes (the kernel completes it for a listening socket, even for a
  stopped process); **time-out**: no answer within ``probe_timeout``;
- the verdict: **alive** if any port answers (the first answer decides, without waiting
  for the other port), else **dead** if any port is dead, else **unknown**;
- a node that registers again, or heartbeats again, is no longer suspected: results of
  its probes still in flight are ignored (each probe has an id).

The quick second probe matters: a process killed with SIGKILL has its sockets closed by
its kernel one after the other, and HaloD on the same host can see the control connection
close and connect to a listener that is not closed yet (measured: most of the time on a
loaded 2-core box). The second probe, FIRST_GAP later, finds the ports refusing.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum


class Outcome(Enum):
    """One TCP connect to one of a node's ports."""

    ANSWERED = "answered"
    REFUSED = "refused"
    RESET = "reset"
    UNREACHABLE = "unreachable"
    TIMEOUT = "timeout"


DEAD_OUTCOMES = frozenset({Outcome.REFUSED, Outcome.RESET, Outcome.UNREACHABLE})
FIRST_GAP = 0.05  # seconds from a probe's verdict to the second probe; then doubling


class Cause(Enum):
    """Why a node is suspected."""

    DISCONNECTED = "disconnected"  # its control connection closed
    SILENT = "silent"  # connected, but no heartbeat for missed_heartbeats intervals


class Verdict(Enum):
    ALIVE = "alive"
    DEAD = "dead"
    UNKNOWN = "unknown"


# (cause, verdict) → fail the node now? Otherwise its deadline applies and it is probed
# again every probe_interval until then.
FAIL_NOW: dict[tuple[Cause, Verdict], bool] = {
    (Cause.DISCONNECTED, Verdict.DEAD): True,
    (Cause.DISCONNECTED, Verdict.UNKNOWN): False,
    (Cause.DISCONNECTED, Verdict.ALIVE): False,
    (Cause.SILENT, Verdict.DEAD): True,
    (Cause.SILENT, Verdict.UNKNOWN): True,
    (Cause.SILENT, Verdict.ALIVE): False,
}


def verdict(outcomes: Iterable[Outcome | None], complete: bool) -> Verdict | None:
    """The verdict on one probe's port outcomes (None: a port has not answered yet).
    ``complete``: the time-out has passed (missing ports count as time-outs). Returns None
    while the outcome still depends on a port not heard from."""
    seen = list(outcomes)
    if Outcome.ANSWERED in seen:
        return Verdict.ALIVE
    if None in seen and not complete:
        return None
    if any(o in DEAD_OUTCOMES for o in seen):
        return Verdict.DEAD
    return Verdict.UNKNOWN


@dataclass(frozen=True)
class ProbeSettings:
    enabled: bool = True  # probe at all (off: only the deadlines decide, as before)
    timeout: float = 0.5  # seconds a connect may take before it counts as a time-out
    interval: float = 0.5  # seconds between probes of a node that is still suspected


@dataclass(frozen=True)
class ProbeRequest:
    """Connect to ``address`` (``host:port``), one of node ``name``'s ``port``s, and report
    the Outcome with ``probe_id`` (halod.probe)."""

    name: str
    probe_id: int
    port: str  # "browser" or "sp"
    address: str
    timeout: float


@dataclass(frozen=True)
class Finding:
    """A probe's verdict on a suspected node, and whether it is failed over now."""

    name: str
    cause: Cause
    verdict: Verdict
    fail: bool
    outcomes: tuple[tuple[str, Outcome], ...]  # (port, outcome) in port order
    changed: bool = True  # the first verdict on this suspicion, or not the previous one

    def describe(self) -> str:
        ports = ", ".join(f"{port} {outcome.value}" for port, outcome in self.outcomes)
        return f"probe: {ports}"


@dataclass
class _Suspect:
    cause: Cause
    ports: dict[str, str]  # port → address
    probe_id: int = 0
    started: float | None = None  # a probe is in flight since
    results: dict[str, Outcome | None] = field(default_factory=dict)
    next_probe: float = 0.0
    gap: float = FIRST_GAP  # seconds from this verdict to the next probe
    last: Verdict | None = None


class Prober:
    """The suspected nodes and their probes. Membership calls ``suspect`` when a node
    disconnects or falls silent, ``clear`` when it is back (or gone), ``result`` with each
    port's outcome and ``tick`` on every deadline check."""

    def __init__(self, settings: ProbeSettings) -> None:
        self.settings = settings
        self._suspects: dict[str, _Suspect] = {}
        self._ids = itertools.count(1)

    def suspect(self, name: str, cause: Cause, ports: dict[str, str], now: float
                ) -> list[ProbeRequest]:  # fmt: skip
        """Start probing ``name`` (at once) for ``cause``. A node already suspected for
        the same cause is not probed twice; a new cause starts afresh."""
        if not self.settings.enabled:
            return []
        current = self._suspects.get(name)
        if current is not None and current.cause is cause:
            return []
        suspect = self._suspects[name] = _Suspect(cause, dict(ports))
        return self._start(name, suspect, now)

    def clear(self, name: str) -> None:
        self._suspects.pop(name, None)

    def cause(self, name: str) -> Cause | None:
        suspect = self._suspects.get(name)
        return None if suspect is None else suspect.cause

    def last_verdict(self, name: str) -> Verdict | None:
        suspect = self._suspects.get(name)
        return None if suspect is None else suspect.last

    def result(self, name: str, probe_id: int, port: str, outcome: Outcome, now: float
               ) -> Finding | None:  # fmt: skip
        """One port's outcome. A Finding once the probe has a verdict; None while it waits
        for the other port, or for a probe that is no longer current (the node came
        back, or a newer probe started)."""
        suspect = self._suspects.get(name)
        if (
            suspect is None
            or suspect.probe_id != probe_id
            or suspect.started is None
            or port not in suspect.results
            or suspect.results[port] is not None  # a port reports once
        ):
            return None
        suspect.results[port] = outcome
        return self._judge(name, suspect, now, complete=False)

    def next_due(self) -> float | None:
        """When ``tick`` next has something to do (a time-out, a probe to start)."""
        times = [
            s.next_probe if s.started is None else s.started + self.settings.timeout
            for s in self._suspects.values()
        ]
        return min(times, default=None)

    def tick(self, now: float, timeouts: bool = True) -> tuple[list[ProbeRequest], list[Finding]]:
        """Time out probes past ``timeout`` and start the next probe of nodes still
        suspected. ``timeouts`` False: the caller was stalled (answers may sit unread), so
        no probe times out this time."""
        requests: list[ProbeRequest] = []
        findings: list[Finding] = []
        for name, suspect in list(self._suspects.items()):
            if suspect.started is not None:
                if timeouts and now - suspect.started >= self.settings.timeout:
                    finding = self._judge(name, suspect, now, complete=True)
                    if finding is not None:
                        findings.append(finding)
            elif now >= suspect.next_probe:
                requests += self._start(name, suspect, now)
        return requests, findings

    def _start(self, name: str, suspect: _Suspect, now: float) -> list[ProbeRequest]:
        suspect.probe_id = next(self._ids)
        suspect.started = now
        suspect.results = dict.fromkeys(suspect.ports)
        timeout = self.settings.timeout
        return [
            ProbeRequest(name, suspect.probe_id, port, address, timeout)
            for port, address in suspect.ports.items()
        ]

    def _judge(self, name: str, suspect: _Suspect, now: float, complete: bool
               ) -> Finding | None:  # fmt: skip
        found = verdict(suspect.results.values(), complete)
        if found is None:
            return None
        outcomes = tuple(
            (port, Outcome.TIMEOUT if outcome is None else outcome)
            for port, outcome in suspect.results.items()
            if outcome is not None or found is not Verdict.ALIVE
        )
        fail = FAIL_NOW[(suspect.cause, found)]
        changed = suspect.last is not found
        suspect.started, suspect.last = None, found
        suspect.next_probe = now + min(suspect.gap, self.settings.interval)
        suspect.gap *= 2
        if fail:
            del self._suspects[name]
        return Finding(name, suspect.cause, found, fail, outcomes, changed)
