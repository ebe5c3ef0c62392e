"""The dedup memory: which event requests were answered lately, so a resend is not
delivered twice (docs/protocol.md, "Resends").

A request is identified by its digest (orbited.node.events.EventRequest.digest). Its
encoded reply is kept for ``window`` seconds, and at most ``max_entries`` replies and
``max_bytes`` reply bytes are kept (the oldest go first): a resend within the window gets
the first reply again and delivers nothing. A resend that arrives while the first one's
reply is still being gathered (acknowledged mode, a route being handed over) waits for
it: ``begin`` / ``wait`` / ``finish``.

Pure: times are plain numbers passed in, waiters are whatever the caller keeps (the hub
keeps Deferreds); tested with plain values in tests/node/test_dedup.py.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

W = TypeVar("W")


@dataclass(frozen=True)
class DedupLimits:
    window: float = 300.0  # seconds a request is remembered to ignore resends
    max_entries: int = 100_000  # requests remembered at most
    max_bytes: int = 64 * 1024 * 1024  # bytes of remembered replies at most


class DedupMemory(Generic[W]):
    """Remembered replies by request digest, oldest first, and the requests whose reply
    is not ready yet with the resends waiting for it (``W``: one waiter)."""

    __slots__ = ("limits", "_recent", "_bytes", "_inflight")

    def __init__(self, limits: DedupLimits) -> None:
        self.limits = limits
        self._recent: OrderedDict[bytes, tuple[float, bytes]] = OrderedDict()
        self._bytes = 0
        self._inflight: dict[bytes, list[W]] = {}

    def __len__(self) -> int:
        return len(self._recent)

    @property
    def size(self) -> int:
        """Bytes of the replies remembered now."""
        return self._bytes

    @property
    def inflight(self) -> int:
        """Requests whose reply is being gathered."""
        return len(self._inflight)

    def knows(self, digest: bytes) -> bool:
        """Is this request remembered (maybe past its window) or pending? False for a new
        one: then neither ``reply`` nor ``pending`` need asking."""
        return digest in self._recent or digest in self._inflight

    def reply(self, digest: bytes, now: float) -> bytes | None:
        """The remembered reply of this request, if it was answered within the window."""
        remembered = self._recent.get(digest)
        if remembered is None:
            return None
        if remembered[0] <= now:  # past the window: forget it and its elders
            self.forget_old(now)
            return None
        return remembered[1]

    def remember(self, digest: bytes, reply: bytes, now: float) -> None:
        """Keep ``reply`` for ``window`` seconds from ``now``, dropping the oldest replies
        past ``max_entries`` or ``max_bytes``."""
        recent = self._recent
        old = recent.pop(digest, None)
        if old is not None:
            self._bytes -= len(old[1])
        recent[digest] = (now + self.limits.window, reply)
        self._bytes += len(reply)
        limits = self.limits
        while len(recent) > limits.max_entries or self._bytes > limits.max_bytes:
            _, (_, dropped) = recent.popitem(last=False)
            self._bytes -= len(dropped)

    def forget_old(self, now: float) -> None:
        """Drop the replies whose window ended by ``now``. ``remember`` and ``reply`` do
        not need it to be exact (a reply past its window is never returned); the hub calls
        it once per batch of requests, so memory stays bounded by the window."""
        recent = self._recent
        while recent:
            digest, (expires, reply) = next(iter(recent.items()))
            if expires > now:
                break
            del recent[digest]
            self._bytes -= len(reply)

    # -- requests whose reply is not ready yet -------------------------------------------

    def pending(self, digest: bytes) -> bool:
        return digest in self._inflight

    def begin(self, digest: bytes) -> None:
        """The reply of this request will come later (``finish``)."""
        self._inflight.setdefault(digest, [])

    def wait(self, digest: bytes, waiter: W) -> None:
        """A resend of a pending request: ``waiter`` is handed back by ``finish``."""
        self._inflight[digest].append(waiter)

    def finish(self, digest: bytes) -> list[W]:
        """The request's reply is ready (or it failed): the resends that waited for it."""
        return self._inflight.pop(digest, [])
