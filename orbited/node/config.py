"""Node configuration: a TOML file's [node] table, overridden by command-line flags.

Every key and default is listed in docs/operations.md ("Node configuration").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from orbited.core.settings import (
    ConfigBase,
    ConfigError,
    opt,
    parse_host_port,
    parse_sp_address,
)
from orbited.node.events import RequestLimits
from orbited.node.hub import HubConfig
from orbited.node.mailbox import MailboxLimits
from orbited.node.rep import RepLimits
from orbited.node.transports.limits import BrowserLimitsConfig


@dataclass
class NodeConfig(ConfigBase):
    """The [node] table."""

    section: ClassVar[str] = "node"

    name: str = opt("orbited", "node name in logs and /orbited/health")
    http: str = opt("127.0.0.1:8000", "browser listener host:port")
    sp: str = opt("tcp://127.0.0.1:9000", "SP REP listener for web apps, tcp://host:port")
    secret_file: str = opt("orbited.secret", "token secret shared with web apps")
    create_secret: bool = opt(True, "create a random secret file if it is missing")
    cors_origins: list[str] = opt([], "page origin allowed cross-origin (repeat; * = any)")
    token_leeway: float = opt(30.0, "seconds of clock skew allowed on token expiry")
    linger: float = opt(30.0, "seconds a mailbox outlives its last connection")
    keepalive: float = opt(25.0, "seconds of silence before a ping frame")
    mailbox_events: int = opt(1000, "events kept per connection key")
    mailbox_bytes: int = opt(1024 * 1024, "payload bytes kept per connection key")
    mailbox_total_bytes: int = opt(
        512 * 1024 * 1024, "payload bytes kept in all mailboxes together (then status full)"
    )
    max_payload: int = opt(64 * 1024, "largest event data, bytes of encoded JSON")
    max_recipients: int = opt(10_000, "recipients per event request")
    max_ack_wait: float = opt(60.0, "largest wait a request in the acknowledged mode may ask")
    dedup_window: float = opt(300.0, "seconds a request is remembered to ignore resends")
    dedup_max: int = opt(100_000, "requests remembered at most")
    dedup_max_bytes: int = opt(64 * 1024 * 1024, "bytes of remembered replies at most")
    sp_max_message: int = opt(4 * 1024 * 1024, "largest SP message; larger closes")
    sp_header_timeout: float = opt(10.0, "seconds a web app has to send its SP header")
    sp_max_inflight: int = opt(1024, "unanswered requests per SP connection")
    sp_max_connections: int = opt(1000, "SP (web-app) connections at once; more are closed")
    max_connections: int = opt(15_000, "browser connections at once (then 503 / close 4503)")
    max_sockets: int = opt(
        0, "open sockets on the browser port (0 = fd limit less min(1024, limit/4), ≥ 64)"
    )
    connect_rate: float = opt(2000.0, "new browser connections per second (0 = no limit)")
    connect_burst: int = opt(10_000, "new browser connections at once above connect_rate")
    max_pending_polls: int = opt(10_000, "held long-polls at once (then 503)")
    max_write_queue: int = opt(1024 * 1024, "unsent bytes per browser stream, then closed")
    max_client_message: int = opt(
        BrowserLimitsConfig.max_client_message, "bytes per WebSocket message from a browser (1009)"
    )
    max_request_line: int = opt(
        BrowserLimitsConfig.max_request_line, "bytes of an HTTP request line (then 414)"
    )
    max_header_bytes: int = opt(
        BrowserLimitsConfig.max_header_bytes, "bytes of a request's header lines (then 431)"
    )
    max_headers: int = opt(BrowserLimitsConfig.max_headers, "header lines per request (431)")
    publish_http: str = opt("", "HTTP publish API host:port (empty = off)")
    publish_key_file: str = opt("", "file holding the publish API key (needed with publish_http)")
    presence_url: str = opt("", "webhook URL for signon/signoff notices (empty = off)")
    presence_queue: int = opt(10_000, "presence notices queued at most (oldest dropped)")
    presence_timeout: float = opt(5.0, "seconds per presence webhook request")
    presence_retries: int = opt(5, "attempts per presence batch before it is dropped")
    orbit_legacy: str = opt("", "2007 Orbit 1.0 protocol listener host:port (empty = off)")
    iframe_max_bytes: int = opt(1024 * 1024, "bytes per iframe response, then reconnect")
    backlog: int = opt(1024, "listen backlog of both listeners (connect bursts)")
    halod: str = opt("", "HaloD control address tcp://host:port (empty = standalone)")
    halod_secret_file: str = opt("", "file holding HaloD's cluster secret (if it has one)")
    routes: int = opt(24, "routes in the cluster (HaloD's value wins when connected)")
    advertise_http: str = opt("", "browser address HaloD forwards to (default: --http)")
    advertise_sp: str = opt("", "SP address HaloD forwards to (default: --sp)")
    capacity: int = opt(100_000, "connections this node is sized for (reported to HaloD)")
    handoff_timeout: float = opt(5.0, "seconds a route moved here waits for its mailboxes")
    reconnect_rate: float = opt(
        HubConfig.reconnect_rate,
        "new connections/s a node takes: browsers spread reconnects over mailboxes/rate s",
    )
    log_level: str = opt("info", "debug, info, warn or error")

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
