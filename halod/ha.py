"""HaloD on etcd (``store = "etcd"``): which HaloD leads, and what the others know.

:class:`Leadership` runs phase 1's parts for one HaloD (docs/halod.md, "High
availability"): an :class:`~halod.etcd.election.Election` on ``<prefix>/leader`` (its value
also names this HaloD's control address, so followers can point nodes at the leader), a
:class:`~halod.store.etcd.Follower` keeping a warm copy of the table, the fenced
:class:`~halod.store.etcd.EtcdStore` the leader writes through, and a health poll of each
etcd endpoint for /status. It decides nothing about nodes: the daemon (halod.server) is
told ``on_lead()`` / ``on_follow()`` / ``on_table(table)`` and acts.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.client import Agent, readBody

from halod.etcd.client import EtcdClient
from halod.etcd.election import Election, ElectionSettings, Fence, State
from halod.store.base import Persisted
from halod.store.etcd import EtcdSettings, EtcdStore, Follower


class Role(StrEnum):
    """/status ``role``: ``solo`` with SQLite; with etcd ``leader``, ``follower`` or
    ``candidate`` (no leader known: campaigning, or stepped down)."""

    SOLO = "solo"
    LEADER = "leader"
    FOLLOWER = "follower"
    CANDIDATE = "candidate"


@dataclass(frozen=True)
class LeaderInfo:
    """What ``<prefix>/leader`` says about the leading HaloD."""

    name: str
    control: str | None  # its control address (the not_leader hint), if it named one
    status: str | None = None  # its status_http, if it named one


def leader_info(value: bytes | None) -> LeaderInfo | None:
    """Parse the leader key's JSON value (None: no leader, or not ours)."""
    if value is None:
        return None
    try:
        obj = json.loads(value)
        name = obj["name"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(name, str):
        return None
    control, status = obj.get("control"), obj.get("status")
    return LeaderInfo(
        name,
        control if isinstance(control, str) else None,
        status if isinstance(status, str) else None,
    )


# Keepalives per lease TTL: the leader steps down when it could not renew for TTL −
# margin − TTL/RENEWALS, so frequent renewals let it ride out an etcd leader election
# (0.3-0.7 s) even with a 1 s lease; each is one small HTTP request.
RENEWALS = 10


class Leadership:
    """One HaloD's part in the election. Calls ``on_lead()`` when it leads (the store can
    write), ``on_follow()`` when it stops leading (or another leads), and
    ``on_table(table)`` with each new warm copy of the table while it does not lead."""

    log = Logger()
    HEALTH_INTERVAL = 2.0  # seconds between /health polls of each etcd endpoint

    def __init__(self, reactor: Any, settings: EtcdSettings, name: str = "",
                 info: dict[str, str] | None = None) -> None:  # fmt: skip
        self.reactor = reactor
        self.settings = settings
        self.name = name
        self.client = EtcdClient(reactor, settings.endpoints, settings.timeout)
        election = settings.election()
        election = ElectionSettings(election.ttl, election.margin, election.retry, RENEWALS)
        self.election = Election(self.client, settings.key_prefix, name, election,
                                 self._changed, info)  # fmt: skip
        self.store = EtcdStore(self.client, settings, self.election.fence,
                               on_fenced=self.election.deposed)  # fmt: skip
        self.follower = Follower(self.client, settings.key_prefix, self._table)
        self.on_lead: Callable[[], None] = lambda: None
        self.on_follow: Callable[[], None] = lambda: None
        self.on_table: Callable[[Persisted | None], None] = lambda table: None
        self.leading = False
        # A leader (another HaloD, or this one in an earlier term) was known while this
        # HaloD ran: when it now leads, that is a change of leader, not a cold start.
        self.seen_leader = False
        self.health: dict[str, bool | None] = dict.fromkeys(settings.endpoints)
        self._agent = cast(Any, Agent)(reactor, connectTimeout=settings.timeout)
        self._health = LoopingCall(self._poll_health)
        self._health.clock = reactor
        self.stopped = False

    # -- views -----------------------------------------------------------------------------

    @property
    def role(self) -> Role:
        if self.leading:
            return Role.LEADER
        if self.election.state is State.FOLLOWER:
            return Role.FOLLOWER
        return Role.CANDIDATE

    def leader(self) -> LeaderInfo | None:
        """The leading HaloD as far as this one knows (itself when it leads)."""
        values = self.follower.mirror.values
        known = leader_info(values.get(self.settings.key_prefix + b"/leader"))
        if self.election.state is State.FOLLOWER and self.election.candidate.holder:
            holder = self.election.candidate.holder
            if known is None or known.name != holder:
                return LeaderInfo(holder, None)
        if self.election.state is State.LEADER:
            if known is None or known.name != self.name:
                return LeaderInfo(self.name, self.election.info.get("control"),
                                  self.election.info.get("status"))  # fmt: skip
        if self.election.state not in (State.FOLLOWER, State.LEADER):
            return None
        return known

    # -- life ------------------------------------------------------------------------------

    def start(self, name: str | None = None, info: dict[str, str] | None = None) -> None:
        """Campaign as ``name``; ``info`` goes into the leader key's value with it (e.g.
        ``control``: where nodes reach this HaloD), both known once its ports are bound."""
        if name:
            self.name = self.election.candidate.name = name
        if info is not None:
            self.election.info = dict(info)
        if not self.name:
            raise ValueError("etcd: a HaloD needs a name to campaign with")
        self.follower.start()
        self.election.start()
        self._health.start(self.HEALTH_INTERVAL, now=True)

    def stop(self) -> Deferred[None]:
        """Step down (the lease is revoked: a follower leads at once) and close etcd."""
        self.stopped = True
        if self._health.running:
            self._health.stop()
        self.follower.stop()
        was_leading, self.leading = self.leading, False
        if was_leading:
            self.on_follow()
        d = self.election.stop()
        d.addBoth(lambda _: self.store.shutdown())
        return d

    def _changed(self, state: State, fence: Fence | None) -> None:
        if self.stopped:
            return
        leads = state is State.LEADER and fence is not None
        seen = state is State.FOLLOWER or self.leading
        if leads and not self.leading:
            self.leading = True
            self.on_lead()
        elif not leads and self.leading:
            self.leading = False
            self.on_follow()
        self.seen_leader = self.seen_leader or seen

    def _table(self, table: Persisted | None) -> None:
        if not self.leading and not self.stopped:
            self.on_table(table)

    def _poll_health(self) -> None:
        for endpoint in self.settings.endpoints:
            d = self._agent.request(b"GET", (endpoint.rstrip("/") + "/health").encode())
            d.addTimeout(self.settings.timeout, self.reactor)
            d.addCallback(readBody)

            def done(body: bytes, endpoint: str = endpoint) -> None:
                try:
                    self.health[endpoint] = json.loads(body).get("health") == "true"
                except (ValueError, AttributeError):
                    self.health[endpoint] = False

            def failed(_: object, endpoint: str = endpoint) -> None:
                self.health[endpoint] = False

            d.addCallbacks(done, failed)
