"""The built-in data plane, HaloD's side: a proxy worker process on the 2×N route ports.

The forwarding itself runs in ``halod/dataplane/proxy_worker.py``, a process of its own
(docs/halod.md, "The built-in proxy"), because in HaloD's reactor it made heartbeats wait
behind traffic (false failovers under load) and HaloD's death closed every proxied
connection. This module finds or starts that worker, keeps it supervised and sends it
every table over a UNIX socket (``proxy/worker.sock`` beside the database, mode 600,
halod/dataplane/proxy_protocol.py):

* **start**: connect to the socket. A worker that answers with HaloD's port layout (an
  earlier HaloD's, still forwarding after a crash or SIGKILL) is re-attached and sent the
  restored table: routes that did not change keep their connections. One with another
  layout or protocol version is told to stop and a new one is started. No answer (no
  socket, a stale one, a worker that does not say hello) → a leftover worker named by
  ``worker.pid`` is killed and a new one is started, detached in its own session
  (``start_new_session``), so that signals to HaloD's process group and HaloD's death do
  not reach it.
* **apply**: the full table, non-blocking; one table in flight at a time, later changes
  coalesce into the next (only the latest matters), so a stalled worker never makes
  HaloD buffer more than one table.
* **stats**: the worker pushes counts (changes every 0.25 s, at least one message a
  second); ``stats()`` returns the cached copy at once.
* **supervision**: a worker that exits, closes the socket or stays silent for
  ``SILENCE`` seconds (HaloD's own stalls excepted) is killed if need be, logged, and
  replaced — first at once, then with backoff (1 s doubling to 10 s) while it keeps failing.
* **stop**: with ``stop_on_exit`` (the default) the worker is told to stop and HaloD
  waits for it (SIGKILL after ``STOP_TIMEOUT``); otherwise HaloD only closes the socket
  and the worker forwards on with the last table.

HaloD never blocks on the worker: the socket is non-blocking, the only synchronous
calls are the fork/exec of a new worker and reading a few bytes of /proc.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.internet import defer, task, tcp
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ClientFactory, connectionDone
from twisted.logger import Logger
from twisted.protocols import basic
from twisted.python.failure import Failure

import halod
from halod.dataplane import proxy_protocol as pp
from halod.dataplane.base import MOVE_CLOSE_DELAY, Owner, Ports

if TYPE_CHECKING:
    from halod.config import HaloDConfig

BROWSER, SP = "browser", "sp"
WORKER_MODULE = "halod.dataplane.proxy_worker"
WATCH_PERIOD = 0.5  # seconds between supervision checks
SILENCE = 10.0  # a worker silent this long (no stats, no hello) is killed and replaced
SPAWN_TIMEOUT = 10.0  # a new worker has this long to open its control socket
STOP_TIMEOUT = 5.0  # after `stop`, SIGKILL
BACKOFF_MAX = 10.0
SUN_PATH_MAX = 107  # bytes of a UNIX socket path (sun_path, with its NUL)


def worker_command(socket_path: Path, ports: Ports) -> list[str]:
    return [
        sys.executable, "-m", WORKER_MODULE, "--socket", str(socket_path),
        "--host", ports.host, "--browser-base", str(ports.browser_base),
        "--sp-base", str(ports.sp_base), "--routes", str(ports.routes),
    ]  # fmt: skip


def _lock(directory: Path) -> int:
    """Hold ``directory``'s ``halod.lock`` for this HaloD's life (the kernel lets it go
    when the process ends, however it ends); ValueError if another live HaloD holds it.
    Two HaloDs whose ``db`` share a directory would each take the other's worker for a
    stale one and replace it, cutting every route connection through it."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(directory / "halod.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ValueError(
            f"another HaloD uses {directory} (its db is in the same directory, "
            f"{directory.parent}): give each HaloD a directory of its own for db"
        ) from None
    return fd


def is_worker(pid: int, socket_path: Path) -> bool:
    """``pid`` is alive (not a zombie) and is a proxy worker for ``socket_path``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        return False
    return WORKER_MODULE.encode() in argv and str(socket_path).encode() in argv


def _send_message(sock: socket.socket, message: pp.Message) -> None:
    body = pp.encode(message)
    sock.sendall(struct.pack("!I", len(body)) + body)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise OSError("the proxy worker closed the connection")
        data += chunk
    return data


def _recv_message(sock: socket.socket) -> bytes:
    (length,) = struct.unpack("!I", _recv_exactly(sock, 4))
    if length > pp.MAX_MESSAGE:
        raise pp.ProtocolError(f"message of {length} bytes is too long")
    return _recv_exactly(sock, length)


class _Control(basic.Int32StringReceiver):
    """HaloD's end of the control socket."""

    MAX_LENGTH = pp.MAX_MESSAGE
    transport: tcp.Connection  # a UNIX socket's (unix.Client is a tcp.BaseClient)

    def __init__(self, plane: ProxyDataPlane) -> None:
        self.plane = plane

    def connectionMade(self) -> None:  # noqa: N802
        self.plane._connected(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        self.plane._lost(self)

    def lengthLimitExceeded(self, length: int) -> None:  # noqa: N802
        self.plane.log.warn("proxy worker sent {n} bytes in one message: closing", n=length)
        self.transport.abortConnection()

    def stringReceived(self, data: bytes) -> None:  # noqa: N802
        try:
            message = pp.decode(data, self.plane.ports.routes)
        except pp.ProtocolError as e:
            self.plane.log.warn("bad message from the proxy worker ({error}): closing", error=e)
            self.transport.abortConnection()
            return
        self.plane._received(self, message)

    def send(self, message: pp.Message) -> None:
        self.sendString(pp.encode(message))


class _Connector(ClientFactory):
    noisy = False

    def __init__(self, plane: ProxyDataPlane) -> None:
        self.plane = plane

    def buildProtocol(self, addr: object) -> _Control:  # noqa: N802
        return _Control(self.plane)

    def clientConnectionFailed(self, connector: object, reason: Failure) -> None:  # noqa: N802
        self.plane._no_answer(reason.getErrorMessage())


class ProxyDataPlane:
    """The route ports, served by a proxy worker process; see the module docstring."""

    log = Logger()

    def __init__(
        self, ports: Ports, reactor: Any, close_delay: float = MOVE_CLOSE_DELAY, *,
        directory: Path, stop_on_exit: bool = True,
    ) -> None:  # fmt: skip
        self.ports = ports
        self.layout = pp.Layout.of(ports)
        self.reactor = reactor
        self.close_delay = close_delay
        self.directory = directory
        self.socket_path = directory / "worker.sock"
        self.pid_path = directory / "worker.pid"
        self.log_path = directory / "worker.log"
        self.stop_on_exit = stop_on_exit
        self.owners: dict[int, Owner | None] = {}
        self.state = "stopped"  # starting | running | failed | stopped
        self.error: str | None = None
        self.pid: int | None = None  # the worker we talk to
        self.attached = False  # it was running before this HaloD started it
        self.restarts = 0
        self._primed_pid: int | None = None  # attached at start-up, logged there
        self.counts: pp.Counts = {r: (0, 0) for r in range(1, ports.routes + 1)}
        self.refused = 0
        self.cut = 0
        self.seq = 0
        self._control: _Control | None = None
        self._hello = False
        self._inflight = False  # a table was sent and not yet applied
        self._dirty = False  # the table changed since the last one sent
        self._process: subprocess.Popen[bytes] | None = None
        self._spawned_at = 0.0
        self._replacing: int | None = None  # pid of a worker being replaced
        self._replace_since = 0.0
        self._last_heard = 0.0
        self._last_watch = 0.0
        self._retry: IDelayedCall | None = None
        self._backoff = 0.0
        self._stopping = False
        self._watch = task.LoopingCall(self._watchdog)
        self._watch.clock = reactor
        self._lock: int | None = None  # fd holding halod.lock (from_config), until stop

    @classmethod
    def from_config(cls, config: HaloDConfig, reactor: Any) -> ProxyDataPlane:
        """The worker's files go in ``proxy/`` beside the database, like HAProxy's: each
        HaloD (and each test's) finds its own worker there after a restart."""
        directory = Path(config.db).parent.absolute() / "proxy"
        if len(str(directory / "worker.sock").encode()) > SUN_PATH_MAX:
            raise ValueError(f"{directory}/worker.sock is too long for a UNIX socket path "
                             f"({SUN_PATH_MAX} bytes): put db in a shorter directory")  # fmt: skip
        plane = cls(config.ports(), reactor, config.move_close_delay, directory=directory,
                    stop_on_exit=config.proxy_on_exit == "stop")  # fmt: skip
        plane._lock = _lock(directory)
        return plane

    # -- DataPlane ----------------------------------------------------------------------------

    def start(self, owners: dict[int, Owner | None]) -> None:
        self.owners = dict(owners)
        self._dirty = True
        self.state = "starting"
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._prime()
        self._last_watch = self.reactor.seconds()
        self._watch.start(WATCH_PERIOD, now=False)
        self._connect()

    def apply(self, owners: dict[int, Owner | None]) -> None:
        self.owners = dict(owners)
        self._dirty = True
        self._send_table()

    def stop(self) -> defer.Deferred[Any]:
        self._stopping = True
        if self._lock is not None:  # the next HaloD of this directory may start now
            os.close(self._lock)
            self._lock = None
        if self._watch.running:
            self._watch.stop()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        if not self.stop_on_exit:
            if self.pid is not None:  # (none if it never started: ports taken, say)
                self.log.info("HaloD stops; the proxy worker {pid} forwards on", pid=self.pid)
            if self._control is not None:
                self._control.transport.loseConnection()
            self.state = "stopped"
            return defer.succeed(None)
        # Every worker this HaloD knows of: the one it talks to, one it started (perhaps
        # not answering yet), the one named by the pid file.
        spawned = self._process.pid if self._process is not None else None
        candidates = {self.pid, spawned, self._pid_file(), self._replacing}
        pids = {pid for pid in candidates if pid is not None and is_worker(pid, self.socket_path)}
        if not pids:
            self.state = "stopped"
            return defer.succeed(None)
        for pid in pids:
            if self._control is not None and self._hello and pid == self.pid:
                self._control.send(pp.Stop())
            else:
                os.kill(pid, signal.SIGTERM)
        started = self.reactor.seconds()
        stopped: defer.Deferred[None] = defer.Deferred()

        def check() -> None:
            self._reap()
            alive = [pid for pid in pids if is_worker(pid, self.socket_path)]
            if not alive:
                poll.stop()
                self.state = "stopped"
                stopped.callback(None)
            elif self.reactor.seconds() - started > STOP_TIMEOUT:
                for pid in alive:
                    self.log.warn("proxy worker {pid} did not stop: SIGKILL", pid=pid)
                    self._kill(pid)

        poll = task.LoopingCall(check)
        poll.clock = self.reactor
        poll.start(0.02, now=False)
        return stopped

    def stats(self) -> dict[str, Any]:
        routes = {str(r): {BROWSER: b, SP: s} for r, (b, s) in sorted(self.counts.items())}
        return {
            "backend": "proxy",
            "host": self.ports.host,
            "browser_base": self.ports.browser_base,
            "sp_base": self.ports.sp_base,
            "routes": routes,
            "connections": sum(b + s for b, s in self.counts.values()),
            "refused": self.refused,
            "cut": self.cut,
            "worker": {
                "state": self.state,
                "pid": self.pid,
                # the worker has the latest table
                "synced": self._hello and not self._inflight and not self._dirty,
                "attached": self.attached,
                "restarts": self.restarts,
                "error": self.error,
                "socket": str(self.socket_path),
            },
        }

    # -- finding or starting the worker -------------------------------------------------------

    def _prime(self) -> None:
        """Once, before HaloD serves anything: block (≤ ``SPAWN_TIMEOUT`` + a few s) until a
        worker forwards with the restored table, so the route ports are open when HaloD
        says it is ready, as they were with the proxy in HaloD's reactor. A worker that
        cannot open the ports makes this raise (HaloD does not start); one that does not
        answer is left to the asynchronous supervision below."""
        for _attempt in range(2):
            sock = self._prime_connect()
            if sock is None:
                return
            try:
                with sock:
                    hello = pp.decode(_recv_message(sock), self.ports.routes)
                    if not isinstance(hello, pp.Hello):
                        raise pp.ProtocolError("the worker did not say hello")
                    if self._incompatible(hello):
                        if hello.version == pp.VERSION:
                            _send_message(sock, pp.Stop())
                        else:
                            self._kill(hello.pid)
                        self._prime_await_gone(hello.pid)
                        continue
                    if self._process is None or self._process.pid != hello.pid:
                        self.log.info(
                            "attached to a running proxy worker (pid {pid}, table {seq})",
                            pid=hello.pid, seq=hello.seq,
                        )  # fmt: skip
                        self._primed_pid = hello.pid  # said once: not again when it connects
                    seq = hello.seq + 1
                    _send_message(sock, pp.Table(seq, self.owners, self.close_delay))
                    while True:
                        reply = pp.decode(_recv_message(sock), self.ports.routes)
                        if isinstance(reply, pp.Error):
                            raise OSError(f"proxy worker: {reply.message}")
                        if isinstance(reply, pp.Applied) and reply.seq == seq:
                            self.seq = seq
                            return
            except (OSError, pp.ProtocolError) as e:
                if isinstance(e, OSError) and str(e).startswith("proxy worker:"):
                    raise
                self.log.warn("proxy worker start-up: {error}; supervising it", error=e)
                return

    def _prime_connect(self) -> socket.socket | None:
        deadline = time.monotonic() + SPAWN_TIMEOUT
        spawned = False
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(5)
            try:
                sock.connect(str(self.socket_path))
                return sock
            except OSError:
                sock.close()
            if spawned:
                if self._process is not None and self._process.poll() is not None:
                    raise OSError(
                        f"the proxy worker exited with code {self._process.returncode}: "
                        f"{self._tail()}"
                    )
                if time.monotonic() > deadline:
                    self.log.warn("the proxy worker is slow to start; supervising it")
                    return None
                time.sleep(0.02)
                continue
            old = self._pid_file()
            if old is not None and is_worker(old, self.socket_path):
                self.log.warn("proxy worker {pid} does not answer on {path}: killing it",
                              pid=old, path=str(self.socket_path))  # fmt: skip
                self._kill(old)
                self._prime_await_gone(old)
            self._spawn(connect=False)
            if self._process is None:
                return None
            spawned = True

    def _prime_await_gone(self, pid: int) -> None:
        deadline = time.monotonic() + STOP_TIMEOUT
        while is_worker(pid, self.socket_path):
            self._reap()
            if time.monotonic() > deadline:
                self._kill(pid)
                deadline = time.monotonic() + STOP_TIMEOUT
            time.sleep(0.02)

    def _connect(self) -> None:
        self._retry = None
        if self._stopping or self._control is not None:
            return
        self.reactor.connectUNIX(str(self.socket_path), _Connector(self), timeout=2)

    def _later(self, delay: float, call: Any = None) -> None:
        if self._stopping:
            return
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = self.reactor.callLater(delay, call or self._connect)

    def _no_answer(self, why: str) -> None:
        """Nothing answered on the socket: wait for the worker we started, or start one."""
        if self._stopping:
            return
        now = self.reactor.seconds()
        process = self._process
        if process is not None and process.poll() is None:
            if now - self._spawned_at < SPAWN_TIMEOUT:
                self._later(0.05)  # still starting (a Python interpreter takes ~0.3 s)
                return
            self._failed(f"the proxy worker did not open {self.socket_path} in {SPAWN_TIMEOUT} s")
            self._kill(process.pid)
            return
        if process is not None:
            self._process = None
            self._failed(f"the proxy worker exited with code {process.returncode}: {self._tail()}")
            return
        old = self._pid_file()
        if old is not None and is_worker(old, self.socket_path):
            # A worker that does not accept on its socket (removed, or never bound): it
            # holds the route ports, so it has to go before a new one can start.
            self.log.warn("proxy worker {pid} does not answer on {path}: killing it",
                          pid=old, path=str(self.socket_path))  # fmt: skip
            self._replace(old, kill=True)
            return
        self._spawn()

    def _spawn(self, connect: bool = True) -> None:
        self.socket_path.unlink(missing_ok=True)
        env = dict(os.environ)
        root = str(Path(halod.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        with self.log_path.open("ab") as log:
            try:
                self._process = subprocess.Popen(
                    worker_command(self.socket_path, self.ports), stdin=subprocess.DEVNULL,
                    stdout=log, stderr=subprocess.STDOUT, cwd=self.directory, env=env,
                    start_new_session=True, close_fds=True,
                )  # fmt: skip
            except OSError as e:
                self._failed(f"cannot start the proxy worker: {e}")
                return
        self._spawned_at = self.reactor.seconds()
        self.log.info("started a proxy worker (pid {pid})", pid=self._process.pid)
        if connect:
            self._later(0.05)

    def _replace(self, pid: int, kill: bool) -> None:
        """Start a new worker once ``pid`` (the old one, holding the ports) is gone."""
        self._replacing = pid
        self._replace_since = self.reactor.seconds()
        if kill:
            self._kill(pid)
        self._later(0.05, self._await_gone)

    def _await_gone(self) -> None:
        self._retry = None
        pid = self._replacing
        if pid is None or self._stopping:
            return
        self._reap()
        if is_worker(pid, self.socket_path):
            if self.reactor.seconds() - self._replace_since > STOP_TIMEOUT:
                self._kill(pid)
            self._later(0.05, self._await_gone)
            return
        self._replacing = None
        self._spawn()

    def _failed(self, error: str) -> None:
        self.state = "failed"
        self.error = error
        self.log.error("proxy data plane: {error}", error=error)
        self._backoff = min(BACKOFF_MAX, max(1.0, self._backoff * 2))
        self.log.info("retrying the proxy worker in {s} s", s=self._backoff)
        self._later(self._backoff)

    def _kill(self, pid: int | None) -> None:
        if pid is not None and is_worker(pid, self.socket_path):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def _reap(self) -> None:
        """Collect the exit status of a worker this HaloD started (no zombie is left)."""
        if self._process is not None:
            self._process.poll()

    def _pid_file(self) -> int | None:
        try:
            return int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return None

    def _tail(self, lines: int = 5) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(max(0, f.seek(0, 2) - 4096))
                text = f.read().decode(errors="replace")
        except OSError:
            return "(no worker.log)"
        return " | ".join(text.strip().splitlines()[-lines:])

    # -- the control connection -----------------------------------------------------------------

    def _connected(self, conn: _Control) -> None:
        if self._stopping or self._control is not None:
            conn.transport.loseConnection()
            return
        self._control = conn
        self._hello = False
        self._last_heard = self.reactor.seconds()

    def _lost(self, conn: _Control) -> None:
        if conn is not self._control:
            return
        self._control = None
        hello, self._hello = self._hello, False
        self._inflight = False
        self._dirty = True
        if self._stopping or self._replacing is not None:
            return
        self._reap()
        if hello:
            self.restarts += 1
            code = None
            if self._process is not None and self._process.returncode is not None:
                code, self._process = self._process.returncode, None
            self.log.warn("lost the proxy worker (pid {pid}, exit code {code}): {tail}",
                          pid=self.pid, code=code, tail=self._tail(2))  # fmt: skip
            self.state = "starting"
        self._later(0.05 if self._backoff == 0 else self._backoff)

    def _received(self, conn: _Control, message: pp.Message) -> None:
        self._last_heard = self.reactor.seconds()
        if isinstance(message, pp.Hello):
            self._on_hello(conn, message)
        elif not self._hello:
            self.log.warn("the proxy worker spoke before hello: closing")
            conn.transport.abortConnection()
        elif isinstance(message, pp.Applied):
            if message.seq == self.seq:
                self._inflight = False
                self._send_table()
        elif isinstance(message, pp.Stats):
            if message.full:
                self.counts = {r: (0, 0) for r in range(1, self.ports.routes + 1)}
            self.counts.update(message.counts)
            self.refused, self.cut = message.refused, message.cut
        elif isinstance(message, pp.Error):
            self.error = message.message
            self.log.error("proxy worker: {error}", error=message.message)
        else:
            self.log.warn("unexpected {type} from the proxy worker: closing",
                          type=type(message).__name__)  # fmt: skip
            conn.transport.abortConnection()

    def _incompatible(self, hello: pp.Hello) -> bool:
        """A worker of another port layout or protocol version (logged) must be replaced:
        told to stop when it speaks our version, killed otherwise."""
        if hello.version == pp.VERSION and hello.layout == self.layout:
            return False
        self.log.warn(
            "proxy worker {pid} has another port layout or protocol version "
            "({layout}, v{version}): replacing it",
            pid=hello.pid, layout=hello.layout, version=hello.version,
        )  # fmt: skip
        return True

    def _on_hello(self, conn: _Control, hello: pp.Hello) -> None:
        if self._hello:
            conn.transport.abortConnection()
            return
        if self._incompatible(hello):
            if hello.version == pp.VERSION:
                conn.send(pp.Stop())
            self._replace(hello.pid, kill=hello.version != pp.VERSION)
            conn.transport.loseConnection()
            return
        self._hello = True
        self.pid = hello.pid
        self.attached = self._process is None or self._process.pid != hello.pid
        if self.attached and self._primed_pid != hello.pid:
            self.log.info("attached to a running proxy worker (pid {pid}, table {seq})",
                          pid=hello.pid, seq=hello.seq)  # fmt: skip
        self._primed_pid = None
        self.seq = max(self.seq, hello.seq)
        self.state = "running"
        self.error = None
        self._backoff = 0.0
        self._inflight = False
        self._dirty = True
        self._send_table()

    def _send_table(self) -> None:
        if self._control is None or not self._hello or self._inflight or not self._dirty:
            return
        self.seq += 1
        self._inflight, self._dirty = True, False
        self._control.send(pp.Table(self.seq, self.owners, self.close_delay))

    # -- supervision ------------------------------------------------------------------------

    def _watchdog(self) -> None:
        now = self.reactor.seconds()
        late = now - self._last_watch > 2 * WATCH_PERIOD
        self._last_watch = now
        self._reap()
        if late:
            # HaloD itself was stalled (busy, SIGSTOP): the worker's messages are still
            # unread in the socket, so its silence means nothing yet.
            self._last_heard = now
            return
        if self._control is not None and now - self._last_heard > SILENCE:
            pid = self.pid if self._hello else self._pid_file()
            self.log.error("proxy worker {pid} silent for {s} s: replacing it", pid=pid,
                           s=round(now - self._last_heard, 1))  # fmt: skip
            self.error = f"worker {pid} silent for {SILENCE} s"
            self.restarts += 1
            self.state = "starting"
            conn = self._control
            self._control, self._hello = None, False
            conn.transport.abortConnection()
            if pid is not None and is_worker(pid, self.socket_path):
                self._replace(pid, kill=True)
            else:
                self._later(0.05)
