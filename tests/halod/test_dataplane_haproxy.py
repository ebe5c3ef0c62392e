"""The HAProxy data plane: the sans-I/O core (cfg rendering, runtime commands, show stat
parsing) without a reactor, then real HaloD + real nodes + a real HAProxy (skipped when
HAProxy is not installed): route ports lead to the owner and follow a move at once, the
moved route's old connections are cut after the delay while other routes' survive, an
unowned route accepts and closes, counts reach /status, a HaloD restart keeps established
connections, a dead HAProxy is restarted, and no HAProxy outlives a test."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pynng
import pytest
from websockets.sync.client import connect

from halod.config import HaloDConfig
from halod.dataplane.base import Owner, Ports
from halod.dataplane.haproxy import (
    PARKED,
    Counter,
    HAProxyDataPlane,
    Settings,
    SlotTable,
    batches,
    find_binary,
    parse_stat,
    process_alive,
    proxy_names,
    refused_counts,
    render_config,
    reply_errors,
    route_counts,
    targets_of,
)
from orbited.client import BlockingClient, HaloDCluster
from orbited.core.settings import ConfigError
from tests.conftest import SECRET, HaloDProcess, keys_on_routes, wait_for

N1 = Owner("n1", ("127.0.0.2", 8001), ("127.0.0.2", 9001))
N2 = Owner("n2", ("127.0.0.3", 8002), ("127.0.0.3", 9002))


# -- the sans-I/O core ----------------------------------------------------------------------


def settings(tmp_path: Path = Path("/run/h"), routes: int = 2) -> Settings:
    return Settings(Ports("127.0.0.1", 8100, 9100, routes), tmp_path, maxconn=5000)


def test_config_holds_the_table_and_the_layout():
    table = SlotTable.of(targets_of({1: N1, 2: None}, 2))
    cfg = render_config(settings(), table)
    assert "    maxconn 5000" in cfg and "nbthread" not in cfg
    assert "    stats socket /run/h/admin.sock mode 600 level admin expose-fd listeners" in cfg
    assert "    noreuseport" in cfg and "    timeout tunnel 3600s" in cfg
    # A refused connect is retried every 100 ms on whichever slot is enabled by then.
    assert "    timeout connect 100ms\n    retries 20\n    option redispatch 1\n" in cfg
    assert f"    setenv HALOD_LAYOUT {settings().layout()}" in cfg
    # route 1's browser port leads to n1's browser address through slot a; b is idle.
    assert ("listen r1_browser\n    bind 127.0.0.1:8100\n"
            "    server a 127.0.0.2:8001\n    server b 127.0.0.1:9 disabled\n") in cfg  # fmt: skip
    assert "listen r1_sp\n    bind 127.0.0.1:9100\n    server a 127.0.0.2:9001\n" in cfg
    # An unowned route: both slots in maintenance (HAProxy accepts and closes).
    assert ("listen r2_sp\n    bind 127.0.0.1:9101\n    server a 127.0.0.1:9 disabled\n"
            "    server b 127.0.0.1:9 disabled\n") in cfg  # fmt: skip


def test_layout_changes_with_the_ports_not_the_owners():
    base = settings()
    assert base.layout() == settings().layout()
    assert base.layout() != settings(routes=3).layout()
    assert base.layout() != Settings(base.ports, base.directory, maxconn=6000).layout()
    assert base.layout() != Settings(base.ports, base.directory, retries=5).layout()
    with pytest.raises(ValueError, match="haproxy_connect_timeout"):
        Settings(base.ports, base.directory, connect_timeout=0)
    assert "nbthread 2" in render_config(
        Settings(base.ports, base.directory, nbthread=2), SlotTable(proxy_names(2))
    )


def test_a_move_uses_the_idle_slot_and_cuts_the_old_one_later():
    table = SlotTable.of(targets_of({1: N1, 2: N1}, 2))
    plan = table.plan(targets_of({1: N1, 2: N2}, 2))
    assert plan.commands == [
        "set server r2_browser/b addr 127.0.0.3 port 8002",
        "enable server r2_browser/b",
        "disable server r2_browser/a",
        "set server r2_sp/b addr 127.0.0.3 port 9002",
        "enable server r2_sp/b",
        "disable server r2_sp/a",
    ]
    assert [(c.proxy, c.slot) for c in plan.cuts] == [("r2_browser", "a"), ("r2_sp", "a")]
    assert table.targets()["r2_sp"] == N2.sp and table.targets()["r1_sp"] == N1.sp
    # Nothing changed: nothing to send.
    assert table.plan(targets_of({1: N1, 2: N2}, 2)).commands == []
    # The delay passed: the old slot's sessions are shut down, once.
    assert table.due(plan.cuts[0]) == ["shutdown sessions server r2_browser/a"]
    assert table.due(plan.cuts[0]) == []
    assert table.pending() == [plan.cuts[1]]


def test_an_unowned_route_disables_both_slots_and_an_owner_comes_back():
    table = SlotTable.of(targets_of({1: N1}, 1))
    plan = table.plan(targets_of({1: None}, 1))
    assert plan.commands == ["disable server r1_browser/a", "disable server r1_sp/a"]
    assert len(plan.cuts) == 2 and table.targets() == {"r1_browser": None, "r1_sp": None}
    # The same owner back before the cut: slot b takes it, a's cut stays due.
    plan = table.plan(targets_of({1: N1}, 1))
    assert plan.commands[:2] == [
        "set server r1_browser/b addr 127.0.0.2 port 8001",
        "enable server r1_browser/b",
    ]
    assert plan.cut_now == [] and len(table.pending()) == 2


def test_a_second_move_within_the_delay_cuts_the_reused_slot_first():
    table = SlotTable.of(targets_of({1: N1}, 1))
    first = table.plan(targets_of({1: N2}, 1))  # a → b, a's cut pending
    n3 = Owner("n3", ("127.0.0.4", 8003), ("127.0.0.4", 9003))
    second = table.plan(targets_of({1: n3}, 1))  # b → a: a must lose n1's sessions now
    assert second.commands[:4] == [
        "shutdown sessions server r1_browser/a",
        "set server r1_browser/a addr 127.0.0.4 port 8003",
        "enable server r1_browser/a",
        "disable server r1_browser/b",
    ]
    assert second.cut_now == [("r1_browser", "a"), ("r1_sp", "a")]
    assert table.due(first.cuts[0]) == []  # superseded: it would hit n3's connections
    assert table.due(second.cuts[0]) == ["shutdown sessions server r1_browser/b"]


STAT = """\
# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,status,addr
r1_browser,FRONTEND,,,3,3,5000,10,0,0,OPEN,
r1_browser,a,0,0,1,1,,6,0,0,MAINT,127.0.0.2:8001
r1_browser,b,0,0,2,2,,3,0,0,no check,127.0.0.3:8002
r1_browser,BACKEND,0,0,3,3,500,11,0,0,UP,
r1_sp,FRONTEND,,,0,0,5000,0,0,0,OPEN,
r1_sp,a,0,0,0,0,,0,0,0,MAINT,127.0.0.1:9
r1_sp,b,0,0,0,0,,0,0,0,MAINT,127.0.0.1:9
r1_sp,BACKEND,0,0,0,0,500,4,0,0,DOWN,

"""


def test_show_stat_gives_counts_refusals_and_the_slots():
    rows = parse_stat(STAT)
    assert route_counts(rows, 1) == {"1": {"browser": 3, "sp": 0}}
    # Backend sessions no slot took: accepted and closed for want of an owner.
    assert refused_counts(rows, proxy_names(1)) == {"r1_browser": 2, "r1_sp": 4}
    table, missing = SlotTable.from_stat(proxy_names(1), rows)
    assert missing == []
    assert table.targets() == {"r1_browser": ("127.0.0.3", 8002), "r1_sp": None}
    # Slot a is disabled but still has a session: a cut an earlier HaloD did not make.
    assert [(c.proxy, c.slot) for c in table.pending()] == [("r1_browser", "a")]
    assert table.slots["r1_sp"]["a"].addr == PARKED
    _, missing = SlotTable.from_stat(proxy_names(2), rows)
    assert missing == ["r2_browser/a", "r2_browser/b", "r2_sp/a", "r2_sp/b"]
    with pytest.raises(ValueError):
        parse_stat("Unknown command\n")


def test_counter_survives_haproxy_counter_resets():
    counter = Counter()
    counter.baseline({"r1_sp": 5})  # attached: what happened before is not ours
    counter.update({"r1_sp": 7, "r2_sp": 1})
    assert counter.total == 3
    counter.update({"r1_sp": 2, "r2_sp": 1})  # a reload reset r1_sp
    assert counter.total == 5


def test_commands_are_batched_and_errors_found():
    commands = [f"enable server r{i}_sp/a" for i in range(1000)]
    lines = batches(commands, limit=1000)
    assert all(len(line) <= 1000 for line in lines)
    assert "; ".join(lines) == "; ".join(commands)
    reply = ("IP changed from '127.0.0.1' to '127.0.0.3', port changed from '9' to '8002' by "
             "'stats socket command'\n\n\n\nNo such backend.\n\n")  # fmt: skip
    assert reply_errors(reply) == ["No such backend."]
    assert reply_errors("\n\n\n") == []


def test_haproxy_config_keys_are_checked(tmp_path):
    base = {"dataplane": "haproxy", "haproxy_dir": str(tmp_path)}
    config = HaloDConfig.load(None, base)
    assert (config.haproxy_maxconn, config.haproxy_on_exit) == (8000, "keep")
    assert HaloDConfig.load(None, {**base, "haproxy_nbthread": 64}).haproxy_nbthread == 64
    beside_db = HaloDConfig.load(None, {"dataplane": "haproxy", "db": str(tmp_path / "h.db")})
    assert beside_db.haproxy_directory() == tmp_path / "haproxy"
    for bad, message in [
        ({"haproxy_on_exit": "later"}, "keep or stop"),
        ({"haproxy_maxconn": 0}, "haproxy_maxconn must be positive"),
        ({"haproxy_nbthread": -1}, "haproxy_nbthread"),
        ({"haproxy_nbthread": 65}, "haproxy_nbthread must be at most 64"),
        ({"haproxy_nbthread": 100000}, "haproxy_nbthread must be at most 64"),
        ({"haproxy_dir": "/" + "d" * 120}, "too long"),
    ]:
        with pytest.raises(ConfigError, match=message):
            HaloDConfig.load(None, {**base, **bad})


def test_connect_timeout_and_retries_are_config_keys_rendered_into_the_cfg(tmp_path):
    base = {"dataplane": "haproxy", "haproxy_dir": str(tmp_path)}
    default = HAProxyDataPlane.from_config(HaloDConfig.load(None, base), None).settings
    assert (default.connect_timeout, default.retries) == (0.1, 20)
    config = HaloDConfig.load(None, {**base, "haproxy_connect_timeout": 0.25, "haproxy_retries": 8})
    plane = HAProxyDataPlane.from_config(config, None)
    cfg = render_config(plane.settings, SlotTable.of(targets_of({1: N1}, plane.ports.routes)))
    assert "    timeout connect 250ms\n    retries 8\n    option redispatch 1\n" in cfg
    for bad, message in [
        ({"haproxy_connect_timeout": 0}, "haproxy_connect_timeout must be positive"),
        ({"haproxy_retries": -1}, "haproxy_retries must not be negative"),
    ]:
        with pytest.raises(ConfigError, match=message):
            HaloDConfig.load(None, {**base, **bad})


# -- real HaloD, nodes and HAProxy ------------------------------------------------------------

HAPROXY = find_binary("haproxy")
needs_haproxy = pytest.mark.skipif(
    HAPROXY is None, reason="HAProxy is not installed (./dev installs Debian's haproxy)"
)


def haproxy_processes(directory: Path) -> list[int]:
    """Live (non-zombie) HAProxy processes whose command line names ``directory``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        # argv[0]: HaloD's own command line names the directory too.
        if Path(argv[0]).name == "haproxy" and str(directory) in " ".join(argv):
            if process_alive(int(entry.name)):
                found.append(int(entry.name))
    return found


class Cluster:
    """A HaloD with the HAProxy data plane in ``tmp/hx``; teardown kills every process
    it started and checks no HAProxy is left."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.hx = tmp / "hx"
        self.procs: list = []
        self.halod: HaloDProcess | None = None

    def start(self, *flags: str) -> HaloDProcess:
        self.halod = HaloDProcess(
            self.tmp, "--haproxy-dir", str(self.hx), "--haproxy-stats-interval", "0.2",
            "--haproxy-nbthread", "1", *flags, dataplane="haproxy",
        ).start()  # fmt: skip
        self.procs.append(self.halod)
        self.wait_synced()
        return self.halod

    def node(self, name: str):
        node = self.halod.node(self.tmp, name)
        self.procs.append(node)
        self.wait_synced()
        return node

    def plane(self) -> dict:
        return self.halod.get("status")["dataplane"]

    def wait_synced(self) -> None:
        wait_for(lambda: self.plane()["haproxy"]["synced"], "HAProxy has the table", 15)

    def pid(self) -> int:
        return int((self.hx / "haproxy.pid").read_text())

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.alive():
                proc.stop(signal.SIGKILL)
        # HAProxy outlives HaloD by design: stop the master (it stops its workers).
        for pid in haproxy_processes(self.hx)[:1] or []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid() if (self.hx / "haproxy.pid").exists() else pid, signal.SIGTERM)
        wait_for(lambda: not haproxy_processes(self.hx), "HAProxy gone", 10)


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    yield c
    c.close()
    assert haproxy_processes(c.hx) == []


def idle_http(port: int) -> socket.socket:
    """A browser-port connection that stays open: an unfinished HTTP request."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"GET /orbited/ws HTTP/1.1\r\nHost: x\r\n")
    return s


def is_open(s: socket.socket, wait: float = 0.3) -> bool:
    s.settimeout(wait)
    try:
        return s.recv(10) != b""
    except TimeoutError:
        return True
    except OSError:
        return False


def hello_from(ws) -> str:
    """The epoch of the node that said hello (its streams are named ``epoch.n``)."""
    hello = json.loads(ws.recv(timeout=5))
    assert hello["type"] == "hello"
    return hello["stream"].split(".")[0]


slow = pytest.mark.slow


@slow
@needs_haproxy
def test_route_ports_follow_the_table_through_haproxy(cluster):
    halod = cluster.start("--spares", "0", "--grace", "1", "--heartbeat-interval", "0.2",
                          "--move-close-delay", "1.5")  # fmt: skip
    # No node: the route port accepts, then closes.
    with socket.create_connection(("127.0.0.1", halod.browser_base), timeout=5) as s:
        assert s.recv(10) == b""
    wait_for(lambda: cluster.plane()["refused"] >= 1, "the refusal counted")
    n1 = cluster.node("n1")
    hx = HaloDCluster("127.0.0.1", halod.sp_base, halod.browser_base)
    moving, late = keys_on_routes([20], count=2)  # n2 will take routes 13-24
    staying = keys_on_routes([1])[0]
    ws_moving = connect(hx.browser_url(moving, SECRET), open_timeout=5, legacy=True)
    ws_staying = connect(hx.browser_url(staying, SECRET), open_timeout=5, legacy=True)
    assert hello_from(ws_moving) == hello_from(ws_staying) == n1.epoch
    app = BlockingClient(hx, backoff=0.3)
    assert app.send([staying], {"n": 1}, "e1")[staying]["status"] == "delivered"
    assert json.loads(ws_staying.recv(timeout=5))["data"] == {"n": 1}
    # Idle connections the nodes leave open: only the data plane can end them.
    idle_moving = idle_http(halod.browser_base + 20 - 1)
    idle_staying = idle_http(halod.browser_base + 1 - 1)
    wait_for(lambda: cluster.plane()["routes"]["20"]["browser"] == 2, "route 20's count")
    assert cluster.plane()["routes"]["1"]["browser"] == 2

    n2 = cluster.node("n2")
    moved_at = time.monotonic()
    # New connections to route 20's port reach n2 at once, browsers and web apps alike.
    ws_late = connect(hx.browser_url(late, SECRET), open_timeout=5, legacy=True)
    assert hello_from(ws_late) == n2.epoch
    with pynng.Req0(dial=f"tcp://127.0.0.1:{halod.sp_base + 20 - 1}", recv_timeout=5000) as req:
        req.send(json.dumps({"id": "e2", "to": [list(late)], "data": 2}).encode())
        assert json.loads(req.recv())["results"][0]["status"] == "delivered"
    assert json.loads(ws_late.recv(timeout=5))["data"] == 2
    # The moved route's old connection is cut after the delay, not before; route 1's stays.
    assert is_open(idle_moving, 0.5)
    wait_for(lambda: not is_open(idle_moving, 0.05), "the cut", 5)
    assert time.monotonic() - moved_at >= 1.0
    assert is_open(idle_staying) and cluster.plane()["cut"] >= 1
    assert app.send([staying], {"n": 3}, "e3")[staying]["status"] == "delivered"
    assert json.loads(ws_staying.recv(timeout=5))["data"] == {"n": 3}
    metrics = halod_metrics(halod)
    assert 'halod_route_connections{route="1",side="browser"}' in metrics
    for c in (app, ws_moving, ws_staying, ws_late, idle_moving, idle_staying):
        c.close()


def halod_metrics(halod: HaloDProcess) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://{halod.status_http}/metrics", timeout=5) as r:
        return r.read().decode()


@slow
@needs_haproxy
def test_halod_restart_keeps_established_connections(cluster):
    halod = cluster.start("--spares", "0", "--grace", "5", "--heartbeat-interval", "0.2")
    n1 = cluster.node("n1")
    pid = cluster.pid()
    hx = HaloDCluster("127.0.0.1", halod.sp_base, halod.browser_base)
    key = keys_on_routes([7])[0]
    ws = connect(hx.browser_url(key, SECRET), open_timeout=5, legacy=True)
    assert hello_from(ws) == n1.epoch
    idle = idle_http(halod.browser_base + 3 - 1)

    halod.stop(signal.SIGKILL)  # no goodbye: HAProxy carries on alone
    req = pynng.Req0(dial=f"tcp://127.0.0.1:{halod.sp_base + 7 - 1}", recv_timeout=5000)
    req.send(json.dumps({"id": "a", "to": [list(key)], "data": 1}).encode())
    assert json.loads(req.recv())["results"][0]["status"] == "delivered"
    assert json.loads(ws.recv(timeout=5))["data"] == 1

    halod.start()  # same database, same haproxy_dir: attaches
    cluster.wait_synced()
    assert cluster.pid() == pid and cluster.plane()["haproxy"]["pid"] == pid
    assert "attached to a running HAProxy" in halod.log_file.read_text()
    req.send(json.dumps({"id": "b", "to": [list(key)], "data": 2}).encode())
    assert json.loads(req.recv())["results"][0]["status"] == "delivered"
    assert json.loads(ws.recv(timeout=5))["data"] == 2
    assert is_open(idle)
    wait_for(lambda: cluster.plane()["routes"]["7"] == {"browser": 1, "sp": 1}, "counts")

    halod.stop()  # SIGTERM, haproxy_on_exit = keep: still serving
    assert process_alive(pid) and is_open(idle)
    req.close()
    ws.close()
    idle.close()


@slow
@needs_haproxy
def test_a_dead_haproxy_is_restarted_and_stopped_with_halod(cluster):
    halod = cluster.start("--spares", "0", "--haproxy-on-exit", "stop")
    n1 = cluster.node("n1")
    hx = HaloDCluster("127.0.0.1", halod.sp_base, halod.browser_base)
    key = keys_on_routes([2])[0]
    first = cluster.pid()
    for pid in haproxy_processes(cluster.hx):
        os.kill(pid, signal.SIGKILL)

    def restarted() -> bool:
        try:  # HAProxy writes its pid file late, and a restart may replace it meanwhile
            pid = (cluster.hx / "haproxy.pid").read_text().strip()
        except FileNotFoundError:
            return False
        return bool(pid) and int(pid) != first and cluster.plane()["haproxy"]["state"] == "running"

    wait_for(restarted, "a new HAProxy", 20)
    cluster.wait_synced()
    with connect(hx.browser_url(key, SECRET), open_timeout=5, legacy=True) as ws:
        assert hello_from(ws) == n1.epoch
    second = cluster.pid()
    halod.stop()  # haproxy_on_exit = stop
    assert not process_alive(second) and haproxy_processes(cluster.hx) == []


@slow
@needs_haproxy
def test_haproxy_failing_to_start_is_reported_and_retried(cluster, tmp_path):
    halod = HaloDProcess(tmp_path, "--haproxy-dir", str(cluster.hx), dataplane="haproxy")
    hog = socket.create_server(("127.0.0.1", halod.browser_base + 5))  # route 6's port
    cluster.halod = halod.start()
    cluster.procs.append(halod)
    wait_for(lambda: "Address already in use" in (cluster.plane()["haproxy"]["error"] or ""),
             "the start failure reported")  # fmt: skip
    assert cluster.plane()["haproxy"]["state"] == "failed" and halod.alive()
    hog.close()
    cluster.wait_synced()  # a retry (backoff 1, 2, 4 s) starts it


def first_answer(host: str, port: int, ready_file: Path, proc) -> str:
    """Wait (1 ms polls) for the ready file, then connect to ``port`` at once."""
    deadline = time.monotonic() + 15
    while not ready_file.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "HaloD did not start"
        time.sleep(0.001)
    try:
        with socket.create_connection((host, port), timeout=5) as s:
            return "eof" if s.recv(10) == b"" else "data"
    except ConnectionRefusedError:
        return "refused"


@needs_haproxy
def test_haproxy_listens_when_halod_says_it_is_ready(cluster, tmp_path):
    """The ready file waits for HAProxy's first start, as for the built-in proxy's worker:
    an unowned route is answered with an EOF (operations.md), never refused. Before, the
    ready file came 20-50 ms before HAProxy listened; a HAProxy that cannot start still
    gets the ready file written (then retried)."""
    host = "127.0.1.51"
    halod = HaloDProcess(tmp_path, "--haproxy-dir", str(cluster.hx), "--haproxy-nbthread",
                         "1", "--haproxy-stats-interval", "0.2", "--dataplane-host", host,
                         dataplane="haproxy")  # fmt: skip
    halod.control, halod.status_http = "tcp://127.0.1.50:0", "127.0.1.50:0"
    cmd = [sys.executable, "-m", "halod.cli", "run", "--db", str(halod.db), "--control",
           halod.control, "--status-http", halod.status_http, "--ready-file",
           str(halod.ready_file), *halod.flags]  # fmt: skip
    with halod.log_file.open("ab") as log:
        halod.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    cluster.procs.append(halod)
    assert first_answer(host, halod.browser_base, halod.ready_file, halod.proc) == "eof"
    cluster.halod = halod
    halod.status_http = json.loads(halod.ready_file.read_text())["status"]
    cluster.wait_synced()
    assert "HAProxy data plane started" in halod.log_file.read_text()
    wait_for(lambda: cluster.plane()["refused"] == 1, "the EOF counted as refused")
    halod.stop()
    cluster.close()

    # HAProxy cannot start (its port taken): the ready file is written all the same.
    hog = socket.create_server((host, halod.browser_base + 1))
    halod.ready_file.unlink()
    with halod.log_file.open("ab") as log:
        halod.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        assert first_answer(host, halod.browser_base, halod.ready_file, halod.proc) == "refused"
        halod.status_http = json.loads(halod.ready_file.read_text())["status"]
        assert halod.get("status")["dataplane"]["haproxy"]["state"] == "failed"
        hog.close()
        cluster.wait_synced()  # the retry (1 s) starts it
        assert first_answer(host, halod.browser_base, halod.ready_file, halod.proc) == "eof"
    finally:
        hog.close()


@slow
@needs_haproxy
def test_a_changed_layout_reloads_haproxy_keeping_connections(cluster):
    halod = cluster.start("--spares", "0", "--grace", "5", "--heartbeat-interval", "0.2")
    n1 = cluster.node("n1")
    pid = cluster.pid()
    hx = HaloDCluster("127.0.0.1", halod.sp_base, halod.browser_base)
    key = keys_on_routes([4])[0]
    ws = connect(hx.browser_url(key, SECRET), open_timeout=5, legacy=True)
    assert hello_from(ws) == n1.epoch

    halod.stop(signal.SIGKILL)
    halod.flags = (*halod.flags, "--haproxy-maxconn", "7000")  # a new layout
    halod.start()
    cluster.wait_synced()
    assert "HAProxy reloaded with a new layout" in halod.log_file.read_text()
    assert cluster.pid() == pid and "maxconn 7000" in (cluster.hx / "haproxy.cfg").read_text()
    # The old worker keeps the WebSocket; the new one takes new connections.
    with pynng.Req0(dial=f"tcp://127.0.0.1:{halod.sp_base + 4 - 1}", recv_timeout=5000) as req:
        req.send(json.dumps({"id": "a", "to": [list(key)], "data": 1}).encode())
        assert json.loads(req.recv())["results"][0]["status"] == "delivered"
    assert json.loads(ws.recv(timeout=5))["data"] == 1
    ws.close()


def health_via(port: int) -> tuple[float, str | None]:
    """GET /orbited/health through a route port: (seconds it took, the answering node's
    name, or None when the connection was closed without an answer)."""
    began = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /orbited/health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
    except OSError:
        reply = b""
    head, _, body = reply.partition(b"\r\n\r\n")
    name = json.loads(body)["node"] if head.startswith(b"HTTP/1.") and body else None
    return time.monotonic() - began, name


@slow
@needs_haproxy
def test_connections_to_a_killed_owner_wait_for_the_new_one_not_three_seconds(cluster):
    # While HaloD has not yet moved a dead node's routes, HAProxy's connect to it is
    # refused. It must retry often enough, and on the slot HaloD enables, that such a
    # connection reaches the new owner once the route moves — not be held through
    # HAProxy's default retries (3 × 1 s turn-around) and then closed.
    halod = cluster.start("--spares", "0", "--grace", "0.5", "--heartbeat-interval", "0.1")
    n1 = cluster.node("n1")
    cluster.node("n2")
    route = next(r for r, owner in halod.owners().items() if owner == "n1")
    port = halod.browser_base + route - 1
    assert health_via(port)[1] == "n1"
    n1.stop(signal.SIGKILL)
    attempts = []
    with ThreadPoolExecutor(64) as pool:
        for _ in range(10):  # a burst while HaloD is still finding out
            attempts.append(pool.submit(health_via, port))
            time.sleep(0.01)
        moved_at = None
        deadline = time.monotonic() + 15
        while moved_at is None or time.monotonic() < moved_at + 0.3:
            attempts.append(pool.submit(health_via, port))
            if moved_at is None and halod.owners()[route] == "n2":
                moved_at = time.monotonic()
            assert time.monotonic() < deadline, "the route never moved"
            time.sleep(0.05)
        results = [a.result() for a in attempts]
    # Every connection, including those made while the route still named the dead node,
    # is answered by the new owner; none is held anywhere near HAProxy's 3 s.
    assert [name for _, name in results] == ["n2"] * len(results), results
    assert max(seconds for seconds, _ in results) < 2.5, results
