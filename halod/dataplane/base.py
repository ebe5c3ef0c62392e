"""What every data-plane back-end shares: a route's owner, the route ports, and the
back-end interface (docs/operations.md, "Data plane")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

# Seconds from a route's move to the cut of its connections to the old owner: the old
# node's own reconnect frames go first (HaloD's move_close_delay key).
MOVE_CLOSE_DELAY = 1.0


@dataclass(frozen=True)
class Owner:
    """Where route r's traffic goes: the owning node's advertised addresses."""

    name: str
    browser: tuple[str, int]
    sp: tuple[str, int]


@dataclass(frozen=True)
class Ports:
    host: str  # where the route ports listen
    browser_base: int  # route r's browser port is browser_base + r - 1
    sp_base: int  # route r's web-app port is sp_base + r - 1
    routes: int

    def browser(self, route: int) -> int:
        return self.browser_base + route - 1

    def sp(self, route: int) -> int:
        return self.sp_base + route - 1


class DataPlane(Protocol):
    def start(self, owners: dict[int, Owner | None]) -> None:
        """Open the route ports and forward per ``owners`` (route → owner or None)."""

    def apply(self, owners: dict[int, Owner | None]) -> None:
        """A table change: new connections follow ``owners`` now; routes whose owner
        changed get their existing connections cut."""

    def stop(self) -> Any:
        """Close the route ports (may return a Deferred)."""

    def stats(self) -> dict[str, Any]:
        """Per-route connection counts and totals, for /status and /metrics."""
