"""Running a twisted.application service in the foreground, for both CLIs.

Owns start-up failures (address in use → exit 1), the ready file tests and supervisors
read (bound addresses as JSON, written atomically) and stopping on SIGTERM/SIGINT.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from twisted.application.service import IService


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
