"""The built-in data plane with real processes: route ports lead to the owner, follow a
move at once, cut the moved route's open connections, refuse unowned routes; the proxy
worker keeps established connections through HaloD's SIGKILL, restart and SIGSTOP, is
re-attached, replaced when it dies or the ports change, and ends with a clean stop."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import struct
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pynng
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from orbited.client import BlockingClient, HaloDCluster
from orbited.core.hashing import route_of
from orbited.core.tokens import issue_token
from orbited.sp import wire
from tests.conftest import SECRET, HaloDProcess, keys_on_routes, moved_frame, next_frame, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def procs():
    """Processes to stop after the test: a running HaloD with SIGTERM (a clean stop of one
    with ``--proxy-on-exit stop`` ends its proxy worker: checked), the rest with SIGKILL; no
    proxy worker is left behind."""
    started = []
    yield started
    outlived = []
    for proc in reversed(started):
        clean = isinstance(proc, HaloDProcess) and proc.alive()
        if proc.alive():
            proc.stop(signal.SIGTERM if clean else signal.SIGKILL)
        pid = worker_pid(proc) if isinstance(proc, HaloDProcess) else None
        if pid is not None:  # HaloD killed last, or proxy_on_exit = keep: it forwards on
            os.kill(pid, signal.SIGKILL)
            if clean and stops_its_worker(proc):
                outlived.append(pid)
    assert not outlived, "a proxy worker outlived its HaloD's clean stop"


STOP = ("--proxy-on-exit", "stop")  # the default, keep, leaves the worker forwarding


def stops_its_worker(halod: HaloDProcess) -> bool:
    flags = list(halod.flags)
    return "--proxy-on-exit" in flags and flags[flags.index("--proxy-on-exit") + 1] == "stop"


def worker_pid(halod: HaloDProcess) -> int | None:
    """The live proxy worker of ``halod``'s state directory, if any."""
    try:
        pid = int((halod.tmp / "proxy" / "worker.pid").read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, ValueError):
        return None
    return pid if b"proxy_worker" in cmdline and state != "Z" else None


def browser(cluster, key):
    """A WebSocket to the key's route port (browser_url gives the ws:// URL)."""
    return connect(cluster.browser_url(key, SECRET), open_timeout=5, legacy=True)


def test_route_ports_follow_the_table(tmp_path, procs):
    halod = HaloDProcess(tmp_path, "--spares", "0", "--grace", "1", "--heartbeat-interval",
                         "0.2", "--move-close-delay", "1.5", *STOP, proxy=True).start()  # fmt: skip
    procs.append(halod)
    # No node yet: a route port accepts and closes.
    with socket.create_connection(("127.0.0.1", halod.browser_base), timeout=5) as s:
        assert s.recv(10) == b""
    n1 = halod.node(tmp_path, "n1")
    procs.append(n1)
    cluster = HaloDCluster("127.0.0.1", halod.sp_base, halod.browser_base)
    early, late = keys_on_routes([20], count=2)  # one route: one SP connection
    ws = browser(cluster, early)
    assert json.loads(ws.recv(timeout=5))["type"] == "hello"
    app = BlockingClient(cluster, backoff=0.3)  # keeps its SP connection through route ports open
    assert app.send([early], {"n": 1}, "e1")[early]["status"] == "delivered"
    assert json.loads(ws.recv(timeout=5))["data"] == {"n": 1}
    wait_for(  # counts come from the proxy worker, every 0.25 s
        lambda: halod.get("status")["dataplane"]["routes"][str(route_of(early))]["browser"] == 1,
        "the browser connection counted",
    )

    n2 = halod.node(tmp_path, "n2")  # takes routes 13-24
    procs.append(n2)
    assert moved_frame(next_frame(ws)) == {"type": "reconnect", "reason": "route_moved"}
    with pytest.raises(ConnectionClosed):
        ws.recv(timeout=5)
    # The same port now leads to n2, for browsers and web apps.
    again = browser(cluster, late)
    assert json.loads(again.recv(timeout=5))["type"] == "hello"
    # The app's old connection still reaches n1, which answers `moved`; the client resends
    # through the route port once the data plane has cut that connection (1.5 s after the
    # move; the client's resends span 0.3 + 0.6 + 1.2 s).
    assert app.send([late], {"n": 2}, "e2")[late]["status"] == "delivered"
    assert json.loads(again.recv(timeout=5))["data"] == {"n": 2}
    app.close()
    again.close()


def test_moved_route_connections_are_cut_even_if_the_old_node_is_silent(tmp_path, procs):
    halod = HaloDProcess(tmp_path, "--spares", "1", "--grace", "0.5", "--heartbeat-interval",
                         "0.1", "--move-close-delay", "0.2", *STOP, proxy=True).start()  # fmt: skip
    procs.append(halod)
    n1 = halod.node(tmp_path, "n1")
    spare = halod.node(tmp_path, "spare")
    procs += [n1, spare]
    route = 5
    # A web app's SP connection through route 5's port, then n1 freezes (SIGSTOP): the
    # kernel keeps its sockets open, so only the data plane can end the connection.
    req = pynng.Req0(dial=f"tcp://127.0.0.1:{halod.sp_base + route - 1}", recv_timeout=5000)
    key = keys_on_routes([route])[0]
    req.send(json.dumps({"id": "a", "to": [list(key)], "data": 1}).encode())
    assert json.loads(req.recv())["ok"] is True
    n1.proc.send_signal(signal.SIGSTOP)
    try:
        wait_for(lambda: halod.nodes().get("spare", {}).get("state") == "active", "failover")
        wait_for(lambda: halod.get("status")["dataplane"]["cut"] >= 1, "the cut")
        # nng redials the same port and reaches the spare.
        req.send(json.dumps({"id": "b", "to": [list(key)], "data": 2}).encode())
        assert json.loads(req.recv())["results"] == [{"status": "no_connection"}]
    finally:
        n1.proc.send_signal(signal.SIGCONT)
        req.close()


# -- the proxy worker outlives HaloD (docs/halod.md, "The built-in proxy") --------------------


class RawReq:
    """A web app's SP REQ connection through a route port, on one TCP connection that is
    never re-dialled (nng would redial silently): a cut shows as an error here."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.sendall(wire.encode_header(wire.REQ))
        assert self._exactly(8)[:4] == b"\x00SP\x00"
        self.n = 0

    def _exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("the SP connection was closed")
            data += chunk
        return data

    def send(self, key, data: object) -> dict:  # noqa: ANN001
        self.n += 1
        body = json.dumps({"id": f"e{self.n}", "to": [list(key)], "data": data}).encode()
        self.sock.sendall(wire.encode_message(struct.pack(">I", 0x80000000 | self.n) + body))
        (length,) = struct.unpack(">Q", self._exactly(8))
        return json.loads(self._exactly(length)[4:])

    def close(self) -> None:
        self.sock.close()


class HeldPoll:
    """A long-poll through a route port: one keep-alive HTTP connection, the poll held by
    the node in a thread until an event comes."""

    def __init__(self, port: int, key) -> None:  # noqa: ANN001
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.token = issue_token(SECRET, key, 300)
        frames = self.get(f"token={self.token}&timeout=0")
        hello = frames[0]
        assert hello["type"] == "hello"
        self.last = f"{hello['stream']}:{hello['seq']}"
        self.pool = ThreadPoolExecutor(1)

    def get(self, query: str) -> list[dict]:
        self.conn.request("GET", f"/orbited/poll?{query}")
        response = self.conn.getresponse()
        assert response.status == 200
        return json.loads(response.read())

    def hold(self) -> Future:
        return self.pool.submit(self.get, f"token={self.token}&last={self.last}&timeout=60")

    def close(self) -> None:
        self.conn.close()
        self.pool.shutdown()


def proxy_cluster(tmp_path, procs, *flags, on_exit="stop"):  # noqa: ANN001, ANN201
    halod = HaloDProcess(tmp_path, "--spares", "0", "--grace", "4", "--heartbeat-interval",
                         "0.2", "--move-close-delay", "0.5", "--proxy-on-exit", on_exit,
                         *flags, proxy=True).start()  # fmt: skip
    procs.append(halod)
    n1 = halod.node(tmp_path, "n1")
    procs.append(n1)
    return halod, n1, HaloDCluster("127.0.0.1", halod.sp_base, halod.browser_base)


def worker_info(halod: HaloDProcess) -> dict:
    return halod.get("status")["dataplane"]["worker"]


def events(ws, poll: HeldPoll, held: Future) -> tuple[object, object]:  # noqa: ANN001
    """The next event of the WebSocket and of the held poll (which then moves on)."""
    hello, *rest = held.result(timeout=5)
    poll.last = f"{hello['stream']}:{rest[-1]['seq']}"
    return json.loads(ws.recv(timeout=5))["data"], rest[-1]["data"]


def test_connections_survive_kill_9_and_restart_of_halod_and_moves_still_cut(tmp_path, procs):
    halod, n1, cluster = proxy_cluster(tmp_path, procs)
    worker = worker_pid(halod)
    assert worker is not None and worker_info(halod)["pid"] == worker
    # Route 20: n1's now, n2's once n2 joins (routes 13-24).
    ws_key, poll_key = keys_on_routes([20], count=2)
    ws = browser(cluster, ws_key)
    assert json.loads(ws.recv(timeout=5))["type"] == "hello"
    poll = HeldPoll(halod.browser_base + 19, poll_key)
    app = RawReq(halod.sp_base + 19)
    held = poll.hold()
    assert [r["status"] for r in app.send(ws_key, 1)["results"]] == ["delivered"]
    assert app.send(poll_key, 1)["results"][0]["status"] in ("delivered", "queued")
    assert events(ws, poll, held) == (1, 1)

    halod.stop(signal.SIGKILL)
    # HaloD is gone: the same connections carry on, new ones are forwarded too.
    held = poll.hold()
    assert app.send(ws_key, 2)["results"][0]["status"] == "delivered"
    assert app.send(poll_key, 2)["results"][0]["status"] in ("delivered", "queued")
    assert events(ws, poll, held) == (2, 2)
    other = keys_on_routes([3])[0]
    fresh = browser(cluster, other)
    assert json.loads(fresh.recv(timeout=5))["type"] == "hello"
    fresh.close()

    halod.start()  # same database and ports: it re-attaches to the running worker
    info = worker_info(halod)
    assert info["pid"] == worker and info["attached"] and info["state"] == "running"
    assert "attached to a running proxy worker" in halod.log_file.read_text()
    wait_for(lambda: halod.nodes().get("n1", {}).get("connected"), "n1 back")
    held = poll.hold()
    assert app.send(ws_key, 3)["results"][0]["status"] == "delivered"
    assert app.send(poll_key, 3)["results"][0]["status"] in ("delivered", "queued")
    assert events(ws, poll, held) == (3, 3)
    assert halod.get("status")["dataplane"]["cut"] == 0

    # A move after the restart still cuts the moved route's connections and redirects it.
    n2 = halod.node(tmp_path, "n2")
    procs.append(n2)
    assert moved_frame(next_frame(ws)) == {"type": "reconnect", "reason": "route_moved"}
    with pytest.raises(ConnectionClosed):
        ws.recv(timeout=5)
    with pytest.raises(ConnectionError):  # cut 0.5 s after the move
        for i in range(50):
            app.send(ws_key, f"x{i}")
            time.sleep(0.1)
    again = browser(cluster, ws_key)
    assert json.loads(again.recv(timeout=5))["type"] == "hello"
    assert route_of(ws_key) == 20 and halod.owners()[20] == "n2"
    assert worker_pid(halod) == worker  # the same worker throughout
    again.close()
    poll.close()
    app.close()


def test_by_default_a_stopped_halod_leaves_the_worker_forwarding_and_a_restart_reattaches(
    tmp_path, procs
):
    halod, n1, cluster = proxy_cluster(tmp_path, procs, on_exit="keep")
    worker = worker_pid(halod)
    assert worker is not None
    key = keys_on_routes([7])[0]
    ws = browser(cluster, key)
    assert json.loads(ws.recv(timeout=5))["type"] == "hello"
    app = RawReq(halod.sp_base + 6)
    assert app.send(key, 1)["results"][0]["status"] == "delivered"
    assert json.loads(ws.recv(timeout=5))["data"] == 1

    assert halod.stop(signal.SIGTERM) == 0  # a clean stop: the worker forwards on
    assert "forwards on" in halod.log_file.read_text()
    assert worker_pid(halod) == worker
    assert app.send(key, 2)["results"][0]["status"] == "delivered"  # the same connections
    assert json.loads(ws.recv(timeout=5))["data"] == 2

    halod.start()  # re-attaches: nothing was cut
    info = worker_info(halod)
    assert info["pid"] == worker and info["attached"] and info["state"] == "running"
    wait_for(lambda: halod.nodes().get("n1", {}).get("connected"), "n1 back")
    assert app.send(key, 3)["results"][0]["status"] == "delivered"
    assert json.loads(ws.recv(timeout=5))["data"] == 3
    assert halod.get("status")["dataplane"]["cut"] == 0
    app.close()
    ws.close()


def test_a_stopped_halod_stalls_no_traffic_and_its_worker_is_kept(tmp_path, procs):
    halod, n1, cluster = proxy_cluster(tmp_path, procs)
    worker = worker_pid(halod)
    key = keys_on_routes([7])[0]
    ws = browser(cluster, key)
    assert json.loads(ws.recv(timeout=5))["type"] == "hello"
    app = RawReq(halod.sp_base + 6)
    halod.proc.send_signal(signal.SIGSTOP)
    try:
        # Longer than the worker's silence limit: HaloD must not take its own stall for
        # a silent worker once it runs again.
        end = time.monotonic() + 11
        n = 0
        while time.monotonic() < end:
            n += 1
            assert app.send(key, n)["results"][0]["status"] == "delivered"
            assert json.loads(ws.recv(timeout=2))["data"] == n
            time.sleep(0.5)
        fresh = browser(cluster, keys_on_routes([8])[0])  # new connections too
        assert json.loads(fresh.recv(timeout=5))["type"] == "hello"
        fresh.close()
    finally:
        halod.proc.send_signal(signal.SIGCONT)
    time.sleep(2)
    info = worker_info(halod)
    assert info["pid"] == worker and info["restarts"] == 0 and info["state"] == "running"
    assert app.send(key, "after")["results"][0]["status"] == "delivered"
    app.close()
    ws.close()


def test_a_clean_stop_ends_the_worker_and_a_dead_worker_is_replaced(tmp_path, procs):
    halod, n1, cluster = proxy_cluster(tmp_path, procs)
    first = worker_pid(halod)
    assert first is not None
    os.kill(first, signal.SIGKILL)  # the worker dies: HaloD starts another
    wait_for(lambda: worker_pid(halod) not in (None, first), "a new worker", timeout=15)
    wait_for(lambda: worker_info(halod)["state"] == "running", "the new worker running")
    assert worker_info(halod)["restarts"] >= 1
    key = keys_on_routes([2])[0]
    ws = browser(cluster, key)  # it forwards with the current table
    assert json.loads(ws.recv(timeout=5))["type"] == "hello"
    ws.close()
    second = worker_pid(halod)
    halod.stop(signal.SIGTERM)
    assert (
        worker_pid(halod) is None
        and not Path(f"/proc/{second}/cmdline").exists()
        or (Path(f"/proc/{second}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z")
    )
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", halod.browser_base + 1), timeout=5)


def test_a_restart_with_other_route_ports_replaces_the_worker(tmp_path, procs):
    halod, n1, cluster = proxy_cluster(tmp_path, procs)
    old = worker_pid(halod)
    halod.stop(signal.SIGKILL)
    moved = HaloDProcess(tmp_path, "--spares", "0", "--grace", "4", *STOP, proxy=True)  # new ports
    moved.control = halod.control  # where n1 looks for HaloD
    procs.append(moved)
    moved.start()
    new = worker_pid(moved)
    assert (
        new is not None
        and new != old
        and not moved.get("status")["dataplane"]["worker"]["attached"]
    )
    with pytest.raises(ConnectionRefusedError):  # the old layout's ports are closed
        socket.create_connection(("127.0.0.1", halod.browser_base), timeout=5)
    wait_for(lambda: moved.nodes().get("n1", {}).get("connected"), "n1 back")
    ws = connect(HaloDCluster("127.0.0.1", moved.sp_base, moved.browser_base).browser_url(
        keys_on_routes([5])[0], SECRET), open_timeout=5, legacy=True)  # fmt: skip
    assert json.loads(ws.recv(timeout=5))["type"] == "hello"
    ws.close()


def test_a_route_port_in_use_stops_halods_start_with_the_reason(tmp_path, procs):
    halod = HaloDProcess(tmp_path, proxy=True)
    procs.append(halod)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", halod.sp_base + 3))
        taken.listen()
        with pytest.raises(RuntimeError, match="cannot open the route ports"):
            halod.start()
    assert halod.proc.wait(10) == 1
    wait_for(lambda: worker_pid(halod) is None, "the worker to exit")


def test_a_hung_worker_is_replaced(tmp_path, procs):
    halod, n1, cluster = proxy_cluster(tmp_path, procs)
    hung = worker_pid(halod)
    os.kill(hung, signal.SIGSTOP)  # it holds the ports but forwards nothing, says nothing
    try:
        wait_for(lambda: worker_pid(halod) not in (None, hung), "a new worker", timeout=25)
    finally:
        if Path(f"/proc/{hung}").exists():
            os.kill(hung, signal.SIGKILL)
    wait_for(lambda: worker_info(halod)["state"] == "running", "the new worker running")
    assert "silent for" in halod.log_file.read_text()
    ws = browser(cluster, keys_on_routes([9])[0])
    assert json.loads(ws.recv(timeout=5))["type"] == "hello"
    ws.close()
