"""HaloD configuration: a TOML file's [halod] table, overridden by command-line flags.

Every key and default is listed in docs/operations.md ("HaloD configuration").
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from halod.dashboard import DEFAULT_STREAMS
from halod.dataplane.base import MOVE_CLOSE_DELAY, Ports
from halod.dataplane.haproxy import HAProxyDataPlane
from halod.dataplane.haproxy import Settings as HAProxySettings
from halod.liveness import ProbeSettings
from halod.membership import Timing
from halod.store.etcd import EtcdSettings
from halod.timeline import DEFAULT_CAPACITY as TIMELINE_SIZE
from halod.tracefan import TRACE_TIMEOUT
from orbited.core.control import MAX_MESSAGE, MAX_ROUTES
from orbited.core.hashing import DEFAULT_HASH_VERSION, HASH_VERSIONS
from orbited.core.routes import DEFAULT_ROUTES, POLICIES
from orbited.core.settings import (
    ConfigBase,
    ConfigError,
    FieldError,
    opt,
    parse_host_port,
    parse_sp_address,
)

if TYPE_CHECKING:  # (halod.vip is imported only when the route address is used)
    from halod.vip import VipSettings

DATAPLANES = ("proxy", "haproxy", "nftables", "none")
STORES = ("sqlite", "etcd")
# The route address's keepalived settings (halod.vip.VipSettings has no defaults for them).
VIP_INTERFACE, VIP_ROUTER_ID, VIP_PRIORITY = "", 51, 100


def _refuse_group_address(host: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    """A multicast or the broadcast address is no address clients connect to."""
    if host.is_multicast or host == ipaddress.IPv4Address("255.255.255.255"):
        raise ConfigError(f"dataplane_host must be a unicast address, not {host} "
                          "(multicast or broadcast)")  # fmt: skip


@dataclass
class HaloDConfig(ConfigBase):
    """The [halod] table."""

    section: ClassVar[str] = "halod"

    control: str = opt("tcp://127.0.0.1:7600", "control listener for nodes (SP pair0)")
    status_http: str = opt("127.0.0.1:7601", "status JSON and /metrics host:port (empty = off)")
    status_hosts: list[str] = opt(
        [], "host name the status port answers to besides IP literals and localhost (repeat)"
    )
    routes: int = opt(DEFAULT_ROUTES, "N, the number of routes (fixed for the life of a cluster)")
    hash_version: int = opt(
        DEFAULT_HASH_VERSION,
        "hash version of a NEW table (docs/hashing.md); an existing table keeps its own",
    )
    spares: int = opt(1, "failover nodes kept in commission when possible")
    policy: str = opt("seed", "failover without a spare: seed (2007 note) or minimal")
    heartbeat_interval: float = opt(
        Timing.heartbeat_interval, "seconds between a node's heartbeats"
    )
    missed_heartbeats: int = opt(Timing.missed_heartbeats, "k: silent for k intervals = failed")
    grace: float = opt(Timing.grace, "seconds a disconnected node has to reconnect and keep routes")
    move_rate: float = opt(
        Timing.move_rate, "browsers/s a planned move (drain, join) sends on (0 = all at once)"
    )
    probe: bool = opt(
        ProbeSettings.enabled, "probe a lost node's ports (so a dead one fails over at once)"
    )
    probe_timeout: float = opt(
        ProbeSettings.timeout, "seconds a probe connect may take (then: no answer)"
    )
    probe_interval: float = opt(
        ProbeSettings.interval, "seconds between probes of a node that still answers"
    )
    db: str = opt("halod.sqlite3", "SQLite file the table is saved to on every change")
    store: str = opt("sqlite", "where the table lives: sqlite (db) or etcd (etcd_endpoints)")
    etcd_endpoints: list[str] = opt(
        list(EtcdSettings.endpoints), "store etcd: an etcd member's client URL (repeat)"
    )
    etcd_prefix: str = opt(EtcdSettings.prefix, "store etcd: the key prefix of this table")
    etcd_lease_ttl: int = opt(
        EtcdSettings.lease_ttl, "store etcd: seconds of the leader's lease (the take-over time)"
    )
    etcd_step_down_margin: float = opt(
        EtcdSettings.step_down_margin, "store etcd: the leader stops this long before its lease"
    )
    etcd_timeout: float = opt(EtcdSettings.timeout, "store etcd: seconds an etcd request may take")
    etcd_name: str = opt("", "store etcd: this HaloD's name (empty: its control host:port)")
    control_advertise: str = opt(
        "", "store etcd: the control address followers send nodes to (empty: the bound one)"
    )
    vip_address: str = opt("", "store etcd: route address the leader's host holds (empty = off)")
    vip_interface: str = opt(VIP_INTERFACE, "vip: the interface the address goes on")
    vip_router_id: int = opt(VIP_ROUTER_ID, "vip: VRRP virtual router id, the same on every host")
    vip_priority: int = opt(VIP_PRIORITY, "vip: this host's VRRP priority while nobody leads")
    secret_file: str = opt("", "cluster secret nodes must present (empty = none)")
    operator_key_file: str = opt(
        "", "bearer key (≥ 32 bytes) for drain/undrain/rehash and /trace (empty: CLI only)"
    )
    dashboard_streams: int = opt(DEFAULT_STREAMS, "open /dashboard/events streams at most")
    timeline_size: int = opt(TIMELINE_SIZE, "dashboard timeline: incidents kept in memory")
    trace_timeout: float = opt(TRACE_TIMEOUT, "seconds /trace waits for the nodes' answers")
    control_max_message: int = opt(MAX_MESSAGE, "largest control message; larger closes")
    control_header_timeout: float = opt(10.0, "seconds a node has to send SP header+register")
    dataplane: str = opt("proxy", "route ports: proxy (built-in), haproxy, nftables, or none")
    dataplane_host: str = opt("127.0.0.1", "address the 2×N route ports listen on")
    browser_port_base: int = opt(8100, "route r's browser port is this + r - 1")
    sp_port_base: int = opt(9100, "route r's web-app (SP) port is this + r - 1")
    move_close_delay: float = opt(
        MOVE_CLOSE_DELAY, "seconds before connections of a moved route are cut"
    )
    proxy_on_exit: str = opt(
        "keep", "proxy: keep the worker forwarding when HaloD stops, or stop it"
    )
    haproxy_dir: str = opt("", "HAProxy's cfg, sockets, pidfile (empty: haproxy/ beside db)")
    haproxy_bin: str = opt("haproxy", "the HAProxy executable (PATH, then /usr/sbin)")
    haproxy_manage: bool = opt(True, "start HAProxy when none answers on haproxy_dir's socket")
    haproxy_on_exit: str = opt("keep", "keep HAProxy serving when HaloD stops, or stop it")
    haproxy_maxconn: int = opt(
        HAProxySettings.maxconn, "HAProxy maxconn (needs about 2× as many fds)"
    )
    haproxy_nbthread: int = opt(HAProxySettings.nbthread, "HAProxy threads (0: one per CPU)")
    haproxy_timeout: float = opt(
        HAProxySettings.timeout, "HAProxy client/server/tunnel idle timeout, seconds"
    )
    haproxy_connect_timeout: float = opt(
        HAProxySettings.connect_timeout, "seconds HAProxy waits for a node's connect, per try"
    )
    haproxy_retries: int = opt(
        HAProxySettings.retries, "HAProxy connect retries (on the route's owner at that time)"
    )
    haproxy_stats_interval: float = opt(
        HAProxyDataPlane.STATS_INTERVAL, "seconds between HAProxy show stat polls"
    )
    nft_table: str = opt("halod", "the nftables data plane's table (unique per host)")
    nft_keep_on_stop: bool = opt(True, "leave the nftables table in place when HaloD stops")
    nft_source_nat: str = opt("none", "nftables: none, or masquerade DNATed flows")
    nft_stats_interval: float = opt(5.0, "nftables: seconds between conntrack polls (0 = off)")
    nft_conntrack: str = opt("conntrack", "nftables: the conntrack tool (name or path)")
    log_level: str = opt("info", "debug, info, warn or error")

    def validate(self) -> None:
        super().validate()
        parse_sp_address(self.control, "control")
        if self.status_http:
            parse_host_port(self.status_http, "status_http")
        self.require_positive(
            "routes", "heartbeat_interval", "missed_heartbeats", "grace",
            "probe_timeout", "probe_interval", "control_max_message", "control_header_timeout",
            "dashboard_streams", "timeline_size", "trace_timeout",
        )  # fmt: skip
        if self.move_rate < 0:
            raise ConfigError("move_rate must be 0 (no pacing) or more")
        if self.control_max_message < MAX_MESSAGE:  # what nodes send (hand-offs, trace replies)
            raise ConfigError(
                f"control_max_message must be at least {MAX_MESSAGE}: nodes send messages "
                "up to that size"
            )
        if self.routes > MAX_ROUTES:  # nodes refuse a welcome with more (halod-protocol.md)
            raise ConfigError(f"routes must be at most {MAX_ROUTES}")
        if self.hash_version not in HASH_VERSIONS:
            raise ConfigError(f"hash_version is one of {', '.join(map(str, HASH_VERSIONS))}")
        if self.spares < 0:
            raise ConfigError("spares must not be negative")
        if self.policy not in POLICIES:
            raise ConfigError(f"policy is one of {', '.join(POLICIES)}")
        if self.dataplane not in DATAPLANES:
            raise ConfigError(f"dataplane is one of {', '.join(DATAPLANES)}")
        if self.dataplane != "none":
            ranges = []
            for name in ("browser_port_base", "sp_port_base"):
                base = getattr(self, name)
                if not 1 <= base or base + self.routes - 1 > 65535:
                    raise ConfigError(f"{name} + routes must stay within ports 1..65535")
                ranges.append(range(base, base + self.routes))
            if set(ranges[0]) & set(ranges[1]):
                raise ConfigError("browser and SP route port ranges overlap")
            if self.dataplane != "nftables":  # nftables: stricter, _validate_nftables
                self._validate_dataplane_host()
        if self.move_close_delay < 0:
            raise ConfigError("move_close_delay must not be negative")
        if self.proxy_on_exit not in ("keep", "stop"):
            raise ConfigError("proxy_on_exit is keep or stop")
        self._validate_store()
        if self.dataplane == "haproxy":
            self._validate_haproxy()
        if self.dataplane == "nftables":
            self._validate_nftables()

    def _validate_store(self) -> None:
        if self.store not in STORES:
            raise ConfigError(f"store is one of {', '.join(STORES)}")
        if self.store == "sqlite" and not self.db:
            raise ConfigError("db must name the SQLite file")
        if self.store == "etcd":
            try:
                self.etcd_settings()
            except ValueError as e:
                raise ConfigError(str(e)) from None
            if self.control_advertise:
                parse_sp_address(self.control_advertise, "control_advertise")
        if self.vip_address:
            if self.store != "etcd":
                raise ConfigError('vip_address needs store = "etcd" (the leader holds it)')
            from halod.vip import unsafe_path  # only when the route address is used

            settings = self.vip_settings()
            if unsafe_path(settings.state_dir):  # (named here: the folder comes from db)
                raise ConfigError(
                    f"db {self.db}: with vip_address its folder holds keepalived's files "
                    f"({settings.state_dir}), and keepalived cannot run a script from a path "
                    "with white space or quotes: move db"
                )
            settings.validate()
            self._validate_vip_dataplane()

    def vip_settings(self) -> VipSettings:
        """The route address's settings (halod.vip): keepalived's files in ``vip/``
        beside ``db`` (HaloD's state together), and a hung HaloD's file stale once its
        lease has ended."""
        from halod.vip import VipSettings

        return VipSettings(
            address=self.vip_address, interface=self.vip_interface,
            router_id=self.vip_router_id, priority=self.vip_priority,
            stale_after=self.etcd_lease_ttl,
            state_dir=str(Path(self.db).absolute().parent / "vip"),
        )  # fmt: skip

    def _validate_vip_dataplane(self) -> None:
        """Every host's data plane listens on the route address (docs/halod.md): a
        ``dataplane_host`` that is not it (or, for the proxy and HAProxy, a wildcard)
        would leave the address served by nothing once this host holds it."""
        if self.dataplane == "none":
            return
        vip = ipaddress.ip_interface(self.vip_address).ip
        try:
            host = ipaddress.ip_address(self.dataplane_host)
        except ValueError:
            return  # refused by the data plane's own check, with its message
        wildcard = self.dataplane != "nftables" and host.is_unspecified
        if host != vip and not wildcard:
            also = "" if self.dataplane == "nftables" else " (or 0.0.0.0, every interface)"
            raise ConfigError(
                f"dataplane_host {self.dataplane_host} is not the route address {vip} "
                f"(vip_address): every HaloD host's data plane must listen on it; set "
                f'dataplane_host = "{vip}"{also}'
            )

    def etcd_settings(self) -> EtcdSettings:
        """The etcd store's settings (ValueError names a bad key)."""
        return EtcdSettings(
            tuple(self.etcd_endpoints), self.etcd_prefix, self.etcd_lease_ttl,
            self.etcd_step_down_margin, self.etcd_timeout,
        )  # fmt: skip

    def _validate_dataplane_host(self) -> None:
        # An IP literal, never resolved: "" would bind every interface without saying so,
        # and a name or typo would fail only when the ports are opened (HAProxy: retried
        # forever). 0.0.0.0 / :: stay allowed, with halod.exposure's warning.
        try:
            host = ipaddress.ip_address(self.dataplane_host)
        except ValueError:
            raise ConfigError(
                f"dataplane_host must be an IP address (IPv4 or IPv6, not a name), "
                f"not {self.dataplane_host!r}"
            ) from None
        _refuse_group_address(host)

    def _validate_nftables(self) -> None:
        try:  # the kernel matches `ip daddr`: a literal address, not a name or 0.0.0.0
            vip = ipaddress.IPv4Address(self.dataplane_host)
        except ValueError:
            raise ConfigError("dataplane nftables needs an IPv4 dataplane_host") from None
        if vip.is_unspecified:
            raise ConfigError("dataplane nftables needs a specific dataplane_host, not 0.0.0.0")
        _refuse_group_address(vip)
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,31}", self.nft_table):
            raise ConfigError("nft_table is a letter then letters, digits or _ (≤ 32)")
        if self.nft_source_nat not in ("none", "masquerade"):
            raise ConfigError("nft_source_nat is none or masquerade")
        if self.nft_stats_interval < 0:
            raise ConfigError("nft_stats_interval must not be negative")

    def _validate_haproxy(self) -> None:
        self.require_positive("haproxy_stats_interval")
        try:  # the layout's ranges are HAProxy Settings' own
            self.haproxy_settings()
        except FieldError as e:
            raise ConfigError(str(e)) from None
        if self.haproxy_on_exit not in ("keep", "stop"):
            raise ConfigError("haproxy_on_exit is keep or stop")
        # UNIX socket paths are limited to 107 bytes (sun_path).
        if len(str(self.haproxy_directory() / "master.sock").encode()) > 107:
            raise ConfigError("haproxy_dir is too long a path for its UNIX sockets")

    def haproxy_directory(self) -> Path:
        """Beside the database by default: HaloD's state stays together (and each test's
        HaloD gets its own HAProxy)."""
        return Path(self.haproxy_dir or Path(self.db).parent / "haproxy").absolute()

    def ports(self) -> Ports:
        return Ports(self.dataplane_host, self.browser_port_base, self.sp_port_base, self.routes)

    def haproxy_settings(self) -> HAProxySettings:
        return HAProxySettings(
            self.ports(), self.haproxy_directory(), self.haproxy_maxconn, self.haproxy_nbthread,
            self.haproxy_timeout, self.haproxy_connect_timeout, self.haproxy_retries,
        )  # fmt: skip

    def timing(self) -> Timing:
        probe = ProbeSettings(self.probe, self.probe_timeout, self.probe_interval)
        return Timing(
            self.heartbeat_interval, self.missed_heartbeats, self.grace, probe, self.move_rate
        )
