"""``orbited trace`` (orbited/trace.py): the text it prints for HaloD's merged answer and
for one node's, and how it asks: the bearer key, a follower's 409 followed to the
leader, errors and exit codes. HTTP is a stdlib server on 127.0.0.1 that answers as
docs/operations.md and docs/halod-protocol.md say HaloD and a node do; the real
endpoints are exercised in tests/integration (test_cli.py, test_trace_moves.py)."""

from __future__ import annotations

import json
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from orbited.core.traceview import merge_keys, verdicts
from orbited.trace import node_view, trace_command, trace_lines, traced

T = 1796540400.0
KEY = ["alice", "3f9a", "/chat"]
OPERATOR_KEY = b"o" * 40
TRACE_KEY = b"t" * 40


def rec(event: str, t: float, node: str = "n1", **fields: Any) -> dict[str, Any]:
    return {"t": t, "event": event, "request": "77aa0c13d2e4f0a1", "node": node, "route": 13,
            "status": "queued", "seq": int(event), "stream": "kQ3v_x9A.1f", "dropped": 0,
            "ack_wait": None, "written": None, "transport": None, "rewritten": 0,
            "acked": None, "outcome": None, "handed": None, "trace_id": None,
            **fields}  # fmt: skip


N1 = {"node": "n1", "mode": "all", "keys": [{
    "key": KEY, "route": 13, "here": False,
    "dispatches": [rec("41", T + 1, status="delivered", written=T + 1.0003, transport="ws",
                       acked=T + 1.182),
                   rec("42", T + 2.002, handed="out:n2")],
    "notes": [{"t": T + 2.01, "what": "moved", "route": 13, "to": "tcp://n2:9001",
               "handed": True}]}]}  # fmt: skip
N2 = {"node": "n2", "mode": "all", "keys": [{
    "key": KEY, "route": 13, "here": True, "stream": "kQ3v_x9A.1f", "attached": "ws",
    "last_seq": 42, "acked": 42,
    "dispatches": [rec("42", T + 2.002, handed="out:n2", written=T + 2.21, transport="ws",
                       rewritten=1, acked=T + 2.6)],
    "notes": [{"t": T + 2.1, "what": "handed_in", "origin": "n1"}]}]}  # fmt: skip
FAILED = [{"name": "n3", "at": T + 12, "why": "ports refused"}]


def halod_answer(event: str | None = "42") -> dict[str, Any]:
    keys = merge_keys({"n1": N1, "n2": N2})
    return {
        "query": {"user": "alice", "session": None, "location": None, "event": event},
        "asked": ["n1", "n2", "n4"], "answered": ["n1", "n2"],
        "missing": [{"name": "n4", "why": "no reply in 1 s"}], "failed_nodes": FAILED,
        "keys": keys, "verdicts": verdicts(keys, event, FAILED),
        "incidents": [{"id": 88, "kind": "drain", "node": "n1", "reason": "operator",
                       "first_sign": T + 2.0, "handoff_s": 0.041, "browsers_moved": 150,
                       "browsers_back": 150, "back_s": 0.29,
                       "moves": [{"route": r, "old": "n1", "new": "n2"}
                                 for r in (13, 14, 15, 20)]},
                      {"id": 89, "kind": "join", "node": "n5", "first_sign": T,
                       "moves": [{"route": 7, "old": None, "new": "n5"}]}],
    }  # fmt: skip


def test_the_merged_answer_as_text():
    lines = trace_lines(halod_answer())
    assert lines[0] == (
        'key ["alice","3f9a","/chat"]  route 13, now on n2 · stream kQ3v_x9A.1f · '
        "attached ws · acked 42 of 42"
    )
    assert lines[1].split() == ["TIME", "NODE", "EVENT", "REQUEST", "STATUS", "SEQ", "WRITTEN",
                                "ACKED", "NOTE"]  # fmt: skip
    assert lines[2].split() == ["07:00:01.000", "n1", "41", "77aa0c13", "delivered", "41",
                                "+0.3ms", "ws", "+182ms"]  # fmt: skip
    assert lines[3].split() == ["07:00:02.002", "n1", "42", "77aa0c13", "queued", "42",
                                "+208ms", "ws", "(replay)", "+598ms", "handed", "out", "to",
                                "n2"]  # fmt: skip
    assert lines[4].split()[:3] == ["07:00:02.010", "n1", "moved"]
    assert lines[5].split() == ["07:00:02.100", "n2", "handed_in", "origin=n1"]
    assert lines[6] == (
        "07:00:02.000  --   incident 88: drain n1 (operator) · routes 13-15,20 → n2 · "
        "hand-off 41 ms · 150/150 browsers back 0.29 s"
    )  # the join of route 7 is not this key's
    assert lines[8:] == [
        'event 42 → ["alice","3f9a","/chat"]: written to ws on n2 at 07:00:02.210 (after the '
        "hand-off), acknowledged 07:00:02.600",
        "n4 did not answer: no reply in 1 s",
        "records of n3 (failed 07:00:12.000, ports refused) are lost with its process",
    ]


def test_one_nodes_answer_prints_like_haloDs():
    view = node_view(N1, "n1", {"user": "alice", "event": None})
    assert view["asked"] == view["answered"] == ["n1"] and view["missing"] == []
    lines = trace_lines(view)
    assert lines[0] == 'key ["alice","3f9a","/chat"]  route 13, no node holds its mailbox'
    assert lines[-1].startswith('event 42 → ["alice","3f9a","/chat"]: queued on n1')
    assert traced(view)


def test_nothing_traced():
    answer = {"keys": [], "verdicts": verdicts([], "42")}
    assert trace_lines(answer) == [
        "event 42 → this user: no node has a record of event 42 for this user: it never "
        "reached the cluster, tracing was off (the nodes' default: trace = off), or the keys "
        "fell out of the trace"
    ]
    assert not traced(answer)
    assert not traced({"keys": [{"key": KEY, "dispatches": [], "notes": []}]})


def test_an_asked_event_with_no_record_is_not_traced_though_the_key_has_notes():
    """``--event X``: a key's attach and detach notes say nothing of X (exit 1)."""
    key = {"key": KEY, "dispatches": [], "notes": [{"t": 1.0, "kind": "attach"}]}
    assert traced({"keys": [key]})  # without --event: something was traced
    assert not traced({"keys": [key]}, "x")
    assert traced({"keys": [dict(key, dispatches=[{"event": "x", "t": 1.0}])]}, "x")


def test_control_characters_from_nodes_are_escaped():
    bad = {"keys": [{"key": ["al\x1b[31mice", "", ""], "route": 1,
                     "dispatches": [{**rec("1", T), "event": "\x1b]0;x\x07"}]}]}  # fmt: skip
    text = "\n".join(trace_lines(bad))
    assert "\x1b" not in text and "\x07" not in text
    assert "\\x1b]0;x\\x07" in text and "\\u001b[31mice" in text


def test_a_truncated_answer_says_so():
    assert trace_lines({"keys": [], "truncated": True})[-1] == (
        "(truncated: the oldest records were left out to fit a control message; ask with "
        "--event or --limit)"
    )
    assert trace_lines({"keys": [], "truncated": ["n1", "n3"]})[-1].startswith(
        "(truncated on n1, n3: "
    )
    assert trace_lines({"keys": [], "truncated": []}) == []


# -- asking, over HTTP -----------------------------------------------------------------------


class Server:
    """Answers GET /trace (as HaloD) and /orbited/trace (as a node) from a script."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, list[str]], str | None]] = []
        self.reply: tuple[int, Any] = (200, halod_answer())
        self.routes: dict[str, tuple[int, Any]] = {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                url = urllib.parse.urlsplit(self.path)
                outer.requests.append((url.path, urllib.parse.parse_qs(url.query),
                                       self.headers.get("authorization")))  # fmt: skip
                status, body = outer.routes.get(url.path, outer.reply)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.close()


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "operator.key").write_bytes(OPERATOR_KEY)
    (tmp_path / "trace.key").write_bytes(TRACE_KEY)
    return {"operator": tmp_path / "operator.key", "trace": tmp_path / "trace.key"}


def test_haloD_is_asked_with_the_operator_key(server, keys, capsys, monkeypatch):
    monkeypatch.delenv("HALOD_OPERATOR_KEY_FILE", raising=False)
    code = trace_command(["--user", "alice", "--event", "42", "--url", server.url,
                          "--operator-key-file", str(keys["operator"])])  # fmt: skip
    assert code == 0
    ((path, query, auth),) = server.requests
    assert path == "/trace" and query == {"user": ["alice"], "event": ["42"]}
    assert auth == "Bearer " + OPERATOR_KEY.decode()
    out = capsys.readouterr().out
    assert "written to ws on n2 at 07:00:02.210 (after the hand-off)" in out


def test_the_key_file_comes_from_the_environment_or_the_clusters_state(
    server, keys, tmp_path, monkeypatch
):  # fmt: skip
    monkeypatch.setenv("HALOD_OPERATOR_KEY_FILE", str(keys["operator"]))
    assert trace_command(["--user", "alice", "--url", server.url, "--json"]) == 0
    assert server.requests[-1][2] == "Bearer " + OPERATOR_KEY.decode()
    monkeypatch.delenv("HALOD_OPERATOR_KEY_FILE")
    state = tmp_path / "cluster"
    state.mkdir()
    (state / "cluster.json").write_text(json.dumps(
        {"halod_status": server.url, "operator_key_file": str(keys["operator"])}))  # fmt: skip
    assert trace_command(["--user", "alice", "--state-dir", str(state)]) == 0
    assert server.requests[-1][2] == "Bearer " + OPERATOR_KEY.decode()
    (tmp_path / "empty").mkdir()
    assert trace_command(["--user", "alice", "--url", server.url,
                          "--state-dir", str(tmp_path / "empty")]) == 0  # fmt: skip
    assert server.requests[-1][2] is None  # no key configured: none sent


def test_with_ha_the_leading_halod_is_asked(server, keys, tmp_path):
    """cluster.json of ``orbited cluster --ha`` names both HaloDs; the first one is dead,
    the other leads: the trace goes to the leader."""
    server.routes["/status"] = (200, {"role": "leader"})
    state = tmp_path / "cluster"
    state.mkdir()
    dead = "http://127.0.0.1:9"
    (state / "cluster.json").write_text(json.dumps({
        "halod_status": dead, "halod_statuses": [dead, server.url],
        "operator_key_file": str(keys["operator"]),
    }))  # fmt: skip
    assert trace_command(["--user", "alice", "--state-dir", str(state)]) == 0
    assert [path for path, _, _ in server.requests] == ["/status", "/trace"]


def test_json_output_is_the_answer(server, capsys):
    assert trace_command(["--user", "alice", "--url", server.url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == server.reply[1]


def test_a_key_names_all_three_parts(server):
    argv = ["--key", json.dumps(KEY), "--limit", "4", "--url", server.url]
    assert trace_command(argv) == 0
    assert server.requests[0][1] == {"user": ["alice"], "session": ["3f9a"],
                                     "location": ["/chat"], "limit": ["4"]}  # fmt: skip


def test_nothing_traced_exits_1_with_the_verdict(server, capsys):
    server.reply = (200, {"keys": [], "verdicts": verdicts([], "42"), "missing": [],
                          "failed_nodes": []})  # fmt: skip
    assert trace_command(["--user", "bob", "--event", "42", "--url", server.url]) == 1
    assert "no node has a record of event 42" in capsys.readouterr().out


def test_a_follower_is_followed_to_the_leader(server):
    leader = Server()
    try:
        status = leader.url.removeprefix("http://")
        server.reply = (409, {"error": {"code": "not_leader", "message": "this HaloD follows",
                                        "leader": {"name": "h1", "status": status}}})  # fmt: skip
        assert trace_command(["--user", "alice", "--url", server.url]) == 0
        assert len(server.requests) == 1 and len(leader.requests) == 1
    finally:
        leader.close()


@pytest.mark.parametrize(
    ("status", "error", "said"),
    [
        (401, {"code": "unauthorized", "message": "operator key required"},
         "401 unauthorized: operator key required"),
        (403, {"code": "cross_site", "message": "x"}, "403 cross_site"),
        (503, {"code": "busy", "message": "too many trace queries"}, "503 busy"),
        (409, {"code": "not_leader", "message": "no leader"}, "409 not_leader: no leader"),
    ],
)  # fmt: skip
def test_refusals_exit_1_with_the_reason(server, capsys, status, error, said):
    server.reply = (status, {"error": error})
    assert trace_command(["--user", "alice", "--url", server.url]) == 1
    err = capsys.readouterr().err
    assert err.startswith("orbited trace: ") and said in err


def test_an_answer_that_is_not_a_trace_exits_1(server, capsys):
    server.reply = (200, {"nodes": []})
    assert trace_command(["--user", "alice", "--url", server.url]) == 1
    assert "did not answer a trace" in capsys.readouterr().err


def test_nobody_listening_exits_1(capsys):
    server = Server()
    url = server.url
    server.close()
    assert trace_command(["--user", "alice", "--url", url]) == 1
    assert "cannot reach" in capsys.readouterr().err


def test_a_node_is_asked_directly_with_its_trace_key(server, keys, capsys):
    server.routes["/orbited/trace"] = (200, N2)
    argv = ["--user", "alice", "--event", "42", "--node", server.url,
            "--key-file", str(keys["trace"])]  # fmt: skip
    assert trace_command(argv) == 0
    ((path, query, auth),) = server.requests
    assert path == "/orbited/trace" and query == {"user": ["alice"], "event": ["42"]}
    assert auth == "Bearer " + TRACE_KEY.decode()
    out = capsys.readouterr().out
    assert "now on n2" in out and "acknowledged 07:00:02.600" in out


@pytest.mark.parametrize(
    "argv",
    [
        [],  # no user
        ["--user", ""],
        ["--user", "alice", "--key", '["bob", "", ""]'],
        ["--key", "[1]"],
        ["--key", "not json"],
        ["--user", "alice", "--event", ""],
        ["--user", "alice", "--limit", "0"],
        ["--user", "alice", "--limit", "x"],
        ["--user", "alice", "--node", "http://127.0.0.1:1"],  # no --key-file
    ],
)
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        trace_command(argv)
    assert e.value.code == 2
    assert "usage: orbited trace" in capsys.readouterr().err


def test_a_short_or_missing_key_file_exits_2(server, tmp_path, capsys):
    short = tmp_path / "short.key"
    short.write_bytes(b"abc")
    for path in (short, tmp_path / "missing.key"):
        assert trace_command(["--user", "alice", "--url", server.url,
                              "--operator-key-file", str(path)]) == 2  # fmt: skip
        assert capsys.readouterr().err.startswith("orbited trace: ")
    assert server.requests == []


def test_a_node_without_the_endpoint_says_how_to_turn_it_on(server, keys, capsys):
    server.routes["/orbited/trace"] = (404, {"error": {"code": "not_found", "message": "no"}})
    argv = ["--user", "alice", "--node", server.url, "--key-file", str(keys["trace"])]
    assert trace_command(argv) == 1
    assert "trace endpoint is off: set its trace_key_file" in capsys.readouterr().err
