"""Every server of the side-by-side benchmarks: start, stop, sample, subscribe, publish.

Owns launching Orbited (one node; or ``orbited node --workers 2`` behind HaloD), the raw
floor (bench/raw_server.py: the node's socket path without Orbited's work), Nchan (nginx
+ libnginx-mod-nchan) and Pushpin (condure, zurl, pushpin-proxy, pushpin-handler and the
GRIP backend bench/grip_backend.py) on loopback, each in a temporary directory of its
own, and the publish side of each: how a publisher process sends a batch of distinct
events to individual clients.

Interface (stable; scenarios build on it)::

    server = make_server("nchan", workdir)      # SERVERS: orbited, orbited2, raw, nchan,
    with server:                                # nchan2, pushpin, orbited-off/-trace/-otel
                                                # (tracing variants); start() on enter, stop()
        server.transports                       # subset of ("ws", "sse", "poll")
        server.url("c17", "sse")                # subscribe URL of client "c17"
        server.flavour                          # wire dialect: orbited | raw | nchan | pushpin
        server.pids()                           # top pids; usage() adds their descendants
        server.connect_rate                     # connects/s it takes (Pushpin: 400)
        usage(server.pids())                    # Usage(cpu_s, rss_kb, processes)
        spec = server.publish_spec("sse")       # JSON-able, for another process:
    pub = make_publisher(spec)                  # in the publisher process (asyncio)
    await pub.publish([("c17", '{"t":1.5}'), ...])  # → Published(ok, failed)
    await pub.close()
    server.settings                             # every non-default setting, documented
    exit_on_signals()                           # SIGTERM/SIGHUP stop servers like Ctrl-C

- ``start()`` waits until the server really answers (ready file, or a subscribe/publish
  round trip on its ports) and raises ``PeerError`` with its log tail otherwise.
- ``stop()`` ends the whole process tree it started (each child leads its own process
  group; SIGTERM, then SIGKILL after 5 s; PR_SET_PDEATHSIG so that children die with us
  even when we are SIGKILLed), also on Ctrl-C (context manager) and at exit (atexit).
- Clients are named by strings ``[A-Za-z0-9_]``; the client's key / channel is that name:
  Orbited ``(name, "b", "/bench")``, Nchan channel ``name``, Pushpin channel ``name``.
- An event's data is a JSON text (str); every server delivers it unchanged (Orbited
  inside its ``event`` frame, the raw baseline inside ``{"type":"event","data":…}``).

Fairness (bench/README.md, "dispatch", lists all of these): Orbited is one process = one
core, so ``nchan`` runs ``worker_processes 1`` and ``orbited2`` (two workers) compares with
``nchan2`` (2 workers); Pushpin is several processes by design and is measured whole.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httptools

from orbited.core.hashing import route_of
from orbited.core.keys import ConnectionKey
from orbited.core.routes import DEFAULT_ROUTES
from orbited.core.tokens import issue_token
from orbited.sp import wire
from orbited.sp.reqrep import RequestIds

SECRET = b"bench-secret-bench-secret-bench-secret!"
SESSION, LOCATION = "b", "/bench"
RAW_OK = b'{"ok":true}'  # bench/raw_server.py's reply
CLK_TCK = os.sysconf("SC_CLK_TCK")
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
NCHAN_MODULE = "/usr/lib/nginx/modules/ngx_nchan_module.so"
PUSHPIN = shutil.which("pushpin") or "/usr/bin/pushpin"
FD_LIMIT = 20_000  # this box's hard limit per process (ulimit -Hn)


class PeerError(RuntimeError):
    pass


def available(name: str) -> bool:
    """Whether the binaries a server needs are installed (tests skip the others)."""
    if name.startswith("nchan"):
        return os.path.exists(NGINX) and os.path.exists(NCHAN_MODULE)
    if name == "pushpin":
        return all(shutil.which(b) for b in ("pushpin", "condure", "zurl", "pushpin-handler"))
    if name == "orbited-otel":  # the otel extra (pip install 'orbited[otel]')
        return importlib.util.find_spec("opentelemetry.sdk") is not None
    return True


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct free ports: held open together while they are picked (ports
    picked one after another, each closed at once, can repeat: Pushpin's handler once
    got condure's port and exited, "unable to bind")."""
    with contextlib.ExitStack() as stack:
        held = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in held:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in held]


# -- CPU and memory of a process tree ------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    cpu_s: float  # utime+stime of the live processes (and their reaped children)
    rss_kb: int
    processes: int


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def descendants(pids: list[int]) -> list[int]:
    """``pids`` and every process below them."""
    tree = _children()
    out, todo = [], list(pids)
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += tree.get(pid, [])
    return out


def usage(pids: list[int]) -> Usage:
    """CPU seconds (utime+stime+cutime+cstime) and RSS of ``pids`` and their descendants."""
    cpu, rss, n = 0.0, 0, 0
    for pid in descendants(pids):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue  # gone in between
        cpu += sum(int(f) for f in fields[11:15]) / CLK_TCK
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1])
        n += 1
    return Usage(cpu, rss, n)


# -- children ------------------------------------------------------------------------------


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


_LIVE: set[Server] = set()


@atexit.register
def _stop_all() -> None:
    for server in list(_LIVE):
        server.stop()


def exit_on_signals() -> None:
    """SIGTERM/SIGHUP raise SystemExit in the main thread, so ``with`` blocks and atexit
    stop every server; SIGINT raises KeyboardInterrupt even where it was inherited ignored."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)
    # A process started in the background by a non-interactive shell inherits SIGINT
    # ignored (POSIX), and Python then installs no KeyboardInterrupt: restore it.
    signal.signal(signal.SIGINT, signal.default_int_handler)


class Child:
    """A process in its own process group, output to a log file."""

    def __init__(self, name: str, cmd: list[str], log: Path, env: dict | None = None) -> None:
        self.name, self.log = name, log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=env, start_new_session=True, preexec_fn=_die_with_parent,
            )  # fmt: skip

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            text = []
        return "\n".join(f"  {self.name}| {line}" for line in text)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the process group, SIGKILL what is left after ``timeout``."""
        pgid = self.proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        # workers of a stopped master (nginx) or a runner's services can outlive it briefly
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _group_running(pgid):
                break
            time.sleep(0.05)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout)


def _group_running(pgid: int) -> bool:
    """Whether a process of group ``pgid`` is still running: zombies (orphaned workers
    that this container's init has not reaped yet) answer kill(0) but do not count."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def _wait(predicate: Any, what: str, children: list[Child], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, ValueError, KeyError):
            result = predicate()
            if result:
                return result
        for child in children:
            if not child.alive():
                raise PeerError(f"{child.name} exited while starting:\n{child.tail()}")
        if time.monotonic() > deadline:
            tails = "\n".join(c.tail() for c in children)
            raise PeerError(f"timed out waiting for {what}\n{tails}")
        time.sleep(0.05)


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


# -- servers -------------------------------------------------------------------------------


class Server:
    """One server under test; subclasses fill in start/url/publish_spec."""

    name = ""
    flavour = ""
    transports: tuple[str, ...] = ("ws", "sse", "poll")
    connect_rate = 4000  # new connections/s the server takes without refusing (all clients)
    settings: dict[str, str] = {}  # non-default settings, name → value and why

    def __init__(self, workdir: Path) -> None:
        self.dir = Path(workdir) / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.children: list[Child] = []

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def spawn(self, name: str, cmd: list[str], env: dict | None = None) -> Child:
        _LIVE.add(self)
        child = Child(name, cmd, self.dir / f"{name}.log", env)
        self.children.append(child)
        return child

    def start(self, timeout: float = 30.0) -> None:
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()
        self.children = []
        _LIVE.discard(self)

    def pids(self) -> list[int]:
        """The server's own processes (not the GRIP backend: the web app, as for Orbited)."""
        return [c.proc.pid for c in self.children if c.alive()]

    def url(self, client: str, transport: str) -> str:
        raise NotImplementedError

    def publish_spec(self, transport: str) -> dict[str, Any]:
        raise NotImplementedError


def _py(*args: str) -> list[str]:
    return [sys.executable, *os.environ.get("BENCH_PY_ARGS", "").split(), *args]


class Orbited(Server):
    """One ``orbited node`` (one process, one core)."""

    name, flavour = "orbited", "orbited"
    settings = {
        "--keepalive 600": "no ping frames during a run",
        "--log-level warn": "no per-connection info lines",
    }

    def _node(self, tag: str, extra: list[str]) -> Child:
        secret = self.dir / "secret"
        secret.write_bytes(SECRET)
        ready = self.dir / f"{tag}.ready"
        ready.unlink(missing_ok=True)
        return self.spawn(tag, _py(
            "-m", "orbited.cli", "node", "--name", tag, "--http", "127.0.0.1:0",
            "--sp", "tcp://127.0.0.1:0", "--secret-file", str(secret), "--keepalive", "600",
            "--log-level", "warn", "--ready-file", str(ready), *extra,
        ))  # fmt: skip

    node_flags: tuple[str, ...] = ()  # variants (bench tracecost): extra node flags

    def _start(self, timeout: float) -> None:
        node = self._node("node", list(self.node_flags))
        info = _wait(lambda: _read_json(self.dir / "node.ready"), "the node", [node], timeout)
        self.http, self.sp = info["http"], info["sp"]

    def _http_of(self, client: str) -> str:
        return self.http

    def url(self, client: str, transport: str) -> str:
        token = issue_token(SECRET, ConnectionKey(client, SESSION, LOCATION), ttl=7 * 86400)
        scheme = "ws" if transport == "ws" else "http"
        return f"{scheme}://{self._http_of(client)}/orbited/{transport}?token={token}"

    def publish_spec(self, transport: str) -> dict[str, Any]:
        return {"kind": "orbited", "routes": 1, "sp": {"1": self.sp}}


class OrbitedTraceOff(Orbited):
    """``orbited`` with per-key tracing off, said explicitly (bench tracecost's baseline
    whatever the default mode is)."""

    name = "orbited-off"
    node_flags = ("--trace", "off")
    settings = Orbited.settings | {"--trace off": "the baseline of bench tracecost"}


class OrbitedTrace(Orbited):
    """One ``orbited node`` with per-key delivery tracing of every key (bench tracecost)."""

    name = "orbited-trace"
    node_flags = ("--trace", "all")
    settings = Orbited.settings | {"--trace all": "every key traced (the variant measured)"}


class OrbitedOtel(Orbited):
    """Tracing and OpenTelemetry spans for every request, sampled 100 %, to an exporter
    that discards them (bench tracecost; needs the ``otel`` extra)."""

    name = "orbited-otel"
    config = 'otel = true\notel_sample = 1.0\notel_exporter = "discard"\n'
    settings = Orbited.settings | {
        "--trace all, otel = true, otel_sample = 1.0, otel_exporter = discard": (
            "every request traced and sampled; spans built and discarded (no collector)"
        ),
    }

    def _start(self, timeout: float) -> None:
        path = self.dir / "node.toml"
        path.write_text("[node]\n" + self.config)
        self.node_flags = ("--trace", "all", "--config", str(path))
        super()._start(timeout)


class OrbitedHaloD(Orbited):
    """``orbited node --workers 2`` behind HaloD: two node processes (one per core), each
    its own HaloD member (``--dataplane none``: browsers and web apps reach a route's
    owner directly, as with an external data plane; HaloD's built-in proxy would put a
    third Python process in the data path)."""

    name = "orbited2"
    routes = DEFAULT_ROUTES
    workers = 2
    settings = Orbited.settings | {
        f"halod --dataplane none --spares 0 --routes {DEFAULT_ROUTES}": (
            "no proxy hop; both workers active"
        ),
        "orbited node --workers 2 (orbited2)": "one node process per core, as nchan2",
    }

    def _start(self, timeout: float) -> None:
        ready = self.dir / "halod.ready"
        ready.unlink(missing_ok=True)
        halod = self.spawn("halod", _py(
            "-m", "halod.cli", "run", "--db", str(self.dir / "halod.sqlite3"),
            "--control", "tcp://127.0.0.1:0", "--status-http", "127.0.0.1:0",
            "--routes", str(self.routes), "--spares", "0", "--dataplane", "none",
            "--log-level", "warn", "--ready-file", str(ready),
        ))  # fmt: skip
        for name in ("halod.sqlite3", "halod.sqlite3-wal", "halod.sqlite3-shm"):
            (self.dir / name).unlink(missing_ok=True)
        info = _wait(lambda: _read_json(ready), "HaloD", [halod], timeout)
        status = f"http://{info['status']}/routes"
        nodes = [halod, self._node("n", ["--halod", info["control"],
                                         "--workers", str(self.workers)])]  # fmt: skip
        _wait(lambda: _read_json(self.dir / "n.ready"), "the workers", nodes, timeout)
        wanted = {f"n-{i}" for i in range(self.workers)}

        def table() -> dict | None:
            with urllib.request.urlopen(status, timeout=2) as r:
                owners = json.loads(r.read())["owners"]
            names = {o["name"] for o in owners.values() if o}
            return owners if names == wanted and all(owners.values()) else None

        owners = _wait(table, "HaloD to give routes to both nodes", nodes, timeout)
        self.owners = {int(r): (o["browser"], o["sp"]) for r, o in owners.items()}

    def pids(self) -> list[int]:
        # HaloD is off the data path (no data plane): the worker parent and its workers
        return [c.proc.pid for c in self.children if c.alive() and c.name != "halod"]

    def _http_of(self, client: str) -> str:
        browser = self.owners[route_of(ConnectionKey(client, SESSION, LOCATION), self.routes)][0]
        return browser.split("://", 1)[-1]

    def publish_spec(self, transport: str) -> dict[str, Any]:
        return {
            "kind": "orbited",
            "routes": self.routes,
            "sp": {str(r): sp for r, (_, sp) in self.owners.items()},
        }


class Raw(Server):
    """bench/raw_server.py, the floor: the node's socket path (accept loop, llhttp, 101,
    write-through, SP REP server), none of Orbited's work."""

    name, flavour, transports = "raw", "raw", ("ws",)

    def _start(self, timeout: float) -> None:
        ready = self.dir / "raw.ready"
        ready.unlink(missing_ok=True)
        child = self.spawn("raw", _py("-m", "bench.raw_server", str(ready)))
        info = _wait(lambda: _read_json(ready), "the raw server", [child], timeout)
        self.http, self.sp = info["http"], info["sp"]

    def url(self, client: str, transport: str) -> str:
        return f"ws://{self.http}/?u={client}"

    def publish_spec(self, transport: str) -> dict[str, Any]:
        return {"kind": "orbited", "routes": 1, "sp": {"1": self.sp}}


NCHAN_CONF = """\
load_module {module};
worker_processes {workers};
worker_rlimit_nofile {fds};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections {conns}; multi_accept on; }}
http {{
  access_log off;
  client_body_temp_path {dir}/tmp/body;
  proxy_temp_path {dir}/tmp/proxy;
  fastcgi_temp_path {dir}/tmp/fastcgi;
  uwsgi_temp_path {dir}/tmp/uwsgi;
  scgi_temp_path {dir}/tmp/scgi;
  keepalive_requests 1000000;
  keepalive_timeout 600s;
  nchan_shared_memory_size {shm};
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location ~ ^/pub/(\\w+)$ {{
      nchan_publisher; nchan_channel_id $1;
      nchan_message_buffer_length 50; nchan_message_timeout 5m;
    }}
    location ~ ^/sub/(\\w+)$ {{
      nchan_subscriber; nchan_channel_id $1;
      nchan_subscriber_first_message newest; nchan_websocket_ping_interval 600;
    }}
    location = /nchan_stub_status {{ nchan_stub_status; }}
  }}
}}
"""


class Nchan(Server):
    """nginx + Nchan, ``worker_processes 1`` (one core, as one Orbited node)."""

    name, flavour, workers = "nchan", "nchan", 1
    settings = {
        "worker_processes 1 (nchan) / 2 (nchan2)": "one core per Orbited node",
        "worker_rlimit_nofile 20000, worker_connections 40000": (
            "19 000 clients: Nchan takes connection slots beyond the fds (at 19500 nginx "
            "logged 'worker_connections are not enough, reusing connections' at 18 339 fds)"
        ),
        "listen backlog=4096, multi_accept on": "connect bursts",
        "keepalive_requests 1000000, keepalive_timeout 600s": "publishers keep connections",
        "nchan_shared_memory_size 256M": "10 000 channels with buffered messages",
        "nchan_message_buffer_length 50, nchan_message_timeout 5m": "peers.md's settings",
        "nchan_subscriber_first_message newest": "peers.md's setting",
        "nchan_websocket_ping_interval 600": "no pings during a run (as Orbited)",
        "access_log off, error_log warn": "no per-request log writes",
    }

    def _start(self, timeout: float) -> None:
        (self.dir / "tmp").mkdir(exist_ok=True)
        self.port = free_port()
        conf = self.dir / "nginx.conf"
        conf.write_text(NCHAN_CONF.format(
            module=NCHAN_MODULE, workers=self.workers, fds=FD_LIMIT, conns=2 * FD_LIMIT,
            dir=self.dir, shm="256M", port=self.port,
        ))  # fmt: skip
        child = self.spawn("nginx", [NGINX, "-c", str(conf), "-p", f"{self.dir}/",
                                     "-g", "daemon off;"])  # fmt: skip
        base = f"http://127.0.0.1:{self.port}"
        _wait(lambda: urllib.request.urlopen(f"{base}/nchan_stub_status", timeout=1).status
              == 200, "nginx", [child], timeout)  # fmt: skip
        _wait(lambda: len(descendants([child.proc.pid])) > self.workers, "workers", [child], 10)

    def url(self, client: str, transport: str) -> str:
        scheme = "ws" if transport == "ws" else "http"
        return f"{scheme}://127.0.0.1:{self.port}/sub/{client}"

    def publish_spec(self, transport: str) -> dict[str, Any]:
        return {"kind": "nchan", "address": ["127.0.0.1", self.port]}


class Nchan2(Nchan):
    name, workers = "nchan2", 2


PUSHPIN_CONF = """\
[global]
include={{libdir}}/internal.conf
rundir={rundir}
ipc_prefix=bench-
port_offset=0
stats_connection_ttl=120
[runner]
services=condure,zurl,pushpin-proxy,pushpin-handler
http_port=127.0.0.1:{http_port}
logdir={dir}/log
log_level=2
client_buffer_size=8192
client_maxconn={maxconn}
condure_bin=condure
zurl_bin=zurl
[proxy]
routesfile={dir}/routes
debug=false
auto_cross_origin=false
sig_iss=pushpin
sig_key=changeme
updates_check=off
zurl_out_specs=ipc://{{rundir}}/{{ipc_prefix}}zurl-in
zurl_out_stream_specs=ipc://{{rundir}}/{{ipc_prefix}}zurl-in-stream
zurl_in_specs=ipc://{{rundir}}/{{ipc_prefix}}zurl-out
[handler]
push_in_spec=tcp://127.0.0.1:{push_in}
push_in_sub_specs=tcp://127.0.0.1:{push_sub}
push_in_sub_connect=false
push_in_http_addr=127.0.0.1
push_in_http_port={push_http}
push_in_http_max_headers_size=10000
push_in_http_max_body_size={max_body}
stats_spec=ipc://{{rundir}}/{{ipc_prefix}}stats
command_spec=tcp://127.0.0.1:{command}
message_rate={message_rate}
message_hwm={message_hwm}
message_wait=5000
id_cache_ttl=60
connection_subscription_max=20
subscription_linger=60
stats_subscription_ttl=60
stats_report_interval=10
stats_format=tnetstring
"""


class Pushpin(Server):
    """Pushpin's runner (condure, zurl, pushpin-proxy, pushpin-handler) in front of
    bench/grip_backend.py. WebSocket is WebSocket-over-HTTP (``over_http`` route). No
    long-poll: a held GRIP response has no buffer between polls (events are lost)."""

    name, flavour, transports = "pushpin", "pushpin", ("ws", "sse")
    connect_rate = 400  # bursts over ≈ 400/s get 502s from zurl (seen here)
    message_rate = 1_000_000
    message_hwm = 1_000_000
    max_body = 4_000_000
    settings = {
        "services=condure,zurl,pushpin-proxy,pushpin-handler": "zurl is needed to proxy",
        "client_maxconn=50000": "10 000+ clients (the Debian default config's value)",
        f"message_rate={message_rate}, message_hwm={message_hwm}": (
            "defaults 2500/s and 25000 drop silently above them"
        ),
        f"push_in_http_max_body_size={max_body}": "many items per POST /publish/",
        "routes: * 127.0.0.1:<backend>,over_http": "WebSocket-over-HTTP to the GRIP backend",
    }

    def _start(self, timeout: float) -> None:
        backend_ready = self.dir / "grip.ready"
        backend_ready.unlink(missing_ok=True)
        backend = self.spawn("grip_backend", _py("-m", "bench.grip_backend", "127.0.0.1:0",
                                                 str(backend_ready)))  # fmt: skip
        info = _wait(lambda: _read_json(backend_ready), "the GRIP backend", [backend], timeout)
        self.backend_pid = info["pid"]
        # ZeroMQ ipc:// paths must fit a Unix socket address (108 bytes): a short rundir
        self.rundir: Path | None = Path(tempfile.mkdtemp(prefix="pp-", dir="/tmp"))
        (self.dir / "log").mkdir(exist_ok=True)
        (self.dir / "routes").write_text(f"* 127.0.0.1:{info['port']},over_http\n")
        self.http_port, self.push_http, push_in, push_sub, command = free_ports(5)
        conf = self.dir / "pushpin.conf"
        conf.write_text(PUSHPIN_CONF.format(
            dir=self.dir, rundir=self.rundir, http_port=self.http_port, maxconn=50_000,
            push_in=push_in, push_sub=push_sub, push_http=self.push_http, command=command,
            max_body=self.max_body, message_rate=self.message_rate,
            message_hwm=self.message_hwm,
        ))  # fmt: skip
        runner = self.spawn("pushpin", [PUSHPIN, "--config", str(conf), "--merge-output"])
        children = [backend, runner]
        # ready = a held stream through the proxy receives a published message
        _wait(lambda: self._round_trip(), "Pushpin to proxy and publish", children, timeout)

    def _round_trip(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.http_port), timeout=2) as s:
            s.sendall(b"GET /sse/ready_probe HTTP/1.1\r\nHost: x\r\n\r\n")
            head = s.recv(65536)
            if b" 200 " not in head.split(b"\r\n", 1)[0]:
                return False
            body = json.dumps({"items": [{"channel": "ready_probe", "formats": {
                "http-stream": {"content": "data: probe\n\n"}}}]}).encode()  # fmt: skip
            req = urllib.request.Request(
                f"http://127.0.0.1:{self.push_http}/publish/",
                data=body,
                method="POST",
                headers={"Content-Type": "application/json"},
            )
            end = time.monotonic() + 2
            got = head
            while b"probe" not in got and time.monotonic() < end:
                urllib.request.urlopen(req, timeout=2).read()
                s.settimeout(0.3)
                with contextlib.suppress(TimeoutError):
                    got += s.recv(65536)
            return b"probe" in got

    def stop(self) -> None:
        super().stop()
        rundir = getattr(self, "rundir", None)
        if rundir is not None:
            shutil.rmtree(rundir, ignore_errors=True)
            self.rundir = None

    def pids(self) -> list[int]:
        return [c.proc.pid for c in self.children if c.alive() and c.name != "grip_backend"]

    def url(self, client: str, transport: str) -> str:
        if transport == "ws":
            return f"ws://127.0.0.1:{self.http_port}/ws/{client}"
        return f"http://127.0.0.1:{self.http_port}/{transport}/{client}"

    def publish_spec(self, transport: str) -> dict[str, Any]:
        return {"kind": "pushpin", "address": ["127.0.0.1", self.push_http],
                "transport": transport}  # fmt: skip


_CLASSES: tuple[type[Server], ...] = (Orbited, OrbitedHaloD, Raw, Nchan, Nchan2, Pushpin)
_CLASSES += (OrbitedTraceOff, OrbitedTrace, OrbitedOtel)  # bench tracecost
SERVERS: dict[str, type[Server]] = {cls.name: cls for cls in _CLASSES}


def make_server(name: str, workdir: Path) -> Server:
    if name not in SERVERS:
        raise PeerError(f"unknown server {name!r} (one of {', '.join(SERVERS)})")
    return SERVERS[name](workdir)


# -- publishers (run in the publisher processes, on asyncio) -------------------------------


@dataclass
class Published:
    ok: int = 0  # accepted for a connected client (Orbited: "delivered"; Nchan: 201)
    failed: int = 0  # refused, no subscriber, or the connection failed


class Publisher:
    async def publish(self, events: list[tuple[str, str]]) -> Published:
        """Send each (client, data JSON) as a distinct event to that client alone."""
        raise NotImplementedError

    async def close(self) -> None:
        pass


class _SPBatch:
    """The requests of one ``send_all``: their replies, in order, and how many are due."""

    __slots__ = ("replies", "left", "done")

    def __init__(self, n: int, done: asyncio.Future[list[Any]]) -> None:
        self.replies: list[Any] = [None] * n
        self.left = n
        self.done = done


class _SPReq:
    """One SP REQ connection with many requests in flight (replies matched by id). A
    batch's replies are awaited as one, as ``_HTTPPipe`` awaits its pipelined responses:
    no future per request (at 60 000 events/s those were a fifth of the publisher's CPU,
    which shares the box with the server it measures)."""

    def __init__(self, address: str, window: int) -> None:
        host, port = address.removeprefix("tcp://").rsplit(":", 1)
        self.address = (host, int(port))
        self.window = window  # requests in flight at most
        self.inflight = 0
        self.room = asyncio.Event()  # set when a reply frees a place in the window
        self.ids = RequestIds()
        self.waiting: dict[int, tuple[_SPBatch, int]] = {}
        self.writer: asyncio.StreamWriter | None = None
        self.opening: asyncio.Task[None] | None = None  # one connect for concurrent sends

    async def open(self) -> None:
        try:
            reader, writer = await asyncio.open_connection(*self.address)
        finally:
            self.opening = None  # a failed connect is tried again by the next send
        writer.write(wire.encode_header(wire.REQ))
        self.reader_task = asyncio.create_task(self._read(reader))
        self.writer = writer

    async def _read(self, reader: asyncio.StreamReader) -> None:
        sp = wire.SPConnection(wire.REQ, wire.REP, max_message=64 << 20)
        waiting = self.waiting
        try:
            while data := await reader.read(1 << 18):
                for reply in sp.receive(data):
                    entry = waiting.pop(int.from_bytes(reply[:4], "big"), None)
                    if entry is None:
                        continue
                    batch, i = entry
                    batch.replies[i] = reply[4:]
                    batch.left -= 1
                    self.inflight -= 1
                    if not batch.left and not batch.done.done():
                        batch.done.set_result(batch.replies)
                self.room.set()
        finally:
            # Lost: the replies that came are kept, the others are the error; the next
            # send connects again, and sends waiting for room go on (to that connection).
            lost = ConnectionError("SP connection lost")
            for batch, _ in waiting.values():
                if not batch.done.done():
                    batch.done.set_result([lost if r is None else r for r in batch.replies])
            waiting.clear()
            self.writer, self.inflight = None, 0
            self.room.set()

    async def send_all(self, bodies: list[bytes]) -> list[bytes]:
        """Write the bodies (in pieces that fit the window), then await their replies."""
        loop = asyncio.get_running_loop()
        pending: list[asyncio.Future[list[Any]]] = []
        for start in range(0, len(bodies), self.window):
            piece = bodies[start : start + self.window]
            error: OSError | None = None
            while self.writer is None or self.inflight + len(piece) > self.window:
                if self.writer is not None:  # wait for room
                    self.room.clear()
                    await self.room.wait()
                    continue
                if self.opening is None:
                    self.opening = asyncio.ensure_future(self.open())
                try:
                    await asyncio.shield(self.opening)
                except OSError as e:  # not connected: these bodies fail, the next try again
                    error = e
                    break
            if error is not None:
                failed: asyncio.Future[list[Any]] = loop.create_future()
                failed.set_result([error] * len(piece))
                pending.append(failed)
                continue
            assert self.writer is not None
            batch = _SPBatch(len(piece), loop.create_future())
            chunk = []
            for i, body in enumerate(piece):
                request_id = self.ids.next()
                self.waiting[request_id] = (batch, i)
                chunk.append(wire.encode_message(RequestIds.encode(request_id) + body))
            self.inflight += len(piece)
            self.writer.write(b"".join(chunk))
            pending.append(batch.done)
        replies: list[Any] = []
        for done in pending:
            replies += await done
        return replies

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader_task.cancel()


class OrbitedPublisher(Publisher):
    """SP REQ to each route's node, ``connections`` connections in all (8, as many as
    Nchan's publisher pipelines over; at least one per node), each batch on the next
    connection of each node in turn, a batch's requests for a node written together
    (batching per route), one event per request (1:1). One connection was the bench's
    limit, not the node's: a connection holds ≤ ``window`` unanswered requests (the
    node's own ``sp_max_inflight`` is 1024), so a single one stalled the publisher."""

    def __init__(self, spec: dict[str, Any], window: int = 1000, connections: int = 8) -> None:
        self.routes = spec["routes"]
        nodes = sorted(set(spec["sp"].values()))
        each = max(1, connections // len(nodes))
        self.pools = {addr: [_SPReq(addr, window) for _ in range(each)] for addr in nodes}
        self.by_route = {int(r): self.pools[a] for r, a in spec["sp"].items()}
        self.turn = 0
        self.n = 0
        self.prefix = f"p{os.getpid()}-"

    def _pool(self, client: str) -> list[_SPReq]:
        if self.routes == 1:
            return self.by_route[1]
        return self.by_route[route_of(ConnectionKey(client, SESSION, LOCATION), self.routes)]

    async def publish(self, events: list[tuple[str, str]]) -> Published:
        groups: dict[_SPReq, list[bytes]] = {}
        turn = self.turn
        self.turn += 1
        for client, data in events:
            self.n += 1
            body = f'{{"id":"{self.prefix}{self.n}","to":[["{client}","{SESSION}","{LOCATION}"]],"data":{data}}}'  # noqa: E501
            pool = self._pool(client)
            groups.setdefault(pool[turn % len(pool)], []).append(body.encode())
        out = Published()
        replies = await asyncio.gather(*(c.send_all(b) for c, b in groups.items()))
        for group in replies:
            for reply in group:
                if isinstance(reply, bytes) and (b'"seq"' in reply or reply == RAW_OK):
                    out.ok += 1
                else:
                    out.failed += 1
        return out

    async def close(self) -> None:
        for pool in self.pools.values():
            for conn in pool:
                await conn.close()


class _Statuses:
    """httptools callbacks for pipelined responses: each complete one's status code goes
    to ``out``; ``closed`` once one says the server closes the connection after it."""

    def __init__(self, out: list[int]) -> None:
        self.out = out
        self.closed = False
        self.parser = httptools.HttpResponseParser(self)

    def on_message_complete(self) -> None:
        self.out.append(self.parser.get_status_code())
        if not self.parser.should_keep_alive():
            self.closed = True


class _HTTPPipe:
    """One keep-alive HTTP/1.1 connection with pipelined requests (Content-Length or
    chunked responses); reconnects when the server closes it. The responses are read by
    httptools from what each read brings, without a wait per response (as ``_SPReq``
    takes its replies: the publishers share the box with the server they measure)."""

    def __init__(self, address: tuple[str, int], pipeline: bool = True) -> None:
        self.address = address
        self.pipeline = pipeline
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.lock = asyncio.Lock()

    async def exchange(self, requests: list[bytes]) -> list[int]:
        """Send the requests (back to back when pipelining); return their status codes
        (0 = no answer)."""
        async with self.lock:
            statuses: list[int] = []
            try:
                if self.pipeline:
                    reader, writer = await self._connection()
                    writer.write(b"".join(requests))
                    await self._responses(reader, len(requests), statuses)
                else:  # Pushpin's publish endpoint reads a pipelined request as body
                    for request in requests:
                        reader, writer = await self._connection()
                        writer.write(request)
                        await self._responses(reader, 1, statuses)
            except (ConnectionError, asyncio.IncompleteReadError, httptools.HttpParserError):
                self._drop()
            return statuses + [0] * (len(requests) - len(statuses))

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.reader is None or self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(*self.address)
        return self.reader, self.writer

    def _drop(self) -> None:
        if self.writer is not None:
            self.writer.transport.abort()
        self.reader = self.writer = None

    async def _responses(self, reader: asyncio.StreamReader, n: int, out: list[int]) -> None:
        """Read ``n`` responses' statuses into ``out`` (ConnectionError if the server
        closes first)."""
        statuses, want = _Statuses(out), len(out) + n
        while len(out) < want and not statuses.closed:
            more = await reader.read(1 << 18)
            if not more:
                raise ConnectionError("closed before the responses came")
            statuses.parser.feed_data(more)
        if statuses.closed:
            self._drop()  # Pushpin's publish endpoint closes after every answer

    async def close(self) -> None:
        self._drop()


class NchanPublisher(Publisher):
    """``POST /pub/<client>`` per event, pipelined over ``connections`` keep-alive
    connections (Nchan has no batch publish)."""

    def __init__(self, spec: dict[str, Any], connections: int = 8) -> None:
        host, port = spec["address"]
        self.host = f"{host}:{port}"
        self.pipes = [_HTTPPipe((host, port)) for _ in range(connections)]

    async def publish(self, events: list[tuple[str, str]]) -> Published:
        requests = [
            (f"POST /pub/{client} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: "
             f"application/json\r\nContent-Length: {len(data)}\r\n\r\n{data}").encode()
            for client, data in events  # data is ASCII JSON (len = bytes)
        ]  # fmt: skip
        n = len(self.pipes)
        results = await asyncio.gather(*(p.exchange(requests[i::n]) for i, p in
                                         enumerate(self.pipes) if requests[i::n]))  # fmt: skip
        statuses = [s for r in results for s in r]
        ok = sum(1 for s in statuses if s == 201)  # 202 = no subscriber on that channel
        return Published(ok, len(statuses) - ok)

    async def close(self) -> None:
        for p in self.pipes:
            await p.close()


class PushpinPublisher(Publisher):
    """``POST /publish/`` with up to ``per_request`` items, on a few keep-alive
    connections. Pushpin answers before delivering (and drops silently over its limits),
    so ``ok`` only means accepted."""

    def __init__(self, spec: dict[str, Any], connections: int = 8, per_request: int = 500) -> None:
        host, port = spec["address"]
        self.host = f"{host}:{port}"
        self.transport = spec["transport"]
        self.per_request = per_request
        self.pipes = [_HTTPPipe((host, port), pipeline=False) for _ in range(connections)]

    def _item(self, client: str, data: str) -> dict[str, Any]:
        if self.transport == "ws":
            return {"channel": client, "formats": {"ws-message": {"content": data}}}
        return {"channel": client, "formats": {"http-stream": {"content": f"data: {data}\n\n"}}}

    async def publish(self, events: list[tuple[str, str]]) -> Published:
        step = self.per_request
        bodies = [
            json.dumps({"items": [self._item(c, d) for c, d in events[i : i + step]]})
            for i in range(0, len(events), step)
        ]
        sizes = [min(step, len(events) - i) for i in range(0, len(events), step)]
        requests = [
            (f"POST /publish/ HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json"
             f"\r\nContent-Length: {len(b)}\r\n\r\n{b}").encode()
            for b in bodies
        ]  # fmt: skip
        n = len(self.pipes)
        results = await asyncio.gather(*(p.exchange(requests[i::n]) for i, p in
                                         enumerate(self.pipes) if requests[i::n]))  # fmt: skip
        out = Published()
        for i in range(n):
            if not requests[i::n]:
                continue
            for status, size in zip(results.pop(0), sizes[i::n], strict=True):
                if status == 200:
                    out.ok += size
                else:
                    out.failed += size
        return out

    async def close(self) -> None:
        for p in self.pipes:
            await p.close()


def make_publisher(spec: dict[str, Any]) -> Publisher:
    kinds = {"orbited": OrbitedPublisher, "nchan": NchanPublisher, "pushpin": PushpinPublisher}
    return kinds[spec["kind"]](spec)
