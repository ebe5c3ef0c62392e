"""The ``orbited`` command: run a node in the foreground, issue a browser token, run a
local cluster.

    orbited [node] [--config FILE] [--http HOST:PORT] [--sp tcp://HOST:PORT] ...
    orbited node --workers N ...      N node processes, one per core (orbited/node/workers.py)
    orbited token --user U [--session S] [--location L] [--ttl SECONDS]
    orbited cluster [--port 8080] [--free-ports] ...   HaloD, nodes and cherrychat locally
    orbited whereis --user U --session S --location L | --key JSON | --route R
    orbited trace --user U [--event E] [--node URL --key-file FILE]   delivery records

``orbited --help`` lists the commands, ``orbited COMMAND --help`` a command's flags
(docs/operations.md). :func:`run_commands` is the dispatcher both ``orbited`` and
``halod`` use: a default command for bare flags, and an unknown command is an error
(exit 2) with a suggestion.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from orbited import __version__
from orbited.core.keys import ConnectionKey, KeyError_
from orbited.core.tokens import DEFAULT_TTL, issue_token, load_secret
from orbited.node.config import NodeConfig
from orbited.runtime.commands import ArgumentParser, Command, run_commands
from orbited.runtime.daemon import run_configured


def _node_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="orbited node",
        description="Run an Orbited node. Every flag is also a key of the config file's "
        "[node] table (docs/operations.md); flags win.",
    )
    p.add_argument("--config", type=Path, help="TOML file with a [node] table")
    p.add_argument("--ready-file", type=Path, help="write the bound addresses here as JSON")
    NodeConfig.add_flags(p)
    return p


def _token_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="orbited token", description="Issue a browser token.")
    p.add_argument("--secret-file", default=NodeConfig.secret_file, type=Path)
    p.add_argument("--user", required=True)
    p.add_argument("--session", default="")
    p.add_argument("--location", default="")
    p.add_argument(
        "--ttl", type=float, default=DEFAULT_TTL, help=f"seconds (default {DEFAULT_TTL:g})"
    )
    return p


def _whereis(argv: list[str]) -> int:
    from orbited.whereis import whereis_command

    return whereis_command(argv)


def _trace(argv: list[str]) -> int:
    from orbited.trace import trace_command

    return trace_command(argv)


def _cluster(argv: list[str]) -> int:
    from orbited.cluster import cluster_command

    return cluster_command(argv)


COMMANDS = (
    Command("node", "run an Orbited node in the foreground (the default)",
            lambda argv: node_command(_node_parser().parse_args(argv), argv)),
    Command("token", "issue a browser token for a connection key",
            lambda argv: token_command(_token_parser().parse_args(argv))),
    Command("cluster", "run HaloD, two nodes, a spare and the cherrychat demo here "
            "(./dev run)", _cluster),
    Command("whereis", "which node (and pid) serves a connection key or route now",
            _whereis),
    Command("trace", "what became of a user's events: every node's delivery records "
            "and a verdict per event", _trace),
)  # fmt: skip
SUBCOMMANDS = tuple(c.name for c in COMMANDS)
DESCRIPTION = (
    "Orbited: server push (Comet) on Twisted. Web apps send events to connection keys "
    "over SP (nng); nodes write them to browsers (docs/operations.md)."
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return run_commands("orbited", DESCRIPTION, COMMANDS, "node", argv, __version__)


def token_command(args: argparse.Namespace) -> int:
    try:
        secret = load_secret(args.secret_file)
        key = ConnectionKey.from_json([args.user, args.session, args.location])
        token = issue_token(secret, key, args.ttl)  # ValueError: "*" is reserved, ...
    except (OSError, ValueError, KeyError_) as e:
        print(f"orbited token: {e}", file=sys.stderr)
        return 2
    print(token)
    return 0


def node_ready(node) -> dict[str, object]:  # noqa: ANN001
    """What a running node's ready file holds (besides its pid)."""
    return {
        "http": node.http_address,
        "sp": node.sp_address,
        "publish": node.publish_address,
        "orbit": node.orbit_address,
        "epoch": node.hub.epoch,
    }


def node_command(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """Run a node; with ``workers`` ≠ 1 the parent of that many (orbited.node.workers)."""
    if args.workers not in (None, 1) or args.config is not None:
        code = _maybe_workers(args, argv or [])
        if code is not None:
            return code

    def build(config: NodeConfig, reactor: object):  # noqa: ANN202
        from orbited.node.service import NodeService

        return NodeService(config, reactor)  # type: ignore[arg-type]

    from orbited.node.exposure import node_warnings

    if args.name is not None:
        from orbited.node.workers import become_worker

        become_worker(args.name)  # only when started by a worker parent
    return run_configured("orbited", NodeConfig, args, build, node_ready, node_warnings)


def _maybe_workers(args: argparse.Namespace, argv: list[str]) -> int | None:
    """Run the worker parent when the configuration asks for workers ≠ 1; None: a node."""
    import os

    from orbited.core.settings import ConfigError
    from orbited.node.workers import Supervisor, worker_count
    from orbited.runtime.daemon import load_config

    try:
        config = load_config(NodeConfig, args)
    except ConfigError as e:
        print(f"orbited: {e}", file=sys.stderr)
        return 2
    if config.workers == 1:
        return None
    from orbited.node.service import key_file
    from orbited.runtime.daemon import check_ready_file

    try:
        check_ready_file(args.ready_file)
        # once, before the workers race to create it (named as a node names it)
        key_file("secret_file", config.secret_file, create=config.create_secret)
    except (ConfigError, ValueError) as e:
        print(f"orbited: {e}", file=sys.stderr)
        return 2
    count = worker_count(config.workers, os.cpu_count())
    return Supervisor(config, argv, count, args.ready_file).run()


if __name__ == "__main__":
    sys.exit(main())
