"""The ``orbited`` command: run a node in the foreground, or issue a browser token.

    orbited [node] [--config FILE] [--http HOST:PORT] [--sp tcp://HOST:PORT] ...
    orbited token --user U [--session S] [--location L] [--ttl SECONDS]

Flags are documented in docs/operations.md; ``orbited node --help`` lists them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from orbited import __version__
from orbited.config import ConfigError, NodeConfig
from orbited.keys import ConnectionKey, KeyError_
from orbited.tokens import DEFAULT_TTL, issue_token, load_secret

SUBCOMMANDS = ("node", "token")


def _node_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="orbited node", description="Run an Orbited node.")
    p.add_argument("--config", type=Path, help="TOML file with a [node] table")
    p.add_argument("--name", help="node name shown in logs and health (default orbited)")
    p.add_argument("--http", help="browser listener host:port (default 127.0.0.1:8000)")
    p.add_argument("--sp", help="SP REP listener tcp://host:port (default tcp://127.0.0.1:9000)")
    p.add_argument("--secret-file", help="shared secret file (default ./orbited.secret)")
    p.add_argument(
        "--no-create-secret",
        dest="create_secret",
        action="store_const",
        const=False,
        help="fail instead of creating a missing secret file",
    )
    p.add_argument(
        "--cors-origin",
        dest="cors_origins",
        action="append",
        metavar="ORIGIN",
        help="allow browser pages from ORIGIN (repeatable; * allows any)",
    )
    p.add_argument("--linger", type=float, help="seconds a mailbox outlives its connection")
    p.add_argument("--keepalive", type=float, help="seconds of silence before a ping frame")
    p.add_argument("--mailbox-events", type=int, help="events kept per connection key")
    p.add_argument("--mailbox-bytes", type=int, help="payload bytes kept per connection key")
    p.add_argument("--max-payload", type=int, help="largest event data, bytes of JSON")
    p.add_argument("--max-recipients", type=int, help="recipients per event request")
    p.add_argument("--sp-max-message", type=int, help="largest SP message; larger closes")
    p.add_argument("--log-level", choices=["debug", "info", "warn", "error"])
    p.add_argument("--ready-file", type=Path, help="write the bound addresses here as JSON")
    return p


def _token_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="orbited token", description="Issue a browser token.")
    p.add_argument("--secret-file", default="orbited.secret", type=Path)
    p.add_argument("--user", required=True)
    p.add_argument("--session", default="")
    p.add_argument("--location", default="")
    p.add_argument("--ttl", type=float, default=DEFAULT_TTL, help="seconds (default 3600)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["--version"], ["version"]):
        print(f"orbited {__version__}")
        return 0
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else "node"
    if argv and argv[0] in SUBCOMMANDS:
        argv = argv[1:]
    if command == "token":
        return token_command(_token_parser().parse_args(argv))
    return node_command(_node_parser().parse_args(argv))


def token_command(args: argparse.Namespace) -> int:
    try:
        secret = load_secret(args.secret_file)
        key = ConnectionKey.from_json([args.user, args.session, args.location])
    except (OSError, ValueError, KeyError_) as e:
        print(f"orbited token: {e}", file=sys.stderr)
        return 2
    print(issue_token(secret, key, args.ttl))
    return 0


def node_command(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "ready_file")}
    try:
        config = NodeConfig.load(args.config, overrides)
    except (ConfigError, TypeError) as e:
        print(f"orbited: {e}", file=sys.stderr)
        return 2
    from twisted.internet import reactor

    from orbited.logs import start_logging
    from orbited.node import NodeService

    start_logging(config.log_level)
    try:
        node = NodeService(config, reactor)
    except (OSError, ValueError) as e:
        print(f"orbited: {e}", file=sys.stderr)
        return 2
    failed: list[BaseException] = []

    def start() -> None:
        try:
            node.startService()
        except Exception as e:  # e.g. address in use
            failed.append(e)
            reactor.stop()
            return
        if args.ready_file is not None:
            ready = {
                "http": node.http_address,
                "sp": node.sp_address,
                "pid": os.getpid(),
                "epoch": node.hub.epoch,
            }
            tmp = args.ready_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(ready))
            tmp.replace(args.ready_file)

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", node.stopService)
    reactor.run()
    if failed:
        print(f"orbited: cannot start: {failed[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
