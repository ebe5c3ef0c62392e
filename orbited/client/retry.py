"""When the web-app clients resend a request (docs/client-python.md, "Retries"): sans-I/O.

A request is resent after a connection loss, a time-out or (through HaloD's route ports)
a ``moved`` answer, on a fresh connection, with the same event id (the node deduplicates).
The first resend after a failure goes at once: a ``moved`` answer or a cut connection
means the route port now leads elsewhere, and dialling it again is what reaches the new
owner. Only a failure that follows another waits: after a ``moved`` answer (HaloD has
moved the route; its port follows within milliseconds) ``moved_pause``, never growing;
otherwise (the route port still leads to a dead node: HaloD has not moved the route
yet) ``backoff``, doubling up to ``max_backoff``. A request is resent while less than
``budget`` seconds have passed since it was first sent (and, if ``retries`` is set, at
most that many times); then its keys get ``{"status": "error", ...}``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    # Seconds after a request's first attempt during which it is resent: above HaloD's
    # failover time for a dead node (its ports probed at once; a silent one after
    # missed_heartbeats × heartbeat_interval = 3 s by default).
    budget: float = 5.0
    backoff: float = 0.05  # the pause before the second resend in a row, doubling
    max_backoff: float = 0.5
    retries: int | None = None  # at most this many resends of a request (None: the budget)
    moved_pause: float = 0.01  # between re-dials while the old owner answers `moved`

    def __post_init__(self) -> None:
        if min(self.budget, self.backoff, self.max_backoff, self.moved_pause) < 0:
            raise ValueError(
                "retry_budget, backoff, max_backoff and moved_pause must not be negative"
            )
        if self.retries is not None and self.retries < 0:
            raise ValueError("retries must not be negative")

    def pause(self, failures: int, moved: bool = False) -> float:
        """Seconds to wait before resending after ``failures`` failures in a row (1: the
        first): none after the first; then, if the last was a ``moved`` answer,
        ``moved_pause``; else ``backoff``, doubling, at most ``max_backoff``."""
        if failures <= 1:
            return 0.0
        if moved:
            return self.moved_pause
        return min(self.max_backoff, self.backoff * 2 ** (failures - 2))

    def allows(self, started: float, resends: int, at: float) -> bool:
        """Whether a request first sent at ``started`` and resent ``resends`` times so far
        may be resent at time ``at``."""
        if self.retries is not None and resends >= self.retries:
            return False
        return at - started <= self.budget
