"""Property-based fuzzing of issue 22's control parts (docs/fuzzing.md): a heartbeat's
``load``, ``trace_query`` and the cutting of ``trace_reply`` (fuzz.targets
``check_heartbeat_load``, ``check_trace_query``, ``check_trace_fit``). Inputs are near
valid (the right member names, values around each limit) as well as arbitrary JSON."""

from __future__ import annotations

import json

from hypothesis import example, given
from hypothesis import strategies as st

from fuzz import targets as t
from tests.integration.test_fuzz import FUZZ, json_values, text

counts = st.one_of(st.integers(-1, 3), st.sampled_from([2**40, 2**40 + 1, 2**62, 2**62 + 1]),
                   json_values)  # fmt: skip
route_keys = st.one_of(st.sampled_from(["1", "13", "65536", "65537", "0", "013", "+1", " 1",
                                        "1e3", "１"]), text)  # fmt: skip
loads = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            **{name: counts for name in ("events", "recipients", "delivered", "queued",
                                         "acked", "full", "moved")},
            "ack_hist": st.one_of(
                st.lists(st.lists(st.one_of(st.integers(-1, 15), counts), min_size=0,
                                  max_size=3), max_size=17), json_values),
            "routes": st.one_of(st.dictionaries(route_keys, counts, max_size=4), json_values),
            "routes_full": json_values,
        },
    ),
    json_values,
)  # fmt: skip
parts = st.one_of(st.none(), text, st.text(min_size=60, max_size=130), json_values)
queries = st.fixed_dictionaries(
    {},
    optional={"qid": st.one_of(st.integers(-1, 2**53 + 1), json_values),
              "user": st.one_of(st.just("alice"), parts), "session": parts,
              "location": parts, "event": parts,
              "limit": st.one_of(st.integers(-1, 65537), json_values)},
)  # fmt: skip
records = st.one_of(
    st.fixed_dictionaries({"t": st.one_of(st.floats(0, 1e10), json_values),
                           "event": st.one_of(text, json_values), "pad": st.text(max_size=300)}),
    json_values,
)  # fmt: skip
answers = st.fixed_dictionaries(
    {"keys": st.one_of(
        st.lists(st.one_of(
            st.fixed_dictionaries({"key": st.just(["alice", "", ""])},
                                  optional={"dispatches": st.lists(records, max_size=20),
                                            "notes": st.one_of(st.lists(records, max_size=5),
                                                               json_values)}),
            json_values), max_size=4),
        json_values)},
    optional={"node": text, "truncated": json_values},
)  # fmt: skip


@FUZZ
@given(loads)
@example({"routes": {"１": 1}})  # a full-width digit: int() reads it, the wire must not
@example({"ack_hist": [[1, 1], [1, 1]]})
def test_heartbeat_load(value):
    t.check_heartbeat_load(value)


@FUZZ
@given(queries)
@example({"qid": 1, "user": "é" * 129})  # 258 bytes of UTF-8: over a key part's 256
def test_trace_query(fields):
    t.check_trace_query(fields)


@FUZZ
@given(answers, st.integers(0, 6000))
def test_trace_fit(answer, limit):
    t.check_trace_fit(answer, limit)


# -- W3C trace context (orbited.core.tracecontext; the event request's fields) -------------

hexes = st.text(alphabet="0123456789abcdefABCDEF-", min_size=0, max_size=40)
traceparents = st.one_of(
    st.tuples(st.sampled_from(["00", "01", "fe", "ff", "0g", "0"]), hexes, hexes,
              st.sampled_from(["00", "01", "ff", "1"]),
              st.sampled_from(["", "-", "-x", "-future"])).map(lambda p: "-".join(p[:4]) + p[4]),
    st.builds(lambda t, s, f: f"00-{t}-{s}-{f:02x}",
              st.text(alphabet="0123456789abcdef", min_size=32, max_size=32),
              st.text(alphabet="0123456789abcdef", min_size=16, max_size=16),
              st.integers(0, 255)),
    text,
)  # fmt: skip
tracestates = st.one_of(
    st.lists(st.tuples(st.sampled_from(["congo", "rojo", "a@b", "A", "1x", "x" * 257]),
                       st.sampled_from(["t61rcWkgMzE", "00f067aa0ba902b7", "", "a=b", " "]))
             .map("=".join), max_size=34).map(",".join),
    text,
)  # fmt: skip
fields = st.one_of(st.none(), traceparents, tracestates, st.text(min_size=500, max_size=520),
                   json_values)  # fmt: skip


@FUZZ
@given(traceparents, tracestates)
@example("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "congo=t61rcWkgMzE")
@example("00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01", "")  # upper case
@example("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x", ",,")
def test_trace_context_text(traceparent, tracestate):
    t.check_trace_context(traceparent, tracestate)


@FUZZ
@given(fields, fields)
@example("x" * 513, None)
@example("\ud800", None)
def test_event_trace_fields(traceparent, tracestate):
    t.check_event_trace_fields(traceparent, tracestate)


# -- a hand-off's trace member and trace queries, through a real node link ------------------

trace_rows = st.one_of(
    st.fixed_dictionaries(
        {"t": st.one_of(st.floats(0, 2e9), json_values),
         "event": st.one_of(st.just("e1"), json_values),
         "request": st.one_of(st.just("77aa0c13d2e4f0a1"), json_values),
         "node": st.one_of(st.sampled_from(["n1", "n2"]), json_values),
         "status": st.one_of(st.sampled_from(["delivered", "queued", "moved"]), json_values)},
        optional={"route": st.one_of(st.integers(-1, 5), json_values),
                  "seq": st.one_of(st.integers(-1, 3), json_values),
                  "written": json_values, "acked": json_values, "handed": json_values,
                  "what": st.one_of(st.sampled_from(["attach", "moved"]), json_values),
                  "stream": json_values, "dropped": json_values, "rewritten": json_values}),
    json_values,
)  # fmt: skip
handoffs = st.builds(
    lambda trace, done: {"type": "handoff", "to": "n1", "done": done, "mailboxes": [{
        "key": ["alice", "s", "/l"], "route": 1, "stream": "fz0.1", "next_seq": 2,
        "acked": 0, "events": [[1, '"hi"']], "trace": trace}]},
    st.one_of(st.lists(trace_rows, max_size=6), json_values),
    st.sampled_from([[], [1, 2, 3, 4]]),
)  # fmt: skip
trace_queries = st.fixed_dictionaries(
    {"type": st.just("trace_query"), "qid": st.integers(0, 3),
     "user": st.sampled_from(["alice", "bob", ""])},
    optional={"event": st.sampled_from(["e1", None, ""]), "limit": st.integers(0, 3),
              "session": st.sampled_from(["s", None]), "location": st.sampled_from(["/l", None])},
)  # fmt: skip
WELCOME_ALL = {
    "type": "welcome", "role": "active", "routes": [1, 2, 3, 4], "total_routes": 4,
    "incoming": [1, 2, 3, 4], "heartbeat_interval": 1, "missed_heartbeats": 3,
}  # fmt: skip


@FUZZ
@given(
    st.lists(st.one_of(handoffs, trace_queries), min_size=1, max_size=5),
    t_cuts := st.lists(st.integers(1, 70), min_size=1, max_size=8),
)
def test_node_link_hand_off_traces_and_queries(messages, cuts):
    """A hand-off whose ``trace`` member is anything never costs the mailbox or the link,
    and trace queries after it are answered (no logged failure, no exception)."""
    t.check_node_messages([WELCOME_ALL, *messages], cuts)


def test_a_handed_over_trace_reaches_the_new_owners_answer():
    """The seed: the old owner's record arrives with the mailbox, is kept with its node,
    and shows in the new owner's trace answer, marked handed out to it."""
    entry = t.check_handoff_trace(json.loads(t.SEEDS["handoff_trace"][0]))
    (record,) = [r for r in entry["dispatches"] if r["event"] == "e1"]
    assert record["node"] == "n2" and record["handed"] == "out:n1" and entry["here"] is True


@FUZZ
@given(st.one_of(st.lists(trace_rows, max_size=8), json_values))
def test_any_trace_member_keeps_the_mailbox(trace):
    t.check_handoff_trace(trace)
