"""The route address across HaloD hosts: a virtual IPv4 address (VIP) that the host of
the leading HaloD holds, moved by keepalived (VRRP version 3, Debian's ``keepalived``).

Each HaloD host runs one keepalived as a child process of HaloD, with one VRRP instance
for the address. Leadership drives it through a *track file*: HaloD writes ``1`` to it
when it leads and ``0`` when it follows, and keepalived adds ``value × lead_boost`` to
the instance's priority. So the leader's host runs at ``priority + lead_boost`` and every
follower at its own ``priority``: the leader's host wins the address (VRRP preempts a
lower-priority master), and a follower's keepalived gives it up as soon as it hears the
leader's advertisement.

A HaloD that hangs (frozen, a blocked reactor) cannot write ``0`` when another HaloD
takes its lease, so the track file also has to be *fresh*: HaloD rewrites its time every
``refresh_interval`` seconds, and keepalived runs a check (``alive.sh``, every second)
that takes ``lead_boost`` away again while the file is older than ``stale_after`` (the
lease's TTL: by then a hung leader has lost its lease). A hung leader's host then drops
back to its base priority and the new leader's host takes the address.

keepalived runs under ``setpriv --pdeathsig TERM``: when HaloD dies (even by SIGKILL)
keepalived gets SIGTERM, removes the address and sends a priority-0 advertisement, so a
standby takes the address within its skew time (≈ ``advert_int`` × (256 − priority)/256)
without waiting for HaloD's lease to end. If the whole host dies, the others take it
after VRRP's master-down interval (3 × ``advert_int`` + skew). While no HaloD leads
(etcd lost quorum), every host runs at its base priority and the address stays where it
is, so the data plane keeps forwarding.

Before keepalived starts, each host also gets the address on ``lo`` (a /32) and ARP
settings on the interface (:class:`HostSetup`): so connections still open through a
host's data plane after the address left it get reset at the client's next packet
instead of hanging (see HostSetup).

The sans-I/O part (:func:`keepalived_conf`, :func:`track_value`, :func:`vrrp_state`,
:func:`keepalived_argv`, :func:`host_setup`) is pure and unit-tested;
:class:`VirtualAddress` is the thin Twisted shell: it prepares the host, writes the
track file, starts keepalived on the first ``lead()`` or ``follow()`` (or once the
reactor runs), restarts it if it dies, and stops it at ``stop()``. Its files live in
``state_dir`` (mode 700): ``keepalived.conf``, ``leader`` (the track file),
``alive.sh`` (the freshness check), ``keepalived.pid``, ``vrrp.pid`` and
``keepalived.log`` (its output, emptied when HaloD starts).
docs/halod.md, "Route address across HaloD hosts".
"""

from __future__ import annotations

import enum
import ipaddress
import os
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import defer, task, utils
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from orbited.core.settings import ConfigError

KEEPALIVED = "/usr/sbin/keepalived"
SETPRIV = "/usr/bin/setpriv"
IP = "/usr/sbin/ip"  # iproute2
STAT, DATE = "/usr/bin/stat", "/usr/bin/date"  # coreutils, where PATH has none (alive.sh)
IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")
MAX_PRIORITY = 254  # 255 is VRRP's "address owner", which never gives the address up


class VipError(Exception):
    """keepalived could not be started or was stopped: the message says why."""


class Role(enum.Enum):
    LEADER = "leader"
    FOLLOWER = "follower"


class VrrpState(enum.Enum):
    """keepalived's state for the instance, as it logs it."""

    BACKUP = "BACKUP"  # running, not holding the address
    MASTER = "MASTER"  # holding the address
    FAULT = "FAULT"  # the interface is down: not holding it, not competing


ARPHRD_LOOPBACK = 772  # /sys/class/net/<name>/type of a loopback interface (linux/if_arp.h)


def _is_loopback(interface: str) -> bool:
    """``lo``, or an interface of this host whose link type is loopback."""
    try:
        kind = int(Path("/sys/class/net", interface, "type").read_text())
    except (OSError, ValueError):
        return interface == "lo"  # not on this host (yet): judged by its name only
    return kind == ARPHRD_LOOPBACK


@dataclass(frozen=True)
class VipSettings:
    """One host's side of the route address; see docs/halod.md for each field."""

    address: str  # the virtual address with its prefix, e.g. "10.77.0.100/24"
    interface: str  # the interface it goes on, e.g. "eth0"
    router_id: int  # VRRP virtual router id, 1-255: the same on every HaloD host
    priority: int  # this host's base priority, 1-154: host order while nobody leads
    lead_boost: int = 100  # added to the priority while this host's HaloD leads
    # Seconds the track file may go unrefreshed before keepalived takes the lead boost
    # away (a hung HaloD); HaloD passes its etcd lease's TTL.
    stale_after: float = 2.0
    advert_int: float = 0.2  # seconds between VRRP advertisements (0.01-40)
    state_dir: str = "vip"  # keepalived's config, track, pid and log files
    keepalived: str = KEEPALIVED
    start_timeout: float = 10.0  # keepalived must report a VRRP state within this
    stop_timeout: float = 5.0  # after SIGTERM; then SIGKILL

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field."""
        try:
            iface = ipaddress.ip_interface(self.address)
        except ValueError:
            raise ConfigError(
                f"vip_address must be an IPv4 address with its prefix length, like "
                f"10.77.0.100/24, not {self.address!r}"
            ) from None
        if not isinstance(iface, ipaddress.IPv4Interface) or "/" not in self.address:
            raise ConfigError(
                f"vip_address must be an IPv4 address with its prefix length, like "
                f"10.77.0.100/24, not {self.address!r}"
            )
        if iface.ip in (iface.network.network_address, iface.network.broadcast_address) and (
            iface.network.prefixlen < 31
        ):
            raise ConfigError(f"vip_address {self.address} is its network's network or "
                              "broadcast address")  # fmt: skip
        if not IFNAME.fullmatch(self.interface):
            raise ConfigError(f"vip_interface must be an interface name (1-15 of A-Z a-z 0-9 "
                              f"_ . -), not {self.interface!r}")  # fmt: skip
        if _is_loopback(self.interface):
            # keepalived refuses it, and only after HaloD set the host up for the address
            raise ConfigError(f"vip_interface must not be a loopback interface: VRRP runs on "
                              f"the network the hosts share, not {self.interface!r}")  # fmt: skip
        if not _int_in(self.router_id, 1, 255):
            raise ConfigError(f"vip_router_id must be an integer 1-255, not {self.router_id!r}")
        if not _int_in(self.lead_boost, 1, MAX_PRIORITY - 1):  # (not a config key)
            raise ConfigError(f"the lead boost must be an integer 1-253, not {self.lead_boost!r}")
        top = MAX_PRIORITY - self.lead_boost  # the leader's host runs at priority + boost
        if not _int_in(self.priority, 1, top):
            raise ConfigError(
                f"vip_priority must be an integer 1-{top} (the leading HaloD's host runs at "
                f"it + {self.lead_boost}, at most {MAX_PRIORITY}), not {self.priority!r}"
            )
        if not (isinstance(self.advert_int, (int, float)) and 0.01 <= self.advert_int <= 40):
            raise ConfigError(f"vip_advert_int must be 0.01-40 seconds, not {self.advert_int!r}")
        if round(self.advert_int * 100) != round(self.advert_int * 100, 6):
            raise ConfigError(f"vip_advert_int must be whole centiseconds (VRRP v3), not "
                              f"{self.advert_int!r}")  # fmt: skip
        for name in ("state_dir", "keepalived"):
            value = getattr(self, name)
            if not value or unsafe_path(value):
                raise ConfigError(f"vip {name} must be a path without quotes or white space, "
                                  f"not {value!r}")  # fmt: skip
        if not (isinstance(self.stale_after, (int, float)) and 1 <= self.stale_after <= 3600):
            raise ConfigError(f"etcd_lease_ttl must be 1-3600 seconds with vip_address (the "
                              f"leader file's staleness), not {self.stale_after!r}")  # fmt: skip
        for name in ("start_timeout", "stop_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"vip {name} must be positive")

    @property
    def instance(self) -> str:
        """keepalived's name for the VRRP instance (in its log lines)."""
        return f"orbited_halod_{self.router_id}"

    def takeover_interval(self) -> float:
        """VRRP's master-down interval for this host as a standby: how long after the
        last advertisement of a dead master (whole host gone) it takes the address."""
        return 3 * self.advert_int + self.skew()

    def refresh_interval(self) -> float:
        """How often HaloD rewrites the track file's time: well inside ``stale_after``."""
        return min(0.5, self.stale_after / 4)

    def skew(self) -> float:
        """VRRP v3 skew time: how long a standby waits after a priority-0 advertisement
        (the master's keepalived stopped)."""
        return (256 - self.priority) * self.advert_int / 256


def unsafe_path(path: str) -> bool:
    """A path keepalived cannot take: it splits a script's path at white space (alive.sh
    would not run), and its config quotes paths."""
    return any(c in path for c in "\"'\0") or any(c.isspace() for c in path)


def _int_in(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


@dataclass(frozen=True)
class VipFiles:
    """The files in ``state_dir`` (absolute paths: keepalived runs from /)."""

    directory: Path

    @classmethod
    def of(cls, settings: VipSettings) -> VipFiles:
        return cls(Path(settings.state_dir).absolute())

    @property
    def conf(self) -> Path:
        return self.directory / "keepalived.conf"

    @property
    def track(self) -> Path:
        return self.directory / "leader"

    @property
    def alive(self) -> Path:
        return self.directory / "alive.sh"

    @property
    def pid(self) -> Path:
        return self.directory / "keepalived.pid"

    @property
    def vrrp_pid(self) -> Path:
        return self.directory / "vrrp.pid"

    @property
    def log(self) -> Path:
        return self.directory / "keepalived.log"


# -- sans-I/O ----------------------------------------------------------------------------


def track_value(role: Role) -> str:
    """What the track file holds for ``role``: keepalived adds value × lead_boost to the
    priority, so the leader's host outbids every follower."""
    return "1\n" if role is Role.LEADER else "0\n"


def effective_priority(settings: VipSettings, role: Role) -> int:
    """The VRRP priority this host advertises in ``role``."""
    return settings.priority + int(track_value(role)) * settings.lead_boost


def alive_script(settings: VipSettings, files: VipFiles, stat: str = STAT,
                 date: str = DATE) -> str:  # fmt: skip
    """The check keepalived runs every second: exit 0 while HaloD rewrote the track file
    within ``stale_after`` seconds (times in milliseconds: GNU ``stat`` and ``date``, at
    the paths given: HaloD finds them on its PATH)."""
    return f"""\
#!/bin/sh
# Written by HaloD (halod/vip.py) at each start: is HaloD alive (its track file fresh)?
m=$({stat} -c %.3Y "{files.track}" 2>/dev/null) || exit 1
now=$({date} +%s%3N)
[ $((now - ${{m%.*}}${{m#*.}})) -le {round(settings.stale_after * 1000)} ]
"""


def keepalived_conf(settings: VipSettings, files: VipFiles) -> str:
    """keepalived.conf for one host: one VRRP v3 instance, state BACKUP with preemption
    (the higher priority takes the address), the track file weighted by lead_boost, and
    the same weight taken away while the file is stale (``alive_script``: HaloD hung)."""
    iface = ipaddress.ip_interface(settings.address)
    advert = f"{settings.advert_int:.2f}".rstrip("0").rstrip(".")
    return f"""\
# Written by HaloD (halod/vip.py) at each start; edits are overwritten.
global_defs {{
  router_id halod_{settings.router_id}_{settings.priority}
  vrrp_version 3
  vrrp_garp_master_delay 1
  vrrp_garp_master_repeat 3
  script_user root
}}

track_file halod_leader {{
  file "{files.track}"
  weight 1
}}

vrrp_script halod_alive {{
  script "{files.alive}"
  interval 1
  timeout 1
  rise 1
  fall 1
}}

vrrp_instance {settings.instance} {{
  state BACKUP
  interface {settings.interface}
  virtual_router_id {settings.router_id}
  priority {settings.priority}
  advert_int {advert}
  track_file {{
    halod_leader weight {settings.lead_boost}
  }}
  track_script {{
    halod_alive weight -{settings.lead_boost}
  }}
  virtual_ipaddress {{
    {iface.with_prefixlen} dev {settings.interface}
  }}
}}
"""


def keepalived_argv(settings: VipSettings, files: VipFiles, setpriv: str = SETPRIV) -> list[str]:
    """The command HaloD runs: keepalived in the foreground, VRRP only, logging to its
    output, under ``setpriv --pdeathsig TERM`` so it stops (and releases the address)
    when HaloD dies, however it dies."""
    return [
        setpriv, "--pdeathsig", "TERM", "--",
        settings.keepalived, "--dont-fork", "--log-console", "--no-syslog", "--vrrp",
        "--use-file", str(files.conf), "--pid", str(files.pid),
        "--vrrp_pid", str(files.vrrp_pid),
    ]  # fmt: skip


@dataclass(frozen=True)
class HostSetup:
    """What every HaloD host needs besides keepalived (applied before keepalived starts,
    never undone): the address also on ``lo`` as a /32, so it stays a local address when
    keepalived moves it away — connections still open through this host's data plane
    can then send (a packet from the address the host no longer holds reaches the
    client, whose reply goes to the new holder and is answered with a reset: the client
    reconnects at once instead of hanging until its watchdog) — and ARP settings on the
    VRRP interface so a host answers ARP for the address only while it holds it there
    (``arp_ignore`` 1) and never announces it as its ARP source (``arp_announce`` 2)."""

    loopback_address: str  # e.g. "10.77.0.100/32"
    sysctls: tuple[tuple[str, str], ...]  # (/proc/sys path, value)

    def ip_argv(self, ip: str = "ip") -> list[str]:
        return [ip, "address", "replace", self.loopback_address, "dev", "lo"]


def host_setup(settings: VipSettings) -> HostSetup:
    ip = ipaddress.ip_interface(settings.address).ip
    conf = f"/proc/sys/net/ipv4/conf/{settings.interface}"
    return HostSetup(f"{ip}/32", ((f"{conf}/arp_ignore", "1"), (f"{conf}/arp_announce", "2")))


_STATE_LINE = re.compile(r"\((?P<instance>[^)]+)\) Entering (?P<state>[A-Z]+) STATE")


def vrrp_state(line: str, instance: str) -> VrrpState | None:
    """The state a keepalived log line reports for ``instance``, or None."""
    m = _STATE_LINE.search(line)
    if m is None or m.group("instance") != instance:
        return None
    try:
        return VrrpState(m.group("state"))
    except ValueError:
        return None


# -- the Twisted shell -------------------------------------------------------------------


class _Keepalived(ProcessProtocol):
    """One keepalived process: its output goes to the log file and its state lines to
    the owner."""

    def __init__(self, owner: VirtualAddress, log_file: Any) -> None:
        self.owner = owner
        self.log_file = log_file
        self.buffer = b""
        self.tail: list[str] = []  # the last lines, for error messages
        self.reason: Failure | None = None
        self.ended: defer.Deferred[None] = defer.Deferred()

    def childDataReceived(self, fd: int, data: bytes) -> None:  # noqa: N802
        self.log_file.write(data)
        self.log_file.flush()
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", "replace").rstrip()
            self.tail = (self.tail + [line])[-20:]
            self.owner._line(self, line)

    def processEnded(self, reason: Failure) -> None:  # noqa: N802
        self.log_file.close()
        self.reason = reason
        self.ended.callback(None)
        self.owner._ended(self, reason)


class VirtualAddress:
    """This host's keepalived, driven by HaloD's leadership. ``lead()``/``follow()``
    write the track file (and start keepalived if it is not running: their Deferred fires
    when keepalived reports its first VRRP state, or fails with VipError); ``stop()``
    stops keepalived (it releases the address) and fires when it has exited. Once the
    reactor runs, keepalived starts as a follower unless told otherwise before."""

    log = Logger()
    RESTART_MIN = 1.0  # after keepalived died unexpectedly; doubling up to RESTART_MAX
    RESTART_MAX = 10.0

    def __init__(self, settings: VipSettings, reactor: Any, *, setpriv: str = SETPRIV,
                 ip: str = IP) -> None:  # fmt: skip
        settings.validate()
        self.settings = settings
        self.reactor = reactor
        self.setpriv = setpriv
        self.ip = ip
        self.files = VipFiles.of(settings)
        self.role: Role | None = None
        self.state: VrrpState | None = None  # keepalived's last reported state
        self.error: str | None = None
        self.restarts = 0
        self._proc: _Keepalived | None = None
        self._transport: Any = None
        self._ready: list[defer.Deferred[None]] = []  # waiting for the first state line
        self._started = False  # the running process reported a state
        self._ever_started = False  # one did: an exit is a crash to restart from
        self._timeout: IDelayedCall | None = None
        self._retry: IDelayedCall | None = None
        self._backoff = self.RESTART_MIN
        self._stopped = False
        self._preparing = False  # HostSetup under way (keepalived not spawned yet)
        # Rewrites the track file's time (alive_script), from the first lead()/follow().
        self._refresher = task.LoopingCall(self._refresh)
        self._refresher.clock = reactor
        self._refresh_failed = False
        # From the moment the reactor runs this host takes part as a follower, so a
        # standby is ready to take the address before its HaloD is ever told anything.
        when_running = getattr(reactor, "callWhenRunning", None)
        if when_running is not None:
            when_running(self._boot)

    def _boot(self) -> None:
        if self.role is None and not self._stopped:
            self.follow().addErrback(lambda f: None)  # logged by _fail_start

    @property
    def pid(self) -> int | None:
        return self._transport.pid if self._transport is not None else None

    def holds_address(self) -> bool:
        """keepalived reported MASTER last: this host has the address."""
        return self.state is VrrpState.MASTER

    def lead(self) -> defer.Deferred[None]:
        return self._set(Role.LEADER)

    def follow(self) -> defer.Deferred[None]:
        return self._set(Role.FOLLOWER)

    def _set(self, role: Role) -> defer.Deferred[None]:
        if self._stopped:
            return defer.fail(VipError("the virtual address was stopped"))
        try:
            self._write_track(role)
        except OSError as e:
            return defer.fail(VipError(f"cannot write {self.files.track}: {e}"))
        if not self._refresher.running:
            self._refresher.start(self.settings.refresh_interval(), now=False)
        if role is not self.role:
            self.log.info("virtual address {address}: this host {role}s (priority {prio})",
                          address=self.settings.address, role=role.value.removesuffix("er"),
                          prio=effective_priority(self.settings, role))  # fmt: skip
        self.role = role
        if self._proc is not None and self._started:
            return defer.succeed(None)
        waiting: defer.Deferred[None] = defer.Deferred()
        self._ready.append(waiting)
        if self._proc is None and self._retry is None and not self._preparing:
            self._start()
        return waiting

    def _write_track(self, role: Role) -> None:
        self.files.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.files.track.with_suffix(".tmp")
        tmp.write_text(track_value(role))
        os.replace(tmp, self.files.track)  # keepalived reads it on the rename (inotify)

    def _refresh(self) -> None:
        """The track file's time, now: HaloD is alive (alive_script)."""
        try:
            os.utime(self.files.track)
        except OSError as e:
            if not self._refresh_failed:  # once, not every half second
                self.log.error("virtual address: cannot refresh {file}: {e}",
                               file=self.files.track, e=e)  # fmt: skip
            self._refresh_failed = True
        else:
            self._refresh_failed = False

    def _start(self) -> None:
        """Prepare the host (HostSetup), then spawn keepalived."""
        self._retry = None
        self._started = False
        self.state = None
        self._preparing = True
        setup = host_setup(self.settings)
        if not Path(setup.sysctls[0][0]).parent.is_dir():
            self._preparing = False
            self._fail_start(f"vip_interface {self.settings.interface} does not exist on this "
                             "host")  # fmt: skip
            return
        try:
            for path, value in setup.sysctls:
                Path(path).write_text(value + "\n")
        except OSError as e:
            self._preparing = False
            self._fail_start(f"cannot set {path} (HaloD needs CAP_NET_ADMIN): {e}")
            return
        d = utils.getProcessOutputAndValue(self.ip, setup.ip_argv(self.ip)[1:],
                                           env=dict(os.environ), reactor=self.reactor)  # fmt: skip

        def prepared(result: tuple[bytes, bytes, int]) -> None:
            self._preparing = False
            out, err, code = result
            if self._stopped:
                return
            if code != 0:
                why = (err or out).decode("utf-8", "replace").strip()
                self._fail_start(f"cannot add {setup.loopback_address} to lo: {why}")
                return
            self._spawn()

        def failed(f: Failure) -> None:
            self._preparing = False
            if not self._stopped:
                self._fail_start(f"cannot run {self.ip}: {f.getErrorMessage()}")

        d.addCallbacks(prepared, failed)

    def _spawn(self) -> None:
        files = self.files
        try:
            files.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            files.conf.write_text(keepalived_conf(self.settings, files))
            files.alive.write_text(alive_script(
                self.settings, files, shutil.which("stat") or STAT, shutil.which("date") or DATE,
            ))  # fmt: skip
            files.alive.chmod(0o700)
            # emptied when this HaloD first starts it; a restart's output follows the crash
            log_file = files.log.open("ab" if self._ever_started else "wb")
        except OSError as e:
            self._fail_start(f"cannot write keepalived's files in {files.directory}: {e}")
            return
        for binary in (self.setpriv, self.settings.keepalived):
            if not os.access(binary, os.X_OK):
                log_file.close()
                self._fail_start(f"{binary} is not installed (Debian packages keepalived and "
                                 "util-linux)")  # fmt: skip
                return
        proc = _Keepalived(self, log_file)
        argv = keepalived_argv(self.settings, files, self.setpriv)
        try:
            self._transport = self.reactor.spawnProcess(proc, argv[0], argv, env=dict(os.environ),
                                                        path="/")  # fmt: skip
        except OSError as e:
            log_file.close()
            self._fail_start(f"cannot run {argv[0]}: {e}")
            return
        self._proc = proc
        self._timeout = self.reactor.callLater(self.settings.start_timeout, self._start_timed_out,
                                               proc)  # fmt: skip
        self.log.info("keepalived started (pid {pid}) for {address} on {interface}",
                      pid=self._transport.pid, address=self.settings.address,
                      interface=self.settings.interface)  # fmt: skip

    def _start_timed_out(self, proc: _Keepalived) -> None:
        self._timeout = None
        if proc is self._proc and not self._started:
            self._fail_start(f"keepalived reported no VRRP state within "
                             f"{self.settings.start_timeout} s; its output: "
                             f"{' | '.join(proc.tail[-5:])}")  # fmt: skip
            self._signal(signal.SIGKILL)

    def _fail_start(self, message: str) -> None:
        self.error = message
        self.log.error("virtual address: {message}", message=message)
        waiting, self._ready = self._ready, []
        for d in waiting:
            d.errback(VipError(message))

    def _line(self, proc: _Keepalived, line: str) -> None:
        if "halod_alive" in line and ("Disabling" in line or "cannot be accessed" in line):
            # keepalived turned the freshness check off: a hung HaloD would keep the address
            self.log.error("virtual address: keepalived disabled its check of HaloD "
                           "(alive.sh), so a hung leader's host would keep the address: "
                           "{line}", line=line)  # fmt: skip
        state = vrrp_state(line, self.settings.instance)
        if state is None or proc is not self._proc:
            return
        if state is not self.state:
            self.log.info("virtual address {address}: keepalived {state}",
                          address=self.settings.address, state=state.value)  # fmt: skip
        self.state = state
        if not self._started:
            self._started = self._ever_started = True
            self.error = None
            self._backoff = self.RESTART_MIN
            if self._timeout is not None and self._timeout.active():
                self._timeout.cancel()
            self._timeout = None
            waiting, self._ready = self._ready, []
            for d in waiting:
                d.callback(None)

    def _ended(self, proc: _Keepalived, reason: Failure) -> None:
        if proc is not self._proc:
            return
        self._proc = None
        self._transport = None
        self.state = None
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None
        if self._stopped:
            return
        code = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        why = f"exit {code}" if code is not None else f"signal {sig}"
        if not self._started:
            self._fail_start(f"keepalived exited ({why}) before it ran: "
                             f"{' | '.join(proc.tail[-5:])}")  # fmt: skip
            if not self._ever_started:  # never came up: a config or environment error
                return
        self.restarts += 1
        self.error = f"keepalived exited ({why}); restarting in {self._backoff:g} s"
        self.log.critical("virtual address: {error}", error=self.error)
        self._retry = self.reactor.callLater(self._backoff, self._start)
        self._backoff = min(self._backoff * 2, self.RESTART_MAX)

    def _signal(self, sig: int) -> None:
        if self._transport is not None:
            try:
                self._transport.signalProcess(sig)
            except ProcessExitedAlready:
                pass

    def stop(self) -> defer.Deferred[None]:
        """Stop keepalived (SIGTERM: it releases the address and tells the others at
        once; SIGKILL after ``stop_timeout``). Fires when it has exited."""
        self._stopped = True
        if self._refresher.running:
            self._refresher.stop()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        waiting, self._ready = self._ready, []
        for d in waiting:
            d.errback(VipError("the virtual address was stopped"))
        proc = self._proc
        if proc is None:
            return defer.succeed(None)
        done: defer.Deferred[None] = defer.Deferred()
        kill = self.reactor.callLater(self.settings.stop_timeout, self._signal, signal.SIGKILL)

        def ended(_: None) -> None:
            if kill.active():
                kill.cancel()
            if proc.reason is not None and not proc.reason.check(ProcessDone):
                self.log.info("keepalived stopped: {reason}",
                              reason=proc.reason.getErrorMessage())  # fmt: skip
            done.callback(None)

        proc.ended.addCallback(ended)
        self._signal(signal.SIGTERM)
        return done
