"""Leader election on an etcd lease: a sans-I/O state machine (:class:`Candidate`) and its
Twisted shell (:class:`Election`).

A candidate holds a lease it keeps alive (a keepalive every TTL/3 by default) and creates
``<prefix>/leader`` bound to that lease only if the key is absent (a txn comparing its
create_revision with 0). The winner leads while its lease lives; the others watch the key
and campaign again when it is deleted (the lease expired or was revoked).

Fencing: the leader's ``Fence`` (its lease and the leader key's create revision) goes into
every write as txn conditions (``halod.store.etcd``), so a deposed leader's write fails in
etcd itself. And the leader steps down on its own when it could not renew its lease in time:
it counts its lease as ending ``TTL`` after the *sending* of the last renewal that succeeded
(etcd renews it on receipt, later), and stops acting ``margin`` seconds before that — so it
stops before etcd can expire the lease and let another candidate win.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from halod.etcd import wire
from halod.etcd.client import EtcdClient, Watch


class State(enum.Enum):
    IDLE = "idle"  # not started
    CAMPAIGNING = "campaigning"  # getting a lease / trying to create the leader key
    FOLLOWER = "follower"  # another candidate leads; watching the leader key
    LEADER = "leader"
    STOPPED = "stopped"


@dataclass(frozen=True)
class ElectionSettings:
    ttl: int = 2  # lease TTL, seconds (etcd may raise it to its minimum)
    margin: float = 0.5  # the leader stops acting this long before its lease could end
    retry: float = 0.5  # after a failed grant/campaign, try again after this long
    renewals: int = 3  # keepalives per TTL (HaloD sends more: halod.ha)

    def __post_init__(self) -> None:
        if self.ttl < 1:
            raise ValueError(f"etcd lease TTL must be >= 1 s, not {self.ttl}")
        if not 0 < self.margin < self.ttl * 2 / 3:
            raise ValueError(
                f"step-down margin must be > 0 and < 2/3 of the TTL ({self.ttl} s), "
                f"not {self.margin}: a keepalive may come as late as TTL/3"
            )
        if self.retry <= 0:
            raise ValueError(f"retry must be > 0, not {self.retry}")
        if self.renewals < 3:
            raise ValueError(f"renewals must be >= 3 per TTL, not {self.renewals}")


@dataclass(frozen=True)
class Fence:
    """What a leader's writes are conditioned on."""

    lease: int
    revision: int  # create_revision of the leader key this candidate wrote
    name: str


# -- inputs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    now: float


@dataclass(frozen=True)
class Granted:
    lease: int
    ttl: int
    sent_at: float


@dataclass(frozen=True)
class Failed:
    """A grant or campaign request failed (etcd unreachable...)."""

    now: float
    why: str


@dataclass(frozen=True)
class Won:
    revision: int  # the leader key's create revision
    now: float


@dataclass(frozen=True)
class Lost:
    holder: str  # the leader key's value
    revision: int  # the store revision the campaign saw: watch from the next one
    now: float
    lease: int = 0  # the leader key's lease (0: not known)


@dataclass(frozen=True)
class Renewed:
    lease: int
    ttl: int  # 0: the lease is gone
    sent_at: float


@dataclass(frozen=True)
class LeaderGone:
    now: float


@dataclass(frozen=True)
class WatchLost:
    """The watch on the leader key ended (its member died, the stream broke)."""

    now: float


@dataclass(frozen=True)
class Deposed:
    """etcd refused a write fenced on this candidate's term: someone else leads."""

    now: float


@dataclass(frozen=True)
class Tick:
    now: float


@dataclass(frozen=True)
class Stop:
    now: float


Input = (
    Start | Granted | Failed | Won | Lost | Renewed | LeaderGone | WatchLost | Deposed | Tick | Stop
)

# -- outputs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GrantLease:
    ttl: int


@dataclass(frozen=True)
class Campaign:
    lease: int


@dataclass(frozen=True)
class KeepAlive:
    lease: int


@dataclass(frozen=True)
class WatchLeader:
    from_revision: int


@dataclass(frozen=True)
class Revoke:
    lease: int


@dataclass(frozen=True)
class Elected:
    fence: Fence


@dataclass(frozen=True)
class Following:
    holder: str


@dataclass(frozen=True)
class SteppedDown:
    why: str


Output = (
    GrantLease | Campaign | KeepAlive | WatchLeader | Revoke | Elected | Following | SteppedDown
)


@dataclass
class Candidate:
    """The election's decisions, no I/O: feed inputs to ``handle``, carry out its outputs,
    and call ``handle(Tick(now))`` at ``wake_at()``."""

    name: str
    settings: ElectionSettings = field(default_factory=ElectionSettings)
    state: State = State.IDLE
    lease: int = 0
    lease_ttl: int = 0
    expires_at: float = 0.0  # the earliest the lease can end, as far as we know
    keepalive_at: float = 0.0
    retry_at: float | None = None
    fence: Fence | None = None
    holder: str | None = None
    # A follower whose watch ended (its etcd member died, the stream broke) asks again who
    # leads, by campaigning, while it stays a follower of the leader it knew: /status
    # shows no "candidate" for a leader that is most likely still there.
    recheck: bool = False

    def _campaigning(self) -> bool:
        return self.state is State.CAMPAIGNING or (self.state is State.FOLLOWER and self.recheck)

    def handle(self, event: Input) -> list[Output]:
        if self.state is State.STOPPED:
            return []
        if isinstance(event, Stop):
            out: list[Output] = self._step_down("stopping") if self.state is State.LEADER else []
            if self.lease:
                out.append(Revoke(self.lease))
            self.state, self.lease, self.retry_at = State.STOPPED, 0, None
            return out
        if isinstance(event, Start):
            if self.state is not State.IDLE:
                return []
            return self._regrant()
        if isinstance(event, Granted):
            if not self._campaigning() or self.lease:
                return [Revoke(event.lease)]  # a late grant we no longer need
            self.lease, self.lease_ttl = event.lease, event.ttl
            self.expires_at = event.sent_at + event.ttl
            self.keepalive_at = event.sent_at + event.ttl / self.settings.renewals
            return [Campaign(self.lease)]
        if isinstance(event, Failed):
            if self._campaigning():
                self.retry_at = event.now + self.settings.retry
            return []
        if isinstance(event, Won):
            if not self._campaigning() or not self.lease:
                return []
            self.recheck = False
            if event.now >= self.expires_at - self.settings.margin:
                # Won with a lease about to end: acting now could overlap a successor.
                return self._lease_lost("won too late in the lease")
            self.state, self.holder = State.LEADER, self.name
            self.fence = Fence(self.lease, event.revision, self.name)
            return [Elected(self.fence)]
        if isinstance(event, Lost):
            if not self._campaigning():
                return []
            if event.holder == self.name and event.lease and event.lease != self.lease:
                # Our own key of an earlier lease, which nothing renews any more (etcd
                # came back after we stepped down and regranted; this HaloD's previous
                # process): end it and campaign again, rather than follow ourselves
                # until its TTL runs out. (Candidate names are unique per cluster.)
                self.retry_at = event.now + self.settings.retry
                return [Revoke(event.lease)]
            self.state, self.holder, self.recheck = State.FOLLOWER, event.holder, False
            return [Following(event.holder), WatchLeader(event.revision + 1)]
        if isinstance(event, LeaderGone):
            if self.state is not State.FOLLOWER:
                return []
            self.state, self.holder, self.recheck = State.CAMPAIGNING, None, False
            return [Campaign(self.lease)] if self.lease else self._regrant()
        if isinstance(event, WatchLost):
            if self.state is not State.FOLLOWER:
                return []
            # Whether the leader is still there is unknown: campaign again shortly, still
            # following it meanwhile (``recheck``); the txn either wins or tells who
            # leads (and a new watch starts).
            self.recheck = True
            self.retry_at = event.now + self.settings.retry
            return []
        if isinstance(event, Deposed):
            if self.state is not State.LEADER:
                return []
            return self._lease_lost("etcd refused a write fenced on this term")
        if isinstance(event, Renewed):
            if not self.lease or event.lease != self.lease:
                return []  # a reply about a lease we already gave up
            if event.ttl <= 0:
                return self._lease_lost("the lease expired in etcd")
            self.expires_at = max(self.expires_at, event.sent_at + event.ttl)
            return []
        # Tick
        return self._tick(event.now)

    def _tick(self, now: float) -> list[Output]:
        out: list[Output] = []
        if self.state is State.LEADER and now >= self.expires_at - self.settings.margin:
            return self._lease_lost("could not renew the lease in time")
        if self.lease and now >= self.expires_at:
            return self._lease_lost("the lease ran out")
        if self.retry_at is not None and now >= self.retry_at:
            self.retry_at = None
            out += [Campaign(self.lease)] if self.lease else [GrantLease(self.settings.ttl)]
        if self.lease and now >= self.keepalive_at:
            self.keepalive_at = now + self.lease_ttl / self.settings.renewals
            out.append(KeepAlive(self.lease))
        return out

    def _step_down(self, why: str) -> list[Output]:
        self.fence = None
        return [SteppedDown(why)]

    def _lease_lost(self, why: str) -> list[Output]:
        out = self._step_down(why) if self.state is State.LEADER else []
        old = self.lease
        out += self._regrant()
        if old:
            out.insert(len(out) - 1, Revoke(old))
        return out

    def _regrant(self) -> list[Output]:
        self.state, self.lease, self.fence, self.holder = State.CAMPAIGNING, 0, None, None
        self.retry_at, self.recheck = None, False
        return [GrantLease(self.settings.ttl)]

    def wake_at(self) -> float | None:
        """When to send the next ``Tick`` (None: nothing pending)."""
        times = []
        if self.lease:
            times += [self.keepalive_at, self.expires_at]
            if self.state is State.LEADER:
                times.append(self.expires_at - self.settings.margin)
        if self.retry_at is not None:
            times.append(self.retry_at)
        return min(times) if times else None


# -- the Twisted shell -----------------------------------------------------------------


class NotLeader(Exception):
    """This candidate does not lead (locally known, or etcd refused a fenced write)."""


class Election:
    """Runs a :class:`Candidate` against etcd. ``on_change(state, fence)`` is called on every
    change of role (LEADER with its fence, FOLLOWER, CAMPAIGNING after a step-down)."""

    log = Logger()

    def __init__(self, client: EtcdClient, prefix: bytes, name: str,
                 settings: ElectionSettings | None = None,
                 on_change: Callable[[State, Fence | None], None] | None = None,
                 info: dict[str, str] | None = None) -> None:  # fmt: skip
        self.client = client
        self.info = dict(info or {})  # more fields of the leader key's value (e.g. control)
        self.reactor = client.reactor
        self.key = prefix.rstrip(b"/") + b"/leader"
        self.candidate = Candidate(name, settings or ElectionSettings())
        self.on_change = on_change
        self._timer: Any = None  # an IDelayedCall
        self._watch: Watch | None = None
        self._raised = 0  # a lease TTL etcd granted other than the one asked, once logged
        self.elected: Deferred[Fence] = Deferred()  # fires the first time we lead
        self.terms: list[Fence] = []

    @property
    def state(self) -> State:
        return self.candidate.state

    def fence(self) -> Fence:
        """The current fence; raises NotLeader unless this candidate leads right now."""
        c = self.candidate
        if c.state is not State.LEADER or c.fence is None:
            raise NotLeader(f"{c.name} is {c.state.value}")
        if self.reactor.seconds() >= c.expires_at - c.settings.margin:
            self._feed(Tick(self.reactor.seconds()))
            raise NotLeader(f"{c.name}: lease not renewed in time")
        return c.fence

    def start(self) -> None:
        self._feed(Start(self.reactor.seconds()))

    def stop(self) -> Deferred[None]:
        """Step down (revoking the lease, so a successor need not wait for the TTL)."""
        revoke = [o for o in self.candidate.handle(Stop(self.reactor.seconds()))
                  if isinstance(o, Revoke)]  # fmt: skip
        self._notify()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._drop_watch()
        if not revoke:
            return Deferred.fromCoroutine(_nothing())
        d = self.client.revoke(revoke[0].lease)
        d.addErrback(lambda f: self.log.warn("revoking the lease failed: {f}", f=f.value))
        return d.addCallback(lambda _: None)

    def deposed(self) -> None:
        """A write fenced on this term was refused (halod.store.etcd.Fenced): step down."""
        self._feed(Deposed(self.reactor.seconds()))

    def abandon(self) -> None:
        """Stop sending keepalives and watching without revoking (tests: a leader whose
        process froze); the lease ends after its TTL."""
        self.candidate.state = State.STOPPED
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._drop_watch()

    # -- machinery -------------------------------------------------------------------------

    def _feed(self, event: Input) -> None:
        before = (self.candidate.state, self.candidate.fence)
        outputs = self.candidate.handle(event)
        for out in outputs:
            self._do(out)
        if (self.candidate.state, self.candidate.fence) != before:
            self._notify()
        self._schedule()

    def _notify(self) -> None:
        c = self.candidate
        if c.state is State.LEADER and c.fence is not None:
            self.terms.append(c.fence)
            if not self.elected.called:
                self.elected.callback(c.fence)
        if self.on_change is not None:
            self.on_change(c.state, c.fence)

    def _schedule(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        at = self.candidate.wake_at()
        if at is not None and self.candidate.state is not State.STOPPED:
            delay = max(0.0, at - self.reactor.seconds())
            self._timer = self.reactor.callLater(delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._feed(Tick(self.reactor.seconds()))

    def _do(self, out: Output) -> None:
        now = self.reactor.seconds()
        if isinstance(out, GrantLease):
            d = self.client.grant(out.ttl)
            d.addCallbacks(
                lambda lease: self._granted(lease.id, lease.ttl, out.ttl, now),
                lambda f: self._feed(Failed(self.reactor.seconds(), str(f.value))),
            )
        elif isinstance(out, Campaign):
            self._campaign(out.lease)
        elif isinstance(out, KeepAlive):
            self.client.keepalive(out.lease).addCallbacks(
                lambda lease: self._feed(Renewed(lease.id, lease.ttl, now)),
                lambda f: self.log.info("keepalive failed: {why}", why=str(f.value)),
            )
        elif isinstance(out, WatchLeader):
            self._watch_leader(out.from_revision)
        elif isinstance(out, Revoke):
            self.client.revoke(out.lease).addErrback(lambda f: None)
        elif isinstance(out, Elected):
            fence = out.fence
            self.log.info("{name} leads (lease {lease}, revision {rev})",
                          name=fence.name, lease=fence.lease, rev=fence.revision)  # fmt: skip
        elif isinstance(out, SteppedDown):
            self.log.warn("{name} steps down: {why}", name=self.candidate.name, why=out.why)
        elif isinstance(out, Following):
            self.log.info("{name} follows {holder}", name=self.candidate.name, holder=out.holder)

    def _campaign(self, lease: int) -> None:
        value = json.dumps({**self.info, "name": self.candidate.name}).encode()
        d = self.client.txn(
            [wire.Compare(self.key, wire.Target.CREATE, 0)],
            [wire.Put(self.key, value, lease)],
            [wire.Get(self.key)],
        )

        def done(result: wire.TxnResult) -> None:
            now = self.reactor.seconds()
            if result.succeeded:
                self._feed(Won(result.revision, now))
                return
            kvs = result.ranges[0].kvs if result.ranges else ()
            if not kvs:  # deleted between compare and get: try again
                self._feed(Failed(now, "leader key vanished"))
                return
            if kvs[0].lease == lease:  # ours: an earlier attempt won, its reply was lost
                self._feed(Won(kvs[0].create_revision, now))
                return
            self._feed(Lost(_holder(kvs[0].value), result.revision, now, kvs[0].lease))

        d.addCallbacks(done, lambda f: self._feed(Failed(self.reactor.seconds(), str(f.value))))

    def _granted(self, lease: int, ttl: int, asked: int, sent_at: float) -> None:
        if ttl != asked and ttl != self._raised:  # once per value: every regrant says it
            self._raised = ttl
            self.log.warn(
                "etcd granted a lease of {ttl} s, not the {asked} s of etcd_lease_ttl (its "
                "minimum is 1.5 x its --election-timeout): a take-over takes that long",
                ttl=ttl, asked=asked,
            )  # fmt: skip
        self._feed(Granted(lease, ttl, sent_at))

    def _drop_watch(self) -> None:
        """Cancel the leader watch, if any, as no longer ours first: a cancelled watch
        ends at once (EtcdClient fails its ``done`` synchronously), and its ``ended``
        must not take that for the current watch being lost (which would campaign
        again, and so on for ever: a follower of a new leader stuck as a candidate)."""
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.cancel()

    def _watch_leader(self, from_revision: int) -> None:
        self._drop_watch()

        def changed(message: wire.WatchMessage) -> None:
            if any(e.type is wire.EventType.DELETE for e in message.events):
                self._feed(LeaderGone(self.reactor.seconds()))

        watch = self.client.watch(self.key, None, from_revision, changed)
        self._watch = watch

        def ended(_: object) -> None:
            if self._watch is watch:
                self._watch = None
                self._feed(WatchLost(self.reactor.seconds()))

        watch.done.addBoth(ended)


def _holder(value: bytes) -> str:
    try:
        return str(json.loads(value)["name"])
    except (ValueError, KeyError, TypeError):
        return value.decode("utf-8", "replace")


async def _nothing() -> None:
    return None
