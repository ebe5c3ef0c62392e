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

from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from orbited.runtime.twisted_compat import CountedTCPServer

FD_RESERVE = 1024  # fds left for SP connections, HaloD, presence, logs, ...
# The browser listener's TCP_DEFER_ACCEPT (Linux), seconds: a connection is accepted when
# its request's first bytes arrive, so accept and read are one wake-up (a browser speaks
# first); one that sends nothing is accepted after about this long (the kernel's SYN-ACK
# retransmission decides) and then waits for its request as any other.
DEFER_ACCEPT = 1


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

    def opened(self) -> None:
        self.open += 1

    def closed(self) -> None:
        self.open -= 1


class GatedFactory(Factory):
    """The listener's factory: refuses a connection past the cap (buildProtocol returns
    None, so the port closes the socket at once, before reading a byte), else hands it to
    the real factory's protocol with nothing in between. The port counts the sockets
    (``GatedTCPServer``): the count follows the socket, not the protocol, so a protocol
    taking the connection over (twisted.web's channel from the browser front, httpfront's
    hand-off) leaves it counted until it closes."""

    log = Logger()

    def __init__(self, factory: Factory[Any], gate: SocketGate) -> None:
        self.wrappedFactory = factory
        self.gate = gate
        self._warned_at = -1

    def doStart(self) -> None:  # noqa: N802
        self.wrappedFactory.doStart()
        super().doStart()

    def doStop(self) -> None:  # noqa: N802
        self.wrappedFactory.doStop()
        super().doStop()

    # IProtocolFactory.buildProtocol may return None (the port then closes the socket);
    # Factory's annotation says it never does.
    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:  # noqa: N802
        gate = self.gate
        if gate.admit():
            return self.wrappedFactory.buildProtocol(addr)
        # One line per thousand refusals: a flood must not also flood the log.
        if gate.refused // 1000 != self._warned_at:
            self._warned_at = gate.refused // 1000
            self.log.warn(
                "browser listener at max_sockets ({n}): closing new connections ({refused} so far)",
                n=gate.max_sockets,
                refused=gate.refused,
            )
        return None


class GatedTCPServer(CountedTCPServer):
    """internet.TCPServer serving ``factory`` through a GatedFactory (same arguments, plus
    the gate first); its port (orbited.runtime.twisted_compat.CountedPort) counts every
    accepted socket in the gate from accept to close, and gives every one TCP_NODELAY
    (a browser's frames leave at once, not after its ACK). A factory with a true
    ``lean_transport`` attribute (the browser front, whose clients speak first) gets
    ``LeanConnection`` transports (orbited.runtime.twisted_compat), None for the address
    in ``buildProtocol`` and TCP_DEFER_ACCEPT (``DEFER_ACCEPT``)."""

    def __init__(self, gate: SocketGate, port: int, factory: Factory[Any], backlog: int = 50,
                 interface: str = "", reactor: Any = None) -> None:  # fmt: skip
        lean = bool(getattr(factory, "lean_transport", False))
        super().__init__(port, GatedFactory(factory, gate), on_open=gate.opened,
                         on_close=gate.closed, backlog=backlog, interface=interface,
                         reactor=reactor, nodelay=True, lean=lean,
                         defer_accept=DEFER_ACCEPT if lean else 0)  # fmt: skip
        self.gate = gate
