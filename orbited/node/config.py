"""Node configuration: a TOML file's [node] table, overridden by command-line flags.

Every key and default is listed in docs/operations.md ("Node configuration"). A key that
sets a component's field (``COMPONENT_KEYS``) takes its default from that component's
config class, which also checks its own ranges: each default is defined once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import twisted.web.client

from orbited.core.control import MAX_ROUTES, NAME, halod_addresses
from orbited.core.settings import (
    ConfigBase,
    ConfigError,
    FieldError,
    opt,
    parse_host_port,
    parse_sp_address,
)
from orbited.node.events import RequestLimits
from orbited.node.hub import HubConfig
from orbited.node.mailbox import MailboxLimits
from orbited.node.offline import OfflineConfig
from orbited.node.presence import PresenceConfig
from orbited.node.rep import RepLimits
from orbited.node.trace import DEFAULT_MODE, MODES, TraceConfig
from orbited.node.transports.common import BrowserAuth
from orbited.node.transports.limits import BrowserLimitsConfig
from orbited.node.users import UserLimits

MAX_WORKERS = 256  # node processes one `orbited node --workers` runs at most

# Node key -> (component config class, its field). The key's default is the field's
# default; hub_config(), rep_limits(), browser_limits(), presence_config() and
# offline_config() pass the key's value on. tests/node/test_config.py checks both for every row.
COMPONENT_KEYS: dict[str, tuple[type[Any], str]] = {
    "linger": (HubConfig, "linger"),
    "keepalive": (HubConfig, "keepalive"),
    "dedup_window": (HubConfig, "dedup_window"),
    "dedup_max": (HubConfig, "dedup_max"),
    "dedup_max_bytes": (HubConfig, "dedup_max_bytes"),
    "routes": (HubConfig, "routes"),
    "handoff_timeout": (HubConfig, "handoff_timeout"),
    "mailbox_total_bytes": (HubConfig, "mailbox_total_bytes"),
    "reconnect_rate": (HubConfig, "reconnect_rate"),
    "hash_version": (HubConfig, "hash_version"),
    "user_max_connections": (UserLimits, "max_connections"),
    "user_limit_policy": (UserLimits, "policy"),
    "user_rate": (UserLimits, "rate"),
    "user_burst": (UserLimits, "burst"),
    "user_hold": (UserLimits, "hold"),
    "mailbox_events": (MailboxLimits, "max_events"),
    "mailbox_bytes": (MailboxLimits, "max_bytes"),
    "max_recipients": (RequestLimits, "max_recipients"),
    "max_payload": (RequestLimits, "max_payload"),
    "max_ack_wait": (RequestLimits, "max_ack_wait"),
    "offline_after": (RequestLimits, "offline_after"),
    "max_offline_after": (RequestLimits, "max_offline_after"),
    "sp_max_message": (RepLimits, "max_message"),
    "sp_header_timeout": (RepLimits, "header_timeout"),
    "sp_max_inflight": (RepLimits, "max_inflight"),
    "sp_max_connections": (RepLimits, "max_connections"),
    "max_connections": (BrowserLimitsConfig, "max_connections"),
    "connect_rate": (BrowserLimitsConfig, "connect_rate"),
    "connect_burst": (BrowserLimitsConfig, "connect_burst"),
    "max_pending_polls": (BrowserLimitsConfig, "max_pending_polls"),
    "max_write_queue": (BrowserLimitsConfig, "max_write_queue"),
    "max_client_message": (BrowserLimitsConfig, "max_client_message"),
    "max_request_line": (BrowserLimitsConfig, "max_request_line"),
    "max_header_bytes": (BrowserLimitsConfig, "max_header_bytes"),
    "max_headers": (BrowserLimitsConfig, "max_headers"),
    "max_request_body": (BrowserLimitsConfig, "max_request_body"),
    "presence_url": (PresenceConfig, "url"),
    "presence_queue": (PresenceConfig, "max_queue"),
    "presence_timeout": (PresenceConfig, "timeout"),
    "presence_retries": (PresenceConfig, "retries"),
    "offline_url": (OfflineConfig, "url"),
    "offline_queue": (OfflineConfig, "max_queue"),
    "offline_batch": (OfflineConfig, "batch"),
    "offline_timeout": (OfflineConfig, "timeout"),
    "offline_retries": (OfflineConfig, "retries"),
    "offline_backoff": (OfflineConfig, "backoff"),
    "offline_watches": (OfflineConfig, "watches"),
    "token_leeway": (BrowserAuth, "token_leeway"),
}

OTEL_EXPORTERS = ("otlp", "discard", "memory")  # otel_exporter: discard/memory for tests and bench

# Keys of components that do not check their own ranges yet (hub, events, rep).
_POSITIVE = (
    "linger", "keepalive", "dedup_window", "dedup_max", "dedup_max_bytes", "routes",
    "handoff_timeout", "max_recipients", "max_payload", "max_ack_wait",
    "sp_max_message", "sp_header_timeout", "sp_max_inflight", "sp_max_connections",
    "iframe_max_bytes", "backlog",
)  # fmt: skip


def _check_webhook_url(key: str, url: str) -> None:
    """A webhook URL ("" = off) is http:// or https://; https:// needs Twisted's TLS
    support (pyOpenSSL: ``pip install "Twisted[tls]"``, not an Orbited dependency), without
    which Twisted's Agent cannot make the request at all."""
    if not url:
        return
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"{key} must be an http:// or https:// URL")
    if url.startswith("https://") and getattr(twisted.web.client, "SSL", None) is None:
        raise ConfigError(
            f"{key} is https:// but Twisted's TLS support is not installed "
            '(pip install "Twisted[tls]")'
        )


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
    token_leeway: float = opt(
        BrowserAuth.token_leeway, "seconds of clock skew allowed on token expiry"
    )
    linger: float = opt(HubConfig.linger, "seconds a mailbox outlives its last connection")
    keepalive: float = opt(HubConfig.keepalive, "seconds of silence before a ping frame")
    mailbox_events: int = opt(MailboxLimits.max_events, "events kept per connection key")
    mailbox_bytes: int = opt(MailboxLimits.max_bytes, "payload bytes kept per connection key")
    mailbox_total_bytes: int = opt(
        HubConfig.mailbox_total_bytes,
        "payload bytes kept in all mailboxes together (then status full)",
    )
    max_payload: int = opt(RequestLimits.max_payload, "largest event data, bytes of encoded JSON")
    max_recipients: int = opt(RequestLimits.max_recipients, "recipients per event request")
    max_ack_wait: float = opt(
        RequestLimits.max_ack_wait, "largest wait a request in the acknowledged mode may ask"
    )
    dedup_window: float = opt(
        HubConfig.dedup_window, "seconds a request is remembered to ignore resends"
    )
    dedup_max: int = opt(HubConfig.dedup_max, "requests remembered at most")
    dedup_max_bytes: int = opt(HubConfig.dedup_max_bytes, "bytes of remembered replies at most")
    sp_max_message: int = opt(RepLimits.max_message, "largest SP message; larger closes")
    sp_header_timeout: float = opt(
        RepLimits.header_timeout, "seconds a web app has to send its SP header"
    )
    sp_max_inflight: int = opt(RepLimits.max_inflight, "unanswered requests per SP connection")
    sp_max_connections: int = opt(
        RepLimits.max_connections, "SP (web-app) connections at once; more are closed"
    )
    max_connections: int = opt(
        BrowserLimitsConfig.max_connections, "browser connections at once (then 503 / close 4503)"
    )
    max_sockets: int = opt(
        0, "open sockets on the browser port (0 = fd limit less min(1024, limit/4), ≥ 64)"
    )
    connect_rate: float = opt(
        BrowserLimitsConfig.connect_rate, "new browser connections per second (0 = no limit)"
    )
    connect_burst: int = opt(
        BrowserLimitsConfig.connect_burst, "new browser connections at once above connect_rate"
    )
    max_pending_polls: int = opt(
        BrowserLimitsConfig.max_pending_polls, "held long-polls at once (then 503)"
    )
    max_write_queue: int = opt(
        BrowserLimitsConfig.max_write_queue, "unsent bytes per browser stream, then closed"
    )
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
    max_request_body: int = opt(
        BrowserLimitsConfig.max_request_body, "bytes of a request body on the browser port (413)"
    )
    publish_http: str = opt("", "HTTP publish API host:port (empty = off)")
    publish_key_file: str = opt("", "file holding the publish API key (needed with publish_http)")
    presence_url: str = opt("", "webhook URL for signon/signoff notices (empty = off)")
    presence_queue: int = opt(
        PresenceConfig.max_queue, "presence notices queued at most (oldest dropped)"
    )
    presence_timeout: float = opt(PresenceConfig.timeout, "seconds per presence webhook request")
    presence_retries: int = opt(
        PresenceConfig.retries, "attempts per presence batch before it is dropped"
    )
    orbit_legacy: str = opt("", "2007 Orbit 1.0 protocol listener host:port (empty = off)")
    iframe_max_bytes: int = opt(1024 * 1024, "bytes per iframe response, then reconnect")
    backlog: int = opt(1024, "listen backlog of both listeners (connect bursts)")
    halod: str = opt(
        "", "HaloD control address tcp://host:port, several comma-separated (empty = standalone)"
    )
    halod_secret_file: str = opt("", "file holding HaloD's cluster secret (if it has one)")
    routes: int = opt(HubConfig.routes, "routes in the cluster (HaloD's value wins when connected)")
    advertise_http: str = opt("", "browser address HaloD forwards to (default: --http)")
    advertise_sp: str = opt("", "SP address HaloD forwards to (default: --sp)")
    capacity: int = opt(100_000, "connections this node is sized for (reported to HaloD)")
    handoff_timeout: float = opt(
        HubConfig.handoff_timeout, "seconds a route moved here waits for its mailboxes"
    )
    reconnect_rate: float = opt(
        HubConfig.reconnect_rate,
        "new connections/s a node takes: browsers spread reconnects over mailboxes/rate s",
    )
    hash_version: int = opt(
        HubConfig.hash_version, "route hash version, 1 or 2 (HaloD's wins when connected)"
    )
    user_max_connections: int = opt(
        UserLimits.max_connections, "attached browser connections per user (0 = no limit)"
    )
    user_limit_policy: str = opt(
        UserLimits.policy, "past user_max_connections: refuse (4429) or close_oldest (4003)"
    )
    user_rate: float = opt(UserLimits.rate, "event requests per second per user (0 = no limit)")
    user_burst: int = opt(UserLimits.burst, "event requests per user at once above user_rate")
    user_hold: float = opt(
        UserLimits.hold, "seconds a wildcard event (offline/ack) waits for a user's tab (0 = off)"
    )
    # The offline hook (docs/protocol.md, "Offline webhooks"); orbited.node.service builds
    # the watcher and its webhook queue from these.
    offline_url: str = opt("", "webhook URL for needs_push/cancel notices (empty = off)")
    offline_after: float = opt(
        RequestLimits.offline_after, "seconds unacknowledged before needs_push (offline: true)"
    )
    max_offline_after: float = opt(
        RequestLimits.max_offline_after, "the largest offline wait a request may ask"
    )
    offline_queue: int = opt(
        OfflineConfig.max_queue, "offline notices queued at most (oldest dropped)"
    )
    offline_batch: int = opt(OfflineConfig.batch, "offline notices per webhook request at most")
    offline_retries: int = opt(
        OfflineConfig.retries, "attempts per offline batch before it is dropped"
    )
    offline_backoff: float = opt(
        OfflineConfig.backoff, "seconds before the first retry of an offline batch"
    )
    offline_timeout: float = opt(OfflineConfig.timeout, "seconds per offline webhook request")
    offline_watches: int = opt(OfflineConfig.watches, "events watched for the offline hook at most")
    workers: int = opt(
        1, "node processes, one per core, each its own HaloD member (0 = one per core)"
    )
    # Per-key delivery tracing (orbited.node.trace; docs/operations.md, "Tracing a delivery").
    trace: str = opt(DEFAULT_MODE, "per-key delivery tracing: off, all or users")
    trace_users: list[str] = opt([], "user traced when trace = users (repeat)")
    trace_keys: int = opt(TraceConfig.keys, "keys traced at most (least recently active forgotten)")
    trace_per_key: int = opt(TraceConfig.per_key, "dispatches and notes kept per traced key")
    trace_keep: float = opt(TraceConfig.keep, "seconds a key's trace outlives its last activity")
    trace_key_file: str = opt(
        "", "file with the bearer key (≥ 32 bytes) for GET /orbited/trace (empty = off)"
    )
    # OpenTelemetry spans (orbited.node.otel; needs pip install 'orbited[otel]').
    otel: bool = opt(False, "OpenTelemetry spans per dispatch (needs orbited[otel])")
    otel_sample: float = opt(0.0, "ratio of requests without a traceparent that start a trace")
    otel_recipient_spans: int = opt(10, "orbited.deliver spans per request at most")
    otel_pending_acks: int = opt(10000, "open orbited.ack spans at most, node-wide")
    otel_key_attributes: bool = opt(False, "put key parts on spans (else a key digest)")
    otel_exporter: str = opt("otlp", "span exporter: otlp; discard or memory (tests, bench)")
    log_level: str = opt("info", "debug, info, warn or error")

    def validate(self) -> None:
        super().validate()
        parse_host_port(self.http, "http")
        for key in ("presence_url", "offline_url"):
            _check_webhook_url(key, getattr(self, key))
        if self.hash_version not in (1, 2):
            raise ConfigError("hash_version must be 1 or 2 (docs/hashing.md)")
        self.require_positive("offline_after", "max_offline_after")
        if self.offline_after > self.max_offline_after:
            raise ConfigError("offline_after must not exceed max_offline_after")
        if self.orbit_legacy:
            parse_host_port(self.orbit_legacy, "orbit_legacy")
        if self.publish_http:
            parse_host_port(self.publish_http, "publish_http")
            if not self.publish_key_file:
                raise ConfigError("publish_http needs publish_key_file")
        parse_sp_address(self.sp, "sp")
        self.require_positive(*_POSITIVE, "capacity")
        if not NAME.fullmatch(self.name):  # what HaloD accepts in register
            raise ConfigError(
                "name must be 1-64 characters A-Z a-z 0-9 . _ : @ -, starting with a letter "
                f"or digit (HaloD refuses any other), not {self.name!r}"
            )
        if self.routes > MAX_ROUTES:  # as HaloD's (a node refuses a larger welcome)
            raise ConfigError(f"routes must be at most {MAX_ROUTES}")
        if self.token_leeway < 0:
            raise ConfigError("token_leeway must not be negative")
        if self.reconnect_rate < 0:
            raise ConfigError("reconnect_rate must not be negative")
        try:  # each component checks its own fields' ranges
            self.hub_config()
            self.browser_limits()
            self.rep_limits()
            PresenceConfig(**self._values(PresenceConfig))  # checked even while it is off
            OfflineConfig(**self._values(OfflineConfig))  # likewise
        except FieldError as e:
            raise ConfigError(f"{self._key(e.owner, e.field)} {e.rule}") from None
        if self.max_payload > self.mailbox_bytes:
            raise ConfigError("max_payload must not exceed mailbox_bytes")
        if self.max_payload + 1024 > self.sp_max_message:
            raise ConfigError("sp_max_message must leave room for max_payload plus headers")
        if self.max_sockets < 0:
            raise ConfigError("max_sockets must not be negative")
        if self.max_sockets and self.max_sockets <= self.max_connections:
            raise ConfigError("max_sockets must exceed max_connections (or be 0 = automatic)")
        if self.mailbox_total_bytes < self.mailbox_bytes:
            raise ConfigError("mailbox_total_bytes must be at least mailbox_bytes")
        if self.halod:
            halod_addresses(self.halod, "halod")  # one tcp://host:port, or several (HaloD on etcd)
        if self.advertise_http:
            parse_host_port(self.advertise_http, "advertise_http")
        if self.advertise_sp:
            parse_sp_address(self.advertise_sp, "advertise_sp")
        if not 0 <= self.workers <= MAX_WORKERS:
            raise ConfigError(f"workers must be 0-{MAX_WORKERS} (0 = one per core), "
                              f"not {self.workers}")  # fmt: skip
        if self.trace not in MODES:
            raise ConfigError(f"trace must be one of {', '.join(MODES)}")
        if self.trace == "users" and not self.trace_users:
            raise ConfigError("trace = users needs trace_users")
        self.require_positive("trace_keys", "trace_per_key", "trace_keep")
        if not 0.0 <= self.otel_sample <= 1.0:
            raise ConfigError("otel_sample must be between 0 and 1")
        if self.otel_recipient_spans < 0 or self.otel_pending_acks < 0:
            raise ConfigError("otel_recipient_spans and otel_pending_acks must not be negative")
        if self.otel_exporter not in OTEL_EXPORTERS:
            raise ConfigError(f"otel_exporter must be one of {', '.join(OTEL_EXPORTERS)}")
        if self.workers != 1:  # each worker's ports: the port + i rule, no collisions
            import os

            from orbited.node.workers import plan_workers, worker_count

            plan_workers(self, worker_count(self.workers, os.cpu_count()))

    @staticmethod
    def _key(owner: type[Any], name: str) -> str:
        """The node key that sets ``owner``'s field ``name``."""
        for key, (cls, field_name) in COMPONENT_KEYS.items():
            if cls is owner and field_name == name:
                return key
        return f"{owner.__name__}.{name}"

    def _values(self, owner: type[Any]) -> dict[str, Any]:
        """The keys' values as ``owner``'s constructor arguments."""
        return {name: getattr(self, key)
                for key, (cls, name) in COMPONENT_KEYS.items() if cls is owner}  # fmt: skip

    def hub_config(self) -> HubConfig:
        return HubConfig(
            mailbox=MailboxLimits(**self._values(MailboxLimits)),
            requests=RequestLimits(**self._values(RequestLimits)),
            users=UserLimits(**self._values(UserLimits)),
            **self._values(HubConfig),
        )

    def trace_config(self) -> TraceConfig | None:
        """The per-key tracer's settings; None when tracing is off."""
        if self.trace == "off":
            return None
        return TraceConfig(
            self.trace, self.trace_per_key, self.trace_per_key, self.trace_keys,  # type: ignore[arg-type]
            frozenset(self.trace_users), self.trace_keep,
        )  # fmt: skip

    def browser_limits(self) -> BrowserLimitsConfig:
        return BrowserLimitsConfig(**self._values(BrowserLimitsConfig))

    def rep_limits(self) -> RepLimits:
        return RepLimits(**self._values(RepLimits))

    def presence_config(self) -> PresenceConfig | None:
        """None when presence webhooks are off (no presence_url)."""
        if not self.presence_url:
            return None
        return PresenceConfig(**self._values(PresenceConfig))

    def offline_config(self) -> OfflineConfig | None:
        """The offline hook's webhook and watch limit; None when it is off (no
        offline_url)."""
        if not self.offline_url:
            return None
        return OfflineConfig(**self._values(OfflineConfig))

    def browser_auth(self, secret: bytes) -> BrowserAuth:
        return BrowserAuth(secret, **self._values(BrowserAuth))
