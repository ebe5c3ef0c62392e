"""Per-user state of the hub (sans-I/O): the user index entry, per-user limits, holds.

Under hash version 2 every connection key of a user lives on one node (docs/hashing.md),
so that node alone knows all of a user's keys: ``Hub._users`` maps a user to a
``UserEntry`` (its keys' slots, how many have a transport, its rate budget and its held
wildcard events). Limits (docs/protocol.md, "Per-user limits"; docs/operations.md):

- ``UserLimits.max_connections``: attached transports per user; over it a new
  connection is refused (close 4429 / HTTP 429 ``user_limit``) or the user's
  longest-attached connection is closed (4003 ``displaced``), per ``policy``.
- ``UserLimits.rate`` / ``burst``: event requests per second per user, a GCRA
  (``gcra_take``): one float per user, no timer.

``NullWatcher`` is the offline hook's stand-in (orbited.node.offline provides the real
one): every hub call point of the offline watcher calls one of its methods.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from orbited.core.keys import ConnectionKey, Selector
from orbited.core.settings import FieldError, check_fields
from orbited.node.frames import DISPLACED, USER_LIMIT  # the close codes (4003, 4429)

if TYPE_CHECKING:
    from twisted.internet import defer
    from twisted.internet.interfaces import IDelayedCall

    from orbited.node.hub import _Slot

__all__ = [
    "DISPLACED",
    "POLICIES",
    "USER_LIMIT",
    "NullWatcher",
    "UserEntry",
    "UserHold",
    "UserLimits",
    "gcra_take",
]

POLICIES = ("refuse", "close_oldest")


@dataclass(frozen=True)
class UserLimits:
    """Per-user limits, enforced by the user's owner (docs/operations.md, "Limits")."""

    max_connections: int = 0  # attached transports per user; 0 = no limit
    policy: str = "refuse"  # "refuse" the new connection or "close_oldest"
    rate: float = 0.0  # event requests per second per user; 0 = no limit
    burst: int = 20  # requests at once above rate (>= 1)
    hold: float = 30.0  # seconds a wildcard event for a user with no key is held; 0 = off

    def __post_init__(self) -> None:
        check_fields(self, nonnegative=("max_connections", "rate", "hold"))
        if self.policy not in POLICIES:
            raise FieldError(type(self), "policy", "must be refuse or close_oldest")
        if not self.burst >= 1:
            raise FieldError(type(self), "burst", "must be at least 1")
        if math.isinf(self.rate) or math.isinf(self.hold):
            raise FieldError(type(self), "rate" if math.isinf(self.rate) else "hold",
                             "must be finite")  # fmt: skip


class UserHold:
    """A wildcard event for a user with no matching key (``offline`` or ``ack``): kept
    until ``until`` and appended to each matching mailbox created meanwhile."""

    __slots__ = (
        "selector", "event_id", "eid", "payload", "tag", "until", "timer", "watch", "answer",
        "ack_until", "ack_timer", "reached",
    )  # fmt: skip

    def __init__(
        self, selector: Selector, event_id: str, eid: bytes, payload: bytes, tag: bytes | None,
        until: float,
    ) -> None:  # fmt: skip
        self.selector = selector
        self.event_id = event_id
        self.eid = eid  # encoded once, like a mailbox entry's
        self.payload = payload
        self.tag = tag
        self.until = until  # hub clock: when it is dropped
        self.timer: IDelayedCall | None = None  # the drop
        self.watch: Any = None  # the offline watcher's Watch, if any
        self.reached = 0  # mailboxes it went into
        # Acknowledged mode: the request's answer, its deadline and timer.
        self.answer: defer.Deferred[Any] | None = None
        self.ack_until = 0.0
        self.ack_timer: IDelayedCall | None = None


class UserEntry:
    """One user with at least one mailbox or hold on this node. ``keys`` is in attach
    order (an attach moves its key to the end), so the first key with a sink is the
    user's longest-attached connection."""

    __slots__ = ("keys", "attached", "tat", "holds")

    def __init__(self) -> None:
        self.keys: dict[ConnectionKey, _Slot] = {}
        self.attached = 0  # slots of this user with a sink
        self.tat = 0.0  # GCRA theoretical arrival time (rate limit)
        self.holds: list[UserHold] | None = None


def gcra_take(tat: float, now: float, rate: float, burst: int) -> tuple[bool, float, float]:
    """One request against a GCRA budget of ``rate`` per second with ``burst`` at once:
    (allowed, new_tat, retry_after). ``tat`` is the stored theoretical arrival time
    (0.0 for a fresh budget); when refused, ``tat`` is unchanged and ``retry_after`` is
    the seconds until one request is allowed again."""
    interval = 1.0 / rate
    new_tat = (tat if tat > now else now) + interval
    limit = now + burst * interval
    if new_tat <= limit + 1e-9 * interval:
        return True, new_tat, 0.0
    return False, tat, new_tat - limit


class NullWatcher:
    """The offline hook when no ``offline_url`` is set: every call is a no-op. The hub
    calls these (docs: /work/helpers/NOTES21.md lists when); orbited.node.offline's
    OfflineWatcher has the same methods."""

    def watch(
        self, target: Any, eid: bytes, after: float, keys: list[tuple[ConnectionKey, int]],
        stream: str | None = None,
    ) -> Any:  # fmt: skip
        return None

    def no_connection(
        self, target: Any, eid: bytes, keys: Iterable[tuple[ConnectionKey, int]] = (),
        stream: str | None = None, held: bool = False,
    ) -> Any:  # fmt: skip
        return None

    def add_key(self, watch: Any, key: ConnectionKey, seq: int) -> None:
        return None

    def acked(self, key: ConnectionKey, seq_upto: int) -> None:
        return None

    def expired(self, key: ConnectionKey) -> None:
        return None

    def moved(self, key: ConnectionKey, old_seq: int, new_seq: int, new_eid: bytes) -> None:
        return None

    def dropped(self, watch: Any) -> None:
        return None

    def export(self, keys: Iterable[ConnectionKey]) -> list[dict[str, Any]]:
        return []

    def restore(self, entries: list[dict[str, Any]]) -> None:
        return None
