"""``orbited whereis``: the node (and pid) serving a user, a key or a route, from HaloD's
status and cluster.json under the cluster's hash version — checked against a real local
cluster, before and after a node is killed the way docs/tutorial.md kills one."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from orbited.cli import main
from orbited.cluster import ClusterConfig, LocalCluster
from orbited.core.hashing import route_of, route_of_user
from orbited.core.keys import ConnectionKey
from orbited.whereis import Placement, locate, route_for
from tests.conftest import wait_for

STATUS = {  # the shape of HaloD's /status (docs/halod.md), two active nodes and a spare
    "routes": 24,
    "nodes": [
        {"name": "n1", "state": "active", "routes": list(range(1, 13)),
         "browser": "127.0.0.2:8001", "sp": "tcp://127.0.0.2:9001"},
        {"name": "n3", "state": "active", "routes": list(range(13, 25)),
         "browser": "127.0.0.4:8001", "sp": "tcp://127.0.0.4:9001"},
        {"name": "n2", "state": "spare", "routes": [],
         "browser": "127.0.0.3:8001", "sp": "tcp://127.0.0.3:9001"},
    ],
}  # fmt: skip


def test_locate_names_the_active_owner_and_its_pid():
    key = ConnectionKey("alice", "", "/cherrychat")
    placement = locate(STATUS, 13, {"n3": 4242, "n1": 1}, key)
    assert placement == Placement(13, 24, "n3", "active", "127.0.0.4:8001",
                                  "tcp://127.0.0.4:9001", 4242, tuple(key))  # fmt: skip
    assert placement.line() == (
        'key ["alice", "", "/cherrychat"]: route 13 of 24: n3 (active, browsers '
        "127.0.0.4:8001, web apps tcp://127.0.0.4:9001), pid 4242"
    )
    placement = locate(STATUS, 13, {"n3": 4242}, key, hash_version=2)
    assert placement.line() == (
        'key ["alice", "", "/cherrychat"]: route 13 of 24 (hash version 2): n3 (active, '
        "browsers 127.0.0.4:8001, web apps tcp://127.0.0.4:9001), pid 4242"
    )
    user = locate(STATUS, 11, {}, user="alice", hash_version=2)
    assert user.node == "n1" and user.line().startswith(
        'user "alice": route 11 of 24 (hash version 2): n1 (active'
    )
    assert locate(STATUS, 12).node == "n1" and locate(STATUS, 12).pid is None


def test_a_route_nobody_holds_and_a_route_out_of_range():
    failing_over = {**STATUS, "nodes": [n for n in STATUS["nodes"] if n["name"] != "n1"]}
    placement = locate(failing_over, 5)
    assert placement.node is None and "no node serves it now" in placement.line()
    with pytest.raises(ValueError, match="from 1 to 24"):
        locate(STATUS, 25)


def test_the_route_follows_the_clusters_hash_version():
    key = ConnectionKey("alice", "s1", "/chat")
    v2 = {**STATUS, "hash_version": 2}
    assert route_for(v2, key) == route_for(v2, "alice") == route_of_user("alice", 24) == 11
    assert route_for(v2, ConnectionKey("alice", "", "")) == 11  # every key of the user
    v1 = {**STATUS, "hash_version": 1}
    assert route_for(v1, key) == route_of(key, 24, version=1)
    assert route_for(STATUS, key) == route_of(key, 24, version=1)  # an older HaloD: 1
    with pytest.raises(ValueError, match="hashes with version 1"):
        route_for(v1, "alice")  # a user alone has no route under version 1
    with pytest.raises(ValueError, match="hash_version"):
        route_for({**STATUS, "hash_version": 3}, key)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--user", "alice", "--location", "/c"], "give --user alone"),
        (["--user", ""], "--user: key user must not be empty"),
        (["--user", "*"], "--user: key user cannot be a wildcard"),
        (["--key", '["alice", "*", "/c"]'], "--key: a wildcard session needs"),
        (["--key", '["alice", ""]'], "--key: a connection key is an array"),
        (["--key", "nonsense"], "--key:"),
        (["--route", "3", "--user", "a"], "give one of"),
        ([], "give one of"),
    ],
)
def test_incomplete_keys_are_refused_with_the_reason(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["whereis", *argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_halod_not_answering_is_exit_1(tmp_path, capsys):
    assert main(["whereis", "--route", "1", "--url", "http://127.0.0.1:9",
                 "--state-dir", str(tmp_path)]) == 1  # fmt: skip
    assert "cannot read HaloD's http://127.0.0.1:9/status" in capsys.readouterr().err


def serve_status(status: dict):
    """A stand-in for HaloD's status port serving ``status`` (a real HTTP server)."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = json.dumps(status).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_with_ha_it_asks_the_halod_that_leads(tmp_path, capsys):
    """``orbited cluster --ha``: cluster.json names both HaloDs' status URLs; once the
    first one is dead (the kill the HA mode is there to try), whereis asks the other."""
    leader = serve_status({**STATUS, "role": "leader"})
    try:
        live = f"http://127.0.0.1:{leader.server_address[1]}"
        dead = "http://127.0.0.1:9"  # discard: refused
        info = {"halod_status": dead, "halod_statuses": [dead, live], "pids": {"n1": 77}}
        (tmp_path / "cluster.json").write_text(json.dumps(info))
        assert main(["whereis", "--route", "5", "--state-dir", str(tmp_path)]) == 0
        assert "route 5 of 24: n1 (active" in capsys.readouterr().out
    finally:
        leader.shutdown()


@pytest.mark.parametrize("version", [1, 2])
def test_user_alone_answers_on_version_2_and_explains_on_version_1(tmp_path, capsys, version):
    server = serve_status({**STATUS, "hash_version": version})
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        argv = ["whereis", "--user", "alice", "--url", url, "--state-dir", str(tmp_path)]
        if version == 2:
            assert main([*argv, "--json"]) == 0
            placement = json.loads(capsys.readouterr().out)
            assert placement["route"] == 11 and placement["node"] == "n1"
            assert placement["user"] == "alice" and placement["hash_version"] == 2
        else:
            with pytest.raises(SystemExit) as exit_:
                main(argv)
            assert exit_.value.code == 2
            assert "hashes with version 1" in capsys.readouterr().err
        # A user's selector names the user's route, as --user does.
        selector = ["whereis", "--key", '["alice", "*", "*"]', "--url", url, "--json",
                    "--state-dir", str(tmp_path)]  # fmt: skip
        if version == 2:
            assert main(selector) == 0
            assert json.loads(capsys.readouterr().out)["route"] == 11
        else:
            with pytest.raises(SystemExit):
                main(selector)
            assert "hashes with version 1" in capsys.readouterr().err
        # A whole key: its route under the cluster's version.
        key = ["alice", "s1", "/chat"]
        assert main(["whereis", "--key", json.dumps(key), "--url", url, "--json",
                     "--state-dir", str(tmp_path)]) == 0  # fmt: skip
        placement = json.loads(capsys.readouterr().out)
        assert placement["route"] == route_of(ConnectionKey(*key), 24, version=version)
        assert placement["hash_version"] == version
    finally:
        server.shutdown()


def whereis(capsys, *argv: str) -> tuple[int, str]:
    code = main(["whereis", *argv])
    return code, capsys.readouterr().out.strip()


@pytest.mark.slow
def test_the_tutorials_kill_step_on_a_real_cluster(tmp_path: Path, capsys):
    config = ClusterConfig(state_dir=tmp_path, free_ports=True, fresh=True,
                           heartbeat_interval=0.25, grace=1.0)  # fmt: skip
    with LocalCluster(config) as cluster:
        key = ConnectionKey("alice", "", "/cherrychat")
        state = ["--state-dir", str(tmp_path)]
        code, out = whereis(capsys, "--json", "--user", "alice", "--session", "",
                            "--location", "/cherrychat", *state)  # fmt: skip
        assert code == 0
        before = json.loads(out)
        assert before["route"] == route_of(key, 24)  # a new cluster hashes with version 2
        assert before["hash_version"] == 2
        # Every key of alice lives on that route: --user alone names it.
        code, out = whereis(capsys, "--json", "--user", "alice", *state)
        assert code == 0 and json.loads(out)["route"] == before["route"] == route_of_user(
            "alice", 24
        )
        owners = {n["name"]: n for n in cluster.halod_nodes().values()}
        assert before["route"] in owners[before["node"]]["routes"]
        assert before["pid"] == cluster.children[before["node"]].pid
        # --key answers as the three flags do; --route (what the page shows) gives the pid.
        assert (
            whereis(capsys, "--key", json.dumps(key), *state)[1]
            == whereis(
                capsys, "--user", "alice", "--session", "", "--location", "/cherrychat", *state
            )[1]
        )
        code, pid = whereis(capsys, "--route", str(before["route"]), "--pid", *state)
        assert (code, int(pid)) == (0, before["pid"])
        os.kill(int(pid), signal.SIGKILL)
        # HaloD gives the dead node's routes to the spare; whereis follows.
        wait_for(lambda: whereis(capsys, "--json", "--route", str(before["route"]), *state)[1]
                 .find('"node": "n2"') >= 0, "the spare to take the route", timeout=20)  # fmt: skip
        after = json.loads(whereis(capsys, "--json", "--key", json.dumps(key), *state)[1])
        assert after["node"] == "n2" and after["pid"] == cluster.children["n2"].pid
        cluster.refresh_state()  # as the running `orbited cluster` does every second
        assert before["node"] not in json.loads((tmp_path / "cluster.json").read_text())["pids"]
