"""Node configuration: a TOML file's [node] table, overridden by command-line flags.

Every key and default is listed in docs/operations.md ("Node configuration").
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from orbited.events import RequestLimits
from orbited.hub import HubConfig
from orbited.mailbox import MailboxLimits
from orbited.sp.rep import RepLimits


class ConfigError(ValueError):
    pass


@dataclass
class NodeConfig:
    name: str = "orbited"
    http: str = "127.0.0.1:8000"  # browser-facing HTTP/WebSocket listener
    sp: str = "tcp://127.0.0.1:9000"  # SP REP listener for web apps
    secret_file: str = "orbited.secret"  # shared with web apps; created if missing
    create_secret: bool = True
    cors_origins: list[str] = field(default_factory=list)
    token_leeway: float = 30.0
    linger: float = 30.0
    keepalive: float = 25.0
    mailbox_events: int = 1000
    mailbox_bytes: int = 1024 * 1024
    max_payload: int = 64 * 1024
    max_recipients: int = 10_000
    dedup_window: float = 300.0
    dedup_max: int = 100_000
    sp_max_message: int = 4 * 1024 * 1024
    sp_header_timeout: float = 10.0
    sp_max_inflight: int = 1024
    log_level: str = "info"

    @classmethod
    def load(cls, path: Path | None, overrides: dict[str, object]) -> NodeConfig:
        values: dict[str, object] = {}
        if path is not None:
            try:
                doc = tomllib.loads(path.read_text())
            except (OSError, tomllib.TOMLDecodeError) as e:
                raise ConfigError(f"cannot read config {path}: {e}") from None
            values.update(doc.get("node", {}))
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in fields(cls)}
        unknown = values.keys() - known
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(sorted(unknown))}")
        config = cls(**values)  # type: ignore[arg-type]
        config.validate()
        return config

    def validate(self) -> None:
        parse_host_port(self.http)
        parse_sp_address(self.sp)
        if self.max_payload > self.mailbox_bytes:
            raise ConfigError("max_payload must not exceed mailbox_bytes")
        if self.max_payload + 1024 > self.sp_max_message:
            raise ConfigError("sp_max_message must leave room for max_payload plus headers")
        for name in ("linger", "keepalive", "sp_header_timeout", "dedup_window"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if self.log_level not in ("debug", "info", "warn", "error"):
            raise ConfigError("log_level is one of debug, info, warn, error")

    def hub_config(self) -> HubConfig:
        return HubConfig(
            mailbox=MailboxLimits(self.mailbox_events, self.mailbox_bytes),
            requests=RequestLimits(self.max_recipients, self.max_payload),
            linger=self.linger,
            keepalive=self.keepalive,
            dedup_window=self.dedup_window,
            dedup_max=self.dedup_max,
        )

    def rep_limits(self) -> RepLimits:
        return RepLimits(
            max_message=self.sp_max_message,
            header_timeout=self.sp_header_timeout,
            max_inflight=self.sp_max_inflight,
        )


def parse_host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"address {text!r} is not host:port")
    return (host.strip("[]") or "127.0.0.1"), int(port)


def parse_sp_address(text: str) -> tuple[str, int]:
    if not text.startswith("tcp://"):
        raise ConfigError(f"SP address {text!r} must look like tcp://host:port")
    return parse_host_port(text.removeprefix("tcp://"))
