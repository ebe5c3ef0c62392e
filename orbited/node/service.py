"""One Orbited node as a twisted.application service: SP listener, browser site, keepalive.

Stopping the service (SIGTERM, Ctrl-C) tells every attached browser to reconnect before
the listeners close.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.application import internet, service
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.logger import Logger

from orbited.core import speedups
from orbited.core.settings import parse_host_port, parse_sp_address
from orbited.core.tokens import load_secret
from orbited.node import collector
from orbited.node.config import NodeConfig
from orbited.node.hub import Hub
from orbited.node.legacy.orbit import OrbitFactory
from orbited.node.link import HaloDLink
from orbited.node.observe import build_observer
from orbited.node.offline import OfflineWatcher
from orbited.node.presence import PresenceNotifier
from orbited.node.publish import publish_site
from orbited.node.rep import RepFactory
from orbited.node.trace import Tracer
from orbited.node.transports.gate import (
    GatedTCPServer,
    SocketGate,
    default_max_sockets,
    raise_fd_limit,
)
from orbited.node.transports.httpfront import BrowserFront
from orbited.node.transports.limits import BrowserLimits
from orbited.node.web import browser_site
from orbited.node.webhook import WebhookQueue
from orbited.runtime.twisted_compat import Ticker, listening_port


def key_file(key: str, path: str, create: bool = False) -> bytes:
    """The key in ``path``, the file the node key ``key`` names (``secret_file``,
    ``publish_key_file``...); ValueError names both (the node exits 2 with it)."""
    try:
        return load_secret(Path(path), create=create)
    except OSError as e:
        raise ValueError(f"{key} {path}: {e.strerror or e}") from None
    except ValueError as e:  # (load_secret's message starts with the path)
        raise ValueError(f"{key} {e}") from None


def trace_key(path: str) -> bytes | None:
    """The bearer key of ``GET /orbited/trace`` in ``path`` (None: no path, endpoint off);
    ValueError names the file (the node exits 2 with it)."""
    return key_file("trace_key_file", path) if path else None


def _webhook_counters(name: str, queue: WebhookQueue) -> dict[str, int]:
    """A webhook's notices waiting, sent and lost (/orbited/health's ``limits``)."""
    return {f"{name}_queue": queue.waiting, f"{name}_sent": queue.sent,
            f"{name}_dropped": queue.dropped}  # fmt: skip


class NodeService(service.MultiService):
    log = Logger()

    def __init__(self, config: NodeConfig, reactor: IReactorTCP | None = None) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.config = config
        self.reactor = reactor
        # The reactor provides both; its interfaces are typed one at a time.
        clock: IReactorTime = reactor  # type: ignore[assignment]
        self.clock = clock
        secret = key_file("secret_file", config.secret_file, create=config.create_secret)
        self.hub = Hub(clock, config.hub_config())
        self.hub.name = config.name
        # Per-key tracing and OpenTelemetry (orbited.node.observe): the hub's observer is
        # None when both are off.
        trace = config.trace_config()
        self.tracer = None if trace is None else Tracer(trace, config.name)
        self.otel: Any = None
        if config.otel:
            from orbited.node import otel  # imports opentelemetry only in build()

            self.otel = otel.build(config, config.name)
        self.hub.observe(build_observer(self.tracer, self.otel), self.tracer)
        self.presence: PresenceNotifier | None = None
        presence = config.presence_config()
        if presence is not None:
            self.presence = PresenceNotifier(presence, secret, config.name, clock)
            self.hub.presence = self.presence.notify
        # The offline hook (docs/protocol.md, "Offline webhooks"): without offline_url the
        # hub keeps its no-op watcher and refuses requests with "offline".
        self.offline: OfflineWatcher | None = None
        self.offline_queue: WebhookQueue | None = None
        offline = config.offline_config()
        if offline is not None:
            self.offline_queue = WebhookQueue(offline, secret, config.name, clock, "offline")
            self.offline = OfflineWatcher(
                self.offline_queue, clock, offline.watches, self.hub.stats
            )
            self.hub.offline = self.offline
        # The requests of one SP read form one delivery batch (orbited.node.flush).
        self.rep_factory = RepFactory(
            self.hub.handle_request, config.rep_limits(), clock, batch=self.hub.batch,
            many=self.hub.handle_requests,
        )  # fmt: skip
        self.browser_limits = BrowserLimits(config.browser_limits(), clock)
        self.fd_limit = raise_fd_limit()
        self.socket_gate = SocketGate(config.max_sockets or default_max_sockets(self.fd_limit))
        auth = config.browser_auth(secret)
        self.site = browser_site(
            self.hub,
            auth,
            config.cors_origins,
            config.name,
            config.iframe_max_bytes,
            self.browser_limits,
            self.limit_counters,
            trace_key(config.trace_key_file),
        )
        # The browser port: the lean front serves WebSocket, SSE and long-poll itself and
        # hands every other request to the site (orbited/node/transports/httpfront.py).
        self.front = BrowserFront(
            self.site, self.hub, auth, config.cors_origins, self.browser_limits, clock
        )
        sp_host, sp_port = parse_sp_address(config.sp)
        http_host, http_port = parse_host_port(config.http)
        self.sp_server = internet.TCPServer(
            sp_port, self.rep_factory, backlog=config.backlog, interface=sp_host, reactor=reactor
        )
        self.http_server = GatedTCPServer(
            self.socket_gate, http_port, self.front, backlog=config.backlog,
            interface=http_host, reactor=reactor,
        )  # fmt: skip
        self.sp_server.setServiceParent(self)
        self.http_server.setServiceParent(self)
        self.publish_server: internet.TCPServer | None = None
        if config.publish_http:
            api_key = key_file("publish_key_file", config.publish_key_file)
            publish_host, publish_port = parse_host_port(config.publish_http)
            self.publish_server = internet.TCPServer(
                publish_port,
                publish_site(self.hub, api_key, config.sp_max_message, self.browser_limits.config),
                interface=publish_host,
                reactor=reactor,
            )
            self.publish_server.setServiceParent(self)
        self.orbit_server: internet.TCPServer | None = None
        if config.orbit_legacy:
            orbit_host, orbit_port = parse_host_port(config.orbit_legacy)
            self.orbit_server = internet.TCPServer(
                orbit_port, OrbitFactory(self.hub), interface=orbit_host, reactor=reactor
            )
            self.orbit_server.setServiceParent(self)
        keepalive = Ticker(config.keepalive / 2, self.hub.keepalive_tick)
        keepalive.clock = clock
        keepalive.setServiceParent(self)
        self.halod_link: HaloDLink | None = None
        if config.halod:
            halod_secret = None
            if config.halod_secret_file:
                halod_secret = key_file("halod_secret_file", config.halod_secret_file).decode(
                    "latin-1"
                )  # fmt: skip
            self.halod_link = HaloDLink(
                self.hub, config.name, config.halod, self._advertised, config.capacity,
                reactor, halod_secret,
            )  # fmt: skip
            self.halod_link.setServiceParent(self)  # after the listeners: addresses known

    def limit_counters(self) -> dict[str, int]:
        """The limits' gauges and refusal counters, for /orbited/health."""
        gate = self.socket_gate
        return {
            **self.browser_limits.snapshot(),
            "sockets": gate.open,
            "max_sockets": gate.max_sockets,
            "refused_sockets": gate.refused,
            **self.rep_factory.stats(),
            "mailbox_bytes": self.hub.mailbox_bytes,
            "full": self.hub.stats["full"],
            **self._offline_counters(),
            **self._presence_counters(),
        }

    def _presence_counters(self) -> dict[str, int]:
        """The presence webhook's queue and losses (none when it is off)."""
        return {} if self.presence is None else _webhook_counters("presence", self.presence)

    def _offline_counters(self) -> dict[str, int]:
        """The offline hook's gauges and losses (none when it is off)."""
        if self.offline is None or self.offline_queue is None:
            return {}
        return {"offline_watches": len(self.offline),
                **_webhook_counters("offline", self.offline_queue)}  # fmt: skip

    def _advertised(self) -> tuple[str, str]:
        """The addresses HaloD forwards browsers and web apps to."""
        return (
            self.config.advertise_http or self.http_address,
            self.config.advertise_sp or self.sp_address,
        )

    def startService(self) -> None:  # noqa: N802
        super().startService()
        # Once start-up is over (listeners up, everything imported): freeze what it
        # allocated and raise the collector's thresholds, once per process
        # (orbited.node.collector).
        self.clock.callLater(0, collector.tune)
        if self.config.max_connections >= self.socket_gate.max_sockets:
            self.log.warn(
                "max_connections ({c}) is not below the socket cap ({s}, fd limit {fd}): "
                "browsers past the cap get a closed socket, not a 503",
                c=self.config.max_connections,
                s=self.socket_gate.max_sockets,
                fd=self.fd_limit,
            )
        if speedups.native is None:
            self.log.warn(speedups.NOT_BUILT)
        self.log.info(
            "node {name} epoch {epoch}: browsers on http://{http}/orbited/, web apps on {sp}",
            name=self.config.name,
            epoch=self.hub.epoch,
            http=self._address(self.http_server),
            sp="tcp://" + self._address(self.sp_server),
        )

    def stopService(self) -> defer.Deferred[None]:  # noqa: N802
        if self.halod_link is not None:
            self.halod_link.leave()
        self.hub.shutdown("shutdown")
        if self.otel is not None:
            self.otel.shutdown()  # flushes the spans still batched
        # Then no keep-alive connection to this node is left for a browser's next request.
        self.front.close_idle_connections()
        # Give the reconnect frames and close handshakes a moment to leave.
        stopped: defer.Deferred[None] = task.deferLater(self.clock, 0.2, lambda: None)
        return stopped.addCallback(lambda _: super(NodeService, self).stopService())

    @staticmethod
    def _address(server: internet.TCPServer) -> str:
        host = listening_port(server).getHost()
        if not isinstance(host, IPv4Address | IPv6Address):  # a TCPServer listens on TCP
            raise TypeError(f"not a TCP address: {host}")
        return f"{host.host}:{host.port}"

    @property
    def http_address(self) -> str:
        return self._address(self.http_server)

    @property
    def publish_address(self) -> str | None:
        return self._address(self.publish_server) if self.publish_server else None

    @property
    def orbit_address(self) -> str | None:
        return self._address(self.orbit_server) if self.orbit_server else None

    @property
    def sp_address(self) -> str:
        return "tcp://" + self._address(self.sp_server)
