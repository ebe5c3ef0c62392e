"""What Twisted's epoll reactor spends dispatching one ready descriptor, and what a lean
dispatch would, in one process.

    .venv/bin/python -m bench.reactorcost [--ready 50] [--rounds 400] [--reps 3]

``--ready`` socketpairs are registered as readers of a fresh reactor; each round writes
one byte to every pair and times one ``doPoll(0)`` (``time.process_time``): the
``epoll_wait``, then per ready descriptor the reactor's dispatch and a ``doRead`` that
``recv``s the byte. Printed: µs of CPU per ready descriptor, best of ``--reps``, for
Twisted's ``EPollReactor`` and for ``LeanEPollReactor`` below, whose ``doPoll`` calls
``doRead``/``doWrite`` directly instead of through ``log.callWithLogger`` (a legacy log
context per event), with Twisted's hang-up, ``fileno() == -1`` and error handling.

The node does not use ``LeanEPollReactor``: in an A/B of the node it was within noise
(docs/performance.md, "The SP path, fourth pass": about one ready descriptor per
long-poll delivery). It is kept here, with the figures, for the next one who looks at
"the reactor" in a profile.
"""

from __future__ import annotations

import argparse
import errno
import socket
import sys
import time
from typing import Any

from twisted.internet import epollreactor, posixbase
from twisted.internet.abstract import FileDescriptor
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST
from twisted.python import log

_IN = epollreactor.EPOLLIN
_OUT = epollreactor.EPOLLOUT
_HUP = epollreactor.EPOLLHUP | epollreactor.EPOLLERR


def _system(selectable: Any) -> str:
    try:
        return str(selectable.logPrefix())
    except Exception:
        return "(buggy logPrefix method)"


class LeanEPollReactor(epollreactor.EPollReactor):
    """``EPollReactor`` whose ``doPoll`` dispatches without a log context per event; an
    exception in ``doRead``/``doWrite`` is logged with the descriptor's ``logPrefix`` as
    its ``system`` (as Twisted's context would have it) and loses that descriptor only."""

    def doPoll(self, timeout: float | None) -> None:  # noqa: N802
        if timeout is None:
            timeout = -1
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        selectables = self._selectables
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            why: Any = None
            in_read = False
            try:
                if event & _HUP and not event & _IN:
                    # Only once all input has been read: a clean close if we were
                    # reading (perhaps a half-close), else a failed one.
                    if fd in self._reads:
                        in_read = True
                        why = CONNECTION_DONE
                    else:
                        why = CONNECTION_LOST
                elif selectable.fileno() == -1:
                    why = posixbase._NO_FILEDESC
                else:
                    if event & _IN:
                        why = selectable.doRead()
                        in_read = True
                    if not why and event & _OUT:
                        why = selectable.doWrite()
                        in_read = False
            except BaseException:
                why = sys.exc_info()[1]
                log.err(system=_system(selectable))
            if why:
                try:
                    self._disconnectSelectable(selectable, why, in_read)
                except KeyboardInterrupt:
                    raise
                except BaseException:
                    log.err(system=_system(selectable))

    doIteration = doPoll


class _Reader(FileDescriptor):
    def __init__(self, reactor: Any, sock: socket.socket) -> None:
        super().__init__(reactor)
        self.sock = sock
        self.reads = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def doRead(self) -> None:  # noqa: N802
        self.sock.recv(64)
        self.reads += 1

    def logPrefix(self) -> str:  # noqa: N802
        return "reader"


def per_descriptor(cls: type[epollreactor.EPollReactor], ready: int, rounds: int) -> float:
    """µs of CPU per ready descriptor of one ``doPoll`` of ``cls``."""
    reactor = cls()
    pairs = [socket.socketpair() for _ in range(ready)]
    readers = []
    for a, _ in pairs:
        a.setblocking(False)
        reader = _Reader(reactor, a)
        reactor.addReader(reader)
        readers.append(reader)
    took = 0.0
    try:
        for _ in range(rounds):
            for _, b in pairs:
                b.send(b"x")
            started = time.process_time()
            reactor.doPoll(0)
            took += time.process_time() - started
        if sum(r.reads for r in readers) != ready * rounds:
            raise SystemExit("a ready descriptor was not read")
    finally:
        reactor.removeAll()
        for a, b in pairs:
            a.close()
            b.close()
    return took / (ready * rounds) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.reactorcost", description=__doc__.split("\n")[0]
    )
    p.add_argument("--ready", type=int, default=50, help="ready descriptors per doPoll")
    p.add_argument("--rounds", type=int, default=400)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    for cls in (epollreactor.EPollReactor, LeanEPollReactor):
        best = min(per_descriptor(cls, args.ready, args.rounds) for _ in range(args.reps))
        print(
            f"{cls.__name__}: {best:.2f} µs of CPU per ready descriptor (best of "
            f"{args.reps}; {args.ready} ready per doPoll, {args.rounds} rounds)"
        )


if __name__ == "__main__":
    main()
