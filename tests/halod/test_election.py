"""Leader election on an etcd lease: the state machine with plain values, then two
candidates on a real 3-member etcd cluster (tests/etcd_cluster.py)."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor, task

from halod.etcd import election as el
from halod.etcd.client import EtcdClient
from tests.etcd_cluster import etcd_cluster  # noqa: F401

S = el.ElectionSettings(ttl=3, margin=0.5, retry=0.25)


def leader(now=0.0):
    c = el.Candidate("a", S)
    assert c.handle(el.Start(now)) == [el.GrantLease(3)]
    assert c.handle(el.Granted(7, 3, now)) == [el.Campaign(7)]
    assert c.handle(el.Won(11, now + 0.01)) == [el.Elected(el.Fence(7, 11, "a"))]
    assert c.state is el.State.LEADER
    return c


def test_elected_leader_renews_every_third_of_the_ttl():
    c = leader()
    assert c.wake_at() == 1.0
    assert c.handle(el.Tick(1.0)) == [el.KeepAlive(7)]
    c.handle(el.Renewed(7, 3, sent_at=1.0))
    assert c.handle(el.Tick(2.0)) == [el.KeepAlive(7)]
    c.handle(el.Renewed(7, 3, sent_at=2.0))
    # without the renewals it would have stepped down at 3 - 0.5
    assert c.handle(el.Tick(3.0)) == [el.KeepAlive(7)]
    assert c.state is el.State.LEADER and c.expires_at == 5.0


def test_leader_steps_down_before_its_lease_can_end():
    c = leader()
    c.handle(el.Tick(1.0))  # keepalive sent, never answered
    c.handle(el.Tick(2.0))
    assert c.wake_at() == 2.5  # TTL 3 from the grant's sending, minus the margin
    out = c.handle(el.Tick(2.5))
    assert out == [
        el.SteppedDown("could not renew the lease in time"),
        el.Revoke(7),
        el.GrantLease(3),
    ]
    assert c.state is el.State.CAMPAIGNING and c.fence is None


def test_a_renewal_counts_from_when_it_was_sent():
    c = leader()
    c.handle(el.Tick(1.0))
    c.handle(el.Renewed(7, 3, sent_at=1.0))  # the reply came late; etcd renewed on receipt
    assert c.expires_at == 4.0
    assert c.handle(el.Tick(3.49)) == [el.KeepAlive(7)]
    assert c.state is el.State.LEADER
    assert el.SteppedDown in [type(o) for o in c.handle(el.Tick(3.5))]


def test_expired_lease_reported_by_etcd_steps_down_at_once():
    c = leader()
    out = c.handle(el.Renewed(7, 0, sent_at=1.0))
    assert out[0] == el.SteppedDown("the lease expired in etcd")
    assert c.state is el.State.CAMPAIGNING


def test_a_refused_fenced_write_deposes_the_leader():
    c = leader()
    out = c.handle(el.Deposed(1.0))
    assert out == [
        el.SteppedDown("etcd refused a write fenced on this term"),
        el.Revoke(7),
        el.GrantLease(3),
    ]
    assert c.state is el.State.CAMPAIGNING and c.handle(el.Deposed(1.1)) == []


def test_stale_renewal_of_an_old_lease_is_ignored():
    c = leader()
    c.handle(el.Tick(2.5))  # step down, regrant
    c.handle(el.Granted(8, 3, 2.6))
    assert c.handle(el.Renewed(7, 0, sent_at=2.0)) == []
    assert c.lease == 8


def test_loser_follows_then_campaigns_when_the_key_goes():
    c = el.Candidate("b", S)
    c.handle(el.Start(0.0))
    c.handle(el.Granted(9, 3, 0.0))
    assert c.handle(el.Lost("a", 20, 0.1)) == [el.Following("a"), el.WatchLeader(21)]
    assert c.state is el.State.FOLLOWER and c.holder == "a"
    assert c.handle(el.Tick(1.0)) == [el.KeepAlive(9)]  # a follower keeps its lease too
    c.handle(el.Renewed(9, 3, 1.0))
    assert c.handle(el.LeaderGone(1.2)) == [el.Campaign(9)]
    assert c.handle(el.Won(25, 1.3)) == [el.Elected(el.Fence(9, 25, "b"))]


def test_a_key_of_our_own_earlier_lease_is_revoked_not_followed():
    """After etcd comes back, the leader key of this HaloD's earlier lease (which it
    could not revoke while etcd was away) is still there: the candidate ends that lease
    and campaigns again, instead of following itself until the lease's TTL runs out."""
    c = el.Candidate("b", S)
    c.handle(el.Start(0.0))
    c.handle(el.Granted(9, 3, 0.0))
    assert c.handle(el.Lost("b", 20, 0.1, lease=7)) == [el.Revoke(7)]
    assert c.state is el.State.CAMPAIGNING and c.holder is None
    assert el.Campaign(9) in c.handle(el.Tick(0.1 + S.retry))
    assert c.handle(el.Won(25, 0.8)) == [el.Elected(el.Fence(9, 25, "b"))]
    # Another's key, or one of our current lease (a lost reply), is not touched.
    d = el.Candidate("b", S)
    d.handle(el.Start(0.0))
    d.handle(el.Granted(9, 3, 0.0))
    assert d.handle(el.Lost("a", 20, 0.1, lease=7)) == [el.Following("a"), el.WatchLeader(21)]


def test_a_win_with_a_lease_about_to_end_is_not_taken():
    c = el.Candidate("a", S)
    c.handle(el.Start(0.0))
    c.handle(el.Granted(7, 3, 0.0))
    assert c.handle(el.Won(11, 2.6)) == [el.Revoke(7), el.GrantLease(3)]
    assert c.state is el.State.CAMPAIGNING and c.fence is None


def test_a_follower_that_loses_its_watch_asks_again_as_a_follower():
    """Its watch ended with its etcd member: it campaigns again shortly to learn who leads,
    and stays the follower of the leader it knew meanwhile (no "candidate" in /status for
    a leader that is most likely still there; docs/halod.md, one etcd member of 3 dies)."""
    c = el.Candidate("b", S)
    c.handle(el.Start(0.0))
    c.handle(el.Granted(9, 3, 0.0))
    c.handle(el.Lost("a", 20, 0.1))
    assert c.handle(el.WatchLost(0.5)) == []
    assert c.state is el.State.FOLLOWER and c.holder == "a" and c.wake_at() == 0.75
    assert c.handle(el.Failed(0.7, "refused")) == []  # its next try, later
    assert c.state is el.State.FOLLOWER and c.wake_at() == 0.95
    assert c.handle(el.Tick(0.95)) == [el.Campaign(9)]
    assert c.handle(el.Lost("a", 30, 1.0)) == [el.Following("a"), el.WatchLeader(31)]
    assert c.state is el.State.FOLLOWER and not c.recheck
    assert el.Campaign(9) not in c.handle(el.Tick(1.0 + S.retry))  # it watches again


def test_a_follower_asking_again_leads_if_the_leader_is_gone():
    c = el.Candidate("b", S)
    c.handle(el.Start(0.0))
    c.handle(el.Granted(9, 3, 0.0))
    c.handle(el.Lost("a", 20, 0.1))
    c.handle(el.WatchLost(0.5))
    assert c.handle(el.Tick(0.75)) == [el.Campaign(9)]
    assert c.handle(el.Won(33, 0.8)) == [el.Elected(el.Fence(9, 33, "b"))]
    assert c.state is el.State.LEADER and not c.recheck


def test_failures_retry_later():
    c = el.Candidate("a", S)
    c.handle(el.Start(0.0))
    assert c.handle(el.Failed(0.1, "refused")) == []
    assert c.wake_at() == 0.35
    assert c.handle(el.Tick(0.35)) == [el.GrantLease(3)]
    c.handle(el.Granted(7, 3, 0.4))
    c.handle(el.Failed(0.5, "txn timed out"))
    assert c.handle(el.Tick(0.75)) == [el.Campaign(7)]


def test_stop_steps_down_and_revokes():
    c = leader()
    assert c.handle(el.Stop(1.0)) == [el.SteppedDown("stopping"), el.Revoke(7)]
    assert c.state is el.State.STOPPED
    assert c.handle(el.Tick(5.0)) == [] and c.handle(el.Won(3, 5.0)) == []


@pytest.mark.parametrize("kw", [{"ttl": 0}, {"ttl": 3, "margin": 2.0}, {"margin": 0}, {"retry": 0}])
def test_settings_are_checked(kw):
    with pytest.raises(ValueError):
        el.ElectionSettings(**kw)


# -- on a real etcd cluster ------------------------------------------------------------


def sleep(seconds):
    return task.deferLater(reactor, seconds, lambda: None)


@pytest_twisted.inlineCallbacks
def until(check, timeout, step=0.02):
    deadline = reactor.seconds() + timeout
    while not check():
        if reactor.seconds() > deadline:
            raise AssertionError(f"not within {timeout}s: {check}")
        yield sleep(step)


PREFIX = b"/test/halod"
TTL = 2


def candidates(cluster, names, endpoints=None, margin=0.5):
    made = []
    for i, name in enumerate(names):
        eps = endpoints[i] if endpoints else cluster.endpoints[i:] + cluster.endpoints[:i]
        client = EtcdClient(reactor, eps, timeout=0.5)
        made.append(el.Election(client, PREFIX, name, el.ElectionSettings(TTL, margin, 0.2)))
    return made


@pytest_twisted.inlineCallbacks
def shutdown(elections):
    for e in elections:
        if e.state is not el.State.STOPPED:
            yield e.stop()
        yield e.client.close()


@pytest_twisted.inlineCallbacks
def test_one_leader_of_two_and_take_over_within_the_ttl(etcd_cluster):  # noqa: F811
    a, b = candidates(etcd_cluster, ["a", "b"])
    try:
        a.start()
        b.start()
        yield until(lambda: {a.state, b.state} == {el.State.LEADER, el.State.FOLLOWER}, 5)
        first, second = (a, b) if a.state is el.State.LEADER else (b, a)
        assert second.candidate.holder == first.candidate.name
        # several TTLs later: still the same leader (keepalives work), still one
        yield sleep(2.5 * TTL)
        assert (first.state, second.state) == (el.State.LEADER, el.State.FOLLOWER)
        assert len(first.terms) == 1 and second.terms == []
        # the leader freezes: no keepalive, no revoke
        first.abandon()
        frozen_at = reactor.seconds()
        yield until(lambda: second.state is el.State.LEADER, TTL + 2)
        took = reactor.seconds() - frozen_at
        # etcd ends the lease TTL after the last renewal, which was at most TTL/3 before
        assert took < TTL + 1.0, took
    finally:
        yield shutdown([a, b])


@pytest_twisted.inlineCallbacks
def test_the_loser_of_a_later_election_follows_the_winner(etcd_cluster):  # noqa: F811
    """Three candidates: when the leader goes, one follower wins and the other, which
    saw the key go on its watch and then lost, follows the winner and stays a follower
    (it used to cancel its own new watch and campaign again twice a second for ever)."""
    a, b, c = candidates(etcd_cluster, ["a", "b", "c"])
    try:
        a.start()
        yield a.elected
        b.start()
        c.start()
        yield until(lambda: b.state is c.state is el.State.FOLLOWER, 5)
        yield a.stop()
        yield until(lambda: el.State.LEADER in (b.state, c.state), TTL)
        winner, loser = (b, c) if b.state is el.State.LEADER else (c, b)
        seen = set()
        for _ in range(30):  # 1.5 s: three of the old loop's campaigns
            yield sleep(0.05)
            seen.add((loser.state, loser.candidate.holder))
        assert seen == {(el.State.FOLLOWER, winner.candidate.name)}
    finally:
        yield shutdown([a, b, c])


@pytest_twisted.inlineCallbacks
def test_clean_stop_hands_over_at_once(etcd_cluster):  # noqa: F811
    a, b = candidates(etcd_cluster, ["a", "b"])
    try:
        a.start()
        yield a.elected
        b.start()
        yield until(lambda: b.state is el.State.FOLLOWER, 5)
        stopped_at = reactor.seconds()
        yield a.stop()
        yield until(lambda: b.state is el.State.LEADER, TTL)
        assert reactor.seconds() - stopped_at < TTL / 2  # revoked: no waiting for the TTL
    finally:
        yield shutdown([a, b])


@pytest_twisted.inlineCallbacks
def test_leader_cut_off_from_etcd_stops_before_another_leads(etcd_cluster):  # noqa: F811
    """The leader talks to member 0 only; member 0 dies. It cannot renew, steps down on its
    own, and only after that can the other candidate (on members 1 and 2) win."""
    eps = etcd_cluster.endpoints
    a, b = candidates(etcd_cluster, ["a", "b"], endpoints=[[eps[0]], eps[1:]])
    events = []
    a.on_change = lambda state, fence: events.append((reactor.seconds(), "a", state))
    b.on_change = lambda state, fence: events.append((reactor.seconds(), "b", state))
    try:
        a.start()
        yield a.elected
        b.start()
        yield until(lambda: b.state is el.State.FOLLOWER, 5)
        etcd_cluster.kill(0)
        yield until(lambda: b.state is el.State.LEADER, 3 * TTL)
        stepped = [t for t, who, s in events if who == "a" and s is not el.State.LEADER]
        led = [t for t, who, s in events if who == "b" and s is el.State.LEADER]
        assert stepped and led and stepped[0] < led[0], events
        assert a.state is not el.State.LEADER
        with pytest.raises(el.NotLeader):
            a.fence()
    finally:
        yield shutdown([a, b])


@pytest_twisted.inlineCallbacks
def test_without_quorum_the_leader_steps_down(etcd_cluster):  # noqa: F811
    """2 of 3 members killed: no lease can be renewed, so the leader stops acting before
    its lease could end, and nobody leads."""
    (a,) = candidates(etcd_cluster, ["a"])
    changes = []
    a.on_change = lambda state, fence: changes.append((reactor.seconds(), state))
    try:
        a.start()
        yield a.elected
        cut = reactor.seconds()
        etcd_cluster.kill(1)
        etcd_cluster.kill(2)
        yield until(lambda: a.state is not el.State.LEADER, TTL + 1)
        stepped = next(t for t, s in changes if s is not el.State.LEADER)
        # the last renewal before the cut was sent at most TTL/3 before it
        assert stepped - cut < TTL - a.candidate.settings.margin + 0.1
        with pytest.raises(el.NotLeader):
            a.fence()
        yield sleep(TTL)
        assert a.state is not el.State.LEADER
    finally:
        yield shutdown([a])
