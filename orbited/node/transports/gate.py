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
from twisted.internet import tcp
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

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


class _GatedFactory:
    """The listener's view of the real factory: buildProtocol says no past the cap (the
    port then closes the socket at once); everything else goes to the real factory."""

    log = Logger()

    def __init__(self, factory: Factory, gate: SocketGate) -> None:
        self._factory = factory
        self._gate = gate
        self._warned_at = -1

    def buildProtocol(self, addr: Any) -> Protocol | None:  # noqa: N802
        if not self._gate.admit():
            # One line per thousand refusals: a flood must not also flood the log.
            if self._gate.refused // 1000 != self._warned_at:
                self._warned_at = self._gate.refused // 1000
                self.log.warn(
                    "browser listener at max_sockets ({n}): closing new connections "
                    "({refused} so far)",
                    n=self._gate.max_sockets,
                    refused=self._gate.refused,
                )
            return None
        return self._factory.buildProtocol(addr)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._factory, name)


class _CountedServer(tcp.Server):
    """A server-side TCP connection that its port's gate counts while it is open."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.server.gate.open += 1

    def connectionLost(self, reason: Any) -> None:  # noqa: N802
        self.server.gate.open -= 1
        super().connectionLost(reason)


class GatedPort(tcp.Port):
    transport = _CountedServer

    def __init__(self, gate: SocketGate, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = gate
        self.factory = _GatedFactory(self.factory, gate)  # type: ignore[assignment]


class GatedTCPServer(internet.TCPServer):
    """internet.TCPServer listening with a GatedPort (same arguments, plus the gate)."""

    def __init__(self, gate: SocketGate, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = gate

    def _getPort(self) -> GatedPort:  # noqa: N802
        from twisted.application.internet import _maybeGlobalReactor

        port, factory = self.args
        port = GatedPort(
            self.gate, port, factory, reactor=_maybeGlobalReactor(self.reactor), **self.kwargs
        )
        port.startListening()
        return port
