"""HaloD's data plane: for every route r, a browser port and a web-app (SP) port that lead
to the node owning r (docs/halod.md, "Data plane").

A back-end gets the full route → owner map after every table change and makes new
connections follow it at once; connections of a route whose owner changed are cut after
``move_close_delay`` so clients reconnect (the old node's own reconnect frames go first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from halod.config import HaloDConfig


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


def build(config: HaloDConfig, reactor: Any) -> DataPlane | None:
    """The back-end ``config.dataplane`` names (None for ``none``); imported lazily so a
    back-end's system dependencies are only needed when it is chosen."""
    if config.dataplane == "proxy":
        from halod.dataplane.proxy import ProxyDataPlane

        return ProxyDataPlane.from_config(config, reactor)
    if config.dataplane == "nftables":
        from halod.dataplane.nftables import NftablesDataPlane

        return NftablesDataPlane(config, reactor)
    if config.dataplane == "haproxy":
        from halod.dataplane.haproxy import HAProxyDataPlane

        return HAProxyDataPlane.from_config(config, reactor)
    if config.dataplane == "none":
        return None
    raise ValueError(f"unknown data plane {config.dataplane!r}")
