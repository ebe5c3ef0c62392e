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

from twisted.application.service import IService, Service

from orbited.core.settings import ConfigBase, ConfigError

C = TypeVar("C", bound=ConfigBase)
S = TypeVar("S", bound=IService)


def load_config(config_class: type[C], args: argparse.Namespace) -> C:
    """``config_class`` from ``args.config`` (a TOML file or None) overridden by the other
    flags in ``args`` (those left None are not given). Raises ConfigError."""
    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "ready_file")}
    try:
        return config_class.load(args.config, overrides)
    except TypeError as e:
        raise ConfigError(str(e)) from None


def log_audit(prog: str, lines: list[str]) -> None:
    """Each line of a start-up audit (orbited.node.exposure, halod.exposure) as a warning."""
    from twisted.logger import Logger

    for warning in lines:
        Logger(namespace=prog).warn("exposed: {warning}", warning=warning)


def check_ready_file(path: Path | None) -> None:
    """ConfigError unless ``--ready-file``'s folder exists: found at start (exit 2), not
    once everything listens (a supervisor waiting for the file would wait for ever)."""
    if path is not None and not path.parent.is_dir():
        raise ConfigError(f"--ready-file {path}: the folder {path.parent} does not exist")


def write_ready_file(path: Path, info: dict[str, object]) -> None:
    """The bound addresses and our pid as JSON, written atomically."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**info, "pid": os.getpid()}))
    tmp.replace(path)


class ReadyFileService(Service):
    """Writes the ready file when started: give it to the same parent after the service
    it describes, so that one is listening by then (twistd plugins use it)."""

    def __init__(self, path: Path, ready: Callable[[], dict[str, object]]) -> None:
        self.path = path
        self.ready = ready

    def startService(self) -> None:  # noqa: N802
        super().startService()
        write_ready_file(self.path, self.ready())


def run_configured(
    prog: str, config_class: type[C], args: argparse.Namespace,
    build: Callable[[C, Any], S], ready: Callable[[S], dict[str, object]],
    audit: Callable[[C], list[str]] | None = None,
) -> int:  # fmt: skip
    """Load ``config_class`` from ``--config`` and the flags in ``args``, build the service
    with ``build(config, reactor)`` and run it; ``ready(service)`` fills the ready file;
    each line ``audit(config)`` returns is logged as a warning (orbited.node.exposure,
    halod.exposure)."""
    try:
        config = load_config(config_class, args)
        check_ready_file(args.ready_file)
    except ConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    from twisted.internet import reactor

    from orbited.runtime.logs import start_logging

    start_logging(config.log_level)  # type: ignore[attr-defined]
    if audit is not None:
        log_audit(prog, audit(config))
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
            try:
                write_ready_file(ready_file, ready())
            except OSError as e:  # (its folder was checked at start: removed since?)
                failed.append(OSError(f"cannot write the ready file {ready_file}: {e}"))
                reactor.stop()

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()
    if failed:
        print(f"{prog}: cannot start: {failed[0]}", file=sys.stderr)
        return 1
    return 0
