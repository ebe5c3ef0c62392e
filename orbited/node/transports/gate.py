"""The TCP-level guard of the browser listener: at most ``max_sockets`` open sockets.

``max_connections`` (orbited.node.transports.limits) counts browser transports and answers
503 / close 4503, which needs a socket and a parsed request. Below that, every accepted
socket costs a file descriptor, idle or not (keep-alive, handshakes in progress, acks);
past the process's fd limit accept() fails and the node cannot even answer. So the
listener counts its open sockets and closes any new one beyond ``max_sockets`` at once,
before reading a byte. Set it above ``max_connections`` (room for the 503s and the
short requests) and below the fd limit. See docs/operations.md, "Limits".
"""

from __future__ import annotations

import resource
from typing import Any

from twisted.application import internet
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

FD_RESERVE = 1024  # fds left for SP connections, HaloD, presence, logs, ...


def raise_fd_limit() -> int:
    """Raise this process's soft fd limit to its hard limit (servers need many sockets;
    many systems start processes at 1024). Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def default_max_sockets(fd_limit: int) -> int:
    """The socket cap when not configured: the fd limit less a reserve."""
    return max(64, fd_limit - min(FD_RESERVE, fd_limit // 4))


class SocketGate:
    """Counts the open sockets of one listener (sans-I/O)."""

    def __init__(self, max_sockets: int) -> None:
        self.max_sockets = max_sockets
        self.open = 0
        self.refused = 0

    def admit(self) -> bool:
        if self.open >= self.max_sockets:
            self.refused += 1
            return False
        return True


class GatedFactory(WrappingFactory):
    """The listener's factory: wraps the real one (twisted.protocols.policies), refuses a
    connection past the cap (buildProtocol returns None, so the port closes the socket at
    once, before reading a byte) and counts the open ones in the gate. The count follows
    the socket, not the protocol: a WebSocket taking the connection over from the HTTP
    channel (autobahn swaps the wrapper's wrappedProtocol), or twisted.web's channel one
    from the browser front (httpfront's hand-off does the same), stays counted until it
    closes."""

    log = Logger()

    def __init__(self, factory: Factory[Any], gate: SocketGate) -> None:
        super().__init__(factory)
        self.gate = gate
        self._warned_at = -1

    # IProtocolFactory.buildProtocol may return None (the port then closes the socket);
    # WrappingFactory's annotation says it never does.
    def buildProtocol(  # type: ignore[override]  # noqa: N802
        self, addr: IAddress | None
    ) -> ProtocolWrapper | None:
        if not self.gate.admit():
            # One line per thousand refusals: a flood must not also flood the log.
            if self.gate.refused // 1000 != self._warned_at:
                self._warned_at = self.gate.refused // 1000
                self.log.warn(
                    "browser listener at max_sockets ({n}): closing new connections "
                    "({refused} so far)",
                    n=self.gate.max_sockets,
                    refused=self.gate.refused,
                )
            return None
        inner = self.wrappedFactory.buildProtocol(addr)
        return None if inner is None else self.protocol(self, inner)

    def registerProtocol(self, p: ProtocolWrapper) -> None:  # noqa: N802
        super().registerProtocol(p)
        self.gate.open += 1

    def unregisterProtocol(self, p: ProtocolWrapper) -> None:  # noqa: N802
        super().unregisterProtocol(p)
        self.gate.open -= 1


class GatedTCPServer(internet.TCPServer):
    """internet.TCPServer serving ``factory`` through a GatedFactory (same arguments, plus
    the gate first)."""

    def __init__(self, gate: SocketGate, port: int, factory: Factory[Any], *args: Any,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(port, GatedFactory(factory, gate), *args, **kwargs)
        self.gate = gate
