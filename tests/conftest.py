"""Shared fixtures: real node processes, the real nng (pynng) as the web app, real clients."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pynng
import pytest
from websockets.sync.client import ClientConnection, connect

from orbited.keys import ConnectionKey
from orbited.tokens import issue_token

SECRET = b"test-secret-0123456789-abcdefghijklmnopqrstuvwxyz"


class NodeProcess:
    """An ``orbited node`` subprocess on loopback ports it picks itself (port 0)."""

    def __init__(self, tmp: Path, *flags: str) -> None:
        self.tmp = tmp
        self.secret_file = tmp / "secret"
        self.secret_file.write_bytes(SECRET)
        self.ready_file = tmp / f"ready-{time.monotonic_ns()}.json"
        self.log_file = tmp / "node.log"
        self.flags = flags
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, http: str = "127.0.0.1:0", sp: str = "tcp://127.0.0.1:0") -> NodeProcess:
        self.ready_file.unlink(missing_ok=True)
        log = self.log_file.open("ab")
        cmd = [
            sys.executable, "-m", "orbited.cli", "node",
            "--http", http, "--sp", sp,
            "--secret-file", str(self.secret_file), "--no-create-secret",
            "--ready-file", str(self.ready_file), *self.flags,
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while not self.ready_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"node did not start:\n{self.log_file.read_text()}")
            time.sleep(0.02)
        ready = json.loads(self.ready_file.read_text())
        self.http, self.sp, self.epoch = ready["http"], ready["sp"], ready["epoch"]
        self.publish = ready.get("publish")
        self.orbit = ready.get("orbit")
        return self

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
