"""Shared fixtures: real node processes, the real nng (pynng) as the web app, real clients."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pynng
import pytest
from websockets.sync.client import ClientConnection, connect

from orbited.cluster import free_port_block
from orbited.core.hashing import route_of
from orbited.core.keys import ConnectionKey
from orbited.core.tokens import issue_token

SECRET = b"test-secret-0123456789-abcdefghijklmnopqrstuvwxyz"


class DaemonProcess:
    """A daemon subprocess that writes a ready file (its bound addresses) once listening."""

    proc: subprocess.Popen[bytes] | None = None
    ready_file: Path
    log_file: Path
    prefix: tuple[str, ...] = ()  # e.g. ("ip", "netns", "exec", NAME) to run inside a netns

    def spawn(self, cmd: list[str]) -> dict:
        """Start ``cmd`` (its output appended to the log file); return the ready file."""
        self.ready_file.unlink(missing_ok=True)
        log = self.log_file.open("ab")
        self.proc = subprocess.Popen([*self.prefix, *cmd], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while not self.ready_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{cmd[2]} did not start:\n{self.log_file.read_text()}")
            time.sleep(0.02)
        return json.loads(self.ready_file.read_text())

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class NodeProcess(DaemonProcess):
    """An ``orbited node`` subprocess on loopback ports it picks itself (port 0)."""

    def __init__(self, tmp: Path, *flags: str) -> None:
        self.tmp = tmp
        self.secret_file = tmp / "secret"
        self.secret_file.write_bytes(SECRET)
        self.ready_file = tmp / f"ready-{time.monotonic_ns()}.json"
        self.log_file = tmp / "node.log"
        self.flags = flags

    def start(self, http: str = "127.0.0.1:0", sp: str = "tcp://127.0.0.1:0") -> NodeProcess:
        ready = self.spawn([
            sys.executable, "-m", "orbited.cli", "node",
            "--http", http, "--sp", sp,
            "--secret-file", str(self.secret_file), "--no-create-secret",
            "--ready-file", str(self.ready_file), *self.flags,
        ])  # fmt: skip
        self.http, self.sp, self.epoch = ready["http"], ready["sp"], ready["epoch"]
        self.publish = ready.get("publish")
        self.orbit = ready.get("orbit")
        return self

    # -- clients -----------------------------------------------------------------------

    def token(self, user: str, session: str = "s", location: str = "/t", ttl: float = 60) -> str:
        return issue_token(SECRET, ConnectionKey(user, session, location), ttl)

    def req(self, **options: int) -> pynng.Req0:
        options.setdefault("recv_timeout", 5000)
        options.setdefault("send_timeout", 5000)
        return pynng.Req0(dial=self.sp, **options)

    def ws(self, token: str, last: str | None = None, **headers: str) -> ClientConnection:
        url = f"ws://{self.http}/orbited/ws?token={token}"
        if last:
            url += f"&last={last}"
        return connect(url, additional_headers=headers or None, open_timeout=5, legacy=True)

    def poll(self, query: str, headers: dict[str, str] | None = None) -> tuple[int, object]:
        request = urllib.request.Request(
            f"http://{self.http}/orbited/poll?{query}", headers=headers or {}
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")


class HaloDProcess(DaemonProcess):
    """A ``halod run`` subprocess with its own SQLite file; restartable on the same ports."""

    def __init__(
        self, tmp: Path, *flags: str, routes: int = 24, proxy: bool = False, dataplane: str = ""
    ) -> None:
        self.tmp = tmp
        self.routes = routes
        self.browser_base = self.sp_base = 0
        dataplane = dataplane or ("proxy" if proxy else "none")
        self.dataplane = dataplane
        if dataplane != "none":  # a data plane on 2×N free ports
            self.browser_base = free_port_block(routes)
            self.sp_base = free_port_block(
                routes, avoid=range(self.browser_base, self.browser_base + routes)
            )
            flags = (*flags, "--browser-port-base", str(self.browser_base),
                     "--sp-port-base", str(self.sp_base))  # fmt: skip
        flags = (*flags, "--dataplane", dataplane)
        flags = (*flags, "--routes", str(routes))
        self.db = tmp / "halod.sqlite3"
        self.ready_file = tmp / "halod-ready.json"
        self.log_file = tmp / "halod.log"
        self.flags = flags
        self.control = "tcp://127.0.0.1:0"
        self.status_http = "127.0.0.1:0"

    def start(self) -> HaloDProcess:
        """Start (or restart, on the same ports and database)."""
        ready = self.spawn([
            sys.executable, "-m", "halod.cli", "run", "--db", str(self.db),
            "--control", self.control, "--status-http", self.status_http,
            "--ready-file", str(self.ready_file), *self.flags,
        ])  # fmt: skip
        self.control, self.status_http = ready["control"], ready["status"]
        return self

    def get(self, page: str) -> dict:
        with urllib.request.urlopen(f"http://{self.status_http}/{page}", timeout=5) as r:
            return json.loads(r.read())

    def nodes(self) -> dict[str, dict]:
        return {n["name"]: n for n in self.get("status")["nodes"]}

    def owners(self) -> dict[int, str | None]:
        owners = self.get("routes")["owners"]
        return {int(r): (o["name"] if o else None) for r, o in owners.items()}

    def node(self, tmp: Path, name: str, *flags: str) -> NodeProcess:
        """Start a node named ``name`` registered with this HaloD; wait until it is in."""
        folder = tmp / name
        folder.mkdir(exist_ok=True)
        proc = NodeProcess(folder, "--name", name, "--halod", self.control, *flags)
        host = f"127.0.0.{len(list(tmp.iterdir())) + 1}"
        proc.start(http=f"{host}:0", sp=f"tcp://{host}:0")
        wait_for(lambda: self.nodes().get(name, {}).get("connected"), f"{name} registered")
        wait_for(self.synced, "the proxy worker has the table with the node's routes")
        return proc

    def synced(self) -> bool:
        """Whether the data plane forwards by HaloD's latest table. The proxy worker is
        another process that applies a new table one socket round trip after HaloD's own
        (until then it closes browsers on routes it has no owner for, or leads them to the
        old one): a test that connects through route ports after ``owners()`` changed
        waits for this too."""
        if self.dataplane != "proxy":
            return True
        return bool(self.get("status")["dataplane"]["worker"]["synced"])


def wait_for(predicate: Callable[[], object], what: str, timeout: float = 10.0) -> float:
    """Poll ``predicate`` every 20 ms; return the seconds it took to become true."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - start


def keys_on_routes(routes: Iterable[int], count: int = 1, total: int = 24,
                   prefix: str = "user") -> list[ConnectionKey]:  # fmt: skip
    """The first ``count`` connection keys whose route (docs/hashing.md) is in ``routes``."""
    wanted, found, i = set(routes), [], 0
    while len(found) < count:
        key = ConnectionKey(f"{prefix}{i}", "s", "/t")
        if route_of(key, total) in wanted:
            found.append(key)
        i += 1
    return found


def send_event(req: pynng.Req0, event_id: str, to: list[list[str]], data: object) -> dict:
    req.send(json.dumps({"id": event_id, "to": to, "data": data}).encode())
    return json.loads(req.recv_msg().bytes)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    proc = NodeProcess(tmp_path, "--linger", "5")
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def shared_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One node for tests that do not restart or reconfigure it."""
    proc = NodeProcess(tmp_path_factory.mktemp("node"), "--linger", "5")
    proc.start()
    yield proc
    proc.stop()


def _halod_databases() -> set[Path]:
    """The --db directories of the HaloD processes running now."""
    found = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            argv = cmdline.read_bytes().split(b"\0")
            if b"halod.cli" in argv and b"--db" in argv:
                found.add(Path(argv[argv.index(b"--db") + 1].decode()).parent.absolute())
    return found


@pytest.fixture(autouse=True)
def no_orphaned_proxy_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The built-in proxy's worker outlives a SIGKILLed HaloD by design (docs/halod.md, "The
    built-in proxy"); a test that ends with its HaloD killed must not leave one forwarding
    (and holding ports) for the rest of the session. After each test, a worker under this
    session's temporary directories whose HaloD (same state directory) no longer runs is
    ended; a module-scoped cluster's worker, whose HaloD still runs, is left alone."""
    yield
    workers = list(tmp_path_factory.getbasetemp().glob("**/proxy/worker.pid"))
    if not workers:
        return
    alive = _halod_databases()
    for pid_file in workers:
        if pid_file.parent.parent.absolute() in alive:
            continue
        try:
            pid = int(pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if b"proxy_worker" in cmdline:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def next_frame(ws, timeout: float = 5.0) -> dict:  # noqa: ANN001 - any sync ws client
    """The next frame of a websockets connection that is not a ``ping`` (keepalives, and
    the spread hint a planned move sends before its ``reconnect``: docs/protocol.md)."""
    while True:
        frame = json.loads(ws.recv(timeout=timeout))
        if frame.get("type") != "ping":
            return frame


def moved_frame(frame: dict) -> dict:
    """A planned move's ``reconnect`` frame without its ``spread`` (the hint counted over
    the browsers that move, docs/protocol.md), after checking the spread is a number; a
    ``route_moved`` one also without its ``route`` (the key's route), after checking it
    is one (a rehash's ``route`` stays: tests compare it)."""
    frame = dict(frame)
    spread = frame.pop("spread")
    assert isinstance(spread, int | float) and 0 <= spread <= 30, frame
    if frame.get("reason") == "route_moved":
        route = frame.pop("route")
        assert type(route) is int and route >= 1, frame
    return frame
