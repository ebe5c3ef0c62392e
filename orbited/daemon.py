"""Running a twisted.application service in the foreground, for both CLIs.

Owns loading the configuration (bad config → exit 2), start-up failures (address in use
→ exit 1), the ready file tests and supervisors read (bound addresses as JSON, written
atomically) and stopping on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from twisted.application.service import IService

from orbited.config import ConfigBase, ConfigError

C = TypeVar("C", bound=ConfigBase)
S = TypeVar("S", bound=IService)


def run_configured(
    prog: str, config_class: type[C], args: argparse.Namespace,
    build: Callable[[C, Any], S], ready: Callable[[S], dict[str, object]],
    audit: Callable[[C], list[str]] | None = None,
) -> int:  # fmt: skip
    """Load ``config_class`` from ``--config`` and the flags in ``args``, build the service
    with ``build(config, reactor)`` and run it; ``ready(service)`` fills the ready file;
    each line ``audit(config)`` returns is logged as a warning (orbited.exposure)."""
    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "ready_file")}
    try:
        config = config_class.load(args.config, overrides)
    except (ConfigError, TypeError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    from twisted.internet import reactor

    from orbited.logs import start_logging

    start_logging(config.log_level)  # type: ignore[attr-defined]
    if audit is not None:
        from twisted.logger import Logger

        for warning in audit(config):
            Logger(namespace=prog).warn("exposed: {warning}", warning=warning)
    try:
        service = build(config, reactor)
    except (OSError, ValueError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    return run_service(prog, service, lambda: ready(service), args.ready_file)


def run_service(
    prog: str, service: IService, ready: Callable[[], dict[str, object]],
    ready_file: Path | None,
) -> int:  # fmt: skip
    from twisted.internet import reactor

    failed: list[BaseException] = []

    def start() -> None:
        try:
            service.startService()
        except Exception as e:  # e.g. address in use
            failed.append(e)
            reactor.stop()
            return
        if ready_file is not None:
            tmp = ready_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({**ready(), "pid": os.getpid()}))
            tmp.replace(ready_file)

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()
    if failed:
        print(f"{prog}: cannot start: {failed[0]}", file=sys.stderr)
        return 1
    return 0
