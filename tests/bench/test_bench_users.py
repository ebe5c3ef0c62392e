"""User-addressed events in the load tools: bench/sender.py ``--users`` (one
``[user, "*", "*"]`` per user) and its per-key accounting (bench/chaos_report.py,
``selector_statuses``), which the user chaos test (tests/integration/test_chaos.py)
relies on."""

from __future__ import annotations

import json
import time

import pytest

from bench.browsers import BrowserProcesses
from bench.chaos_report import UNMATCHED, analyse, key_results, selector_statuses
from bench.sender import SenderProcess
from orbited.core.hashing import DEFAULT_ROUTES, route_of_user
from orbited.core.keys import ConnectionKey
from tests.conftest import NodeProcess

KEYS = [("u", "s1", "/a"), ("u", "s1", "/b"), ("u", "s2", "/a")]


def test_key_results_reads_the_wire_and_the_client_form():
    wire = {"status": "matched", "keys": [{"key": ["u", "s1", "/a"], "status": "delivered",
                                           "seq": 4}]}  # fmt: skip
    client = {"status": "matched", "keys": {ConnectionKey("u", "s1", "/a"): {"status": "delivered",
                                                                          "seq": 4}}}  # fmt: skip
    assert key_results(wire) == key_results(client) == {
        ("u", "s1", "/a"): {"status": "delivered", "seq": 4}}  # fmt: skip
    assert key_results({"status": "no_connection", "keys": []}) == {}


def test_selector_statuses_give_every_key_of_the_user_one_status():
    matched = {"status": "matched", "keys": [
        {"key": ["u", "s1", "/a"], "status": "acked", "seq": 1},
        {"key": ["u", "s2", "/a"], "status": "queued", "seq": 9, "dropped": 1},
    ]}  # fmt: skip
    expected = {("u", "s1", "/a"): "acked", ("u", "s1", "/b"): UNMATCHED,
                ("u", "s2", "/a"): "queued"}  # fmt: skip
    assert selector_statuses(matched, KEYS) == expected
    for whole in ({"status": "no_connection", "keys": [], "held": True},
                  {"status": "limited", "retry_after": 0.5},
                  {"status": "moved", "route": 3, "hash": 2},
                  {"status": "error", "code": "unreachable"}):  # fmt: skip
        assert set(selector_statuses(whole, KEYS).values()) == {whole["status"]}


def test_analyse_counts_a_user_event_per_key():
    """Accepted per key from the wildcard replies; a key that was not matched owes
    nothing, a matched one that did not get it is lost."""
    replies = {1: {"status": "matched", "keys": [{"key": list(k), "status": "delivered", "seq": 1}
                                                 for k in KEYS]},
               2: {"status": "matched", "keys": [{"key": list(KEYS[0]), "status": "delivered",
                                                  "seq": 2}]}}  # fmt: skip
    accepted: dict[str, set[int]] = {":".join(k): set() for k in KEYS}
    for n, reply in replies.items():
        for key, status in selector_statuses(reply, KEYS).items():
            if status == "delivered":
                accepted[":".join(key)].add(n)
    clients = [{"id": ":".join(KEYS[0]), "received": [[1, 2]], "dups": 0},
               {"id": ":".join(KEYS[1]), "received": [[1, 1]], "dups": 0},
               {"id": ":".join(KEYS[2]), "received": [], "dups": 1}]  # fmt: skip
    summary = analyse(accepted, clients)["summary"]
    assert (summary["accepted"], summary["lost"], summary["duplicated"]) == (4, 1, 1)


@pytest.mark.slow
def test_the_sender_addresses_users_and_every_key_gets_every_round_once(tmp_path):
    """4 users × 3 keys on every transport, one node: each round is one request with four
    wildcards; every key's reply status is `delivered`/`queued` and every key gets each
    round exactly once."""
    node = NodeProcess(tmp_path, "--linger", "5", "--log-level", "warn").start()
    keys = [[f"bu{u}", f"s{j % 2}", f"/t{j}"] for u in range(4) for j in range(3)]
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps(keys))
    args = ["--secret-file", str(node.secret_file), "--url", f"http://{node.http}",
            "--keys-file", str(keys_file),
            "--transports", "ws=1,poll=1,sse=1,iframe=1"]  # fmt: skip
    browsers = BrowserProcesses(tmp_path, len(keys), 1, args)
    try:
        browsers.wait_ready(20)
        sender = SenderProcess(tmp_path, ["--node-sp", node.sp, "--keys-file", str(keys_file),
                                          "--count", str(len(keys)), "--users",
                                          "--interval", "100", "--duration", "2"])  # fmt: skip
        sent = sender.wait(30)
        time.sleep(1.0)
        reports = browsers.stop()
    finally:
        browsers.kill()
        node.stop()
    assert sent["users"] is True and sent["rounds"] >= 10
    # one request per route a round (one wildcard per user), no resend
    routes = {route_of_user(f"bu{u}", DEFAULT_ROUTES) for u in range(4)}
    assert sent["requests"] == sent["rounds"] * len(routes)
    assert set(sent["status_counts"]) <= {"delivered", "queued"}, sent["status_counts"]
    clients = BrowserProcesses.clients(reports)
    accepted = {k: v["accepted"] for k, v in sent["keys"].items()}
    summary = analyse(accepted, clients, sent["round_times"])["summary"]
    assert summary["accepted"] == len(keys) * sent["rounds"], summary
    assert summary["lost"] == 0 and summary["duplicated"] == 0, summary
    assert all(c["count"] == sent["rounds"] and c["foreign"] == 0 for c in clients)
