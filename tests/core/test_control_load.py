"""Control messages of issue 22 (docs/halod-protocol.md): the heartbeat's ``load``, the
``features`` a node announces, and the trace query and reply; each checked as strictly as
the rest of the protocol, and the old wire still decoding."""

import json
from typing import Any

import pytest

from orbited.core.control import (
    FEATURES,
    FROM_HALOD,
    FROM_NODE,
    MAX_EVENT_ID,
    MAX_MESSAGE,
    ControlError,
    ErrorCode,
    Heartbeat,
    HeartbeatLoad,
    Register,
    TraceQuery,
    TraceReply,
    decode_from_halod,
    decode_from_node,
    encode,
    fit_trace_reply,
    handoff_messages,
    trace_query,
)
from orbited.core.latency import LatencyHistogram
from orbited.node import events

LOAD = HeartbeatLoad(
    events=123456, recipients=130001, delivered=120000, queued=9000, acked=118000, full=0,
    moved=3, ack_hist=((6, 120), (7, 44), (11, 2)), routes={13: 40, 14: 38},
)  # fmt: skip


@pytest.mark.parametrize(
    "message",
    [
        Heartbeat(812, 812, 840, LOAD),
        Heartbeat(1, load=HeartbeatLoad()),
        Heartbeat(2, 0, 0, HeartbeatLoad(events=5, routes={1: 0, 65536: 2}, routes_full=True)),
        Register("n1", "127.0.0.1:80", "tcp://127.0.0.1:90", 5, hashes=(1, 2), features=FEATURES),
        Register("n1", "127.0.0.1:80", "tcp://127.0.0.1:90", 5, features=("trace", "future_1")),
        TraceReply(17, {"node": "n1", "mode": "all", "keys": [{"key": ["a", "", ""]}]}),
        TraceReply(0, {"mode": "off", "keys": []}),
    ],
    ids=repr,
)
def test_node_messages_round_trip(message):
    assert decode_from_node(encode(message)) == message


@pytest.mark.parametrize(
    "message",
    [
        TraceQuery(17, "alice", None, None, "42", 16),
        TraceQuery(1, "alice", "3f9a", "/chat"),
        TraceQuery(2, "ü" * 64, "", ""),
    ],
    ids=repr,
)
def test_halod_messages_round_trip(message):
    assert decode_from_halod(encode(message)) == message


def test_the_wire_of_the_new_messages():
    assert json.loads(encode(Heartbeat(812, 812, 840, LOAD))) == {
        "type": "heartbeat", "seq": 812, "connections": 812, "mailboxes": 840,
        "load": {"events": 123456, "recipients": 130001, "delivered": 120000,
                 "queued": 9000, "acked": 118000, "full": 0, "moved": 3,
                 "ack_hist": [[6, 120], [7, 44], [11, 2]],
                 "routes": {"13": 40, "14": 38}},
    }  # fmt: skip
    assert encode(Heartbeat(1, load=HeartbeatLoad(routes_full=True))) == (
        b'{"type":"heartbeat","seq":1,"load":{"routes":{},"routes_full":true}}'
    )
    assert encode(TraceQuery(17, "alice", event="42", limit=16)) == (
        b'{"type":"trace_query","qid":17,"user":"alice","session":null,"location":null,'
        b'"event":"42","limit":16}'
    )
    assert (
        encode(TraceReply(3, {"keys": []}))
        == b'{"type":"trace_reply","qid":3,"answer":{"keys":[]}}'
    )
    assert encode(Register("n", "a:1", "tcp://a:1", 1, features=("trace", "load"))).endswith(
        b'"capacity":1,"features":["trace","load"]}'
    )


def test_the_old_wire_still_decodes():
    """A node of an earlier release: no load, no features (HaloD sends it no trace_query)."""
    beat = decode_from_node(b'{"type":"heartbeat","seq":3,"connections":1,"mailboxes":2}')
    assert beat == Heartbeat(3, 1, 2) and beat.load is None
    reg = decode_from_node(
        b'{"type":"register","version":1,"name":"n","browser":"a:1","sp":"tcp://a:1","capacity":1}'
    )
    assert isinstance(reg, Register) and reg.features == ()
    assert b"features" not in encode(reg) and b"load" not in encode(Heartbeat(3, 1, 2))


def test_the_nodes_features_are_trace_and_load():
    assert FEATURES == ("trace", "load")


def test_counters_are_the_ones_sent():
    load = HeartbeatLoad.from_wire({"events": 4, "acked": 0})
    assert load.counters() == {"events": 4, "acked": 0}
    assert load.routes == {} and load.ack_hist == () and not load.routes_full
    assert LOAD.counters()["moved"] == 3 and len(LOAD.counters()) == 7


def test_a_hubs_report_with_int_route_ids_is_the_same_load():
    """The node builds HeartbeatLoad from its hub's report, whose route ids may be ints."""
    report = {"events": 1, "ack_hist": [(2, 5)], "routes": {13: 4}, "routes_full": True}
    load = HeartbeatLoad.from_wire(report)
    assert load == HeartbeatLoad(events=1, ack_hist=((2, 5),), routes={13: 4}, routes_full=True)
    assert decode_from_node(encode(Heartbeat(1, load=load))) == Heartbeat(1, load=load)


def test_ack_hist_feeds_a_latency_histogram():
    beat = decode_from_node(encode(Heartbeat(1, load=LOAD)))
    assert isinstance(beat, Heartbeat) and beat.load is not None
    h = LatencyHistogram(beat.load.ack_hist)
    assert h.count == 166 and h.quantile(0.5) == 100.0
    assert h.quantile(0.99) == 5000.0  # rank 165 of 166: past the 164 at ≤ 200 ms


def _beat(load: object) -> bytes:
    return json.dumps({"type": "heartbeat", "seq": 1, "load": load}).encode()


@pytest.mark.parametrize(
    "load",
    [
        [],
        "x",
        {"events": -1},
        {"events": 2**62 + 1},
        {"events": True},
        {"acked": 1.5},
        {"ack_hist": {}},
        {"ack_hist": [[15, 1]]},
        {"ack_hist": [[-1, 1]]},
        {"ack_hist": [[1, 2**40 + 1]]},
        {"ack_hist": [[1, 1, 1]]},
        {"ack_hist": [[1, 1], [1, 2]]},
        {"ack_hist": [[i % 15, 1] for i in range(16)]},
        {"ack_hist": [[True, 1]]},
        {"routes": []},
        {"routes": {"0": 1}},
        {"routes": {"65537": 1}},
        {"routes": {"013": 1}},
        {"routes": {"+13": 1}},
        {"routes": {" 13": 1}},
        {"routes": {"x": 1}},
        {"routes": {"13": -1}},
        {"routes": {"13": 2**40 + 1}},
        {"routes": {"13": "4"}},
        {"routes_full": 1},
        {"routes_full": "true"},
    ],
)
def test_a_malformed_load_is_bad_message(load):
    with pytest.raises(ControlError) as e:
        decode_from_node(_beat(load))
    assert e.value.code is ErrorCode.BAD_MESSAGE
    assert "load" in e.value.message


def test_too_many_routes_are_refused():
    with pytest.raises(ControlError):
        decode_from_node(_beat({"routes": {str(r): 1 for r in range(1, 65538)}}))


def test_a_null_load_is_no_load():
    assert decode_from_node(_beat(None)) == Heartbeat(1)


@pytest.mark.parametrize(
    "features", ["trace", [1], ["Trace"], ["tr ace"], [""], ["x" * 33], ["f"] * 33, {}]
)
def test_malformed_features_are_refused(features):
    body = json.dumps(
        {"type": "register", "version": 1, "name": "n", "browser": "a:1", "sp": "tcp://a:1",
         "capacity": 1, "features": features}
    ).encode()  # fmt: skip
    with pytest.raises(ControlError) as e:
        decode_from_node(body)
    assert e.value.code is ErrorCode.BAD_MESSAGE


def _query(**fields: object) -> bytes:
    return json.dumps({"type": "trace_query", "qid": 1, "user": "alice", **fields}).encode()


@pytest.mark.parametrize(
    "fields",
    [
        {"qid": -1},
        {"qid": 2**53 + 1},
        {"qid": "1"},
        {"user": ""},
        {"user": None},
        {"user": 5},
        {"user": "x" * 257},
        {"session": 5},
        {"location": ["a"]},
        {"location": "é" * 129},  # 258 bytes of UTF-8
        {"event": ""},
        {"event": "e" * 129},
        {"event": 42},
        {"limit": 0},
        {"limit": 65537},
        {"limit": True},
        {"user": "*"},  # reserved: no key holds it
        {"session": "*"},
    ],
)
def test_a_malformed_trace_query_is_bad_message(fields):
    with pytest.raises(ControlError) as e:
        decode_from_halod(_query(**fields))
    assert e.value.code is ErrorCode.BAD_MESSAGE


def test_a_minimal_trace_query_asks_for_everything():
    assert decode_from_halod(_query()) == TraceQuery(1, "alice", None, None, None, None)


def test_trace_query_checks_what_haloD_is_asked():
    assert trace_query(4, "alice", event="42") == TraceQuery(4, "alice", event="42")
    for bad in (dict(user=""), dict(user="a", event=""), dict(user="a", limit=0)):
        with pytest.raises(ValueError):
            trace_query(1, **bad)


def test_the_event_id_limit_is_the_event_requests():
    assert MAX_EVENT_ID == events.MAX_EVENT_ID


@pytest.mark.parametrize(
    "answer",
    [[], "x", {}, {"keys": {}}, {"keys": [1]}, {"keys": ["k"]}, {"keys": None}],
)
def test_a_malformed_trace_reply_is_bad_message(answer):
    body = json.dumps({"type": "trace_reply", "qid": 1, "answer": answer}).encode()
    with pytest.raises(ControlError) as e:
        decode_from_node(body)
    assert e.value.code is ErrorCode.BAD_MESSAGE


def test_each_side_sends_only_its_own_trace_message():
    assert TraceQuery in FROM_HALOD and TraceQuery not in FROM_NODE
    assert TraceReply in FROM_NODE and TraceReply not in FROM_HALOD
    with pytest.raises(ControlError):
        decode_from_node(encode(TraceQuery(1, "a")))
    with pytest.raises(ControlError):
        decode_from_halod(encode(TraceReply(1, {"keys": []})))


def _record(t: float, event: str, pad: int = 0) -> dict:
    return {"t": t, "event": event, "node": "n1", "status": "delivered", "pad": "x" * pad}


def test_a_small_answer_is_sent_as_it_is():
    answer = {"node": "n1", "keys": [{"key": ["a", "", ""], "dispatches": [_record(1.0, "1")]}]}
    reply = fit_trace_reply(5, answer)
    assert reply == TraceReply(5, answer) and "truncated" not in reply.answer


def test_a_large_answer_drops_the_oldest_records_first():
    keys: list[dict[str, Any]] = [
        {"key": ["a", str(k), ""], "route": 1,
         "dispatches": [_record(1000.0 + 10 * i + k, f"{k}-{i}", 900) for i in range(40)],
         "notes": [{"t": 500.0 + i, "what": "attach", "pad": "y" * 900} for i in range(10)]}
        for k in range(3)
    ]  # fmt: skip
    answer: dict[str, Any] = {"node": "n1", "keys": keys, "truncated": False}
    limit = 40_000
    reply = fit_trace_reply(9, answer, limit=limit)
    body = encode(reply)
    assert len(body) <= limit and reply.answer["truncated"] is True
    assert decode_from_node(body) == reply
    kept = [r for k in reply.answer["keys"] for r in k["dispatches"] + k["notes"]]
    dropped_t = {r["t"] for k in keys for r in k["dispatches"] + k["notes"]} - {
        r["t"] for r in kept
    }
    assert kept and dropped_t
    assert max(dropped_t) < min(r["t"] for r in kept)  # the oldest went, the newest stayed
    assert len(reply.answer["keys"]) == 3  # every key still answered
    assert len(answer["keys"][0]["dispatches"]) == 40  # the answer itself is not changed
    assert len(body) > limit - 2000  # not more was dropped than needed


def test_too_many_keys_are_dropped_whole_when_records_are_not_enough():
    keys = [{"key": ["a", "s" * 200, str(k)], "route": 1, "dispatches": []} for k in range(400)]
    reply = fit_trace_reply(1, {"keys": keys}, limit=20_000)
    assert len(encode(reply)) <= 20_000 and reply.answer["truncated"] is True
    assert 0 < len(reply.answer["keys"]) < 400


def test_the_default_cap_is_half_a_control_message():
    rows = [_record(float(i), str(i), 1000) for i in range(1200)]  # ≈ 1.2 MB
    reply = fit_trace_reply(1, {"keys": [{"key": ["a", "", ""], "dispatches": rows}]})
    assert len(encode(reply)) <= MAX_MESSAGE // 2 and reply.answer["truncated"] is True


def test_fitting_reads_odd_answers_without_failing():
    """The answer is the node's own, but fitting must not be the thing that fails."""
    rows = [{"t": float(i), "pad": "x" * 500} for i in range(50)] + ["junk", {"t": "x"}]
    answer = {"keys": [7, {"key": ["a", "", ""], "dispatches": rows, "notes": "n"}]}
    reply = fit_trace_reply(1, answer, limit=5_000)
    assert len(encode(reply)) <= 5_000 and reply.answer["keys"][0] == 7
    assert fit_trace_reply(1, {"keys": "x", "pad": "y" * 10}, limit=10).answer["keys"] == []


# -- hand-off messages with key traces (reviewer item A) -----------------------------------


def _trace(n_records: int = 16, n_notes: int = 8) -> list[dict[str, Any]]:
    record = {"t": 1796540401.12, "event": "é" * 40, "request": "77aa0c13d2e4f0a1", "node": "n1",
              "route": 13, "status": "queued", "seq": 42, "stream": "kQ3v_x9A.1f", "dropped": 0,
              "ack_wait": 10.0, "written": None, "transport": None, "rewritten": 0,
              "acked": None, "outcome": None, "handed": "out", "trace_id": "4b" * 16}  # fmt: skip
    note = {"t": 1796540402.0, "what": "attach", "transport": "ws", "last": "kQ3v_x9A.1f:40",
            "node": "n1"}  # fmt: skip
    return [dict(record, seq=i) for i in range(n_records)] + [dict(note) for _ in range(n_notes)]


def _entry(i: int, events: int, payload: str, trace: list[dict[str, Any]] | None) -> dict:
    entry: dict[str, Any] = {"key": ["bulk", f"s{i}", "/l"], "route": 2, "stream": "a.1",
                             "next_seq": events + 1, "acked": 0,
                             "events": [[n, payload] for n in range(1, events + 1)]}  # fmt: skip
    if trace is not None:
        entry["trace"] = trace
    return entry


def test_traces_count_toward_the_hand_off_message_size():
    """400 lingering mailboxes × 16 queued events, each key with a 24-entry trace: every
    message stays within half a control message (HaloD cuts a link over the limit, and
    the whole hand-off is lost), every event arrives once, every trace once."""
    entries = [_entry(i, 16, '{"text":"' + "x" * 100 + '"}', _trace()) for i in range(400)]
    messages = handoff_messages("n2", [2], entries)
    assert len(messages) > 1 and messages[-1].done == (2,)
    for m in messages:
        assert len(encode(m)) <= MAX_MESSAGE // 2
    arrived = [(b["key"][1], e[0]) for m in messages for b in m.mailboxes for e in b["events"]]
    assert sorted(arrived) == sorted((f"s{i}", n) for i in range(400) for n in range(1, 17))
    traces = [b["key"][1] for m in messages for b in m.mailboxes if "trace" in b]
    assert sorted(traces) == sorted(f"s{i}" for i in range(400))
    for m in messages:
        for b in m.mailboxes:
            assert b.get("trace", _trace()) == _trace()


def test_a_split_mailbox_sends_its_trace_with_the_first_part_only():
    entry = _entry(0, 100, "y" * 1000, _trace())
    messages = handoff_messages("n2", [2], [entry], chunk=40_000)
    parts = [b for m in messages for b in m.mailboxes]
    assert len(parts) > 2
    assert parts[0]["trace"] == _trace() and all("trace" not in b for b in parts[1:])
    assert [e[0] for b in parts for e in b["events"]] == list(range(1, 101))
    assert all(len(encode(m)) < 40_000 + 2_000 for m in messages)


def test_a_trace_larger_than_half_a_chunk_is_left_out_not_the_mailbox():
    entry = _entry(0, 3, "z", _trace(200, 0))
    (message,) = handoff_messages("n2", [2], [entry], chunk=20_000)
    (sent,) = message.mailboxes
    assert "trace" not in sent and [e[0] for e in sent["events"]] == [1, 2, 3]


def test_users_that_do_not_fit_the_last_message_get_their_own():
    entries = [_entry(i, 1, "p" * 9_000, None) for i in range(2)]
    users = [{"user": "u", "holds": [["h" * 8_000]], "watches": []}]
    messages = handoff_messages("n2", [2], entries, chunk=10_000, users=users)
    assert messages[-1].users == tuple(users) and messages[-1].done == (2,)
    assert all(len(encode(m)) < 10_000 + 2_000 for m in messages)
    assert all(not m.users and not m.done for m in messages[:-1])
