"""The dedup memory (orbited.node.dedup) with plain times: no clock, no hub."""

from __future__ import annotations

from orbited.node.dedup import DedupLimits, DedupMemory


def memory(**limits: float) -> DedupMemory[str]:
    return DedupMemory(DedupLimits(**limits))  # type: ignore[arg-type]


def test_a_reply_is_remembered_for_the_window_then_forgotten():
    dedup = memory(window=10)
    dedup.remember(b"d1", b"reply-1", now=100.0)
    assert dedup.reply(b"d1", now=109.9) == b"reply-1"
    assert dedup.reply(b"d2", now=109.9) is None
    assert dedup.reply(b"d1", now=110.0) is None  # the window is [now, now + window)
    assert len(dedup) == 0 and dedup.size == 0


def test_the_oldest_replies_go_first_past_the_count_limit():
    dedup = memory(max_entries=3)
    for n in range(5):
        dedup.remember(b"d%d" % n, b"r%d" % n, now=float(n))
    assert len(dedup) == 3
    assert [dedup.reply(b"d%d" % n, now=5.0) for n in range(5)] == [None, None, b"r2", b"r3", b"r4"]


def test_the_oldest_replies_go_first_past_the_byte_limit():
    dedup = memory(max_bytes=25)
    for n in range(4):
        dedup.remember(b"d%d" % n, b"x" * 10, now=0.0)
    assert dedup.size == 20 and len(dedup) == 2
    assert dedup.reply(b"d0", 1.0) is None and dedup.reply(b"d3", 1.0) == b"x" * 10
    dedup.remember(b"big", b"y" * 30, now=0.0)  # larger than the limit on its own: not kept
    assert dedup.size == 0 and len(dedup) == 0


def test_remembering_a_digest_again_counts_its_bytes_once():
    dedup = memory()
    dedup.remember(b"d", b"12345", now=0.0)
    dedup.remember(b"d", b"123", now=1.0)
    assert len(dedup) == 1 and dedup.size == 3 and dedup.reply(b"d", 2.0) == b"123"


def test_resends_of_a_pending_request_wait_and_are_handed_back_in_order():
    dedup = memory()
    assert not dedup.pending(b"d")
    dedup.begin(b"d")
    assert dedup.pending(b"d") and dedup.inflight == 1
    dedup.wait(b"d", "first resend")
    dedup.wait(b"d", "second resend")
    assert dedup.finish(b"d") == ["first resend", "second resend"]
    assert not dedup.pending(b"d") and dedup.inflight == 0
    assert dedup.finish(b"d") == []  # finished twice (e.g. failed, then cleaned up)


def test_knows_a_remembered_or_pending_request_and_nothing_else():
    dedup = memory(window=10.0)
    assert not dedup.knows(b"a")
    dedup.remember(b"a", b"reply", now=0.0)
    dedup.begin(b"b")
    assert dedup.knows(b"a") and dedup.knows(b"b") and not dedup.knows(b"c")
    dedup.forget_old(10.0)  # a's window ended
    assert not dedup.knows(b"a")
    dedup.finish(b"b")
    assert not dedup.knows(b"b")
