"""HaloD and nodes as real processes: registration, SIGKILL failover, the seed replacement,
HaloD restart, 'route moved' reaching browsers, bad control input (docs/halod-protocol.md)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pynng
import pytest
from websockets.exceptions import ConnectionClosed

from orbited.core.routes import canonical
from tests.conftest import (
    HaloDProcess,
    NodeProcess,
    keys_on_routes,
    moved_frame,
    next_frame,
    send_event,
    wait_for,
)

pytestmark = pytest.mark.slow

HEARTBEAT, MISSED, GRACE = 0.2, 3, 1.0
TIMING = ("--heartbeat-interval", str(HEARTBEAT), "--missed-heartbeats", str(MISSED),
          "--grace", str(GRACE))  # fmt: skip


@pytest.fixture
def procs():
    started: list[HaloDProcess | NodeProcess] = []
    yield started
    for proc in reversed(started):
        if proc.proc is not None and proc.proc.poll() is None:
            proc.stop(signal.SIGKILL)


def start_halod(tmp_path, procs, *flags):
    halod = HaloDProcess(tmp_path, *TIMING, *flags).start()
    procs.append(halod)
    return halod


def start_nodes(halod, tmp_path, procs, names, *flags):
    nodes = {}
    for name in names:
        nodes[name] = halod.node(tmp_path, name, "--linger", "5", *flags)
        procs.append(nodes[name])
    return nodes


def routes_of(halod, name):
    return halod.nodes()[name]["routes"]


def event_results(node, key, event_id):
    with node.req() as req:
        return send_event(req, event_id, [list(key)], {"n": event_id})["results"][0]


def test_spare_takes_over_a_killed_node(tmp_path, procs):
    halod = start_halod(tmp_path, procs, "--spares", "1")
    nodes = start_nodes(halod, tmp_path, procs, ["n1", "n2", "n3", "n4"])
    states = {name: n["state"] for name, n in halod.nodes().items()}
    assert states == {"n1": "active", "n2": "spare", "n3": "active", "n4": "active"}
    assert {r: halod.owners()[r] for r in range(1, 25)} == {
        r: ["n1", "n3", "n4"][i - 1] for i, held in canonical(24, 3).items() for r in held
    }
    lost = routes_of(halod, "n3")
    key = keys_on_routes(lost)[0]
    assert event_results(nodes["n2"], key, "before")["status"] == "moved"  # a spare serves none

    nodes["n3"].stop(signal.SIGKILL)  # its ports refuse: no grace (test_halod_detection.py)
    wait_for(lambda: routes_of(halod, "n2") == lost, "n2 to take n3's routes")
    assert halod.nodes()["n2"]["state"] == "active" and halod.nodes()["n2"]["id"] == 2
    assert halod.get("status")["failed"][0]["name"] == "n3"
    # The spare now serves the route: it accepts the key instead of reporting it moved.
    wait_for(lambda: event_results(nodes["n2"], key, f"x{time.monotonic()}")["status"]
             == "no_connection", "n2 to serve the route")  # fmt: skip
    ws = nodes["n2"].ws(nodes["n2"].token(key.user))
    assert next_frame(ws)["type"] == "hello"
    ws.close()
    svg = urllib_text(f"http://{halod.status_http}/table.svg")
    assert f"route {lost[0]}: node 2 (n2)</title>" in svg and "plan 3" in svg
    # `halod status` shows it to operators.
    out = subprocess.run(
        [sys.executable, "-m", "halod.cli", "status", "--url", f"http://{halod.status_http}"],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    assert out[0].startswith("24 routes, policy seed, 1 spare(s) wanted, 0 available, "
                             "failovers 1")  # fmt: skip
    rows = [line.split()[:4] for line in out[2:-1]]
    assert rows == [["1", "n1", "active", "1-8"], ["2", "n2", "active", "13-20"],
                    ["3", "n4", "active", "9-12,21-24"], ["-", "n3", "failed", "-"]]  # fmt: skip
    # The spare is used up: the status line, the JSON, a metric and the log say so.
    warning = "no spare left (1 wanted): the next failure moves routes between live nodes " \
              "(policy seed)"  # fmt: skip
    assert out[-1] == f"WARNING: {warning}"
    status = halod.get("status")
    assert (status["spares"], status["warnings"]) == (0, [warning])
    assert "halod_spares_missing 1" in urllib_text(f"http://{halod.status_http}/metrics")
    log = halod.log_file.read_text()
    assert log.count("no spare left: n2 took over from n3;") == 1


def test_a_stopped_node_hands_its_routes_over_at_once(tmp_path, procs):
    halod = start_halod(tmp_path, procs, "--spares", "1", "--grace", "30")
    nodes = start_nodes(halod, tmp_path, procs, ["a", "b"])
    routes = routes_of(halod, "a")
    start = time.monotonic()
    nodes["a"].stop(signal.SIGTERM)  # says `leave` before closing
    wait_for(lambda: routes_of(halod, "b") == routes, "b to take a's routes")
    assert time.monotonic() - start < 30


def test_without_spare_the_highest_node_replaces_the_killed_one(tmp_path, procs):
    halod = start_halod(tmp_path, procs, "--spares", "0")
    nodes = start_nodes(halod, tmp_path, procs, ["n1", "n2", "n3"])
    before = routes_of(halod, "n3")  # 9-12, 21-24
    going_back = [r for r in before if r not in canonical(24, 2)[1]]
    key = keys_on_routes(going_back)[0]
    ws = nodes["n3"].ws(nodes["n3"].token(key.user))
    assert next_frame(ws)["type"] == "hello"

    nodes["n1"].stop(signal.SIGKILL)
    wait_for(lambda: "n1" not in halod.nodes(), "n1 to be failed over")
    status = {name: (n["id"], n["routes"]) for name, n in halod.nodes().items()}
    two = canonical(24, 2)
    assert status == {"n3": (1, two[1]), "n2": (2, two[2])}
    # n3's former routes 21-24 went back to n2: its browsers there are told to reconnect.
    assert moved_frame(next_frame(ws)) == {"type": "reconnect", "reason": "route_moved"}
    with pytest.raises(ConnectionClosed):
        ws.recv(timeout=5)
    assert ws.close_code == 4000


def test_joining_node_takes_routes_and_browsers_on_them_reconnect(tmp_path, procs):
    halod = start_halod(tmp_path, procs, "--spares", "0")
    nodes = start_nodes(halod, tmp_path, procs, ["n1"])
    n1 = nodes["n1"]
    stay, move = keys_on_routes(range(1, 13))[0], keys_on_routes(range(13, 25))[0]
    sockets = {}
    for key in (stay, move):
        sockets[key] = n1.ws(n1.token(key.user))
        assert next_frame(sockets[key])["type"] == "hello"

    n2 = start_nodes(halod, tmp_path, procs, ["n2"])["n2"]
    assert moved_frame(next_frame(sockets[move])) == {"type": "reconnect", "reason": "route_moved"}
    assert event_results(n1, stay, "e1")["status"] == "delivered"
    assert next_frame(sockets[stay])["data"] == {"n": "e1"}
    # The old node refuses the moved key and names the new owner to web apps.
    assert event_results(n1, move, "e2") == {
        "status": "moved",
        "route": keys_route(move),
        "to": n2.sp,
        "hash": 2,  # the cluster's hash version, so a web app on another one switches
    }
    # A browser that comes to the old node after the move gets that move's spread: one
    # browser moved, at the default reconnect_rate of 3 000/s (docs/protocol.md).
    moved_one = {"type": "reconnect", "reason": "route_moved", "route": keys_route(move),
                 "spread": 0.001}  # fmt: skip
    late = n1.ws(n1.token(move.user))
    assert next_frame(late) == moved_one
    status, body = n1.poll(f"token={n1.token(move.user)}")
    assert status == 200 and moved_one in body
    # ... and the new owner takes it.
    again = n2.ws(n2.token(move.user))
    assert next_frame(again)["type"] == "hello"
    for ws in (*sockets.values(), late, again):
        ws.close()


def keys_route(key):
    from orbited.core.hashing import route_of

    return route_of(key)


def test_halod_restart_restores_the_same_table(tmp_path, procs):
    # Nodes retry with backoff up to 2 s while HaloD is down: a grace above that.
    halod = start_halod(tmp_path, procs, "--spares", "1", "--grace", "3")
    nodes = start_nodes(halod, tmp_path, procs, ["n1", "n2", "n3", "n4"])
    owners, version = halod.owners(), halod.get("status")["table_version"]
    key = keys_on_routes(routes_of(halod, "n4"))[0]
    ws = nodes["n4"].ws(nodes["n4"].token(key.user))
    assert next_frame(ws)["type"] == "hello"

    halod.stop(signal.SIGKILL)
    halod.start()  # same ports, same database
    assert halod.owners() == owners  # restored before any node is back
    wait_for(lambda: all(n["connected"] for n in halod.nodes().values()), "nodes to return")
    time.sleep(3 + 2 * HEARTBEAT)  # past the grace period: nothing failed over
    status = halod.get("status")
    assert status["failed"] == [] and status["failovers"] == 0
    assert halod.owners() == owners
    assert status["table_version"] == version
    # The browser never noticed.
    assert event_results(nodes["n4"], key, "after")["status"] == "delivered"
    assert next_frame(ws)["data"] == {"n": "after"}
    ws.close()


def test_bad_control_input_is_refused_and_changes_nothing(tmp_path, procs):
    halod = start_halod(tmp_path, procs, "--spares", "0")
    start_nodes(halod, tmp_path, procs, ["a", "b"])
    owners = halod.owners()
    host, port = halod.control.removeprefix("tcp://").split(":")

    with socket.create_connection((host, int(port)), timeout=5) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        try:  # HaloD's SP header at most, then an abort
            while chunk := raw.recv(100):
                received += chunk
        except ConnectionResetError:
            pass
        assert received in (b"", b"\x00SP\x00\x00\x10\x00\x00")

    def register(name, **extra):
        msg = {"type": "register", "version": 1, "name": name, "browser": "127.0.0.1:1",
               "sp": "tcp://127.0.0.1:2", "capacity": 1, "hashes": [1, 2], **extra}  # fmt: skip
        with pynng.Pair0(dial=halod.control, recv_timeout=5000) as pair:  # the real nng
            pair.send(json.dumps(msg).encode())
            return json.loads(pair.recv())

    assert register("a")["code"] == "duplicate_name"
    assert register("intruder", node_id=1)["code"] == "id_claimed"
    assert register("old", version=9)["code"] == "unsupported_version"
    with pynng.Pair0(dial=halod.control, recv_timeout=5000) as pair:
        pair.send(b"\x00not json")
        assert json.loads(pair.recv())["code"] == "bad_message"
    assert halod.owners() == owners and set(halod.nodes()) == {"a", "b"}
    # A well-formed registration from nng works: the SP framing is the real thing.
    welcome = register("c")
    assert welcome["type"] == "welcome" and welcome["role"] == "active"
    wait_for(lambda: "c" not in halod.nodes(), "c to fail after its connection closed")
    assert halod.owners() == owners
    metrics = urllib_text(f"http://{halod.status_http}/metrics")
    assert "halod_control_refused_total 4" in metrics
    assert 'halod_nodes{state="active"} 2' in metrics


def urllib_text(url):
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def halod_cli(halod, *args):
    return subprocess.run(
        [sys.executable, "-m", "halod.cli", *args, "--url", f"http://{halod.status_http}"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def test_operator_drains_and_undrains_a_node(tmp_path, procs):
    halod = start_halod(tmp_path, procs, "--spares", "1")
    nodes = start_nodes(halod, tmp_path, procs, ["a", "s"])
    routes = routes_of(halod, "a")
    key = keys_on_routes(routes)[0]
    ws = nodes["a"].ws(nodes["a"].token(key.user))
    assert next_frame(ws)["type"] == "hello"

    done = halod_cli(halod, "drain", "a")
    assert done.returncode == 0 and done.stdout.strip() == "a: drained"
    assert moved_frame(next_frame(ws)) == {"type": "reconnect", "reason": "route_moved"}
    assert routes_of(halod, "s") == routes and halod.nodes()["a"]["state"] == "drained"
    assert event_results(nodes["a"], key, "d1")["status"] == "moved"
    refused = halod_cli(halod, "drain", "a")
    assert refused.returncode == 1 and "not an active or spare node" in refused.stderr
    assert halod_cli(halod, "undrain", "a").stdout.strip() == "a: spare"
    assert halod_cli(halod, "drain", "nobody").returncode == 1

    # From a web page (a cross-site form, or DNS rebinding to the loopback port) the same
    # POST is refused: the browser always names the page's origin.
    for header in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
        request = urllib.request.Request(
            f"http://{halod.status_http}/nodes/a/drain", method="POST", headers=header
        )
        with pytest.raises(urllib.error.HTTPError) as refused_page:
            urllib.request.urlopen(request, timeout=5)
        assert refused_page.value.code == 403
    # A DNS-rebinding page names the port by its own host: refused, GET included.
    for method, path in (("GET", "/status"), ("POST", "/nodes/a/drain")):
        request = urllib.request.Request(
            f"http://{halod.status_http}{path}", method=method,
            headers={"Host": "rebind.evil.example"},
        )  # fmt: skip
        with pytest.raises(urllib.error.HTTPError) as wrong_host:
            urllib.request.urlopen(request, timeout=5)
        assert wrong_host.value.code == 403
        assert b"status_hosts" in wrong_host.value.read()
    assert halod.nodes()["a"]["state"] == "spare"
