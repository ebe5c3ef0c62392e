"""Start-up audit: listeners a configuration exposes beyond loopback without authentication.

Nodes and HaloD bind 127.0.0.1 by default. An operator who binds a port to a routable
address gets one warning line per port that then trusts whoever can reach it (the
threat model is in docs/security.md); nothing is refused, since a private network or a
firewall may be exactly the protection intended.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from orbited.core.control import halod_addresses
from orbited.core.settings import is_loopback, parse_host_port, parse_sp_address

if TYPE_CHECKING:
    from orbited.node.config import NodeConfig


def node_warnings(config: NodeConfig) -> list[str]:
    warnings = []
    host, _ = parse_sp_address(config.sp)
    if not is_loopback(host):
        warnings.append(
            f"SP port {config.sp} is not on loopback and has no authentication: whoever "
            "reaches it can send events to any browser (firewall it to the web apps)"
        )
    if config.orbit_legacy and not is_loopback(parse_host_port(config.orbit_legacy)[0]):
        warnings.append(
            f"Orbit 1.0 port {config.orbit_legacy} is not on loopback and has no "
            "authentication: whoever reaches it can send events to any browser"
        )
    if config.publish_http and not is_loopback(parse_host_port(config.publish_http)[0]):
        warnings.append(
            f"HTTP publish API {config.publish_http} is not on loopback: its API key "
            "travels in clear unless a TLS proxy is in front"
        )
    if config.halod and not config.halod_secret_file:
        # One address, or several separated by commas (HaloD on etcd): each is checked.
        for address in halod_addresses(config.halod):
            if not is_loopback(parse_sp_address(address)[0]):
                warnings.append(
                    f"HaloD {address} is not on loopback and no halod_secret_file is set"
                )
    if config.trace_key_file and not is_loopback(parse_host_port(config.http)[0]):
        warnings.append(
            f"GET /orbited/trace is served on {config.http} (trace_key_file is set): its "
            "key travels in clear unless a TLS proxy is in front"
        )
    if "*" in config.cors_origins:
        warnings.append("cors_origins has '*': any web page holding a token may read its events")
    return warnings
