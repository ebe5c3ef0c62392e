"""The load tool the chaos, failover and soak tests stand on: its pure analysis
(bench/chaos_report.py), the simulated browsers' parsing and backoff (bench/browsers.py),
and a real node with browser processes on every transport plus the sender
(bench/sender.py), once undisturbed and once through a node shutdown and restart."""

from __future__ import annotations

import json
import random
import time

import pytest

from bench.browsers import (
    Browser,
    BrowserProcesses,
    Options,
    Shared,
    _IframeParser,
    _SSEParser,
    backoff_delay,
    halod_urls,
    make_keys,
    transport_pattern,
)
from bench.chaos_report import (
    ArrivalRanges,
    RangeSet,
    analyse,
    compress,
    expand,
    percentile,
    recovery_after,
)
from bench.sender import SenderProcess, classify
from orbited.client.blocking import event_body
from orbited.core.hashing import route_of
from orbited.node.transports.streaming import script_literal
from tests.conftest import NodeProcess, free_port_block

# -- chaos_report ------------------------------------------------------------------------


def test_ranges_round_trip():
    assert compress([5, 1, 2, 3, 3, 9, 10]) == [[1, 3], [5, 5], [9, 10]]
    assert compress([]) == []
    assert expand([[1, 3], [9, 10], [2, 2]]) == {1, 2, 3, 9, 10}


def test_arrival_ranges_keep_order():
    arrivals = ArrivalRanges()
    for n in [1, 2, 3, 7, 8, 4, 5]:
        arrivals.add(n)
    assert arrivals.runs == [[1, 3], [7, 8], [4, 5]]
    assert arrivals.count == 7


def test_range_set_matches_a_set():
    rng = random.Random(7)
    values = [rng.randrange(200) for _ in range(500)]
    ranges, plain = RangeSet(), set()
    for v in values:
        ranges.add(v)
        plain.add(v)
        assert v in ranges
    assert ranges.ranges() == compress(plain)
    assert len(ranges) == len(plain)
    assert 1000 not in ranges


def test_percentile_nearest_rank():
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile(list(range(1, 101)), 99) == 99
    assert percentile([5.0], 99) == 5.0


def test_recovery_after_an_incident():
    window = (100.0, 110.0)
    assert recovery_after([], window) == (False, None)
    assert recovery_after([[90.0, 91.0, 90.5]], window) == (False, None)  # before: not ours
    assert recovery_after([[101.0, 103.5, 103.0]], window) == (True, 3.5)
    assert recovery_after([[101.0, None, None]], window) == (True, None)  # never again
    # A reconnect that failed again inside the window: until the last one ended.
    assert recovery_after([[101.0, 102.0, None], [102.5, 106.0, None]], window) == (True, 6.0)


def test_analyse_lost_duplicated_and_incidents():
    round_times = [100.0 + n for n in range(10)]  # round n sent at 99 + n
    accepted = {
        "a": [[1, 10]],
        "b": set(range(1, 11)),
        "c": [[1, 10]],
        "gone": [[1, 2]],  # no browser reported this key
    }
    clients = [
        {"id": "a", "transport": "ws", "received": [[1, 10]], "dups": 0, "outages": []},
        # b lost 4 and 5 (sent at 103 and 104, inside the incident) and 9 (outside) and
        # saw one event twice; it was out from 103.2 to 106.0.
        {"id": "b", "transport": "poll", "received": [[1, 3], [6, 8], [10, 10]], "dups": 1,
         "outages": [[103.2, 106.0, 105.9]], "reconnects": 2, "resets": 1},
        {"id": "c", "transport": "sse", "received": [[1, 10], [11, 11]], "dups": 0,
         "outages": [[103.0, None, None]], "out_of_order": 2},
    ]  # fmt: skip
    result = analyse(accepted, clients, round_times, [(103.0, 105.0)])
    assert result["clients"]["c"]["out_of_order"] == 2 and result["summary"]["out_of_order"] == 2
    b = result["clients"]["b"]
    assert b["lost"] == [[4, 5], [9, 9]]
    assert b["lost_by_window"] == {"0": [[4, 5]], "outside": [[9, 9]]}
    assert b["recoveries"] == [3.0]
    assert result["clients"]["c"]["unexpected"] == 1  # 11 arrived, never accepted
    assert result["clients"]["c"]["recoveries"] == ["never"]
    assert result["clients"]["a"]["recoveries"] == [None]  # unaffected
    s = result["summary"]
    assert s["lost"] == 3 + 2  # b's three and the unreported key's two
    assert s["lost_outside_windows"] == 1 + 2
    assert s["duplicated"] == 1
    assert s["missing_clients"] == ["gone"]
    assert s["clients_with_loss"] == 2
    assert s["reconnects"] == 2 and s["resets"] == 1
    assert s["transports"]["poll"] == {"clients": 1, "received": 7, "lost": 3, "duplicated": 1}
    (incident,) = s["incidents"]
    assert incident["affected"] == 2
    assert incident["never_recovered"] == ["c"]
    assert incident["recovery"]["max"] == 3.0
    assert incident["lost"] == 2


# -- browsers: pieces ----------------------------------------------------------------------


def test_backoff_mirrors_the_js_client():
    assert backoff_delay(0, 0.2, 2.0, lambda: 0.0) == 0.1
    assert backoff_delay(0, 0.2, 2.0, lambda: 1.0) == 0.2
    assert backoff_delay(3, 0.2, 2.0, lambda: 1.0) == pytest.approx(1.6)
    assert backoff_delay(10, 0.2, 2.0, lambda: 0.0) == 1.0  # capped: [cap/2, cap]


def test_reconnect_schedule_mirrors_the_js_client(monkeypatch):
    """js/orbited.js _retry (docs/client.md): after a connection that worked, one quick
    retry (0.1 s + random × the node's spread; random × spread after a reconnect frame)
    that is no backoff attempt; a second loss right after goes to the backoff."""
    monkeypatch.setattr(random, "random", lambda: 1.0)
    (key,) = make_keys("q", 1)
    b = Browser(key, "ws", "http://127.0.0.1:1", Shared(b"s" * 32, Options()))
    b.on_frame({"type": "hello", "stream": "x", "keepalive": 25, "seq": 0, "spread": 0.4})
    b._hello_at -= 5  # a connection that lasted 5 s
    assert b._retry_delay(worked=True, planned=False) == pytest.approx(0.5)  # 0.1 + 0.4
    assert 0.1 <= b._retry_delay(worked=False, planned=False) <= 0.2  # backoff attempt 0
    b.on_frame({"type": "hello", "stream": "x", "keepalive": 25, "seq": 0})
    b.on_frame({"type": "ping", "spread": 0.25})
    assert b._retry_delay(worked=True, planned=True) == pytest.approx(0.25)  # a planned move
    b.on_frame({"type": "hello", "stream": "x", "keepalive": 25, "seq": 0})
    # lost < STABLE after its hello, right after a short one: the backoff pace
    assert 0.1 <= b._retry_delay(worked=True, planned=False) <= 0.2  # not 0.1 + 0.25
    b.on_frame({"type": "hello", "stream": "x", "keepalive": 25, "seq": 0, "spread": 0.4})
    b._hello_at -= 5  # a stable connection again
    # A planned move's reconnect frame brings its own spread (its movers only).
    assert b.on_frame({"type": "reconnect", "reason": "route_moved", "spread": 0.03})
    assert b._retry_delay(worked=True, planned=True) == pytest.approx(0.03)


def test_a_reconnect_frames_route_leads_to_that_routes_port():
    # js/orbited.js's locate: after a rehash or a move the key's route is another port.
    # Before, the simulated browsers dialled the same port again for ever.
    from bench.browsers import Browser, Options, Shared, halod_urls, route_urls
    from orbited.core.keys import ConnectionKey

    key = ConnectionKey("b7", "s", "/bench")
    url_for = halod_urls("127.0.0.1:30000", 24, version=1)
    assert url_for(key) == f"http://127.0.0.1:{30000 + route_of(key, 24, 1) - 1}"
    shared = Shared(b"k" * 32, Options())
    browser = Browser(key, "ws", url_for(key), shared)
    browser.on_frame({"type": "reconnect", "reason": "rehash", "route": 5})
    assert browser.base_url == url_for(key)  # one node (no locate): the same URL again
    shared.locate = route_urls("127.0.0.1:30000")
    assert browser.on_frame({"type": "reconnect", "reason": "rehash", "route": 5}) == "reconnect"
    assert browser.base_url == "http://127.0.0.1:30004"
    browser.on_frame({"type": "reconnect", "reason": "shutdown"})  # no route: stays
    assert browser.base_url == "http://127.0.0.1:30004"


def test_transport_pattern_and_keys():
    assert transport_pattern("ws=2,poll=1,sse") == ["ws", "ws", "poll", "sse"]
    assert transport_pattern("ws=1,iframe=0") == ["ws"]
    with pytest.raises(ValueError):
        transport_pattern("carrier-pigeon")
    assert make_keys("p", 2, offset=5) == [("p5", "s", "/bench"), ("p6", "s", "/bench")]
    key = make_keys("p", 1)[0]
    assert halod_urls("127.0.0.1:30000", 24)(key) == f"http://127.0.0.1:{29999 + route_of(key)}"


def test_stream_parsers_survive_any_chunking():
    frames = [{"type": "hello", "stream": "x.1", "keepalive": 25},
              {"type": "event", "seq": 1, "data": {"n": 1, "s": "</script>\u2028é"}}]  # fmt: skip
    sse = b": orbited\n\n" + b"".join(
        b"data: " + json.dumps(f, separators=(",", ":")).encode() + b"\n\n" for f in frames
    )
    iframe = b"<!DOCTYPE html><html><body><script>var t=1</script>\n<!--  -->\n" + b"".join(
        b"<script>f(" + script_literal(json.dumps(f).encode()) + b")</script>\n" for f in frames
    )
    for parser_class, document in ((_SSEParser, sse), (_IframeParser, iframe)):
        for size in (1, 7, len(document)):
            parser = parser_class()
            got = []
            for i in range(0, len(document), size):
                got += parser.feed(document[i : i + size])
            assert got == frames, (parser_class, size)


def test_event_body_carries_ack_only_when_asked():
    key = make_keys("p", 1)[0]
    assert "ack" not in json.loads(event_body("e1", [key], {"n": 1}))
    assert json.loads(event_body("e1", [key], {"n": 1}, ack=2.5))["ack"] == 2.5


def test_reply_statuses():
    assert classify({"status": "delivered", "seq": 1}) == "delivered"
    assert classify({"status": "error", "code": "unreachable", "error": "x"}) == "unreachable"
    assert classify({"status": "error", "code": "bad_key"}) == "error"


# -- real processes ----------------------------------------------------------------------


def fleet(node: NodeProcess, count: int, procs: int, *extra: str) -> BrowserProcesses:
    args = ["--secret-file", str(node.secret_file), "--url", f"http://{node.http}",
            "--prefix", "b", "--transports", "ws=1,poll=1,sse=1,iframe=1", *extra]  # fmt: skip
    return BrowserProcesses(node.tmp, count, procs, args)


@pytest.mark.slow
def test_mixed_fleet_gets_every_event_once(tmp_path):
    node = NodeProcess(tmp_path, "--linger", "5", "--log-level", "warn").start()
    browsers = fleet(node, 40, 2)
    try:
        ready = browsers.wait_ready(20)
        assert sum(r["connected"] for r in ready) == 40
        sender = SenderProcess(tmp_path, ["--node-sp", node.sp, "--prefix", "b", "--count", "40",
                                          "--interval", "50", "--duration", "3"])  # fmt: skip
        sent = sender.wait(30)
        time.sleep(1.0)  # the last round's events are on their way
        reports = browsers.stop()
    finally:
        browsers.kill()
        node.stop()
    clients = BrowserProcesses.clients(reports)
    accepted = {k: v["accepted"] for k, v in sent["keys"].items()}
    summary = analyse(accepted, clients, sent["round_times"])["summary"]
    assert sent["rounds"] >= 30
    assert set(sent["status_counts"]) <= {"delivered", "queued"}, sent["status_counts"]
    assert summary["accepted"] == 40 * sent["rounds"]
    assert summary["lost"] == 0, summary
    assert summary["duplicated"] == 0
    assert summary["reconnects"] == 0
    assert {t: v["clients"] for t, v in summary["transports"].items()} == {
        "ws": 10, "poll": 10, "sse": 10, "iframe": 10}  # fmt: skip
    assert all(c["count"] == sent["rounds"] and c["out_of_order"] == 0 for c in clients)
    assert all(r["loop_lag"]["max"] < 0.5 for r in reports)  # the clients kept up


@pytest.mark.slow
def test_node_shutdown_and_restart(tmp_path):
    http = f"127.0.0.1:{free_port_block(1)}"
    sp = f"tcp://127.0.0.1:{free_port_block(1)}"
    node = NodeProcess(tmp_path, "--linger", "5", "--log-level", "warn").start(http, sp)
    browsers = fleet(node, 20, 1, "--backoff-max", "0.5")
    try:
        browsers.wait_ready(20)
        sender = SenderProcess(tmp_path, ["--node-sp", sp, "--prefix", "b", "--count", "20",
                                          "--interval", "50", "--duration", "5",
                                          "--timeout", "1", "--retries", "1"])  # fmt: skip
        time.sleep(1.5)
        down = time.time()
        node.stop()  # SIGTERM: every browser is told {"type":"reconnect","reason":"shutdown"}
        node.start(http, sp)
        up = time.time()
        sent = sender.wait(30)
        time.sleep(1.0)
        reports = browsers.stop()
    finally:
        browsers.kill()
        if node.alive():
            node.stop()
    clients = BrowserProcesses.clients(reports)
    accepted = {k: v["accepted"] for k, v in sent["keys"].items()}
    result = analyse(accepted, clients, sent["round_times"], [(down, up + 1.0)])
    summary = result["summary"]
    (incident,) = summary["incidents"]
    assert incident["affected"] == 20, incident
    assert incident["never_recovered"] == []
    assert incident["recovery"]["max"] < 5.0
    assert summary["lost_outside_windows"] == 0, summary
    assert summary["duplicated"] == 0
    assert all(c["resets"] >= 1 and c["reconnects"] >= 1 for c in clients)
    assert all(c["errors"].get("reconnect: shutdown") for c in clients)
    # Every transport takes the frame as a planned move (the quick reconnect), as js does,
    # also when it came in a response's last chunk (SSE and iframe).
    assert all(c["errors"].get("reconnect frame") for c in clients), [
        (c["transport"], c["errors"]) for c in clients if not c["errors"].get("reconnect frame")
    ]
    assert "unreachable" in sent["status_counts"] or "no_connection" in sent["status_counts"]
    # After the restart every transport got events again.
    assert all(expand(c["received"]) & set(range(len(sent["round_times"]) - 10,
                                                 len(sent["round_times"]) + 1))
               for c in clients)  # fmt: skip


@pytest.mark.slow
def test_acknowledged_mode_every_transport_acks(tmp_path):
    """--ack-timeout: each reply waits for the browser's ack (WebSocket ack, long-poll
    last, POST /orbited/ack for SSE and iframe), so every event comes back `acked`."""
    node = NodeProcess(tmp_path, "--linger", "5", "--log-level", "warn").start()
    browsers = fleet(node, 20, 1)
    try:
        browsers.wait_ready(20)
        # --routes 1: one request per round, so the waiting requests stay few.
        sender = SenderProcess(tmp_path, ["--node-sp", node.sp, "--prefix", "b", "--count", "20",
                                          "--routes", "1", "--interval", "100", "--duration", "2",
                                          "--ack-timeout", "4"])  # fmt: skip
        sent = sender.wait(30)
        reports = browsers.stop()
    finally:
        browsers.kill()
        node.stop()
    assert set(sent["status_counts"]) == {"acked"}, sent["status_counts"]
    assert sent["unfinished"] == 0
    assert all(r["http_ack"] for r in reports)  # the node has POST /orbited/ack
    accepted = {k: v["accepted"] for k, v in sent["keys"].items()}
    summary = analyse(accepted, BrowserProcesses.clients(reports), sent["round_times"])["summary"]
    assert summary["accepted"] == 20 * sent["rounds"]
    assert summary["lost"] == 0 and summary["duplicated"] == 0


def test_a_resent_event_id_is_dropped_as_the_js_client_does():
    # A node crash: the web app resends events 1-2 to the new owner, on a new stream.
    opts = Options(dedup_window=2)
    b = Browser(make_keys("d", 1)[0], "ws", "http://127.0.0.1:1", Shared(b"s" * 32, opts))
    b.on_frame({"type": "hello", "stream": "dead.1", "keepalive": 25, "seq": 0})
    for n in (1, 2):
        b.on_frame({"type": "event", "seq": n, "id": f"e{n}", "data": {"n": n}})
    b.on_frame({"type": "hello", "stream": "new.1", "keepalive": 25, "seq": 0, "reset": True})
    for n in (1, 2, 3):
        b.on_frame({"type": "event", "seq": n, "id": f"e{n}", "data": {"n": n}})
    report = b.report()
    assert (report["count"], report["dups"], report["dup_dropped"]) == (3, 0, 2)
    assert report["position"] == "new.1:3"  # dropped resends are acknowledged too
    # the window is bounded (2 ids: e2, e3); an event without an id always reaches the app
    b.on_frame({"type": "event", "seq": 4, "id": "e1", "data": {"n": 1}})
    b.on_frame({"type": "event", "seq": 5, "data": {"n": 3}})
    assert (b.dups, b.dup_dropped) == (2, 2)
