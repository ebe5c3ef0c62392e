"""The ``orbited`` command: run a node in the foreground, or issue a browser token.

    orbited [node] [--config FILE] [--http HOST:PORT] [--sp tcp://HOST:PORT] ...
    orbited token --user U [--session S] [--location L] [--ttl SECONDS]
    orbited cluster [--port 8080] [--free-ports] ...   HaloD, nodes and cherrychat locally

Flags are documented in docs/operations.md; ``orbited node --help`` lists them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from orbited import __version__
from orbited.config import NodeConfig
from orbited.daemon import run_configured
from orbited.keys import ConnectionKey, KeyError_
from orbited.tokens import DEFAULT_TTL, issue_token, load_secret

SUBCOMMANDS = ("node", "token", "cluster")


def _node_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="orbited node",
        description="Run an Orbited node. Every flag is also a key of the config file's "
        "[node] table (docs/operations.md); flags win.",
    )
    p.add_argument("--config", type=Path, help="TOML file with a [node] table")
    p.add_argument("--ready-file", type=Path, help="write the bound addresses here as JSON")
    NodeConfig.add_flags(p)
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
    if command == "cluster":
        from orbited.cluster import cluster_command

        return cluster_command(argv)
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
    def build(config: NodeConfig, reactor: object):  # noqa: ANN202
        from orbited.node import NodeService

        return NodeService(config, reactor)  # type: ignore[arg-type]

    def ready(node) -> dict[str, object]:  # noqa: ANN001
        return {
            "http": node.http_address,
            "sp": node.sp_address,
            "publish": node.publish_address,
            "orbit": node.orbit_address,
            "epoch": node.hub.epoch,
        }

    from orbited.exposure import node_warnings

    return run_configured("orbited", NodeConfig, args, build, ready, node_warnings)


if __name__ == "__main__":
    sys.exit(main())
