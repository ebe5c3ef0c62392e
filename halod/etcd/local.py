"""Run a local etcd cluster on loopback: 3 members (by default) of Debian's ``etcd-server``
(/usr/bin/etcd) on free 127.0.0.1 ports, each with its own data directory.

For tests (tests/etcd_cluster.py), the benchmark (bench/store.py) and local HA runs; not
for production, where etcd is the operator's (docs/halod.md, "Store: SQLite or etcd").
Election timings are short (heartbeat 50 ms, election 500 ms; the HA tests pass 25/250)
so the loss of a member is settled quickly; ``kill(i)`` SIGKILLs one member, ``stop()``
all, leaving nothing behind; a member also dies with the process that started it.
"""

from __future__ import annotations

import ctypes
import http.client
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from halod.etcd import wire

ETCD = "/usr/bin/etcd"


def _die_with_parent() -> None:
    """In the child: SIGKILL when the process that started it dies (Linux), so a killed
    test run or bench leaves no etcd behind."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1 (held open together while chosen)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_file: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class EtcdCluster:
    """``size`` members under ``base`` (data dirs ``m<i>.etcd``, logs ``m<i>.log``)."""

    def __init__(self, base: Path, size: int = 3, etcd: str = ETCD,
                 heartbeat_ms: int = 50, election_ms: int = 500) -> None:  # fmt: skip
        self.etcd = etcd
        self.heartbeat_ms, self.election_ms = heartbeat_ms, election_ms  # etcd's raft timing
        ports = free_ports(2 * size)
        self.token = f"orbited-local-{os.getpid()}-{ports[0]}"
        self.members = [
            Member(f"m{i}", ports[2 * i], ports[2 * i + 1], base / f"m{i}.etcd", base / f"m{i}.log")
            for i in range(size)
        ]

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def start(self, timeout: float = 20.0) -> None:
        initial = ",".join(f"{m.name}=http://127.0.0.1:{m.peer_port}" for m in self.members)
        for m in self.members:
            self._spawn(m, initial)
        deadline = time.monotonic() + timeout
        for m in self.members:
            while not self.healthy(m):
                if not m.alive() or time.monotonic() > deadline:
                    self.stop()
                    log = m.log_file.read_text(errors="replace")[-4000:]
                    raise RuntimeError(f"etcd {m.name} did not start:\n{log}")
                time.sleep(0.05)

    def _spawn(self, m: Member, initial: str) -> None:
        cmd = [
            self.etcd, "--name", m.name, "--data-dir", str(m.data_dir),
            "--listen-client-urls", m.endpoint, "--advertise-client-urls", m.endpoint,
            "--listen-peer-urls", f"http://127.0.0.1:{m.peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{m.peer_port}",
            "--initial-cluster", initial, "--initial-cluster-state", "new",
            "--initial-cluster-token", self.token,
            "--heartbeat-interval", str(self.heartbeat_ms),
            "--election-timeout", str(self.election_ms),
            "--logger", "zap", "--log-outputs", "stderr",
        ]  # fmt: skip
        log = m.log_file.open("ab")
        # A session of its own: a Ctrl-C at the terminal (SIGINT to the foreground process
        # group) must not reach the members; whoever started them stops them, last
        # (orbited cluster --ha: after the HaloDs, which revoke their leases first).
        m.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True,
                                  preexec_fn=_die_with_parent)  # fmt: skip
        log.close()

    @staticmethod
    def healthy(m: Member) -> bool:
        try:
            with urllib.request.urlopen(m.endpoint + "/health", timeout=1) as r:
                return bool(json.loads(r.read()).get("health") == "true")
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def kill(self, index: int) -> None:
        """SIGKILL one member and reap it."""
        m = self.members[index]
        if m.proc is not None and m.proc.poll() is None:
            m.proc.send_signal(signal.SIGKILL)
            m.proc.wait(10)

    def stop(self) -> None:
        for i in range(len(self.members)):
            self.kill(i)

    def history(self, key_prefix: bytes) -> list[dict[str, Any]]:
        """Every change ever made under ``key_prefix``, oldest first, read from etcd's own
        revision history (a watch from revision 1 through a live member): dicts with
        ``type`` ("PUT"/"DELETE"), ``key``, ``value``, ``revision``, ``lease``."""
        m = next(m for m in self.members if m.alive())
        body = wire.watch_request(key_prefix, wire.prefix_end(key_prefix), 1)
        # etcd sends the whole history at once; the stream then stays open for new changes,
        # so reading stops at the first second of silence.
        conn = http.client.HTTPConnection("127.0.0.1", m.client_port, timeout=1.0)
        changes: list[dict[str, Any]] = []
        try:
            conn.request("POST", "/v3/watch", json.dumps(body),
                         {"content-type": "application/json"})  # fmt: skip
            response = conn.getresponse()
            while True:
                try:
                    line = response.readline()
                except TimeoutError:
                    break
                if not line:
                    break
                for e in wire.decode_watch(json.loads(line)).events:
                    changes.append({"type": e.type.value, "key": e.kv.key, "value": e.kv.value,
                                    "revision": e.kv.mod_revision,
                                    "lease": e.kv.lease})  # fmt: skip
        finally:
            conn.close()
        return changes

    @staticmethod
    def _post(m: Member, path: str, body: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(m.endpoint + path, json.dumps(body).encode(), method="POST",
                                     headers={"content-type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=5) as r:
            reply: dict[str, Any] = json.loads(r.read())
            return reply
