"""Process-wide logging: twisted.logger to stderr, filtered by level.

Every process Orbited starts (``orbited node``, ``halod``, the cherrychat demo, and nodes
or HaloD under ``twistd``) calls :func:`quiet_factories`, so Twisted's "Starting factory" /
"Stopping factory" lines — one pair per outgoing HTTP request, webhook or reconnect, most
of a busy log — are never written.
"""

from __future__ import annotations

import sys

from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)

# A process-wide setting of Twisted's classes: it lives with the other patches.
from orbited.runtime.twisted_compat import quiet_factories as quiet_factories


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
