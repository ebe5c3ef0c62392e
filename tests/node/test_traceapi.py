"""GET /orbited/trace on a real node's browser port (orbited.node.traceapi;
docs/operations.md, "Tracing a delivery")."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import pytest

from tests.conftest import NodeProcess, send_event

pytestmark = pytest.mark.slow

TRACE_KEY = "trace-key-0123456789-0123456789-abcdefgh"


@pytest.fixture(scope="module")
def traced_node(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("trace")
    (tmp / "trace-key").write_text(TRACE_KEY + "\n")
    node = NodeProcess(tmp, "--trace", "all", "--trace-per-key", "4",
                       "--trace-key-file", str(tmp / "trace-key"))  # fmt: skip
    node.start()
    yield node
    node.stop()


def get(node: NodeProcess, query: str, key: str | None = TRACE_KEY, method: str = "GET",
        **headers: str) -> tuple[int, Any, dict[str, str]]:  # fmt: skip
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    request = urllib.request.Request(
        f"http://{node.http}/orbited/trace?{query}", headers=headers, method=method
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, json.loads(r.read() or b"null"), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null"), dict(e.headers)


def test_the_path_is_404_without_a_trace_key(tmp_path):
    node = NodeProcess(tmp_path, "--trace", "all").start()
    try:
        status, body, _ = get(node, "user=alice")
        assert status == 404 and body["error"]["code"] == "not_found"
    finally:
        node.stop()


@pytest.mark.parametrize("key", [None, "wrong", TRACE_KEY + "x", ""])
def test_a_missing_or_wrong_key_is_401(traced_node, key):
    status, body, headers = get(traced_node, "user=alice", key=key)
    assert status == 401 and body["error"]["code"] == "unauthorized"
    assert headers["WWW-Authenticate"] == 'Bearer realm="orbited"'


@pytest.mark.parametrize(
    "headers",
    [{"origin": "https://evil.example"}, {"origin": "null"}, {"sec-fetch-site": "cross-site"},
     {"sec-fetch-site": "same-site"}],
)  # fmt: skip
def test_pages_are_refused_even_with_the_key(traced_node, headers):
    status, body, _ = get(traced_node, "user=alice", **headers)
    assert status == 403 and body["error"]["code"] == "cross_site"


@pytest.mark.parametrize(
    "query, message",
    [("", "user is required"), ("user=", "user"), ("user=a&limit=0", "limit must be 1-65536"),
     ("user=a&limit=65537", "limit must be 1-65536"), ("user=a&limit=x", "limit"),
     ("user=a&user=b", "more than once"), ("user=a&color=red", "unknown parameter"),
     ("user=a&event=" + "e" * 129, "event must be"), ("user=*", "reserved"),
     ("user=a&session=*", "reserved"), ("user=a&location=*", "reserved")],
)  # fmt: skip
def test_bad_queries_are_400(traced_node, query, message):
    status, body, _ = get(traced_node, query)
    assert status == 400 and body["error"]["code"] == "bad_request"
    assert message in body["error"]["message"]


def test_post_is_405(traced_node):
    status, body, headers = get(traced_node, "user=alice", method="POST")
    assert status == 405 and "GET" in headers["Allow"]


def test_the_answer_shows_delivery_write_and_ack(traced_node):
    node = traced_node
    with node.ws(node.token("tracy", "s1", "/chat")) as ws:
        hello = json.loads(ws.recv(timeout=5))
        with node.req() as req:
            reply = send_event(req, "42", [["tracy", "s1", "/chat"]], {"n": 1})
            assert reply["results"][0]["status"] == "delivered"
            send_event(req, "43", [["tracy", "s1", "/chat"]], {"n": 2})
        first = json.loads(ws.recv(timeout=5))
        json.loads(ws.recv(timeout=5))
        ws.send(json.dumps({"type": "ack", "seq": first["seq"]}))
        for _ in range(50):  # the ack is a message of its own: wait until the node has it
            status, answer, headers = get(node, "user=tracy&event=42")
            if answer["keys"][0]["acked"] == 1:
                break
            time.sleep(0.05)
        assert status == 200 and headers["Cache-Control"] == "no-store"
    assert answer["mode"] == "all" and answer["node"] and answer["epoch"] == node.epoch
    (key,) = answer["keys"]
    assert key["key"] == ["tracy", "s1", "/chat"] and key["here"] is True
    assert key["stream"] == hello["stream"] and key["last_seq"] == 2
    (record,) = key["dispatches"]
    assert record["event"] == "42" and record["status"] == "delivered" and record["seq"] == 1
    assert record["transport"] == "ws" and record["written"] is not None
    assert record["acked"] is not None and record["acked"] >= record["written"]
    assert [n["what"] for n in key["notes"]][0] == "attach"
    assert answer["gauges"]["traced_keys"] >= 1
    status, everything, _ = get(node, urllib.parse.urlencode({"user": "tracy", "limit": 1}))
    assert [r["event"] for r in everything["keys"][0]["dispatches"]] == ["43"]
    status, nobody, _ = get(node, "user=nobody")
    assert status == 200 and nobody["keys"] == []
    # empty session / location: any (as HaloD's /trace); a limit past what is kept: all
    status, same, _ = get(node, "user=tracy&session=&location=&limit=500")
    assert status == 200 and [k["key"] for k in same["keys"]] == [["tracy", "s1", "/chat"]]
    assert [r["event"] for r in same["keys"][0]["dispatches"]] == ["42", "43"]
