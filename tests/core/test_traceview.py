"""Trace verdicts and merging (orbited/core/traceview.py): every case of "did alice get
event 42?" in the words HaloD, the CLI and the dashboard share, from JSON fixtures."""

from typing import Any

import pytest

from orbited.core.traceview import clock, key_text, merge_keys, verdict, verdicts

T = 1796540400.0  # 07:00:00.000 UTC
KEY = ["alice", "3f9a", "/chat"]


def rec(event: str = "42", t: float = T + 1.0, node: str = "n1", **fields: Any) -> dict:
    return {
        "t": t, "event": event, "request": f"req{event}", "node": node, "route": 13,
        "status": "queued", "seq": int(event) if event.isdigit() else 1,
        "stream": "kQ3v_x9A.1f", "dropped": 0, "ack_wait": None, "written": None,
        "transport": None, "rewritten": 0, "acked": None, "outcome": None, "handed": None,
        "trace_id": None, **fields,
    }  # fmt: skip


def note(what: str, t: float, **detail: Any) -> dict:
    return {"t": t, "what": what, **detail}


def test_clock_is_utc_with_milliseconds_and_refuses_non_times():
    assert clock(T + 2.418) == "07:00:02.418"
    assert clock(None) == clock("x") == clock(True) == clock(1e30) == "?"


def test_delivered_and_acked():
    r = rec(status="delivered", written=T + 1.0003, transport="ws", acked=T + 1.182)
    assert (
        verdict("42", [r], []) == "written to ws on n1 at 07:00:01.000, acknowledged 07:00:01.182"
    )


def test_an_ack_mode_outcome_acked_counts_as_acknowledged():
    r = rec(status="delivered", written=T + 1.0, transport="sse", outcome="acked")
    assert verdict("42", [r], []) == "written to sse on n1 at 07:00:01.000, acknowledged"


def test_written_not_acked_yet():
    r = rec(status="delivered", written=T + 1.0, transport="poll")
    assert verdict("42", [r], []) == ("written to poll on n1 at 07:00:01.000, not acknowledged yet")


def test_written_and_unacked_in_ack_mode():
    r = rec(status="delivered", written=T + 1.0, transport="ws", ack_wait=10.0,
            outcome="unacked")  # fmt: skip
    assert verdict("42", [r], []) == (
        "written to ws on n1 at 07:00:01.000, not acknowledged within 10 s "
        "(the web app was told unacked)"
    )


def test_written_but_the_route_moved_before_the_ack():
    r = rec(status="delivered", written=T + 1.0, transport="ws", outcome="moved")
    assert "not acknowledged before its route moved" in verdict("42", [r], [])


def test_queued_then_handed_to_the_new_owner_and_written_there():
    """A planned move: n1 queued it, handed the mailbox to n2, and n2 replayed it to the
    reconnected browser, which acked; the new owner's copy of the record wins."""
    n1 = rec(node="n1", handed="out:n2")
    on_n2 = rec(node="n1", handed="out:n2", written=T + 1.208, transport="ws",
                rewritten=1, acked=T + 1.39)  # fmt: skip
    keys = merge_keys({
        "n1": {"keys": [{"key": KEY, "here": False, "dispatches": [n1]}]},
        "n2": {"keys": [{"key": KEY, "here": True, "dispatches": [on_n2]}]},
    })  # fmt: skip
    assert len(keys) == 1 and len(keys[0]["dispatches"]) == 1
    assert keys[0]["owner_now"] == "n2"
    assert verdict("42", keys[0]["dispatches"], keys[0]["notes"]) == (
        "written to ws on n2 at 07:00:01.208 (after the hand-off), acknowledged 07:00:01.390"
    )


def test_queued_and_never_written_while_the_browser_stays_away():
    assert verdict("42", [rec()], [note("detach", T)]) == (
        "queued on n1 at 07:00:01.000 and never written (browser away); "
        "still waiting for the browser"
    )


def test_queued_then_the_mailbox_expired():
    text = verdict("42", [rec()], [note("expired", T + 61, undelivered=3)])
    assert text == (
        "queued on n1 at 07:00:01.000 and never written (browser away); the mailbox "
        "expired at 07:01:01.000 (the browser did not come back within linger)"
    )


def test_queued_then_handed_over_in_a_planned_move():
    text = verdict("42", [rec()], [note("moved", T + 2, route=13, to="tcp://n2:9001",
                                        handed=True)])  # fmt: skip
    assert text.endswith(
        "; then route 13 moved and the mailbox was handed over to tcp://n2:9001; "
        "still waiting for the browser there"
    )


def test_queued_then_moved_without_a_hand_off():
    text = verdict("42", [rec()], [note("moved", T + 2, route=13, to=None, handed=False)])
    assert text.endswith(
        "; then route 13 moved at 07:00:02.000 without a hand-off: the mailbox was dropped"
    )


def test_queued_then_handed_as_the_record_says():
    assert verdict("42", [rec(handed="out:n2")], []).endswith("; then handed to n2")


def test_a_note_before_the_record_or_of_another_node_does_not_decide():
    notes = [note("expired", T), note("expired", T + 5, node="n2")]
    assert verdict("42", [rec()], notes).endswith("still waiting for the browser")


def test_evicted_before_delivery_gives_the_browser_a_gap():
    text = verdict("42", [rec()], [note("evicted", T + 3, first=40, last=45)])
    assert text.endswith(
        "; evicted by the mailbox limits at 07:00:03.000: the browser gets gap 40-45"
    )
    # An eviction that does not cover the seq is not this event's fate.
    assert verdict("42", [rec()], [note("evicted", T + 3, first=1, last=5)]).endswith(
        "still waiting for the browser"
    )


def test_a_reset_stream_loses_the_event():
    text = verdict("42", [rec()], [note("reset", T + 4, old="old.1")])
    assert text.endswith(
        "; its stream was reset at 07:00:04.000: events before the reset are lost to the browser"
    )


def test_held_for_an_incoming_hand_off():
    assert verdict("42", [rec(status="held")], []).startswith(
        "held for the route's incoming hand-off on n1 at 07:00:01.000"
    )


def test_no_connection():
    assert verdict("42", [rec(status="no_connection", seq=None)], []) == (
        "not stored: n1 had no mailbox for this key at 07:00:01.000 "
        "(the browser was not connected within linger)"
    )


def test_full():
    assert verdict("42", [rec(status="full", seq=None)], []) == (
        "refused by n1 at 07:00:01.000: its mailbox memory was full (mailbox_total_bytes)"
    )


def test_limited():
    assert "user's rate limit (user_rate)" in verdict("42", [rec(status="limited")], [])


def test_moved_and_no_record_of_the_resend():
    assert verdict("42", [rec(status="moved", seq=None)], []) == (
        "refused by n1 at 07:00:01.000: route 13 had moved; the web app had to resend it "
        "to the new owner, and no node has a record of that resend"
    )


def test_moved_then_resent_to_the_new_owner_reports_the_resend():
    moved = rec(status="moved", seq=None)
    there = rec(node="n2", t=T + 1.05, status="delivered", written=T + 1.05, transport="ws")
    assert verdict("42", [moved, there], []) == (
        "written to ws on n2 at 07:00:01.050, not acknowledged yet"
    )


def test_a_duplicate_alone_says_the_first_send_is_gone():
    text = verdict("42", [rec(status="duplicate")], [])
    assert text.startswith("a resend, seen as a duplicate on n1 at 07:00:01.000")


def test_a_duplicate_does_not_hide_the_first_sends_fate():
    first = rec(status="delivered", written=T + 1.0, transport="ws", acked=T + 1.2)
    dup = rec(status="duplicate", t=T + 3)
    assert verdict("42", [first, dup], []).endswith("acknowledged 07:00:01.200")


def test_not_seen_names_the_failed_nodes():
    failed = [{"name": "n3", "at": T + 12, "why": "ports refused"}]
    assert verdict("42", [rec(event="41")], [], failed) == (
        "no node has a record of event 42 for this key: it never reached the cluster, "
        "tracing was off (the nodes' default: trace = off), or the key fell out of the trace "
        "(trace_keys, trace_keep), or it was on n3, which failed at 07:00:12.000"
    )


def test_queued_on_a_node_that_failed_says_its_records_are_lost():
    failed = [{"name": "n1", "at": T + 5, "why": "ports refused"}]
    assert verdict("42", [rec()], [], failed).endswith(
        "; n1 failed at 07:00:05.000 (ports refused): what it held after that is lost "
        "with its process"
    )


def test_a_node_that_left_is_said_to_have_left_not_failed():
    # An audit: a node stopped with SIGTERM (HaloD's failed_nodes, why "left") was
    # "n2 failed at ..." in every verdict.
    left = [{"name": "n2", "at": T + 5, "why": "left"}]
    assert verdict("42", [rec(node="n2")], [], left).endswith(
        "; n2 left at 07:00:05.000: what it held after that is lost with its process"
    )
    assert verdict("42", [rec(event="41")], [], left).endswith(", which left at 07:00:05.000")


@pytest.mark.parametrize(
    "junk",
    [
        {"event": "42"},
        {"event": "42", "t": "soon", "status": 5, "node": None, "written": "x"},
        {"event": "42", "t": True, "status": "queued", "seq": "7", "handed": 3},
    ],
)
def test_malformed_records_give_a_sentence_not_an_error(junk):
    assert isinstance(verdict("42", [junk], [{"what": 5}, {"t": "x", "what": "evicted"}]), str)


def test_merge_orders_by_time_and_keeps_each_nodes_header():
    a = {"node": "n1", "keys": [{"key": KEY, "route": 13, "here": False, "stream": "s.1",
                                 "dispatches": [rec("41", T + 1), rec("43", T + 3)],
                                 "notes": [note("detach", T + 2)]}]}  # fmt: skip
    b = {"node": "n2", "keys": [{"key": KEY, "route": 13, "here": True, "attached": "ws",
                                 "dispatches": [rec("42", T + 2, node="n2")],
                                 "notes": [note("attach", T + 2.5, transport="ws")]},
                                {"key": ["alice", "x", ""], "route": 4, "here": True,
                                 "dispatches": [], "notes": []}]}  # fmt: skip
    keys = merge_keys({"n1": a, "n2": b})
    assert [k["key"] for k in keys] == [KEY, ["alice", "x", ""]]
    first = keys[0]
    assert [r["event"] for r in first["dispatches"]] == ["41", "42", "43"]
    assert [(n["what"], n["node"]) for n in first["notes"]] == [("detach", "n1"), ("attach", "n2")]
    assert first["nodes"] == {"n1": {"route": 13, "here": False, "stream": "s.1"},
                              "n2": {"route": 13, "here": True, "attached": "ws"}}  # fmt: skip
    assert first["route"] == 13 and first["owner_now"] == "n2"


def test_merge_skips_what_is_not_a_key():
    answers: dict[str, Any] = {"n1": {"keys": [1, {"key": "alice"}, {"key": [1, 2, 3]}, {"key": KEY,
               "dispatches": [5, rec()], "notes": "x"}]}, "n2": {"keys": None}}  # fmt: skip
    keys = merge_keys(answers)
    assert len(keys) == 1 and len(keys[0]["dispatches"]) == 1 and keys[0]["notes"] == []


def test_verdicts_for_a_queried_event_and_for_the_newest():
    keys = merge_keys({"n1": {"keys": [{"key": KEY, "dispatches": [rec("41"), rec("42", T + 2)]},
                                       {"key": ["alice", "", ""], "dispatches": []}]}})  # fmt: skip
    asked = verdicts(keys, "41")
    assert [v["key"] for v in asked] == [KEY, ["alice", "", ""]]
    assert asked[0]["event"] == "41" and asked[0]["text"].startswith("queued on n1")
    assert asked[1]["text"].startswith("no node has a record of event 41")
    newest = verdicts(keys, None)
    assert newest == [{"event": "42", "key": KEY, "text": verdict("42", keys[0]["dispatches"], [])}]


def test_verdicts_when_nothing_is_traced():
    failed = [{"name": "n3", "at": T, "why": "gone"}]
    (only,) = verdicts([], "42", failed)
    assert only["key"] is None and only["event"] == "42"
    assert only["text"] == (
        "no node has a record of event 42 for this user: it never reached the cluster, "
        "tracing was off (the nodes' default: trace = off), or the keys fell out of the trace; "
        "n3 failed at 07:00:00.000 and its records are lost"
    )


def test_key_text_is_compact_json():
    assert key_text(KEY) == '["alice","3f9a","/chat"]'
    assert key_text(['a"b', "", ""]) == '["a\\"b","",""]'
    assert key_text(None) == "None"


def test_the_old_owners_bare_out_and_the_new_owners_named_copy():
    """H2's tracer: the old owner marks its copy ``out`` (it does not know the new owner's
    name), the new owner's import says ``out:n2``; the named copy wins the merge."""
    old = rec(node="n1", handed="out")
    new = rec(node="n1", handed="out:n2")
    keys = merge_keys({
        "n1": {"keys": [{"key": KEY, "here": False, "dispatches": [old]}]},
        "n2": {"keys": [{"key": KEY, "here": True, "dispatches": [new]}]},
    })  # fmt: skip
    (only,) = keys[0]["dispatches"]
    assert only["handed"] == "out:n2"
    assert verdict("42", [only], []).endswith("; then handed to n2")
    assert verdict("42", [old], []).endswith("; then handed to the route's new owner")


def test_the_kept_copy_gets_what_only_the_other_knows():
    """An acknowledged-mode event: n1 answered the web app ``unacked`` (its route was
    handed to n2 first); the browser acked it on n2. One row: n2's (acked) with n1's
    outcome, and a verdict that says both."""
    on_n1 = rec(node="n1", handed="out", ack_wait=5.0, outcome="unacked")
    on_n2 = rec(node="n1", handed="out:n2", ack_wait=5.0, written=T + 1.3, transport="ws",
                rewritten=1, acked=T + 1.5)  # fmt: skip
    keys = merge_keys({
        "n1": {"keys": [{"key": KEY, "dispatches": [on_n1]}]},
        "n2": {"keys": [{"key": KEY, "dispatches": [on_n2]}]},
    })  # fmt: skip
    (row,) = keys[0]["dispatches"]
    assert (row["outcome"], row["acked"], row["handed"]) == ("unacked", T + 1.5, "out:n2")
    assert verdict("42", [row], []) == (
        "written to ws on n2 at 07:00:01.300 (after the hand-off), acknowledged 07:00:01.500; "
        "the web app was told unacked (its wait ended before the ack)"
    )


def test_a_note_carried_in_a_hand_off_is_shown_once():
    """n2's imported copy of n1's note has no ``node`` (n2 would be named): one row."""
    attach = note("attach", T, transport="ws", node="n1")
    keys = merge_keys({
        "n1": {"keys": [{"key": KEY, "notes": [attach]}]},
        "n2": {"keys": [{"key": KEY, "notes": [note("attach", T, transport="ws"),
                                               note("handed_in", T + 1)]}]},
    })  # fmt: skip
    assert [(n["what"], n["node"]) for n in keys[0]["notes"]] == [
        ("attach", "n1"), ("handed_in", "n2")
    ]  # fmt: skip


def test_a_moved_note_names_the_new_owner_when_it_knows_it():
    moved = note("moved", T + 2, route=13, to="tcp://127.0.0.3:9001", owner="n2", handed=True)
    assert verdict("42", [rec()], [moved]).endswith(
        "; then route 13 moved and the mailbox was handed over to n2; still waiting for the "
        "browser there"
    )


def test_what_happened_on_the_new_owner_after_the_hand_off():
    """Notes of the node the mailbox went to follow the hand-off; another node's do not."""
    moved = note("moved", T + 2, route=13, owner="n2", handed=True, node="n1")
    gap = note("gap", T + 3, first=40, last=45, node="n2")
    elsewhere = note("expired", T + 2.5, node="n3")
    assert verdict("42", [rec()], [moved, elsewhere, gap]).endswith(
        "; then route 13 moved and the mailbox was handed over to n2; gone before it was "
        "written (evicted by the mailbox limits, or left out of a hand-off): the browser got "
        "gap 40-45 at 07:00:03.000"
    )
    expired = note("expired", T + 70, node="n2")
    assert verdict("42", [rec(handed="out:n2")], [expired]).endswith(
        "; the mailbox expired at 07:01:10.000 (the browser did not come back within linger)"
    )
    assert verdict("42", [rec()], [gap]).endswith("; still waiting for the browser")
