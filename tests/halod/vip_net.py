"""Two HaloD "hosts" and a client in network namespaces, for tests/halod/test_vip.py.

``Lan`` creates three namespaces on one Ethernet segment (a bridge in the client's
namespace, a veth pair to each host) and removes them — after SIGKILLing every process
left in them — at ``close()``. Hosts ``a`` (10.77.0.1) and ``b`` (10.77.0.2) each allow
binding an address they do not hold (``net.ipv4.ip_nonlocal_bind=1``, as a data plane on
the virtual address needs); the client ``c`` is 10.77.0.10.

Run as a program inside a namespace:

- ``python -m tests.halod.vip_net host NAME ADDRESS IFACE PRIORITY STATE_DIR PORT``: a
  HaloD stand-in. It runs halod.vip.VirtualAddress (router id 77) and a browser-facing
  stream on ADDRESS's IP:PORT (an HTTP response that sends ``data: NAME N`` every
  0.1 s). Commands on stdin, one a line: ``lead``, ``follow``, ``stop``; each answers
  ``ok CMD`` or ``error CMD MESSAGE`` on stdout. ``ready`` is printed once listening.
- ``python -m tests.halod.vip_net client IP PORT [SILENCE]``: a browser stand-in. It
  keeps one stream open, reconnecting 50 ms after a cut (a read silent for SILENCE s,
  default 0.6, counts as cut: its watchdog),
  and prints one JSON line per event: ``{"t", "event": "connected", "host"}`` at the
  first data of a connection, ``{"t", "event": "cut", "reason"}``. ``t`` is
  time.monotonic(), the same clock as the test's.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

VIP = "10.77.0.100/24"
HOSTS = {"a": "10.77.0.1", "b": "10.77.0.2"}
CLIENT = "10.77.0.10"
PORT = 8080
ROUTER_ID = 77


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def netns_usable() -> str | None:
    """None if this process can create network namespaces with veth pairs and a bridge,
    else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    name = f"orbprobe{uuid.uuid4().hex[:8]}"
    try:
        _ip("netns", "add", name)
    except (OSError, subprocess.SubprocessError) as e:
        return f"cannot create a network namespace: {e}"
    try:
        _ip("-n", name, "link", "add", "br0", "type", "bridge")
        _ip("-n", name, "link", "add", "x0", "type", "veth", "peer", "name", "x1")
    except (OSError, subprocess.SubprocessError) as e:
        return f"cannot create a bridge or veth pair in a namespace: {e}"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
    return None


class Lan:
    """Namespaces ``<tag>a``, ``<tag>b`` (hosts) and ``<tag>c`` (client, with the bridge)."""

    def __init__(self) -> None:
        self.tag = f"orbvip{uuid.uuid4().hex[:6]}"
        self.ns = {h: self.tag + h for h in ("a", "b", "c")}
        self.created: list[str] = []

    def iface(self, host: str) -> str:
        return f"v{host}"

    def start(self) -> None:
        for ns in self.ns.values():
            _ip("netns", "add", ns)
            self.created.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        c = self.ns["c"]
        _ip("-n", c, "link", "add", "br0", "type", "bridge")
        _ip("-n", c, "addr", "add", f"{CLIENT}/24", "dev", "br0")
        _ip("-n", c, "link", "set", "br0", "up")
        for host, ip in HOSTS.items():
            ns, iface, port = self.ns[host], self.iface(host), f"p{host}"
            _ip("-n", c, "link", "add", port, "type", "veth", "peer", "name", iface,
                "netns", ns)  # fmt: skip
            _ip("-n", c, "link", "set", port, "master", "br0")
            _ip("-n", c, "link", "set", port, "up")
            _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", iface)
            _ip("-n", ns, "link", "set", iface, "up")
            self.run(host, ["sysctl", "-qw", "net.ipv4.ip_nonlocal_bind=1"])

    def run(self, host: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.ns[host], *argv], check=True,
                              capture_output=True, text=True, timeout=10)  # fmt: skip

    def popen(self, host: str, argv: list[str], **kw: Any) -> subprocess.Popen[str]:
        return subprocess.Popen(["ip", "netns", "exec", self.ns[host], *argv], text=True,
                                **kw)  # fmt: skip

    @staticmethod
    def _ns_pids(ns: str) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                             timeout=10).stdout  # fmt: skip
        return [int(p) for p in out.split()]

    def pids(self, host: str) -> list[int]:
        return self._ns_pids(self.ns[host])

    def kill_all(self, host: str) -> list[int]:
        """SIGKILL every process in ``host``'s namespace (all started by this test)."""
        pids = self.pids(host)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    def addresses(self, host: str) -> list[str]:
        out = self.run(host, ["ip", "-4", "-o", "addr", "show", "dev", self.iface(host)]).stdout
        return [line.split()[3] for line in out.splitlines()]

    def state(self) -> str:
        """For failure messages: the hosts' addresses and the client's neighbours."""
        lines = [f"{h}: {' '.join(self.addresses(h))}" for h in HOSTS]
        for h in HOSTS:
            link = self.run(h, ["ip", "-br", "link", "show", "dev", self.iface(h)]).stdout
            lines.append(f"{h} link: {link.strip()}")
        lines.append("c neighbours: " + self.run("c", ["ip", "neigh"]).stdout.strip())
        return "\n".join(lines)

    def close(self) -> None:
        for ns in self.created:
            for pid in self._ns_pids(ns):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 5
        for ns in self.created:
            while self._ns_pids(ns) and time.monotonic() < deadline:
                time.sleep(0.05)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        self.created = []


@contextmanager
def lan() -> Iterator[Lan]:
    net = Lan()
    try:
        net.start()
        yield net
    finally:
        net.close()


# -- the programs run inside the namespaces ----------------------------------------------


def host_main(name: str, address: str, iface: str, priority: int, state_dir: str,
              port: int) -> None:  # fmt: skip
    from twisted.internet import reactor, stdio, task
    from twisted.internet.protocol import Factory, Protocol
    from twisted.protocols.basic import LineReceiver

    from halod.vip import VipSettings, VirtualAddress

    settings = VipSettings(address=address, interface=iface, router_id=ROUTER_ID,
                           priority=priority, state_dir=state_dir)  # fmt: skip
    vip = VirtualAddress(settings, reactor)
    streams: set[Protocol] = set()

    class Stream(Protocol):
        started = False

        def dataReceived(self, data: bytes) -> None:  # noqa: N802
            if not self.started:
                self.started = True
                assert self.transport is not None
                self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                                     b"cache-control: no-store\r\n\r\n")  # fmt: skip
                streams.add(self)

        def connectionLost(self, reason: object = None) -> None:  # noqa: N802
            streams.discard(self)

    counter = iter(range(10**9))

    def tick() -> None:
        line = f"data: {name} {next(counter)}\n\n".encode()
        for s in list(streams):
            if s.transport is not None:
                s.transport.write(line)

    task.LoopingCall(tick).start(0.1)

    class Commands(LineReceiver):
        delimiter = b"\n"

        def lineReceived(self, line: bytes) -> None:  # noqa: N802
            cmd = line.decode().strip()
            actions = {"lead": vip.lead, "follow": vip.follow, "stop": vip.stop}
            if cmd not in actions:
                self.sendLine(f"error {cmd} unknown command".encode())
                return
            d = actions[cmd]()
            d.addCallbacks(lambda _: self.sendLine(f"ok {cmd}".encode()),
                           lambda f: self.sendLine(f"error {cmd} {f.getErrorMessage()}"
                                                   .encode()))  # fmt: skip

    ip = address.split("/")[0]
    factory: Any = Factory.forProtocol(Stream)
    reactor.listenTCP(port, factory, interface=ip)
    stdio.StandardIO(Commands())
    print("ready", flush=True)
    reactor.run()


def client_main(ip: str, port: int, silence: float = 0.6) -> None:
    def emit(**kw: Any) -> None:
        print(json.dumps({"t": time.monotonic(), **kw}), flush=True)

    while True:
        try:
            s = socket.create_connection((ip, port), timeout=0.3)
        except OSError as e:
            time.sleep(0.05)
            last = f"connect: {e}"
            continue
        s.settimeout(silence)
        connected = False
        buf = b""
        try:
            s.sendall(b"GET /stream HTTP/1.1\r\nHost: vip\r\n\r\n")
            while True:
                data = s.recv(4096)
                if not data:
                    raise ConnectionError("closed by the server")
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.startswith(b"data: ") and not connected:
                        connected = True
                        emit(event="connected", host=line.split()[1].decode())
        except OSError as e:
            last = f"{type(e).__name__}: {e}"
            if connected:
                emit(event="cut", reason=last)
        finally:
            s.close()
        time.sleep(0.05)


if __name__ == "__main__":
    if sys.argv[1] == "host":
        n, a, i, p, d, port = sys.argv[2:8]
        host_main(n, a, i, int(p), d, int(port))
    elif sys.argv[1] == "client":
        client_main(sys.argv[2], int(sys.argv[3]), *map(float, sys.argv[4:5]))
    else:
        raise SystemExit(f"usage: {sys.argv[0]} host|client ...")
