"""Process-wide logging: twisted.logger to stderr, filtered by level.

Every process Orbited starts (``orbited node``, ``halod``, the cherrychat demo, and nodes
or HaloD under ``twistd``) calls :func:`quiet_factories`, so Twisted's "Starting factory" /
"Stopping factory" lines — one pair per outgoing HTTP request, webhook or reconnect, most
of a busy log — are never written.
"""

from __future__ import annotations

import sys

from twisted.internet.protocol import AbstractDatagramProtocol, Factory
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)


def quiet_factories() -> None:
    """Turn off Twisted's start/stop lines for every factory in this process.

    ``noisy`` is Twisted's own switch for them (``Factory.noisy``, per class or instance);
    setting the base classes' default here covers the factories of every library (HTTP
    clients, autobahn, twisted.web) at once, whatever log observer is in use (ours, or
    twistd's own), instead of one ``noisy = False`` per factory."""
    Factory.noisy = False
    AbstractDatagramProtocol.noisy = False


def start_logging(level: str = "info") -> None:
    quiet_factories()
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(level))
    # autobahn logs every connection at debug/info; keep it to warnings unless debugging.
    if level != "debug":
        predicate.setLogLevelForNamespace("autobahn", LogLevel.warn)
        predicate.setLogLevelForNamespace(
            "orbited.node.transports.websocket.BrowserWebSocket", LogLevel.warn
        )
    observer = FilteringLogObserver(textFileLogObserver(sys.stderr), [predicate])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
