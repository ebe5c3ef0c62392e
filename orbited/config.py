"""Node configuration: a TOML file's [node] table, overridden by command-line flags.

Every key and default is listed in docs/operations.md ("Node configuration").
"""

from __future__ import annotations

import argparse
import tomllib
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import ClassVar, TypeVar

from orbited.events import RequestLimits
from orbited.hub import HubConfig
from orbited.mailbox import MailboxLimits
from orbited.sp.rep import RepLimits
from orbited.transports.limits import BrowserLimitsConfig


class ConfigError(ValueError):
    pass


def _opt(default: object, help: str) -> object:  # noqa: A002
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


C = TypeVar("C", bound="ConfigBase")
LOG_LEVELS = ["debug", "info", "warn", "error"]


class ConfigBase:
    """A dataclass whose fields are the keys of one TOML table (``section``) and flags.

    Each field is a TOML key and a flag (--field-name); its help is the flag's help.
    """

    section: ClassVar[str]

    @classmethod
    def load(cls: type[C], path: Path | None, overrides: dict[str, object]) -> C:
        values: dict[str, object] = {}
        if path is not None:
            try:
                doc = tomllib.loads(path.read_text())
            except (OSError, tomllib.TOMLDecodeError) as e:
                raise ConfigError(f"cannot read config {path}: {e}") from None
            values.update(doc.get(cls.section, {}))
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = values.keys() - known
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(sorted(unknown))}")
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        """Types first (TOML and flags both end here); subclasses add their rules."""
        for f in fields(self):  # type: ignore[arg-type]
            value, default = getattr(self, f.name), f.default
            expected = type(default) if default is not MISSING else list
            ok = isinstance(value, expected) or (expected is float and isinstance(value, int))
            if not ok or isinstance(value, bool) != (expected is bool):
                raise ConfigError(f"{f.name} must be of type {expected.__name__}")
            if expected is list and not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{f.name} must be a list of strings")
        if getattr(self, "log_level", LOG_LEVELS[1]) not in LOG_LEVELS:
            raise ConfigError("log_level is one of debug, info, warn, error")

    def require_positive(self, *names: str) -> None:
        for name in names:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")

    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser) -> None:
        """One flag per field: --no-x for booleans, repeated --x for lists."""
        for f in fields(cls):  # type: ignore[arg-type]
            flag = "--" + f.name.replace("_", "-")
            default = f.default if f.default is not MISSING else []
            helptext = f"{f.metadata['help']} (default: {default!r})"
            if isinstance(default, bool):
                parser.add_argument(
                    f"--no-{f.name.replace('_', '-')}",
                    dest=f.name,
                    action="store_const",
                    const=False,
                    help=f"do not {helptext}",
                )
            elif isinstance(default, list):
                parser.add_argument(
                    flag.removesuffix("s"), dest=f.name, action="append", help=helptext
                )
            elif f.name == "log_level":
                parser.add_argument(flag, choices=LOG_LEVELS, help=helptext)
            else:
                parser.add_argument(flag, type=type(default), help=helptext)


@dataclass
class NodeConfig(ConfigBase):
    """The [node] table."""

    section: ClassVar[str] = "node"

    name: str = _opt("orbited", "node name in logs and /orbited/health")
    http: str = _opt("127.0.0.1:8000", "browser listener host:port")
    sp: str = _opt("tcp://127.0.0.1:9000", "SP REP listener for web apps, tcp://host:port")
    secret_file: str = _opt("orbited.secret", "token secret shared with web apps")
    create_secret: bool = _opt(True, "create a random secret file if it is missing")
    cors_origins: list[str] = _opt([], "page origin allowed cross-origin (repeat; * = any)")
    token_leeway: float = _opt(30.0, "seconds of clock skew allowed on token expiry")
    linger: float = _opt(30.0, "seconds a mailbox outlives its last connection")
    keepalive: float = _opt(25.0, "seconds of silence before a ping frame")
    mailbox_events: int = _opt(1000, "events kept per connection key")
    mailbox_bytes: int = _opt(1024 * 1024, "payload bytes kept per connection key")
    mailbox_total_bytes: int = _opt(
        512 * 1024 * 1024, "payload bytes kept in all mailboxes together (then status full)"
    )
    max_payload: int = _opt(64 * 1024, "largest event data, bytes of encoded JSON")
    max_recipients: int = _opt(10_000, "recipients per event request")
    max_ack_wait: float = _opt(60.0, "largest wait a request in the acknowledged mode may ask")
    dedup_window: float = _opt(300.0, "seconds a request is remembered to ignore resends")
    dedup_max: int = _opt(100_000, "requests remembered at most")
    dedup_max_bytes: int = _opt(64 * 1024 * 1024, "bytes of remembered replies at most")
    sp_max_message: int = _opt(4 * 1024 * 1024, "largest SP message; larger closes")
    sp_header_timeout: float = _opt(10.0, "seconds a web app has to send its SP header")
    sp_max_inflight: int = _opt(1024, "unanswered requests per SP connection")
    sp_max_connections: int = _opt(1000, "SP (web-app) connections at once; more are closed")
    max_connections: int = _opt(15_000, "browser connections at once (then 503 / close 4503)")
    max_sockets: int = _opt(
        0, "open sockets on the browser port (0 = fd limit less min(1024, limit/4), ≥ 64)"
    )
    connect_rate: float = _opt(2000.0, "new browser connections per second (0 = no limit)")
    connect_burst: int = _opt(10_000, "new browser connections at once above connect_rate")
    max_pending_polls: int = _opt(10_000, "held long-polls at once (then 503)")
    max_write_queue: int = _opt(1024 * 1024, "unsent bytes per browser stream, then closed")
    max_client_message: int = _opt(
        BrowserLimitsConfig.max_client_message, "bytes per WebSocket message from a browser (1009)"
    )
    max_request_line: int = _opt(
        BrowserLimitsConfig.max_request_line, "bytes of an HTTP request line (then 414)"
    )
    max_header_bytes: int = _opt(
        BrowserLimitsConfig.max_header_bytes, "bytes of a request's header lines (then 431)"
    )
    max_headers: int = _opt(BrowserLimitsConfig.max_headers, "header lines per request (431)")
    publish_http: str = _opt("", "HTTP publish API host:port (empty = off)")
    publish_key_file: str = _opt("", "file holding the publish API key (needed with publish_http)")
    presence_url: str = _opt("", "webhook URL for signon/signoff notices (empty = off)")
    presence_queue: int = _opt(10_000, "presence notices queued at most (oldest dropped)")
    presence_timeout: float = _opt(5.0, "seconds per presence webhook request")
    presence_retries: int = _opt(5, "attempts per presence batch before it is dropped")
    orbit_legacy: str = _opt("", "2007 Orbit 1.0 protocol listener host:port (empty = off)")
    iframe_max_bytes: int = _opt(1024 * 1024, "bytes per iframe response, then reconnect")
    backlog: int = _opt(1024, "listen backlog of both listeners (connect bursts)")
    halod: str = _opt("", "HaloD control address tcp://host:port (empty = standalone)")
    halod_secret_file: str = _opt("", "file holding HaloD's cluster secret (if it has one)")
    routes: int = _opt(24, "routes in the cluster (HaloD's value wins when connected)")
    advertise_http: str = _opt("", "browser address HaloD forwards to (default: --http)")
    advertise_sp: str = _opt("", "SP address HaloD forwards to (default: --sp)")
    capacity: int = _opt(100_000, "connections this node is sized for (reported to HaloD)")
    handoff_timeout: float = _opt(5.0, "seconds a route moved here waits for its mailboxes")
    reconnect_rate: float = _opt(
        HubConfig.reconnect_rate,
        "new connections/s a node takes: browsers spread reconnects over mailboxes/rate s",
    )
    log_level: str = _opt("info", "debug, info, warn or error")

    def validate(self) -> None:
        super().validate()
        parse_host_port(self.http)
        if self.presence_url and not self.presence_url.startswith(("http://", "https://")):
            raise ConfigError("presence_url must be an http:// or https:// URL")
        if self.orbit_legacy:
            parse_host_port(self.orbit_legacy)
        if self.publish_http:
            parse_host_port(self.publish_http)
            if not self.publish_key_file:
                raise ConfigError("publish_http needs publish_key_file")
        parse_sp_address(self.sp)
        if self.max_payload > self.mailbox_bytes:
            raise ConfigError("max_payload must not exceed mailbox_bytes")
        if self.max_payload + 1024 > self.sp_max_message:
            raise ConfigError("sp_max_message must leave room for max_payload plus headers")
        for name in (
            "linger",
            "keepalive",
            "max_ack_wait",
            "handoff_timeout",
            "sp_header_timeout",
            "dedup_window",
            "mailbox_events",
            "mailbox_bytes",
            "max_payload",
            "max_recipients",
            "dedup_max",
            "dedup_max_bytes",
            "sp_max_inflight",
            "sp_max_connections",
            "max_connections",
            "max_pending_polls",
            "max_write_queue",
            "connect_burst",
            "max_client_message",
            "max_request_line",
            "max_header_bytes",
            "max_headers",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if self.reconnect_rate < 0:
            raise ConfigError("reconnect_rate must not be negative")
        if self.connect_rate < 0 or self.max_sockets < 0:
            raise ConfigError("connect_rate and max_sockets must not be negative")
        if self.max_sockets and self.max_sockets <= self.max_connections:
            raise ConfigError("max_sockets must exceed max_connections (or be 0 = automatic)")
        if self.mailbox_total_bytes < self.mailbox_bytes:
            raise ConfigError("mailbox_total_bytes must be at least mailbox_bytes")
        if self.max_write_queue < 64 * 1024:
            raise ConfigError("max_write_queue must be at least 65536")
        if self.halod:
            parse_sp_address(self.halod)
        if self.advertise_http:
            parse_host_port(self.advertise_http)
        if self.advertise_sp:
            parse_sp_address(self.advertise_sp)
        self.require_positive("routes", "capacity")

    def hub_config(self) -> HubConfig:
        return HubConfig(
            routes=self.routes,
            mailbox=MailboxLimits(self.mailbox_events, self.mailbox_bytes),
            requests=RequestLimits(self.max_recipients, self.max_payload, self.max_ack_wait),
            handoff_timeout=self.handoff_timeout,
            linger=self.linger,
            keepalive=self.keepalive,
            dedup_window=self.dedup_window,
            dedup_max=self.dedup_max,
            dedup_max_bytes=self.dedup_max_bytes,
            mailbox_total_bytes=self.mailbox_total_bytes,
            reconnect_rate=self.reconnect_rate,
        )

    def browser_limits(self) -> BrowserLimitsConfig:
        return BrowserLimitsConfig(
            max_connections=self.max_connections,
            connect_rate=self.connect_rate,
            connect_burst=self.connect_burst,
            max_pending_polls=self.max_pending_polls,
            max_write_queue=self.max_write_queue,
            max_client_message=self.max_client_message,
            max_request_line=self.max_request_line,
            max_header_bytes=self.max_header_bytes,
            max_headers=self.max_headers,
        )

    def rep_limits(self) -> RepLimits:
        return RepLimits(
            max_message=self.sp_max_message,
            header_timeout=self.sp_header_timeout,
            max_inflight=self.sp_max_inflight,
            max_connections=self.sp_max_connections,
        )


def parse_host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 <= int(port) < 65536:
        raise ConfigError(f"address {text!r} is not host:port")
    return (host.strip("[]") or "127.0.0.1"), int(port)


def parse_sp_address(text: str) -> tuple[str, int]:
    if not text.startswith("tcp://"):
        raise ConfigError(f"SP address {text!r} must look like tcp://host:port")
    return parse_host_port(text.removeprefix("tcp://"))
