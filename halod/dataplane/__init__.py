"""HaloD's data plane: for every route r, a browser port and a web-app (SP) port that lead
to the node owning r (docs/operations.md, "Data plane").

A back-end gets the full route → owner map after every table change and makes new
connections follow it at once; connections of a route whose owner changed are cut after
``move_close_delay`` so clients reconnect (the old node's own reconnect frames go first).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from halod.dataplane.base import DataPlane

if TYPE_CHECKING:
    from halod.config import HaloDConfig


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
