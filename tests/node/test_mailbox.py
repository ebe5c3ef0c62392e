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
