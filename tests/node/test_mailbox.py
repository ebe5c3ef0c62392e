"""Mailbox core (docs/protocol.md, "Mailboxes and resume")."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orbited.node.mailbox import Mailbox, MailboxLimits, Position, PositionError


def box(events=100, nbytes=10_000) -> Mailbox:
    return Mailbox("ep0.1", MailboxLimits(events, nbytes))


def test_sequence_numbers_start_at_one_and_increase():
    m = box()
    assert [m.append(b"x").seq for _ in range(3)] == [1, 2, 3]
    assert m.last_seq == 3


def test_resume_from_position_returns_only_unseen_events():
    m = box()
    for i in range(5):
        m.append(b"%d" % i)
    replay = m.replay(Position("ep0.1", 2))
    assert [e[0] for e in replay.events] == [3, 4, 5]
    assert replay.gap is None and not replay.reset
    assert m.acked == 2 and len(m) == 3  # resuming acknowledges what came before


def test_fresh_connection_gets_everything_unacknowledged():
    m = box()
    for _ in range(3):
        m.append(b"e")
    m.ack(1)
    assert [e[0] for e in m.replay(None).events] == [2, 3]


def test_event_limit_evicts_oldest_and_reports_undelivered_drops():
    m = box(events=3)
    for _seq in range(1, 4):
        m.append(b"e")
    m.mark_delivered(1)
    assert m.append(b"e").dropped == 0  # evicts 1, which was delivered
    assert m.append(b"e").dropped == 1  # evicts 2, never delivered
    replay = m.replay(Position("ep0.1", 0))
    assert replay.gap == (1, 2)
    assert [e[0] for e in replay.events] == [3, 4, 5]


def test_byte_limit_evicts_oldest():
    m = box(nbytes=10)
    m.append(b"aaaa")
    m.append(b"bbbb")
    assert m.append(b"cccc").dropped == 1
    assert m.buffered_bytes == 8
    with pytest.raises(ValueError):
        m.append(b"x" * 11)


def test_unknown_stream_is_a_reset_with_everything_buffered():
    m = box()
    m.append(b"a")
    replay = m.replay(Position("other.1", 7))
    assert replay.reset and replay.gap is None
    assert [e[0] for e in replay.events] == [1]


def test_position_from_the_future_is_a_reset():
    m = box()
    m.append(b"a")
    assert m.replay(Position("ep0.1", 5)).reset


def test_ack_beyond_last_is_clamped():
    m = box()
    m.append(b"a")
    m.ack(99)
    assert m.acked == 1
    assert m.append(b"b").seq == 2


@pytest.mark.parametrize(
    "text", ["", "x", "ep0.1:", "ep0.1:-1", ":5", "ep0:5", "a b.1:2", "ep0.1:9999999999999999"]
)
def test_bad_positions(text):
    with pytest.raises(PositionError):
        Position.parse(text)


def test_position_round_trip():
    assert str(Position.parse("aZ3x_-Q.1f:42")) == "aZ3x_-Q.1f:42"


@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("push"), st.binary(min_size=1, max_size=30)),
            st.tuples(st.just("reconnect"), st.booleans()),
        ),
        max_size=60,
    )
)
def test_browser_resuming_sees_every_event_once_in_order_or_a_gap(ops):
    """A browser that reconnects with its last position never sees a duplicate or
    reordering, and every event it misses is covered by a gap it was told about."""
    m = Mailbox("ep0.1", MailboxLimits(max_events=5, max_bytes=80))
    seen: list[int] = []
    told_missing: set[int] = set()
    connected = True
    for op, arg in ops:
        if op == "push":
            seq = m.append(arg).seq
            if connected:
                seen.append(seq)
                m.mark_delivered(seq)
        else:
            connected = arg
            if connected:
                last = Position("ep0.1", seen[-1]) if seen else None
                replay = m.replay(last)
                if replay.gap:
                    told_missing.update(range(replay.gap[0], replay.gap[1] + 1))
                seen.extend(e[0] for e in replay.events)
    assert seen == sorted(set(seen))
    if connected:
        assert set(seen) | told_missing >= set(range(1, m.last_seq + 1))


# -- event ids (docs/protocol.md, "Frames": the page drops a resend it already has) -------


def test_events_keep_their_request_id_through_replay_export_and_restore():
    m = box()
    eid = b'"evt-1"'
    m.append(b'{"n":1}', eid)
    m.append(b'{"n":2}')  # an event without an id (e.g. restored from an older node)
    assert m.replay(None).events == [(1, b'{"n":1}', eid), (2, b'{"n":2}', None)]
    assert m.export() == [(1, b'{"n":1}', eid), (2, b'{"n":2}', None)]
    restored = Mailbox.restored("ep0.1", MailboxLimits(), 3, 0, m.export())
    assert restored.replay(None).events[0][2] is eid  # the same bytes, not a copy


# -- latest-value events (docs/protocol.md, "Latest-value events") -------------------------

T = b'"price:AAPL"'
U = b'"price:MSFT"'


def test_a_tagged_event_replaces_the_undelivered_one_of_its_tag():
    m = box()
    assert m.append(b"1", b'"a"', T) == (1, 0, 0, None)
    m.append(b"x", b'"b"')  # untagged: kept
    out = m.append(b"2", b'"c"', T)
    assert out == (3, 0, 1, 1)  # seq 3, replaced 1 event, superseded seq 1
    assert [e[0] for e in m.replay(None).events] == [2, 3]
    assert m.buffered_bytes == 2
    assert m.tag(3) == (T, 1) and m.tag(2) is None and m.tag(1) is None


def test_replaced_counts_chain_and_seqs_stay_monotonic():
    m = box()
    seqs = [m.append(b"v%d" % i, None, T).seq for i in range(4)]
    assert seqs == [1, 2, 3, 4]
    assert m.tag(4) == (T, 3)  # 4 replaced 3, which had replaced 2, which had replaced 1
    assert [e[0] for e in m.replay(None).events] == [4]
    assert m.append(b"n").seq == 5


def test_tags_are_per_tag_and_case_sensitive():
    m = box()
    m.append(b"a", None, T)
    m.append(b"b", None, U)
    m.append(b"c", None, b'"PRICE:AAPL"')
    assert [e[0] for e in m.replay(None).events] == [1, 2, 3]
    assert m.append(b"d", None, U).superseded == 2


def test_a_delivered_but_unacknowledged_event_is_replaced_too():
    m = box()
    m.append(b"1", None, T)
    m.mark_delivered(1)
    assert m.append(b"2", None, T).superseded == 1
    assert [e[0] for e in m.replay(Position("ep0.1", 0)).events] == [2]


def test_an_acknowledged_event_is_not_replaced():
    m = box()
    m.append(b"1", None, T)
    m.ack(1)
    out = m.append(b"2", None, T)
    assert out.superseded is None and out.replaced == 0
    assert m.tag(2) == (T, 0)


def test_a_replaced_head_is_no_gap_a_real_eviction_is():
    m = box(events=2)
    m.append(b"1", None, T)
    m.append(b"2", None, T)  # replaces 1: the buffer starts at 2
    replay = m.replay(None)
    assert replay.gap is None and [e[0] for e in replay.events] == [2]
    assert m.replay(Position("ep0.1", 0)).gap is None  # resume from before it: no gap either
    m.append(b"3")
    m.append(b"4")  # evicts 2 (the limit is 2 events)
    assert m.evicted == 2
    assert m.replay(Position("ep0.1", 0)).gap == (1, 2)


def test_eviction_forgets_the_tag_so_a_later_event_replaces_nothing():
    m = box(events=1)
    m.append(b"1", None, T)
    m.append(b"2")  # evicts 1
    out = m.append(b"3", None, T)  # evicts 2; nothing of tag T is buffered
    assert out.superseded is None and out.replaced == 0 and out.dropped == 1


def test_byte_limits_count_the_replacement():
    m = box(nbytes=10)
    m.append(b"aaaa", None, T)
    m.append(b"bbbb")
    out = m.append(b"cccc", None, T)  # the old T leaves first: 8 bytes, nothing evicted
    assert out.dropped == 0 and out.superseded == 1 and m.buffered_bytes == 8


def test_ack_drops_tag_entries():
    m = box()
    m.append(b"1", None, T)
    m.append(b"2", None, U)
    m.ack(2)
    assert m._tags is None and m._tag_of is None
    assert m.export_tags() == []


def test_export_and_restore_keep_tags_and_evicted():
    m = box(events=3)
    m.append(b"0")  # 1
    m.append(b"1", b'"a"', T)  # 2
    m.append(b"2", b'"b"', U)  # 3
    m.append(b"3", b'"c"', T)  # 4 replaces 2: the buffer is 1, 3, 4
    m.append(b"4")  # 5: evicts 1
    assert m.evicted == 1 and [e[0] for e in m.export()] == [3, 4, 5]
    tags = m.export_tags()
    assert tags == [(3, U, 0), (4, T, 1)]
    r = Mailbox.restored("ep0.1", MailboxLimits(3, 10_000), m.next_seq, m.acked, m.export(),
                         m.evicted, tags)  # fmt: skip
    assert r.evicted == 1 and r.tag(4) == (T, 1) and r.tag(3) == (U, 0)
    assert r.export() == m.export()
    assert r.append(b"5", None, T) == (6, 0, 2, 4)  # replaces 4 on the new owner
    replay = r.replay(Position("ep0.1", 0))
    assert replay.gap == (1, 1) and [e[0] for e in replay.events] == [3, 5, 6]


def test_restore_from_a_node_without_evicted_reports_the_missing_head_as_a_gap():
    r = Mailbox.restored("ep0.1", MailboxLimits(), 10, 2, [(7, b"x", None), (9, b"y", None)])
    assert r.evicted == 6
    assert r.replay(Position("ep0.1", 2)).gap == (3, 6)
    assert [e[0] for e in r.replay(Position("ep0.1", 2)).events] == [7, 9]


def test_restore_past_the_limits_counts_the_trimmed_as_evicted():
    events = [(s, b"x", None) for s in range(1, 6)]
    r = Mailbox.restored("ep0.1", MailboxLimits(max_events=2), 6, 0, events, 0,
                         [(1, T, 0), (5, U, 3)])  # fmt: skip
    assert r.evicted == 3 and r.tag(5) == (U, 3) and r._tags == {U: (5, 3)}


@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("push"), st.sampled_from([None, b'"a"', b'"b"'])),
            st.tuples(st.just("reconnect"), st.booleans()),
            st.tuples(st.just("ack"), st.booleans()),
        ),
        max_size=60,
    )
)
def test_every_skipped_seq_is_announced_lost_or_replaced(ops):
    """The browser's rule: every seq between two events it receives was announced lost by
    a gap, or replaced by a later event with a latest tag (counted in ``replaced``)."""
    m = Mailbox("ep0.1", MailboxLimits(max_events=4, max_bytes=1000))
    seen: list[int] = []
    lost: set[int] = set()
    tag_of: dict[int, bytes] = {}
    connected = True
    for op, arg in ops:
        if op == "push":
            seq = m.append(b"x", None, arg).seq
            if arg is not None:
                tag_of[seq] = arg
            if connected:
                seen.append(seq)
                m.mark_delivered(seq)
        elif op == "ack":
            if arg and seen:
                m.ack(seen[-1])
        else:
            connected = arg
            if connected:
                replay = m.replay(Position("ep0.1", seen[-1]) if seen else None)
                if replay.gap:
                    lost.update(range(replay.gap[0], replay.gap[1] + 1))
                seen.extend(e[0] for e in replay.events)
    assert seen == sorted(set(seen))
    if connected and seen:
        for skipped in set(range(seen[0], seen[-1] + 1)) - set(seen) - lost:
            tag = tag_of.get(skipped)
            # replaced: a later seq of the same tag reached the browser
            assert tag is not None and any(s > skipped and tag_of.get(s) == tag for s in seen)
