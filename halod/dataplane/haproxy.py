"""HAProxy as HaloD's data plane (docs/operations.md, "HAProxy back-end").

Owns the ``haproxy.cfg`` HaloD writes into ``haproxy_dir``, the HAProxy master-worker
process it starts there (or finds still running from an earlier HaloD and attaches to,
so a HaloD restart keeps established connections), and every route change, sent to
HAProxy's admin socket at runtime: HAProxy is never reloaded for a route change.

Layout: one ``listen r<route>_<side>`` proxy per route port, each with two server slots,
``a`` and ``b`` (a "two-slot technique"). The slot
holding the owner is enabled, the other is in maintenance. A move puts the new owner
into the idle slot, enables it and disables the old one, so new connections follow at
once while the old slot keeps its sessions; ``move_close_delay`` later,
``shutdown sessions server`` on the old slot cuts exactly the connections made before
the move. A proxy per route (not one per node behind a map) is what makes that cut
precise: a node's other routes are untouched. A route without an owner has both slots
in maintenance: HAProxy accepts and closes at once. A connect refused by a dead owner is
retried every ``connect_timeout`` on whichever slot is enabled by then (``option
redispatch 1``), so a connection made before HaloD moves the route reaches the new owner.

Sans-I/O core: ``Settings``/``render_config`` (owners → cfg text), ``SlotTable`` (the
slots' state; ``plan`` turns a new route → owner map into runtime commands), ``parse_stat``
and ``Counter``. The Twisted shell, ``HAProxyDataPlane``, runs them: one reconcile pass at
a time (passes coalesce: only the latest table matters), admin-socket commands over a
non-blocking UNIX client, in order, and a periodic ``show stat`` for ``stats()``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import ipaddress
import itertools
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
from collections.abc import Generator, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.internet import defer, task, threads
from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ClientFactory, ProcessProtocol, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from halod.dataplane.base import MOVE_CLOSE_DELAY, Owner, Ports
from orbited.core.settings import FieldError, check_fields

if TYPE_CHECKING:
    from halod.config import HaloDConfig

SIDES = ("browser", "sp")
SLOTS = ("a", "b")
Addr = tuple[str, int]
# An idle slot's address until it is first used; never connected to (it is disabled).
PARKED: Addr = ("127.0.0.1", 9)
# Bump when render_config's output changes shape: a running HAProxy with another layout
# is reloaded with the new cfg.
LAYOUT_VERSION = 2
LAYOUT_ENV = "HALOD_LAYOUT"
# Commands per admin-socket line: HAProxy reads a CLI line into one buffer (16 kB).
LINE_LIMIT = 8000
CLI_TIMEOUT = 10.0
# The longest start() waits for ``haproxy -D`` (it returns once HAProxy listens).
PRIME_TIMEOUT = 10.0


# -- sans-I/O core --------------------------------------------------------------------------


def proxy_name(route: int, side: str) -> str:
    return f"r{route}_{side}"


def proxy_names(routes: int) -> list[str]:
    return [proxy_name(r, side) for r in range(1, routes + 1) for side in SIDES]


def targets_of(owners: dict[int, Owner | None], routes: int) -> dict[str, Addr | None]:
    """proxy name → the address its connections go to (None: the route has no owner)."""
    targets: dict[str, Addr | None] = {}
    for route in range(1, routes + 1):
        owner = owners.get(route)
        targets[proxy_name(route, "browser")] = owner.browser if owner else None
        targets[proxy_name(route, "sp")] = owner.sp if owner else None
    return targets


def format_addr(host: str, port: int) -> str:
    return f"{host}:{port}"  # HAProxy takes the last colon as the port's: IPv6 works bare


# HAProxy's most threads: `haproxy -vv` of Debian 12's 2.6.12 says "Built with
# multi-threading support (MAX_THREADS=64, default=2)", and `nbthread 65` fails with
# "'nbthread' value must be between 1 and 64".
MAX_THREADS = 64


@dataclass(frozen=True)
class Settings:
    """What shapes haproxy.cfg apart from the owners (its "layout")."""

    ports: Ports
    directory: Path
    maxconn: int = 8000
    nbthread: int = 0  # 0: HAProxy's default (one per CPU)
    timeout: float = 3600.0
    # A connect to a node that fails is retried `retries` times, `connect_timeout` apart
    # (HAProxy waits min(1 s, timeout connect) after a refusal), each time on the slot
    # that is enabled then (option redispatch 1): a connection arriving while its route
    # still names a dead node is held until HaloD moves the route, then reaches the new
    # owner; it is closed only after about retries × connect_timeout.
    connect_timeout: float = 0.1
    retries: int = 20

    def __post_init__(self) -> None:
        check_fields(self, positive=("maxconn", "timeout", "connect_timeout"),
                     nonnegative=("nbthread", "retries"), key_prefix="haproxy_")  # fmt: skip
        if self.nbthread > MAX_THREADS:  # HAProxy refuses to start, and would be retried
            raise FieldError(type(self), "haproxy_nbthread", f"must be at most {MAX_THREADS}")

    @property
    def config_file(self) -> Path:
        return self.directory / "haproxy.cfg"

    @property
    def admin_socket(self) -> Path:
        return self.directory / "admin.sock"

    @property
    def master_socket(self) -> Path:
        return self.directory / "master.sock"

    @property
    def pid_file(self) -> Path:
        return self.directory / "haproxy.pid"

    def layout(self) -> str:
        """A hash of everything but the owners; HaloD compares it with the running
        HAProxy's (``show env HALOD_LAYOUT``) to know whether a reload is needed."""
        text = repr((LAYOUT_VERSION, sorted(asdict(self).items(), key=str)))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def command(self, binary: str) -> list[str]:
        """Master-worker (-W) daemon (-D): the launcher exits 0 once HAProxy listens, or
        non-zero with the reason on stderr; the master sits in its own session, so HaloD
        can die or restart without taking the route ports down. The master CLI socket
        is mode 600, like the admin socket: it can reload and stop HAProxy."""
        return [binary, "-W", "-D", "-S", f"{self.master_socket},mode,600",
                "-f", str(self.config_file), "-p", str(self.pid_file)]  # fmt: skip


@dataclass
class Slot:
    addr: Addr = PARKED
    enabled: bool = False
    cut_token: int = 0  # non-zero: this slot's sessions are due to be cut (Cut.token)


@dataclass(frozen=True)
class Cut:
    """``shutdown sessions server proxy/slot``, once the move's delay has passed."""

    proxy: str
    slot: str
    token: int


@dataclass
class Plan:
    commands: list[str] = field(default_factory=list)
    cuts: list[Cut] = field(default_factory=list)  # to run after move_close_delay
    cut_now: list[tuple[str, str]] = field(default_factory=list)  # cut early (slot reused)


class SlotTable:
    """The two slots of every route proxy, as HAProxy has them (once the commands of the
    last ``plan`` have been sent)."""

    def __init__(self, names: Iterable[str]) -> None:
        self.slots: dict[str, dict[str, Slot]] = {n: {s: Slot() for s in SLOTS} for n in names}
        self._tokens = itertools.count(1)

    @classmethod
    def of(cls, targets: dict[str, Addr | None]) -> SlotTable:
        """A table already holding ``targets`` (what a freshly written cfg starts with)."""
        table = cls(targets)
        table.plan(targets)
        return table

    def targets(self) -> dict[str, Addr | None]:
        return {name: next((s.addr for s in slots.values() if s.enabled), None)
                for name, slots in self.slots.items()}  # fmt: skip

    def plan(self, targets: dict[str, Addr | None]) -> Plan:
        """Update the table to ``targets``; return the runtime commands that do the same
        to HAProxy and the cuts to schedule."""
        plan = Plan()
        for name, target in targets.items():
            self._plan_one(name, self.slots[name], target, plan)
        return plan

    def _plan_one(self, name: str, slots: dict[str, Slot], target: Addr | None,
                  plan: Plan) -> None:  # fmt: skip
        enabled = [s for s in SLOTS if slots[s].enabled]
        keep = None
        if target is not None:
            keep = next((s for s in enabled if slots[s].addr == target), None)
            if keep is None:
                keep = self._take_idle(name, slots, plan)
                slot = slots[keep]
                if slot.addr != target:
                    plan.commands.append(
                        f"set server {name}/{keep} addr {target[0]} port {target[1]}"
                    )
                    slot.addr = target
                # Enable the new slot before disabling the old: a connection arriving in
                # between reaches the old owner and is cut with the others, rather than
                # finding no server at all.
                plan.commands.append(f"enable server {name}/{keep}")
                slot.enabled = True
        for s in SLOTS:
            if s != keep and slots[s].enabled:
                plan.commands.append(f"disable server {name}/{s}")
                slots[s].enabled = False
                slots[s].cut_token = next(self._tokens)
                plan.cuts.append(Cut(name, s, slots[s].cut_token))

    def _take_idle(self, name: str, slots: dict[str, Slot], plan: Plan) -> str:
        idle = [s for s in SLOTS if not slots[s].enabled]
        for s in idle:  # a slot with no cut pending: the other's sessions wait their delay
            if not slots[s].cut_token:
                return s
        # A second move within move_close_delay: reuse a slot whose cut is pending, which
        # must be cut now, before it carries the new owner's connections. (Only a state
        # HaloD did not make has both slots enabled; then "b" is taken over.)
        s = idle[0] if idle else SLOTS[-1]
        if slots[s].enabled:
            plan.commands.append(f"disable server {name}/{s}")
            slots[s].enabled = False
        plan.commands.append(f"shutdown sessions server {name}/{s}")
        plan.cut_now.append((name, s))
        slots[s].cut_token = 0
        return s

    def due(self, cut: Cut) -> list[str]:
        """The command for a cut whose delay has passed (none if it was superseded)."""
        slot = self.slots.get(cut.proxy, {}).get(cut.slot)
        if slot is None or slot.cut_token != cut.token:
            return []
        slot.cut_token = 0
        return [f"shutdown sessions server {cut.proxy}/{cut.slot}"]

    def pending(self) -> list[Cut]:
        return [Cut(name, s, slot.cut_token) for name, slots in self.slots.items()
                for s, slot in slots.items() if slot.cut_token]  # fmt: skip

    @classmethod
    def from_stat(cls, names: Iterable[str], rows: dict[tuple[str, str], StatRow],
                  ) -> tuple[SlotTable, list[str]]:  # fmt: skip
        """The table a running HAProxy has (``show stat``), and the slots it lacks. A
        disabled slot with sessions is a cut an earlier HaloD did not get to: due again."""
        table = cls(names)
        missing = []
        for name, slots in table.slots.items():
            for s, slot in slots.items():
                row = rows.get((name, s))
                if row is None:
                    missing.append(f"{name}/{s}")
                    continue
                slot.addr = row.addr or PARKED
                slot.enabled = not row.status.startswith("MAINT")
                if not slot.enabled and row.scur > 0:
                    slot.cut_token = next(table._tokens)
        return table, missing


def render_config(settings: Settings, table: SlotTable) -> str:
    """haproxy.cfg for ``table``'s current state: what a reload or restart comes back with."""
    s = settings
    t = f"{s.timeout:g}s"
    lines = [
        "# Written by HaloD (halod/dataplane/haproxy.py) on every route change; edits are",
        "# overwritten. Route changes are applied through admin.sock at runtime.",
        "global",
        "    master-worker",
        # Without SO_REUSEPORT a second HAProxy on the same ports fails to start instead
        # of silently sharing connections with the first; reloads hand the listening
        # sockets over (expose-fd listeners), so they stay seamless.
        "    noreuseport",
        f"    maxconn {s.maxconn}",
        *([f"    nbthread {s.nbthread}"] if s.nbthread else []),
        f"    stats socket {s.admin_socket} mode 600 level admin expose-fd listeners",
        f"    setenv {LAYOUT_ENV} {s.layout()}",
        "",
        "defaults",
        "    mode tcp",
        f"    maxconn {s.maxconn}",
        "    option tcpka",
        f"    timeout connect {max(1, round(s.connect_timeout * 1000))}ms",
        f"    retries {s.retries}",
        # Every retry picks the enabled slot again: after a move, the new owner's.
        "    option redispatch 1",
        # Comet streams are idle between events for long stretches.
        f"    timeout client {t}",
        f"    timeout server {t}",
        f"    timeout tunnel {t}",
        "    timeout client-fin 30s",
        "    timeout server-fin 30s",
    ]
    port_of = {"browser": s.ports.browser, "sp": s.ports.sp}
    for route in range(1, s.ports.routes + 1):
        for side in SIDES:
            name = proxy_name(route, side)
            bind = format_addr(s.ports.host, port_of[side](route))
            lines += ["", f"listen {name}", f"    bind {bind}"]
            for slot_name, slot in table.slots[name].items():
                state = "" if slot.enabled else " disabled"
                lines.append(f"    server {slot_name} {format_addr(*slot.addr)}{state}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class StatRow:
    scur: int
    stot: int
    status: str
    addr: Addr | None


def parse_stat(text: str) -> dict[tuple[str, str], StatRow]:
    """``show stat`` CSV → (proxy, FRONTEND|BACKEND|slot) → the fields HaloD uses."""
    lines = text.splitlines()
    if not lines or not lines[0].startswith("# "):
        raise ValueError(f"not show stat output: {text[:200]!r}")
    rows: dict[tuple[str, str], StatRow] = {}
    for rec in csv.DictReader(io.StringIO("\n".join([lines[0][2:], *lines[1:]]))):
        if not rec.get("pxname"):
            continue
        addr = None
        if rec.get("addr"):
            host, _, port = rec["addr"].rpartition(":")
            if port.isdigit():
                addr = (host.strip("[]"), int(port))
        rows[(rec["pxname"], rec["svname"])] = StatRow(
            int(rec["scur"] or 0), int(rec["stot"] or 0), rec["status"] or "", addr
        )
    return rows


def route_counts(rows: dict[tuple[str, str], StatRow], routes: int) -> dict[str, dict[str, int]]:
    """route → side → open client connections on that route port."""
    return {
        str(route): {side: rows[k].scur if (k := (proxy_name(route, side), "FRONTEND")) in rows
                     else 0 for side in SIDES}
        for route in range(1, routes + 1)
    }  # fmt: skip


def refused_counts(rows: dict[tuple[str, str], StatRow], names: Iterable[str]) -> dict[str, int]:
    """proxy → sessions that found no enabled slot (HAProxy accepted and closed them):
    the backend's sessions minus those its slots took."""
    counts = {}
    for name in names:
        backend = rows.get((name, "BACKEND"))
        if backend is not None:
            taken = sum(rows[(name, s)].stot for s in SLOTS if (name, s) in rows)
            counts[name] = max(0, backend.stot - taken)
    return counts


class Counter:
    """A monotonic total over samples of counters that reset (HAProxy restart/reload)."""

    def __init__(self) -> None:
        self.total = 0
        self.last: dict[str, int] = {}

    def baseline(self, sample: dict[str, int] | None) -> None:
        """Count from ``sample`` on (None: from zero, for a HAProxy HaloD just started)."""
        self.last = dict(sample) if sample is not None else {}

    def update(self, sample: dict[str, int]) -> None:
        for key, value in sample.items():
            previous = self.last.get(key, 0)
            self.total += value - previous if value >= previous else value
            self.last[key] = value


def batches(commands: list[str], limit: int = LINE_LIMIT) -> list[str]:
    """Commands joined with ``;`` into admin-socket lines of at most ``limit`` bytes."""
    lines: list[str] = []
    current: list[str] = []
    size = 0
    for command in commands:
        if current and size + len(command) + 2 > limit:
            lines.append("; ".join(current))
            current, size = [], 0
        current.append(command)
        size += len(command) + 2
    if current:
        lines.append("; ".join(current))
    return lines


# Replies of successful commands: `set server addr` reports the change; the rest are empty.
_OK_PREFIXES = ("IP changed from", "no need to change", "port changed from")


def reply_errors(reply: str) -> list[str]:
    """The replies of a ``;``-joined line (each ends with an empty line) that are errors."""
    errors, block = [], []
    for line in reply.splitlines():
        if line.strip():
            block.append(line.strip())
        elif block:
            if not block[0].startswith(_OK_PREFIXES):
                errors.append(" ".join(block))
            block = []
    if block and not block[0].startswith(_OK_PREFIXES):
        errors.append(" ".join(block))
    return errors


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not: an orphaned HAProxy master whose parent
    does not reap it stays in /proc as one)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def find_binary(name: str) -> str | None:
    """``name`` if a path, else looked up in PATH and the sbin directories Debian uses."""
    if os.sep in name:
        return name if os.access(name, os.X_OK) else None
    path = os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin"
    return shutil.which(name, path=path)


# -- Twisted shell --------------------------------------------------------------------------


class CLIError(Exception):
    """The admin or master socket is unreachable, timed out, or refused a command."""


class _CLI(Protocol):
    """One admin-socket exchange: send a line, half-close (the master socket waits for
    it), read the reply until HAProxy closes."""

    transport: FileDescriptor  # a UNIX socket's: it can half-close

    def __init__(self, line: str, done: defer.Deferred[str]) -> None:
        self.line = line
        self.done = done
        self.chunks: list[bytes] = []

    def connectionMade(self) -> None:  # noqa: N802
        self.transport.write(self.line.encode() + b"\n")
        self.transport.loseWriteConnection()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.chunks.append(data)

    def connectionLost(self, reason: Failure | None = None) -> None:  # noqa: N802
        if not self.done.called:
            self.done.callback(b"".join(self.chunks).decode("utf-8", "replace"))


class _CLIFactory(ClientFactory):
    noisy = False  # one connection per command: no "Starting factory" log lines

    def __init__(self, line: str, path: str) -> None:
        self.line = line
        self.path = path
        self.done: defer.Deferred[str] = defer.Deferred()

    def buildProtocol(self, addr: object) -> _CLI:  # noqa: N802
        return _CLI(self.line, self.done)

    def clientConnectionFailed(self, connector: object, reason: Failure) -> None:  # noqa: N802
        if not self.done.called:
            self.done.errback(CLIError(f"cannot reach {self.path}: {reason.getErrorMessage()}"))


class _Launcher(ProcessProtocol):
    """``haproxy -D``: its exit code and output (stderr says why it failed)."""

    def __init__(self) -> None:
        self.output: list[bytes] = []
        self.done: defer.Deferred[tuple[int, str]] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:  # noqa: N802
        self.output.append(data)

    def errReceived(self, data: bytes) -> None:  # noqa: N802
        self.output.append(data)

    def processEnded(self, reason: Failure) -> None:  # noqa: N802
        code = getattr(reason.value, "exitCode", None)
        text = b"".join(self.output).decode("utf-8", "replace")
        self.done.callback((code if code is not None else -1, text))


class HAProxyDataPlane:
    """The route ports served by HAProxy; see the module docstring."""

    log = Logger()
    STATS_INTERVAL = 2.0  # seconds between `show stat` polls (haproxy_stats_interval)

    def __init__(
        self, settings: Settings, reactor: Any, close_delay: float = MOVE_CLOSE_DELAY, *,
        binary: str = "haproxy", manage: bool = True, stop_on_exit: bool = False,
        stats_interval: float = STATS_INTERVAL,
    ) -> None:  # fmt: skip
        self.settings = settings
        self.ports = settings.ports
        self.reactor = reactor
        self.close_delay = close_delay
        self.binary = binary
        self.manage = manage
        self.stop_on_exit = stop_on_exit
        self.stats_interval = stats_interval
        self.names = proxy_names(self.ports.routes)
        self.owners: dict[int, Owner | None] = {}
        self.table: SlotTable | None = None  # HAProxy's slots as last known; None: read them
        self.lock = defer.DeferredLock()  # one admin-socket writer at a time, in order
        self.state = "stopped"  # starting | running | failed | stopped
        self.error: str | None = None
        self.pid: int | None = None
        self.cut = 0
        self.refused = Counter()
        self.counts = route_counts({}, self.ports.routes)
        self._scur: dict[tuple[str, str], int] = {}
        self._timers: set[IDelayedCall] = set()
        self._retry: IDelayedCall | None = None
        self._backoff = 1.0
        self._running = False
        self._again = False
        self._resync = False
        self._polling = False
        self._stopping = False
        self._poller: task.LoopingCall | None = None
        self._primed = False  # start() started the HAProxy the first pass will find

    @classmethod
    def from_config(cls, config: HaloDConfig, reactor: Any) -> HAProxyDataPlane:
        return cls(
            config.haproxy_settings(), reactor, config.move_close_delay, binary=config.haproxy_bin,
            manage=config.haproxy_manage, stop_on_exit=config.haproxy_on_exit == "stop",
            stats_interval=config.haproxy_stats_interval,
        )  # fmt: skip

    # -- DataPlane ---------------------------------------------------------------------------

    def start(self, owners: dict[int, Owner | None]) -> None:
        self.owners = dict(owners)
        self.state = "starting"
        # HAProxy needs about two fds per connection plus one per listener; it inherits
        # HaloD's hard limit and cannot raise it.
        needed = 2 * self.settings.maxconn + 2 * self.ports.routes + 100
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if self.manage and hard != resource.RLIM_INFINITY and needed > hard:
            self.log.warn(
                "haproxy_maxconn {maxconn} needs about {needed} fds but the hard limit is "
                "{hard}: lower haproxy_maxconn or raise LimitNOFILE",
                maxconn=self.settings.maxconn, needed=needed, hard=hard,
            )  # fmt: skip
        self.settings.directory.mkdir(parents=True, exist_ok=True)
        self._poller = task.LoopingCall(self._poll)
        self._poller.clock = self.reactor
        self._poller.start(self.stats_interval, now=False)
        if self._prime():
            self._kick()
        else:
            self._schedule_retry()

    def apply(self, owners: dict[int, Owner | None]) -> None:
        self.owners = dict(owners)
        self._kick()

    def stop(self) -> defer.Deferred[Any]:
        self._stopping = True
        if self._poller is not None and self._poller.running:
            self._poller.stop()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        for call in self._timers:
            if call.active():
                call.cancel()
        self._timers.clear()
        if self.manage and self.stop_on_exit:
            return self._terminate()
        # HAProxy keeps serving; cuts still pending are done now rather than left to a
        # HaloD that may not come back (one that does re-derives them anyway).
        pending = self.table.pending() if self.table is not None else []
        d = self._cut_due(pending) if pending else defer.succeed(None)
        d.addBoth(lambda _: setattr(self, "state", "stopped"))
        return d

    def stats(self) -> dict[str, Any]:
        return {
            "backend": "haproxy",
            "host": self.ports.host,
            "browser_base": self.ports.browser_base,
            "sp_base": self.ports.sp_base,
            "routes": self.counts,
            "connections": sum(sum(v.values()) for v in self.counts.values()),
            "refused": self.refused.total,
            "cut": self.cut,
            "haproxy": {
                "state": self.state,
                # HAProxy has the latest table (no reconcile pass running or pending).
                "synced": self.state == "running" and self.table is not None and not self._running,
                "pid": self.pid,
                "error": self.error,
                "config": str(self.settings.config_file),
            },
        }

    def _prime(self) -> bool:
        """Once, before HaloD says it is ready (``--ready-file``): when HaloD manages
        HAProxy and none answers on the admin socket, start it now, blocking (``haproxy
        -D`` returns once HAProxy listens, in tens of ms), so that the route ports accept
        from the moment HaloD is ready, as with the built-in proxy. A start that fails
        returns False at once: HaloD starts anyway, and the asynchronous path retries
        (1 s, doubling). A HAProxy to attach to, or haproxy_manage off, is left to that
        path; HaloD is then ready before it has attached."""
        s = self.settings
        if not self.manage or _answers(s.admin_socket):
            return True
        binary = find_binary(self.binary)
        if binary is None:
            return True  # the asynchronous path reports it
        targets = targets_of(self.owners, self.ports.routes)
        names = _names(targets)
        if names:  # unresolvable: unowned until a pass resolves it
            _with_ips(targets, _resolve_names(names), {})
        self._write_config(SlotTable.of(targets))
        try:
            done = subprocess.run(
                s.command(binary), cwd=s.directory, env=dict(os.environ),
                stdin=subprocess.DEVNULL, capture_output=True, timeout=PRIME_TIMEOUT,
            )  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as e:
            return self._fail(f"cannot run {binary}: {e}")
        if done.returncode != 0:
            output = (done.stdout + done.stderr).decode("utf-8", "replace").strip()
            return self._fail(f"HAProxy failed to start (exit {done.returncode}): "
                              f"{output[-2000:]}")  # fmt: skip
        self._primed = True
        return True

    # -- reconciling HAProxy with the table ---------------------------------------------------

    def _kick(self) -> None:
        """Run reconcile passes until HAProxy has the latest table (one at a time)."""
        if self._stopping:
            return
        if self._running:
            self._again = True
            return
        self._running = True
        d = self._passes()
        d.addErrback(self._unexpected)

    def _unexpected(self, failure: Failure) -> None:
        self.log.failure("HAProxy data plane: unexpected error; retrying", failure)
        self._running = False
        self._schedule_retry()

    @defer.inlineCallbacks
    def _passes(self) -> Generator[defer.Deferred[Any], Any, None]:
        try:
            while True:
                self._again = False
                ok = yield self._reconcile()
                if not ok:
                    self._schedule_retry()
                    return
                self._backoff = 1.0
                if not self._again or self._stopping:
                    return
        finally:
            self._running = False

    def _schedule_retry(self) -> None:
        if self._stopping or (self._retry is not None and self._retry.active()):
            return
        self._retry = self.reactor.callLater(self._backoff, self._kick)
        self._backoff = min(self._backoff * 2, 10.0)

    def _fail(self, message: str) -> bool:
        # Logged once per distinct problem, not on every retry (HAProxy's messages carry
        # its pid: ignored in the comparison).
        if re.sub(r"\(\d+\)", "", message) != re.sub(r"\(\d+\)", "", self.error or ""):
            self.log.error("HAProxy data plane: {message}", message=message)
        self.error = message
        self.state = "failed"
        return False

    @defer.inlineCallbacks
    def _reconcile(self) -> Generator[defer.Deferred[Any], Any, bool]:
        yield self.lock.acquire()
        try:
            if self._resync:
                self._resync, self.table = False, None
            if self.table is None:
                ok = yield self._connect()
                if not ok:
                    return False
            assert self.table is not None
            targets = yield self._resolve(self.owners)
            plan = self.table.plan(targets)
            if not plan.commands:
                return True
            self._write_config(self.table)  # before the commands: a restart gets the new table
            self.cut += sum(self._scur.get(key, 0) for key in plan.cut_now)
            began = self.reactor.seconds()
            try:
                yield self._send(plan.commands)
            except CLIError as e:
                self.table = None  # unknown which commands took effect: read HAProxy again
                return self._fail(f"applying a route change failed: {e}")
            self.log.debug(
                "HAProxy: {n} runtime commands in {ms:.1f} ms", n=len(plan.commands),
                ms=(self.reactor.seconds() - began) * 1000,
            )  # fmt: skip
            self._schedule_cuts(plan.cuts)
            self.error = None
            return True
        finally:
            self.lock.release()

    @defer.inlineCallbacks
    def _connect(self) -> Generator[defer.Deferred[Any], Any, bool]:
        """Attach to the HAProxy answering on our admin socket, reloading it if its layout
        is not ours, or start one; then read its slots into ``self.table``."""
        s = self.settings
        fresh, self._primed = self._primed, False
        layout = yield self._running_layout()
        if layout is None:
            if not self.manage:
                self._write_config(SlotTable.of((yield self._resolve(self.owners))))
                return self._fail(
                    f"no HAProxy answers on {s.admin_socket} (haproxy_manage is off: start "
                    f"it with {' '.join(s.command('haproxy'))})"
                )
            ok = yield self._spawn()
            if not ok:
                return False
            fresh = True
        elif layout != s.layout():
            # Routes, ports or tuning changed since this HAProxy was configured. Reloading
            # keeps established connections on the old worker (cuts pending there are lost).
            self._write_config(SlotTable.of((yield self._resolve(self.owners))))
            try:
                yield self._cli("reload", s.master_socket)
            except CLIError as e:
                return self._fail(f"HAProxy runs another layout and reloading it failed: {e}")
            for _ in range(100):
                if (yield self._running_layout()) == s.layout():
                    break
                yield task.deferLater(self.reactor, 0.1, lambda: None)
            else:
                return self._fail(f"HAProxy did not reload {s.config_file}")
            self.log.info("HAProxy reloaded with a new layout from {cfg}", cfg=s.config_file)
        try:
            rows = parse_stat((yield self._cli("show stat")))
        except (CLIError, ValueError) as e:
            return self._fail(f"reading HAProxy's state failed: {e}")
        table, missing = SlotTable.from_stat(self.names, rows)
        if missing:
            return self._fail(f"the HAProxy on {s.admin_socket} lacks {missing[:3]}...")
        self.table = table
        self._schedule_cuts(table.pending())  # an earlier HaloD's cuts, due again
        self._write_config(table)
        self.refused.baseline(None if fresh else refused_counts(rows, self.names))
        self._update_counts(rows)
        self.pid = self._read_pid()
        self.state, self.error = "running", None
        self.log.info(
            "HAProxy data plane {how} (pid {pid}, {cfg})",
            how="started" if fresh else "attached to a running HAProxy", pid=self.pid,
            cfg=s.config_file,
        )  # fmt: skip
        return True

    @defer.inlineCallbacks
    def _running_layout(self) -> Generator[defer.Deferred[Any], Any, str | None]:
        """The layout hash of the HAProxy on our admin socket ("" if it has none: not one
        HaloD configured), or None if nothing answers."""
        try:
            reply = yield self._cli(f"show env {LAYOUT_ENV}")
        except CLIError:
            return None
        key, _, value = reply.strip().partition("=")
        return value if key == LAYOUT_ENV else ""

    @defer.inlineCallbacks
    def _spawn(self) -> Generator[defer.Deferred[Any], Any, bool]:
        binary = find_binary(self.binary)
        if binary is None:
            return self._fail(f"HAProxy binary {self.binary!r} not found (install haproxy "
                              "or set haproxy_bin)")  # fmt: skip
        targets = yield self._resolve(self.owners)
        self._write_config(SlotTable.of(targets))
        launcher = _Launcher()
        try:
            self.reactor.spawnProcess(
                launcher, binary, self.settings.command(binary), env=dict(os.environ),
                path=str(self.settings.directory),
            )  # fmt: skip
        except OSError as e:
            return self._fail(f"cannot run {binary}: {e}")
        code, output = yield launcher.done
        if code != 0:
            return self._fail(f"HAProxy failed to start (exit {code}): {output.strip()[-2000:]}")
        # The launcher exits once the master has daemonized; the worker's admin socket
        # follows within milliseconds.
        for _ in range(100):
            if (yield self._running_layout()) is not None:
                return True
            yield task.deferLater(self.reactor, 0.05, lambda: None)
        return self._fail(f"HAProxy started but {self.settings.admin_socket} never answered")

    @defer.inlineCallbacks
    def _resolve(self, owners: dict[int, Owner | None],
                 ) -> Generator[defer.Deferred[Any], Any, dict[str, Addr | None]]:  # fmt: skip
        """Targets with IP addresses (runtime ``set server addr`` takes no names). Names
        are resolved in a thread; one that fails keeps its routes where they are."""
        targets = targets_of(owners, self.ports.routes)
        names = _names(targets)
        if not names:
            return targets
        resolved = yield threads.deferToThread(_resolve_names, names)
        current = self.table.targets() if self.table is not None else {}
        for host, proxy in _with_ips(targets, resolved, current):
            self.log.warn("cannot resolve {host}: {proxy} unchanged", host=host, proxy=proxy)
        return targets

    def _write_config(self, table: SlotTable) -> None:
        path = self.settings.config_file
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(render_config(self.settings, table))
            tmp.replace(path)
        except OSError as e:
            self.log.error("cannot write {path}: {e}", path=path, e=e)

    @defer.inlineCallbacks
    def _send(self, commands: list[str]) -> Generator[defer.Deferred[Any], Any, None]:
        for line in batches(commands):
            reply = yield self._cli(line)
            errors = reply_errors(reply)
            if errors:
                raise CLIError(f"HAProxy refused: {'; '.join(errors[:3])}")

    def _cli(self, line: str, path: Path | None = None) -> defer.Deferred[str]:
        """Send one admin-socket line; its reply (CLIError if unreachable or silent)."""
        path = path or self.settings.admin_socket
        factory = _CLIFactory(line, str(path))
        connector = self.reactor.connectUNIX(str(path), factory, timeout=CLI_TIMEOUT)
        timed_out: list[bool] = []

        def give_up() -> None:
            timed_out.append(True)
            connector.disconnect()

        timer = self.reactor.callLater(CLI_TIMEOUT, give_up)

        def finished(reply: str) -> str:
            if timer.active():
                timer.cancel()
            if timed_out:
                raise CLIError(f"{path}: no reply in {CLI_TIMEOUT:g}s")
            return reply

        def failed(failure: Failure) -> Failure:
            if timer.active():
                timer.cancel()
            return failure

        return factory.done.addCallbacks(finished, failed)

    # -- cuts ------------------------------------------------------------------------------

    def _schedule_cuts(self, cuts: list[Cut]) -> None:
        if cuts and not self._stopping:
            call = self.reactor.callLater(self.close_delay, self._cut_later, cuts)
            self._timers.add(call)

    def _cut_later(self, cuts: list[Cut]) -> None:
        self._timers = {c for c in self._timers if c.active()}
        self._cut_due(cuts).addErrback(self._log_failure, "cutting moved connections")

    @defer.inlineCallbacks
    def _cut_due(self, cuts: list[Cut]) -> Generator[defer.Deferred[Any], Any, None]:
        yield self.lock.acquire()
        try:
            if self.table is None:
                return  # HAProxy is being read again: disabled slots with sessions are re-cut
            commands = [c for cut in cuts for c in self.table.due(cut)]
            if not commands:
                return
            try:  # how many are cut, for stats(): the slots' sessions right now
                rows = parse_stat((yield self._cli("show stat -1 4 -1")))
                self._scur.update({k: r.scur for k, r in rows.items()})
            except (CLIError, ValueError):
                pass  # count with the last poll's figures
            self.cut += sum(self._scur.get((cut.proxy, cut.slot), 0) for cut in cuts)
            try:
                yield self._send(commands)
            except CLIError as e:
                self._fail(f"cutting moved connections failed: {e}")
                self._resync = True  # the next pass reads HAProxy and re-derives the cuts
                self._kick()
        finally:
            self.lock.release()

    # -- stats and liveness ------------------------------------------------------------------

    def _log_failure(self, failure: Failure, what: str) -> None:
        self.log.failure("HAProxy data plane: {what} failed", failure, what=what)

    def _poll(self) -> None:
        # Errors are logged here: one escaping would stop the LoopingCall for good.
        self._poll_once().addErrback(self._log_failure, "polling show stat")

    @defer.inlineCallbacks
    def _poll_once(self) -> Generator[defer.Deferred[Any], Any, None]:
        if self._polling or self._stopping or self.table is None:
            return
        self._polling = True
        try:
            rows = parse_stat((yield self._cli("show stat")))
        except (CLIError, ValueError) as e:
            # HAProxy died, or hangs: read it again (restarting it if it is gone).
            pid = self._read_pid()
            dead = pid is None or not process_alive(pid)
            self._fail(f"HAProxy {'is gone' if dead else 'does not answer'} ({e}); "
                       + ("restarting it" if dead and self.manage else "retrying"))  # fmt: skip
            self._resync = True
            self._kick()
            return
        finally:
            self._polling = False
        self._update_counts(rows)
        self.refused.update(refused_counts(rows, self.names))

    def _update_counts(self, rows: dict[tuple[str, str], StatRow]) -> None:
        self.counts = route_counts(rows, self.ports.routes)
        self._scur = {k: r.scur for k, r in rows.items() if k[1] in SLOTS}

    def _read_pid(self) -> int | None:
        try:
            return int(self.settings.pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    @defer.inlineCallbacks
    def _terminate(self) -> Generator[defer.Deferred[Any], Any, None]:
        """Stop the HAProxy this HaloD manages (haproxy_on_exit = stop): all of its
        connections close."""
        pid = self._read_pid()
        if pid is not None and process_alive(pid):
            self.log.info("stopping HAProxy (pid {pid})", pid=pid)
            os.kill(pid, signal.SIGTERM)  # the master stops its workers
            for _ in range(100):
                if not process_alive(pid):
                    break
                yield task.deferLater(self.reactor, 0.05, lambda: None)
            else:
                os.kill(pid, signal.SIGKILL)
        self.state = "stopped"


def _answers(path: Path) -> bool:
    """Whether something accepts connections on the UNIX socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1)
        try:
            sock.connect(str(path))
        except OSError:
            return False
        return True


def _names(targets: Mapping[str, Addr | None]) -> set[str]:
    """The host names (not IP addresses) among ``targets``."""
    return {a[0] for a in targets.values() if a is not None and not is_ip(a[0])}


def _with_ips(targets: dict[str, Addr | None], resolved: Mapping[str, str | None],
              current: Mapping[str, Addr | None]) -> list[tuple[str, str]]:  # fmt: skip
    """Put the IP address ``resolved`` gave each name into ``targets``; a name that did
    not resolve leaves its proxy at ``current``'s target (none: unowned). Returns those
    (host, proxy)."""
    failed = []
    for proxy, addr in targets.items():
        if addr is not None and addr[0] in resolved:
            ip = resolved[addr[0]]
            if ip is None:
                failed.append((addr[0], proxy))
                targets[proxy] = current.get(proxy)
            else:
                targets[proxy] = (ip, addr[1])
    return failed


def _resolve_names(names: set[str]) -> dict[str, str | None]:
    resolved: dict[str, str | None] = {}
    for name in names:
        try:
            resolved[name] = str(socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)[0][4][0])
        except OSError:
            resolved[name] = None
    return resolved
