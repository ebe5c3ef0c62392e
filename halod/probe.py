"""The probe's Twisted shell: one TCP connect to one of a node's ports (halod.liveness).

A completed connect is closed at once (abort: nothing is sent); its outcome is what the
kernel at the other end said. The decision is halod.liveness's.
"""

from __future__ import annotations

import errno
import ipaddress
from typing import cast

from twisted.internet import defer, error
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
)
from twisted.internet.interfaces import (
    IProtocol,
    IReactorTCP,
    IReactorTime,
    IStreamClientEndpoint,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from halod.liveness import Outcome
from orbited.core.settings import ConfigError, parse_host_port

_UNREACHABLE = frozenset(
    getattr(errno, name)
    for name in ("ENETUNREACH", "EHOSTUNREACH", "EHOSTDOWN", "ENETDOWN")
    if hasattr(errno, name)
)


def outcome_of(failure: Failure) -> Outcome:
    """A failed connect's outcome: refused, reset and unreachable are definite answers
    from the network; anything else (a time-out, a DNS failure) says nothing."""
    e = failure.value
    if isinstance(e, error.ConnectionRefusedError):
        return Outcome.REFUSED
    if isinstance(e, error.NoRouteError):
        return Outcome.UNREACHABLE
    number = getattr(e, "osError", None)
    if isinstance(e, error.ConnectError) and number == errno.ECONNRESET:
        return Outcome.RESET
    if isinstance(e, error.ConnectError) and number in _UNREACHABLE:
        return Outcome.UNREACHABLE
    if isinstance(e, ConnectionResetError | error.ConnectionLost):
        return Outcome.RESET
    return Outcome.TIMEOUT


def probe(reactor: IReactorTCP, address: str, timeout: float) -> defer.Deferred[Outcome]:
    """Connect to ``address`` (``host:port``); never fails: the Outcome says what happened."""
    clock: IReactorTime = reactor  # type: ignore[assignment]
    try:
        host, port = parse_host_port(address)
    except ConfigError:
        return defer.succeed(Outcome.TIMEOUT)  # nothing to learn from a bad address
    endpoint = _endpoint(reactor, host, port, timeout)

    def answered(protocol: IProtocol) -> Outcome:
        assert isinstance(protocol, Protocol)
        cast(ITCPTransport, protocol.transport).abortConnection()
        return Outcome.ANSWERED

    connected = endpoint.connect(Factory.forProtocol(Protocol))
    connected.addTimeout(timeout, clock)  # a slow name lookup counts too
    return connected.addCallbacks(answered, outcome_of)


def _endpoint(reactor: IReactorTCP, host: str, port: int, timeout: float
              ) -> IStreamClientEndpoint:  # fmt: skip
    """IP literals (what nodes advertise by default) connect directly; a name is resolved
    first. HostnameEndpoint reports a failed attempt only at its next attempt slot
    (``attemptDelay``, 0.3 s by default), so it gets a short one."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return HostnameEndpoint(reactor, host, port, timeout=timeout, attemptDelay=0.02)
    kind = TCP4ClientEndpoint if ip.version == 4 else TCP6ClientEndpoint
    return kind(reactor, host, port, timeout=timeout)
