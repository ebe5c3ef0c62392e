"""``orbited node --workers N``: one node process per core, each its own HaloD member.

The parent (:class:`Supervisor`) starts N worker processes, each an ordinary ``orbited
node`` with the same configuration except for its name and ports (docs/operations.md,
"Workers"): worker ``i`` (0-based) is named ``<name>-<i>`` and listens on each configured
port + ``i`` (``http``, ``sp``, ``publish_http``, ``orbit_legacy``; the ``advertise_*``
addresses likewise; a port 0 stays 0, a free port per worker). It forwards SIGTERM and
SIGINT to every worker (each drains and leaves HaloD as a node does), restarts a worker
that dies with a growing delay, gives up (stopping the others, exit 1) when a worker
keeps dying, and writes the ready file once every worker is ready. Each worker asks
Linux to SIGTERM it when the parent dies, even by SIGKILL (PR_SET_PDEATHSIG).

The decisions are pure and tested without processes: :func:`plan_workers` (names and
ports, refusing collisions) and :class:`RestartPolicy` / :class:`WorkerHistory` (when to
restart, when to give up). The shell around them is a plain loop over ``subprocess``
children: the parent serves no network traffic, so it needs no reactor.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO

from orbited.core.control import NAME
from orbited.core.settings import LOG_LEVELS, ConfigError, parse_host_port
from orbited.node.config import NodeConfig

WORKER_ENV = "ORBITED_WORKER_PARENT"  # the parent's pid, set in each worker's environment
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
CONFIG_ERROR = 2  # a node's exit status for a configuration it refuses

# -- names and ports (pure) -----------------------------------------------------------------


@dataclass(frozen=True)
class WorkerPlan:
    """One worker's name and the addresses that differ from the configured ones."""

    index: int
    name: str
    http: str
    sp: str
    publish_http: str = ""
    orbit_legacy: str = ""
    advertise_http: str = ""
    advertise_sp: str = ""

    def flags(self) -> list[str]:
        """The command-line flags that give a worker this plan (they win over the file)."""
        out = ["--workers", "1", "--name", self.name, "--http", self.http, "--sp", self.sp]
        for key in ("publish_http", "orbit_legacy", "advertise_http", "advertise_sp"):
            value = getattr(self, key)
            if value:
                out += ["--" + key.replace("_", "-"), value]
        return out


def worker_count(workers: int, cpus: int | None) -> int:
    """``workers`` as configured; 0 = one per CPU core (``os.cpu_count()``, at least 1)."""
    return workers if workers > 0 else max(1, cpus or 1)


def _shift(address: str, i: int, key: str) -> str:
    """``address`` (host:port or tcp://host:port) with its port + ``i``; port 0 stays 0."""
    if not address:
        return ""
    scheme = "tcp://" if address.startswith("tcp://") else ""
    host, port = parse_host_port(address.removeprefix(scheme))
    if port == 0:
        return address
    if port + i > 65535:
        raise ConfigError(f"workers: {key} port {port} + {i} is past 65535")
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}{shown}:{port + i}"


LISTENERS = ("http", "sp", "publish_http", "orbit_legacy")  # what each worker binds


def host_addresses(host: str) -> frozenset[str]:
    """The addresses a listener on ``host`` binds, to compare two hosts however they
    are written (``localhost`` and ``127.0.0.1``, ``127.0.2051`` and ``127.0.8.3``):
    ``{"*"}`` for a wildcard, the addresses ``host`` resolves to, or ``{host}`` itself
    when it does not resolve (its worker then fails to bind, as a node would)."""
    if host in WILDCARD_HOSTS:
        return frozenset({"*"})
    try:
        return frozenset({str(ipaddress.ip_address(host))})
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return frozenset({host})
    found = frozenset(
        str(ipaddress.ip_address(str(info[4][0]).partition("%")[0])) for info in infos
    )
    return found or frozenset({host})


def plan_workers(config: NodeConfig, count: int) -> list[WorkerPlan]:
    """Each worker's name and ports by the port + i rule. Raises ConfigError when two
    listeners of the workers would share a port (e.g. ``http`` 8000 and ``sp`` 8001 with
    2 workers: worker 1's browser port is worker 0's SP port)."""
    last = f"{config.name}-{count - 1}"
    if not NAME.fullmatch(last):
        raise ConfigError(f"name: the workers' names (up to {last!r}) must be at most 64 "
                          "characters: shorten name")  # fmt: skip
    plans = []
    for i in range(count):
        plans.append(WorkerPlan(
            index=i, name=f"{config.name}-{i}",
            **{key: _shift(getattr(config, key), i, key)
               for key in (*LISTENERS, "advertise_http", "advertise_sp")},
        ))  # fmt: skip
    taken: dict[tuple[frozenset[str], int], str] = {}
    resolved: dict[str, frozenset[str]] = {}  # each host looked up once
    for plan in plans:
        for key in LISTENERS:
            address = getattr(plan, key)
            if not address:
                continue
            host, port = parse_host_port(address.removeprefix("tcp://"))
            if port == 0:
                continue
            if host not in resolved:
                resolved[host] = host_addresses(host)
            here = resolved[host]
            for (other, other_port), owner in taken.items():
                same_host = "*" in here or "*" in other or not here.isdisjoint(other)
                if other_port == port and same_host:
                    raise ConfigError(
                        f"workers: port {port} would be both {owner} and {plan.name}'s "
                        f"{key} (worker i listens on each configured port + i: leave at "
                        f"least {count} ports between {', '.join(LISTENERS)})"
                    )
            taken[(here, port)] = f"{plan.name}'s {key}"
    return plans


# -- restarts (pure) ------------------------------------------------------------------------


@dataclass(frozen=True)
class RestartPolicy:
    """A worker that dies is restarted after ``first_delay`` s, doubling per death in a
    row up to ``max_delay``; a worker that ran ``stable`` s before it died starts the row
    afresh. After ``max_failures`` deaths in a row the parent gives up: it stops every
    worker and exits 1."""

    first_delay: float = 0.5
    max_delay: float = 10.0
    stable: float = 30.0
    max_failures: int = 5

    def __post_init__(self) -> None:
        if not 0 < self.first_delay <= self.max_delay:
            raise ValueError("0 < first_delay <= max_delay")
        if self.stable <= 0 or self.max_failures < 1:
            raise ValueError("stable and max_failures must be positive")


@dataclass(frozen=True)
class WorkerHistory:
    """One worker slot's deaths in a row and when its current process started."""

    started: float
    failures: int = 0


@dataclass(frozen=True)
class Restart:
    at: float  # monotonic time to start the worker again
    history: WorkerHistory


@dataclass(frozen=True)
class GiveUp:
    failures: int  # the restarts that died too (the deaths in a row are one more)


def on_exit(policy: RestartPolicy, history: WorkerHistory, now: float) -> Restart | GiveUp:
    """What to do about a worker that exited at ``now`` (the parent is not stopping)."""
    failures = 1 if now - history.started >= policy.stable else history.failures + 1
    if failures > policy.max_failures:
        return GiveUp(failures - 1)
    delay = min(policy.max_delay, policy.first_delay * 2 ** (failures - 1))
    return Restart(now + delay, replace(history, failures=failures))


# -- the worker side ------------------------------------------------------------------------


class PrefixedStream(io.TextIOBase):
    """Writes each line to ``stream`` behind ``prefix`` (a worker's log lines carry its
    name: ``[node-1] 2026-12-06T… [orbited.node…#info] …``)."""

    def __init__(self, stream: TextIO, prefix: str) -> None:
        self.stream, self.prefix, self.at_line_start = stream, prefix, True

    def write(self, text: str) -> int:
        out = []
        for piece in text.splitlines(keepends=True):
            if self.at_line_start:
                out.append(self.prefix)
            out.append(piece)
            self.at_line_start = piece.endswith("\n")
        self.stream.write("".join(out))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def become_worker(name: str) -> None:
    """In a worker: die (SIGTERM: drain) with the parent; prefix stderr with the name."""
    parent = os.environ.pop(WORKER_ENV, "")
    if not parent:
        return
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != int(parent):  # the parent died before prctl took effect
        sys.exit(1)
    sys.stderr = PrefixedStream(sys.stderr, f"[{name}] ")


# -- the parent -----------------------------------------------------------------------------


@dataclass
class Worker:
    plan: WorkerPlan
    ready_file: Path
    history: WorkerHistory
    proc: subprocess.Popen[bytes] | None = None
    restart_at: float | None = None
    ready: dict[str, object] = field(default_factory=dict)
    was_ready = False  # some process of this slot became ready


def _log(text: str, level: str = "info", threshold: str = "info") -> None:
    """One line of the parent's, in the nodes' log format, when ``level`` is at least
    ``threshold`` (the configured ``log_level``)."""
    if LOG_LEVELS.index(level) < LOG_LEVELS.index(threshold):
        return
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    print(f"{stamp} [orbited.node.workers#{level}] {text}", file=sys.stderr, flush=True)


class Supervisor:
    """The parent of ``workers`` node processes (see the module docstring)."""

    def __init__(
        self, config: NodeConfig, argv: list[str], count: int, ready_file: Path | None,
        policy: RestartPolicy | None = None, stop_timeout: float = 30.0,
    ) -> None:  # fmt: skip
        self.plans = plan_workers(config, count)
        self.log_level = config.log_level
        self.argv = argv
        self.ready_file = ready_file
        self.policy = policy or RestartPolicy()
        self.stop_timeout = stop_timeout
        self.stopping: int | None = None
        self.dir = Path(tempfile.mkdtemp(prefix="orbited-workers-"))
        now = time.monotonic()
        self.workers = [Worker(p, self.dir / f"{p.name}.ready.json", WorkerHistory(now))
                        for p in self.plans]  # fmt: skip
        self.ready_written: tuple[int, ...] = ()

    def command(self, plan: WorkerPlan, ready_file: Path) -> list[str]:
        return [sys.executable, "-m", "orbited.cli", "node", *self.argv, *plan.flags(),
                "--ready-file", str(ready_file)]  # fmt: skip

    def spawn(self, worker: Worker) -> None:
        worker.ready_file.unlink(missing_ok=True)
        worker.ready = {}
        worker.restart_at = None
        worker.history = replace(worker.history, started=time.monotonic())
        env = {**os.environ, WORKER_ENV: str(os.getpid())}
        worker.proc = subprocess.Popen(
            self.command(worker.plan, worker.ready_file),
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # a terminal's Ctrl-C reaches only the parent, which forwards
        )
        self._log(f"started {worker.plan.name} (pid {worker.proc.pid})")

    def _log(self, text: str, level: str = "info") -> None:
        _log(text, level, self.log_level)

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.stopping is None:
            self.stopping = signum

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        try:
            for worker in self.workers:
                self.spawn(worker)
            return self._loop()
        finally:
            self._stop_all()  # even on an exception: every worker drains and leaves HaloD
            for worker in self.workers:  # and no orphan keeps running
                if worker.proc is not None and worker.proc.poll() is None:
                    worker.proc.kill()
                    worker.proc.wait()
            shutil.rmtree(self.dir, ignore_errors=True)

    def _loop(self) -> int:
        while self.stopping is None:
            now = time.monotonic()
            for worker in self.workers:
                if worker.proc is not None and (rc := worker.proc.poll()) is not None:
                    worker.proc = None
                    if rc == CONFIG_ERROR and not worker.was_ready:
                        # It refused the configuration (its message is above): every
                        # restart would too. Exit 2 at once, as one node would.
                        self._log(f"{worker.plan.name} exited ({rc}) before it was ready: "
                                  "the configuration is refused; stopping every worker",
                                  "error")  # fmt: skip
                        return CONFIG_ERROR
                    decision = on_exit(self.policy, worker.history, now)
                    if isinstance(decision, GiveUp):
                        self._log(f"{worker.plan.name} exited ({rc}): {decision.failures + 1} "
                                  f"deaths in a row ({decision.failures} restarts): giving up, "
                                  "stopping every worker", "error")  # fmt: skip
                        return 1
                    worker.history, worker.restart_at = decision.history, decision.at
                    self._log(f"{worker.plan.name} exited ({rc}); restarting in "
                              f"{decision.at - now:.1f} s", "warn")  # fmt: skip
                if (
                    worker.proc is None
                    and worker.restart_at is not None
                    and (now >= worker.restart_at)
                ):
                    self.spawn(worker)
                if worker.proc is not None and not worker.ready and worker.ready_file.exists():
                    with contextlib.suppress(OSError, ValueError):
                        worker.ready = json.loads(worker.ready_file.read_text())
                        worker.was_ready = True
            try:
                self._write_ready()
            except OSError as e:
                self._log(f"cannot write the ready file {self.ready_file}: {e.strerror or e}; "
                          "stopping every worker", "error")  # fmt: skip
                return 1
            time.sleep(0.05)
        self._log(f"signal {signal.Signals(self.stopping).name}: stopping every worker")
        return 0

    def _write_ready(self) -> None:
        """The ready file once every worker is ready, again after a restart."""
        if self.ready_file is None or not all(w.ready for w in self.workers):
            return
        pids = tuple(int(w.ready["pid"]) for w in self.workers)  # type: ignore[call-overload]
        if pids == self.ready_written:
            return
        info = {"pid": os.getpid(),
                "workers": [{"name": w.plan.name, **w.ready} for w in self.workers]}  # fmt: skip
        tmp = self.ready_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(info))
        tmp.replace(self.ready_file)
        self.ready_written = pids

    def _stop_all(self) -> None:
        """SIGTERM (or the signal we got) to every worker; SIGKILL after stop_timeout."""
        sig = signal.SIGINT if self.stopping == signal.SIGINT else signal.SIGTERM
        live = [w.proc for w in self.workers if w.proc is not None and w.proc.poll() is None]
        for proc in live:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
        deadline = time.monotonic() + self.stop_timeout
        for proc in live:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._log(
                    f"pid {proc.pid} did not stop in {self.stop_timeout:g} s: SIGKILL", "warn"
                )
                proc.kill()
                proc.wait()
