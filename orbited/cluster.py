"""``orbited cluster``: the whole system on one machine, for trying it and for tests.

Owns starting real child processes — HaloD with its built-in proxy data plane, two
Orbited nodes and a spare on their own loopback addresses (127.0.0.2, .3, .4), and the
cherrychat demo web app — with a generated shared secret in a state directory, waiting
until each is ready, showing a live status line, and stopping every one of them on
Ctrl-C or SIGTERM. The same ``LocalCluster`` class is what
tests/integration/test_cherrychat.py runs.

``--ha`` runs HaloD replicated instead (docs/halod.md, "High availability"): a local
3-member etcd cluster (halod.etcd.local.EtcdCluster, under ``<state>/etcd``), two HaloD
on it — ``halod`` (control 7600, status 7601, route ports on 127.0.0.1) and ``halod2``
(7610, 7611, route ports on 127.0.1.1), each driving its own built-in proxy — and the
nodes given both control addresses. The README's command keeps the embedded default.

Each child runs in its own process group (a terminal's Ctrl-C reaches only us, and we
stop the children in order) and, on Linux, dies with us if we are killed outright.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from halod.config import HaloDConfig
from orbited.core.routes import DEFAULT_ROUTES
from orbited.core.tokens import load_secret
from orbited.node.config import NodeConfig
from orbited.whereis import DEFAULT_STATE_DIR, leading_status

DEMOS = Path(__file__).resolve().parent.parent / "demos"
ROUTES = DEFAULT_ROUTES  # the cluster HaloD runs uses the default route count


@dataclass
class ClusterConfig:
    state_dir: Path = DEFAULT_STATE_DIR  # where `orbited whereis` looks
    app: str = "127.0.0.1:8080"  # cherrychat; the URL to open
    # HaloD's and the nodes' own defaults (halod/config.py, orbited/node/config.py):
    halod_control: str = HaloDConfig.control
    halod_status: str = HaloDConfig.status_http
    browser_port_base: int = HaloDConfig.browser_port_base
    sp_port_base: int = HaloDConfig.sp_port_base
    nodes: int = 2  # active nodes
    spares: int = HaloDConfig.spares
    free_ports: bool = False  # every listener on a free port (tests; or when defaults are taken)
    heartbeat_interval: float = HaloDConfig.heartbeat_interval
    missed_heartbeats: int = HaloDConfig.missed_heartbeats
    grace: float = HaloDConfig.grace
    linger: float = NodeConfig.linger
    keepalive: float = NodeConfig.keepalive
    fresh: bool = False  # forget the chat's rooms and messages too
    log_level: str = "info"
    cors_origins: list[str] = field(default_factory=list)  # pages of your own apps
    ha: bool = False  # 3 etcd members and 2 HaloD on them (docs/halod.md, "High availability")
    # The demo shows issue 21's per-user features (docs/tutorial.md, "Every tab of a
    # user"): at most this many tabs per user (0: no limit), and the nodes' offline hook
    # pointed at cherrychat's /orbited/offline.
    user_max_connections: int = 3


class ClusterError(RuntimeError):
    pass


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    """Ask Linux to SIGTERM this child when the cluster process dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Child:
    """One child process with a log file and (for daemons) a ready file."""

    def __init__(self, name: str, cmd: list[str], state: Path,
                 env: dict[str, str] | None = None) -> None:  # fmt: skip
        self.name = name
        self.cmd = cmd
        self.log_file = state / "logs" / f"{name}.log"
        self.ready_file = state / f"{name}.ready.json"
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready: dict[str, Any] = {}
        self.reaped = False

    def spawn(self) -> None:
        self.ready_file.unlink(missing_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            self.proc = subprocess.Popen(
                [*self.cmd, "--ready-file", str(self.ready_file)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self.env, start_new_session=True, preexec_fn=_die_with_parent,
            )  # fmt: skip

    def wait_ready(self, deadline: float) -> dict[str, Any]:
        while not self.ready_file.exists():
            if not self.alive():
                raise ClusterError(f"{self.name} exited while starting:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise ClusterError(f"{self.name} did not start in time:\n{self.log_tail()}")
            time.sleep(0.02)
        self.ready = json.loads(self.ready_file.read_text())
        return self.ready

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_file.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(f"  {self.name}| {line}" for line in text[-lines:])

    def signal(self, sig: int) -> None:
        """Signal the child's whole process group (anything it started goes too)."""
        if self.proc is None or self.reaped:
            return  # its process group id may belong to someone else by now
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def reap(self, deadline: float, force: Callable[[], bool] = lambda: False) -> int | None:
        """Wait for the child until ``deadline`` (or until ``force()``), then SIGKILL its
        group and wait for it."""
        if self.proc is None:
            return None
        while self.proc.poll() is None and time.monotonic() < deadline and not force():
            time.sleep(0.02)
        if self.proc.poll() is None:
            self.signal(signal.SIGKILL)
            self.proc.wait()
        self.signal(signal.SIGKILL)  # a grandchild left in the group
        self.reaped = True
        self.ready_file.unlink(missing_ok=True)  # it holds the pid too
        return self.proc.returncode


EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def listen_port_range() -> tuple[int, int]:
    """[low, high): where ``free_port_block`` looks: 20000 up to the ephemeral range, or
    above it, if either leaves at least 2000 ports; else 20000..60000."""
    try:
        first, last = map(int, EPHEMERAL_RANGE.read_text().split())
    except (OSError, ValueError):
        return 20000, 60000
    if first - 20000 >= 2000:
        return 20000, first
    if 65536 - (last + 1) >= 2000:
        return last + 1, 65536
    return 20000, 60000


HANDED_OUT_MEMORY = 120.0  # s: long enough for a bench or test to start what it picked
_HANDED_OUT: list[tuple[float, range]] = []  # (when, block) free_port_block returned


def _recent() -> list[range]:
    cutoff = time.monotonic() - HANDED_OUT_MEMORY
    while _HANDED_OUT and _HANDED_OUT[0][0] < cutoff:
        _HANDED_OUT.pop(0)
    return [block for _, block in _HANDED_OUT]


def _overlap(a: range, b: range) -> bool:
    return a.start < b.stop and b.start < a.stop


def free_port_block(count: int, avoid: range = range(0)) -> int:
    """A base port b such that b..b+count-1 can all be bound on 127.0.0.1 right now and do
    not overlap ``avoid`` (a block picked but not bound yet). Tests and bench use it too.

    The block lies outside the kernel's ephemeral port range when it can: a port of that
    range is free one moment and the local end of some outgoing connection the next, and
    then the block cannot be listened on ("Address already in use").

    A block this process handed out in the last HANDED_OUT_MEMORY seconds is not handed out
    again: it may be free now only because whoever asked for it has not bound it yet."""
    low, high = listen_port_range()
    for _ in range(200):
        base = random.randrange(low, high - count)
        block = range(base, base + count)
        if _overlap(block, avoid) or any(_overlap(block, taken) for taken in _recent()):
            continue
        held: list[socket.socket] = []
        try:
            for port in block:
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", port))
            _HANDED_OUT.append((time.monotonic(), block))
            return base
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise ClusterError("no free block of ports")


def proxy_worker_pid(state: Path) -> int | None:
    """The pid in ``state/proxy/worker.pid`` if that process is a live proxy worker (the
    pid file may be stale and its number reused)."""
    try:
        pid = int((state / "proxy" / "worker.pid").read_text().strip())
        if b"proxy_worker" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return None
        status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, ValueError, IndexError):
        return None
    return None if status == "Z" else pid


def http_json(url: str, timeout: float = 1.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


class LocalCluster:
    """HaloD, the nodes (``nodes`` active + ``spares``) and cherrychat as child processes."""

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.state = config.state_dir.resolve()
        self.children: dict[str, Child] = {}  # in start order
        self.started = time.monotonic()
        self.url = ""
        self.halod_status = ""
        self.halod_statuses: list[str] = []  # every HaloD's status URL (two with --ha)
        self.etcd: Any = None  # halod.etcd.local.EtcdCluster with --ha
        self._force = False
        self._state_text: str | None = None  # what cluster.json holds, once written

    # -- starting ----------------------------------------------------------------------

    def start(self, timeout: float = 45.0) -> None:
        """Start everything; on any failure stop what was started and raise ClusterError."""
        if not (DEMOS / "cherrychat" / "__main__.py").is_file():
            raise ClusterError(f"cherrychat not found in {DEMOS}: run from a source checkout")
        deadline = time.monotonic() + timeout
        try:
            self._start(deadline)
        except BaseException:
            self.stop()
            raise

    def _start(self, deadline: float) -> None:
        c = self.config
        self.state.mkdir(parents=True, exist_ok=True)
        secret_file = self.state / "secret"
        load_secret(secret_file, create=True)
        # HaloD's operator key (drain/undrain/rehash and /trace): `orbited trace`, `halod
        # drain` and the dashboard's operator find it through cluster.json.
        load_secret(self.operator_key_file, create=True)
        # Every node starts empty, so a table from an earlier run would only make HaloD wait
        # out the grace period for nodes that are not coming back: start from scratch.
        for name in ("halod.sqlite3", "halod.sqlite3-wal", "halod.sqlite3-shm"):
            (self.state / name).unlink(missing_ok=True)
        if c.fresh:
            for name in ("cherrychat.sqlite3", "cherrychat.sqlite3-wal", "cherrychat.sqlite3-shm"):
                (self.state / name).unlink(missing_ok=True)
        browser_base, sp_base = c.browser_port_base, c.sp_port_base
        control, status, app = c.halod_control, c.halod_status, c.app
        if c.free_ports:
            browser_base = free_port_block(ROUTES)
            sp_base = free_port_block(ROUTES, avoid=range(browser_base, browser_base + ROUTES))
            control, status = "tcp://127.0.0.1:0", "127.0.0.1:0"
            app = f"{app.rpartition(':')[0]}:0"
        py = sys.executable
        common = [
            "--routes", str(ROUTES), "--spares", str(c.spares), "--dataplane", "proxy",
            "--proxy-on-exit", "stop",  # nothing outlives the cluster (also: _stop_proxy_worker)
            "--browser-port-base", str(browser_base), "--sp-port-base", str(sp_base),
            "--heartbeat-interval", str(c.heartbeat_interval),
            "--missed-heartbeats", str(c.missed_heartbeats), "--grace", str(c.grace),
            "--secret-file", str(secret_file), "--log-level", c.log_level,
            "--operator-key-file", str(self.operator_key_file),
        ]  # fmt: skip
        if c.ha:
            halod_control, ready = self._start_ha(common, control, status, deadline)
        else:
            halod = self._child("halod", [
                py, "-m", "halod.cli", "run", "--db", str(self.state / "halod.sqlite3"),
                "--control", control, "--status-http", status, "--dataplane-host", "127.0.0.1",
                *common,
            ])  # fmt: skip
            halod.spawn()
            ready = halod.wait_ready(deadline)
            halod_control = ready["control"]
            self.halod_statuses = [f"http://{ready['status']}"]
        self.halod_status = f"http://{ready['status']}"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(DEMOS), *filter(None, [os.environ.get("PYTHONPATH")])])}  # fmt: skip
        chat = self._child("cherrychat", [
            py, "-m", "cherrychat", "--http", app, "--db", str(self.state / "cherrychat.sqlite3"),
            "--secret-file", str(secret_file), "--halod-host", "127.0.0.1",
            "--browser-port-base", str(browser_base), "--sp-port-base", str(sp_base),
            "--routes", str(ROUTES), "--halod-status", self.halod_status,
            "--fresh-presence", "--log-level", c.log_level,
            "--offline-hook", "--user-max-connections", str(c.user_max_connections),
        ], env=env)  # fmt: skip
        chat.spawn()
        app_address = chat.wait_ready(deadline)["http"]
        host, port = app_address.rsplit(":", 1)
        self.url = f"http://{host}:{port}/"
        origins = [f"http://{host}:{port}", f"http://localhost:{port}", *c.cors_origins]
        for i in range(1, c.nodes + c.spares + 1):
            name = f"n{i}"
            ip = f"127.0.0.{i + 1}"
            http, sp = (f"{ip}:0", f"tcp://{ip}:0") if c.free_ports else (
                f"{ip}:8001", f"tcp://{ip}:9001")  # fmt: skip
            node = self._child(name, [
                py, "-m", "orbited.cli", "node", "--name", name, "--http", http, "--sp", sp,
                "--halod", halod_control, "--halod-secret-file", str(secret_file),
                "--secret-file", str(secret_file), "--no-create-secret",
                "--presence-url", f"http://{host}:{port}/orbited/presence",
                "--offline-url", f"http://{host}:{port}/orbited/offline",
                "--user-max-connections", str(c.user_max_connections),
                "--linger", str(c.linger), "--keepalive", str(c.keepalive),
                "--trace", "all",  # per-key tracing for `orbited trace` and the dashboard
                *(arg for origin in origins for arg in ("--cors-origin", origin)),
                "--log-level", c.log_level,
            ])  # fmt: skip
            node.spawn()
            node.wait_ready(deadline)

            # One at a time, so n1..nN become the active nodes and the last the spare.
            def registered(n: str = name) -> bool:
                return bool(self.halod_nodes().get(n, {}).get("connected"))

            self._wait(registered, f"{name} to register with HaloD", deadline)
        self._write_state()

    # HaloD on etcd (--ha): etcd's raft timing lets a 1 s lease ride out the loss of its
    # leader (docs/halod.md, "High availability").
    HA_DATAPLANE_HOSTS = ("127.0.0.1", "127.0.1.1")
    HA_ETCD = ("--etcd-prefix", "/orbited/cluster", "--etcd-lease-ttl", "1",
               "--etcd-step-down-margin", "0.15", "--etcd-timeout", "0.5")  # fmt: skip

    def _start_ha(self, common: list[str], control: str, status: str, deadline: float
                  ) -> tuple[str, dict[str, Any]]:  # fmt: skip
        """3 etcd members, then ``halod`` (it leads) and ``halod2``; returns the nodes'
        ``halod`` setting (both control addresses) and the leader's ready file."""
        from halod.etcd.local import EtcdCluster

        etcd_dir = self.state / "etcd"
        shutil.rmtree(etcd_dir, ignore_errors=True)  # a fresh table, as with SQLite
        etcd_dir.mkdir()
        self.etcd = EtcdCluster(etcd_dir, heartbeat_ms=25, election_ms=250)
        try:
            self.etcd.start(timeout=max(1.0, deadline - time.monotonic()))
        except (OSError, RuntimeError) as e:
            raise ClusterError(f"etcd did not start ({e}); is etcd-server installed?") from None
        endpoints = [a for e in self.etcd.endpoints for a in ("--etcd-endpoint", e)]
        readies = []
        for i, host in enumerate(self.HA_DATAPLANE_HOSTS):
            name = "halod" if i == 0 else f"halod{i + 1}"
            folder = self.state / name
            folder.mkdir(exist_ok=True)
            ctl, st = control, status
            if not control.endswith(":0"):  # the second HaloD: ports + 10
                ctl = f"{control.rpartition(':')[0]}:{int(control.rpartition(':')[2]) + 10 * i}"
                st = f"{status.rpartition(':')[0]}:{int(status.rpartition(':')[2]) + 10 * i}"
            child = self._child(name, [
                sys.executable, "-m", "halod.cli", "run", "--db", str(folder / "halod.sqlite3"),
                "--control", ctl, "--status-http", st, "--dataplane-host", host,
                "--store", "etcd", *endpoints, *self.HA_ETCD, "--etcd-name", name, *common,
            ])  # fmt: skip
            child.spawn()
            readies.append(child.wait_ready(deadline))
            self.halod_statuses.append(f"http://{readies[-1]['status']}")
            url = self.halod_statuses[-1]
            role = "leader" if i == 0 else "follower"  # the first one leads

            def has_role(url: str = url, role: str = role) -> bool:
                return bool(http_json(f"{url}/status").get("role") == role)

            self._wait(has_role, f"{name} to be the {role}", deadline)
        return ",".join(r["control"] for r in readies), readies[0]

    def ha_summary(self) -> str:
        """Where each HA part runs (printed by ``orbited cluster --ha``)."""
        lines = [f"etcd members: {', '.join(self.etcd.endpoints)}"]
        for url, host in zip(self.halod_statuses, self.HA_DATAPLANE_HOSTS, strict=False):
            status = http_json(f"{url}/status")
            lines.append(f"HaloD {status['etcd']['name']}: {status['role']}, status {url}/status, "
                         f"route ports on {host}")  # fmt: skip
        return "\n".join(lines)

    def leader_status(self) -> str:
        """The status URL of the HaloD that leads now (the only one without --ha)."""
        if len(self.halod_statuses) < 2:
            return self.halod_status
        return leading_status(self.halod_statuses, None) or self.halod_status

    def _child(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> Child:
        child = Child(name, cmd, self.state, env)
        self.children[name] = child
        return child

    def _wait(self, predicate: Callable[[], object], what: str, deadline: float) -> None:
        while True:
            try:
                if predicate():
                    return
            except OSError:
                pass
            for child in self.children.values():
                if not child.alive():
                    raise ClusterError(f"{child.name} exited:\n{child.log_tail()}")
            if time.monotonic() > deadline:
                raise ClusterError(f"timed out waiting for {what}")
            time.sleep(0.05)

    @property
    def state_file(self) -> Path:
        return self.state / "cluster.json"

    @property
    def operator_key_file(self) -> Path:
        """HaloD's operator key (mode 0600), made on the first start."""
        return self.state / "operator.key"

    def state_info(self) -> dict[str, Any]:
        """What cluster.json says: the processes running now (``pids``), those that
        exited and their exit status (``exited``), and each one's ready file."""
        running = {n: c for n, c in self.children.items() if c.alive()}
        return {
            "url": self.url,
            "halod_status": self.halod_status,
            "halod_statuses": self.halod_statuses,
            "operator_key_file": str(self.operator_key_file),
            "etcd": self.etcd.endpoints if self.etcd is not None else [],
            "pids": {name: child.pid for name, child in running.items()},
            "exited": {
                name: child.proc.returncode
                for name, child in self.children.items()
                if name not in running and child.proc is not None
            },
            "ready": {name: child.ready for name, child in self.children.items()},
        }

    def _write_state(self) -> None:
        """cluster.json: what is running where, for scripts and tests; written atomically,
        and again when a child exits (``refresh_state``), removed when the cluster stops."""
        text = json.dumps(self.state_info(), indent=1)
        if text == self._state_text:
            return
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.state_file)
        self._state_text = text

    def refresh_state(self) -> None:
        """Rewrite cluster.json if a child has exited since it was written."""
        if self._state_text is not None:
            self._write_state()

    # -- watching ----------------------------------------------------------------------

    def halod_nodes(self) -> dict[str, dict[str, Any]]:
        return {n["name"]: n for n in http_json(f"{self.leader_status()}/status")["nodes"]}

    def status_line(self) -> str:
        """One line: users online, failovers and deaths first (a terminal cuts the line at
        its width), then each node's state, routes and connections."""
        head = [f"up {time.monotonic() - self.started:.0f}s"]
        try:
            health = http_json(f"{self.url}healthz", timeout=0.5)
            head.append(f"{health['online']} online")
        except (OSError, ValueError, KeyError):
            head.append("cherrychat not answering")
        nodes = []
        try:
            status = http_json(f"{self.leader_status()}/status", timeout=0.5)
            if status.get("role") not in (None, "solo"):
                head.append(f"HaloD leader {(status.get('leader') or {}).get('name')}")
            if status["failovers"]:
                head.append(f"failovers {status['failovers']}")
            for n in status["nodes"]:
                if n["state"] == "active":
                    where = f"routes {n['ranges']}, {n['connections']} conn"
                    if not n["connected"]:
                        where += f", lost {n['disconnected_for'] or 0:.0f}s"
                    nodes.append(f"{n['name']} active ({where})")
                else:
                    nodes.append(f"{n['name']} {n['state']}")
        except (OSError, ValueError, KeyError):
            head.append("HaloD not answering")
        dead = [f"{c.name} exited ({c.proc.returncode})" for c in self.children.values()
                if c.proc is not None and c.proc.poll() is not None]  # fmt: skip
        return " · ".join(head + dead + nodes)

    # -- stopping ----------------------------------------------------------------------

    def force(self) -> None:
        """Stop waiting for children to exit politely (a second Ctrl-C)."""
        self._force = True

    def stop(self, timeout: float = 8.0) -> None:
        """The web app first (no new pushes), then HaloD (so it moves no routes while the
        nodes go), then all nodes at once; each gets SIGTERM, then SIGKILL at the end of
        ``timeout``. Children that already died are just reaped."""
        deadline = time.monotonic() + timeout
        halods = [c for n, c in self.children.items() if n.startswith("halod")]
        chat = self.children.get("cherrychat")
        for step in [[chat] if chat else [], halods, [
            c for n, c in self.children.items() if n != "cherrychat" and c not in halods
        ]]:  # fmt: skip
            for child in step:
                child.signal(signal.SIGTERM)
            for child in step:
                child.reap(deadline, lambda: self._force)
            if step is halods:
                self._stop_proxy_worker(deadline)
                for halod in halods[1:] if self.etcd is None else halods:
                    self._stop_proxy_worker(deadline, self.state / halod.name)
        if self.etcd is not None:  # last: HaloD stepped down cleanly while it ran
            self.etcd.stop()
        # Nothing that names a pid outlives the processes (pids get reused).
        self.state_file.unlink(missing_ok=True)
        self._state_text = None

    def _stop_proxy_worker(self, deadline: float, folder: Path | None = None) -> None:
        """HaloD stops its proxy worker on SIGTERM (``--proxy-on-exit stop``), but a HaloD
        that was SIGKILLed (or crashed) leaves it forwarding by design (docs/halod.md, "The
        built-in proxy"): end the worker named by ``proxy/worker.pid`` if it still runs."""
        folder = folder or self.state
        pid = proxy_worker_pid(folder)
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
        while proxy_worker_pid(folder) == pid:
            if time.monotonic() > deadline or self._force:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.02)

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- the command -------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    d = ClusterConfig()
    from orbited.runtime.commands import ArgumentParser

    p = ArgumentParser(
        prog="orbited cluster",
        description="Run HaloD, two Orbited nodes, a spare and the cherrychat demo on this "
        "machine (loopback only) until Ctrl-C. See docs/tutorial.md.",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=d.state_dir,
        help=f"secret, databases and logs (default: {d.state_dir})",
    )
    p.add_argument(
        "--port",
        type=int,
        default=int(d.app.rsplit(":", 1)[1]),
        help="cherrychat's port on 127.0.0.1 (default: 8080)",
    )
    p.add_argument(
        "--free-ports",
        action="store_true",
        help="put every listener on a free port instead of the defaults",
    )
    p.add_argument("--fresh", action="store_true", help="forget the chat's rooms and messages")
    p.add_argument(
        "--ha",
        action="store_true",
        help="HaloD replicated: 3 etcd members and 2 HaloD on them (docs/halod.md)",
    )
    p.add_argument(
        "--heartbeat-interval",
        type=float,
        default=d.heartbeat_interval,
        help=f"seconds between node heartbeats to HaloD (default: {d.heartbeat_interval:g})",
    )
    p.add_argument(
        "--missed-heartbeats",
        type=int,
        default=d.missed_heartbeats,
        help=f"silent heartbeats before HaloD fails a node (default: {d.missed_heartbeats})",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=d.grace,
        help=f"seconds a disconnected node keeps its routes (default: {d.grace:g})",
    )
    p.add_argument(
        "--linger",
        type=float,
        default=d.linger,
        help=f"seconds a browser's mailbox outlives its connection (default: {d.linger:g})",
    )
    p.add_argument(
        "--keepalive",
        type=float,
        default=d.keepalive,
        help=f"seconds of silence before nodes ping browsers (default: {d.keepalive:g})",
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="also let pages from ORIGIN use the nodes (repeat), e.g. your own app",
    )
    p.add_argument("--log-level", default=d.log_level, choices=["debug", "info", "warn", "error"])
    p.add_argument("--no-status", action="store_true", help="no live status line")
    return p


def cluster_command(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    config = ClusterConfig(
        state_dir=args.state_dir, app=f"127.0.0.1:{args.port}", free_ports=args.free_ports,
        fresh=args.fresh, heartbeat_interval=args.heartbeat_interval,
        missed_heartbeats=args.missed_heartbeats, grace=args.grace, linger=args.linger,
        keepalive=args.keepalive, log_level=args.log_level, cors_origins=args.cors_origin,
        ha=args.ha,
    )  # fmt: skip
    cluster = LocalCluster(config)
    tty = sys.stdout.isatty()

    def on_signal(signum: int, frame: object) -> None:
        if cluster._force or getattr(on_signal, "stopping", False):
            cluster.force()  # a second Ctrl-C: no more waiting
            return
        on_signal.stopping = True  # type: ignore[attr-defined]
        raise KeyboardInterrupt

    # Set explicitly: a shell may have started us with SIGINT ignored (background jobs).
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)  # the terminal went away
    halods = "3 etcd members, 2 HaloD" if config.ha else "HaloD"
    print(f"orbited cluster: starting {halods}, {config.nodes} nodes, {config.spares} spare "
          f"and cherrychat (logs in {cluster.state}/logs)", flush=True)  # fmt: skip
    try:
        cluster.start()
        print(f"\ncherrychat is ready: open {cluster.url}\n"
              f"HaloD status: {cluster.halod_status}/status  (picture: "
              f"{cluster.halod_status}/table.svg)\n"
              f"dashboard: {cluster.halod_status}/dashboard  (operator key in "
              f"{cluster.operator_key_file})", flush=True)  # fmt: skip
        if config.ha:
            print(cluster.ha_summary(), flush=True)
        print("Ctrl-C stops everything.\n", flush=True)
        last = ""
        while True:
            cluster.refresh_state()
            line = cluster.status_line()
            if args.no_status:
                pass
            elif tty:  # in place; cut to the width, as a wrapped line would not be erased
                width = shutil.get_terminal_size().columns - 1
                print(f"\r\x1b[K{line[:width]}", end="", flush=True)
            elif line.split(" · ", 1)[-1] != last:  # not a terminal: only changes
                print(line, flush=True)
                last = line.split(" · ", 1)[-1]
            time.sleep(1.0)
    except KeyboardInterrupt:
        if tty:
            print()
        print("orbited cluster: stopping", flush=True)
        cluster.stop()
        print("orbited cluster: stopped", flush=True)
        return 0
    except ClusterError as e:
        print(f"orbited cluster: {e}", file=sys.stderr, flush=True)
        if "already in use" in str(e):
            print(
                "orbited cluster: is another one running, or a HaloD's proxy worker still "
                "forwarding (kill $(cat proxy/worker.pid) where that HaloD ran)? Or try "
                "--free-ports (--port N moves the chat's port only)",
                file=sys.stderr,
            )
        return 1
