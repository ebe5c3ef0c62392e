"""Process-wide logging: twisted.logger to stderr, filtered by level."""

from __future__ import annotations

import sys

from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)


def start_logging(level: str = "info") -> None:
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(level))
    # autobahn logs every connection at debug/info; keep it to warnings unless debugging.
    if level != "debug":
        predicate.setLogLevelForNamespace("autobahn", LogLevel.warn)
        predicate.setLogLevelForNamespace(
            "orbited.transports.websocket.BrowserWebSocket", LogLevel.warn
        )
    observer = FilteringLogObserver(textFileLogObserver(sys.stderr), [predicate])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
