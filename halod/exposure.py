"""HaloD's start-up audit: listeners its configuration exposes beyond loopback without
authentication (docs/security.md), one warning line per port."""

from __future__ import annotations

from typing import TYPE_CHECKING

from orbited.core.settings import is_loopback, parse_host_port, parse_sp_address

if TYPE_CHECKING:
    from halod.config import HaloDConfig


def halod_warnings(config: HaloDConfig) -> list[str]:
    warnings = []
    host, _ = parse_sp_address(config.control)
    if not is_loopback(host):
        if not config.secret_file:
            warnings.append(
                f"control port {config.control} is not on loopback and no secret_file is "
                "set: any host that reaches it can register a node and receive browsers' "
                "and web apps' traffic for the routes it is given"
            )
        else:
            warnings.append(
                f"control port {config.control} is not on loopback: the cluster secret "
                "travels in clear (keep the control network private)"
            )
    if config.dataplane != "none" and not is_loopback(config.dataplane_host):
        warnings.append(
            f"route ports listen on {config.dataplane_host}: the SP route ports "
            f"({config.sp_port_base}+) have no authentication, so whoever reaches them can "
            "send events to any browser (firewall them to the web apps)"
        )
    if config.status_http and not is_loopback(parse_host_port(config.status_http)[0]):
        if config.operator_key_file:
            warnings.append(
                f"status port {config.status_http} is not on loopback: whoever reaches it "
                "can read the table (operator requests need the operator key)"
            )
        else:
            warnings.append(
                f"status port {config.status_http} is not on loopback and has no "
                "authentication: whoever reaches it can read the table and drain nodes"
            )
    return warnings
