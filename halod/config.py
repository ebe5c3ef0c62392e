"""HaloD configuration: a TOML file's [halod] table, overridden by command-line flags.

Every key and default is listed in docs/operations.md ("HaloD configuration").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from halod.membership import Timing
from halod.routes import POLICIES
from orbited.config import (
    LOG_LEVELS,
    ConfigBase,
    ConfigError,
    _opt,
    parse_host_port,
    parse_sp_address,
)


@dataclass
class HaloDConfig(ConfigBase):
    """The [halod] table."""

    section: ClassVar[str] = "halod"

    control: str = _opt("tcp://127.0.0.1:7600", "control listener for nodes (SP pair0)")
    status_http: str = _opt("127.0.0.1:7601", "status JSON and /metrics host:port (empty = off)")
    routes: int = _opt(24, "N, the number of routes (fixed for the life of a cluster)")
    spares: int = _opt(1, "failover nodes kept in commission when possible")
    policy: str = _opt("seed", "failover without a spare: seed (2007 note) or minimal")
    heartbeat_interval: float = _opt(1.0, "seconds between a node's heartbeats")
    missed_heartbeats: int = _opt(3, "k: silent for k intervals = failed")
    grace: float = _opt(5.0, "seconds a disconnected node has to reconnect and keep routes")
    db: str = _opt("halod.sqlite3", "SQLite file the table is saved to on every change")
    secret_file: str = _opt("", "cluster secret nodes must present (empty = none)")
    control_max_message: int = _opt(1024 * 1024, "largest control message; larger closes")
    control_header_timeout: float = _opt(10.0, "seconds a node has to send SP header+register")
    log_level: str = _opt("info", "debug, info, warn or error")

    def validate(self) -> None:
        super().validate()
        parse_sp_address(self.control)
        if self.status_http:
            parse_host_port(self.status_http)
        self.require_positive(
            "routes", "heartbeat_interval", "missed_heartbeats", "grace",
            "control_max_message", "control_header_timeout",
        )  # fmt: skip
        if self.spares < 0:
            raise ConfigError("spares must not be negative")
        if self.policy not in POLICIES:
            raise ConfigError(f"policy is one of {', '.join(POLICIES)}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError("log_level is one of debug, info, warn, error")

    def timing(self) -> Timing:
        return Timing(self.heartbeat_interval, self.missed_heartbeats, self.grace)
