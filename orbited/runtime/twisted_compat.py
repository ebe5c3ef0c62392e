"""The one module that touches private Twisted and autobahn names.

Each use here is a measured win or the only hook upstream offers, and each has a test in
tests/runtime/test_twisted_compat.py that fails when the installed Twisted or autobahn
changes what it relies on, so an upgrade breaks a fast unit test, not a node in
production. Nothing else in orbited/ or halod/ may use a private upstream name
(tests/test_layout.py checks it).
"""

from __future__ import annotations

from twisted.application import internet
from twisted.internet.interfaces import IListeningPort


def unsent_bytes(transport: object) -> int | None:
    """Bytes written to a Twisted TCP transport and not yet taken by the kernel (its
    user-space send buffer), or None for a transport of another kind.

    Twisted has no public query for it; ``twisted.internet.abstract.FileDescriptor``
    keeps ``dataBuffer`` (bytes being written), ``offset`` (how much of it went out) and
    ``_tempDataLen`` (bytes queued in ``_tempDataBuffer`` since)."""
    try:
        return (
            len(transport.dataBuffer)  # type: ignore[attr-defined]
            - transport.offset  # type: ignore[attr-defined]
            + transport._tempDataLen  # type: ignore[attr-defined]
        )
    except AttributeError:
        return None


def listening_port(server: internet.TCPServer) -> IListeningPort:
    """The listening port of a started ``TCPServer`` service (to learn the address an
    ephemeral port got). twisted.application.internet keeps it in ``_port`` and offers no
    public accessor."""
    port: IListeningPort = server._port  # type: ignore[attr-defined]
    return port
