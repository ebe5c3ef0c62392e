"""The ``orbited`` command: run a node in the foreground, issue a browser token, run a
local cluster.

    orbited [node] [--config FILE] [--http HOST:PORT] [--sp tcp://HOST:PORT] ...
    orbited token --user U [--session S] [--location L] [--ttl SECONDS]
    orbited cluster [--port 8080] [--free-ports] ...   HaloD, nodes and cherrychat locally
    orbited whereis --user U --session S --location L | --key JSON | --route R

``orbited --help`` lists the commands, ``orbited COMMAND --help`` a command's flags
(docs/operations.md). :func:`run_commands` is the dispatcher both ``orbited`` and
``halod`` use: a default command for bare flags, and an unknown command is an error
(exit 2) with a suggestion.
"""

from __future__ import annotations

import argparse
import difflib
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from orbited import __version__
from orbited.config import NodeConfig
from orbited.daemon import run_configured
from orbited.keys import ConnectionKey, KeyError_
from orbited.tokens import DEFAULT_TTL, issue_token, load_secret


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose "unrecognized arguments" error names the closest flag
    (``--nmae`` → did you mean --name?). Every command's parser is one."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments: "):
            flags = [f for f in self._option_string_actions if f.startswith("--")]
            hints = []
            for word in message.removeprefix("unrecognized arguments: ").split():
                if word.startswith("--"):
                    close = difflib.get_close_matches(word.split("=", 1)[0], flags, n=1)
                    hints += [f"{word.split('=', 1)[0]}: did you mean {c}?" for c in close]
            if hints:
                message += " (" + "; ".join(hints) + ")"
        super().error(message)


@dataclass(frozen=True)
class Command:
    """One subcommand: its name, a one-line summary for the program's --help, and what
    runs it with the arguments after its name (argparse's --help and errors included)."""

    name: str
    summary: str
    run: Callable[[list[str]], int]


def program_help(prog: str, description: str, commands: Sequence[Command], default: str) -> str:
    width = max(len(c.name) for c in commands)
    footer = (
        f"Without a command, {prog} runs `{prog} {default}` with the flags given "
        f"(`{prog} --x` is `{prog} {default} --x`). `{prog} COMMAND --help` (or "
        f"`{prog} help COMMAND`) shows a command's flags."
    )
    lines = [
        f"usage: {prog} [COMMAND] [ARGS ...]",
        "",
        textwrap.fill(description, 79),
        "",
        "commands:",
        *(f"  {c.name.ljust(width)}  {c.summary}" for c in commands),
        "",
        textwrap.fill(footer, 79),
    ]
    return "\n".join(lines)


def unknown_command(prog: str, word: str, commands: Sequence[Command]) -> str:
    """The error for a word that is not a command: a suggestion when one is close."""
    names = [c.name for c in commands]
    message = f"{prog}: unknown command {word!r}"
    close = difflib.get_close_matches(word, names, n=1, cutoff=0.6)
    if close:
        message += f" (did you mean {close[0]!r}?)"
    return f"{message}\ncommands: {', '.join(names)}; `{prog} --help` explains them"


def run_commands(
    prog: str, description: str, commands: Sequence[Command], default: str,
    argv: list[str], version: str | None = None,
) -> int:  # fmt: skip
    """Dispatch ``argv`` to a command.

    - ``--help``, ``-h``, ``help``: the program's help (its commands), exit 0;
      ``help COMMAND`` is ``COMMAND --help``;
    - ``--version`` / ``version`` (when ``version`` is given): ``PROG VERSION``;
    - a first word that names a command runs it with the rest;
    - no arguments, or a flag first: the ``default`` command with all of ``argv``
      (so ``PROG --flag`` keeps working as ``PROG DEFAULT --flag``);
    - any other first word is an unknown command: a message on stderr, with the
      closest command when one is close, and exit 2 — never the default's help."""
    by_name = {c.name: c for c in commands}
    first = argv[0] if argv else None
    if first in ("--help", "-h", "help") and not (first == "help" and argv[1:]):
        print(program_help(prog, description, commands, default))
        return 0
    if first == "help":
        name = argv[1]
        if name not in by_name:
            print(unknown_command(prog, name, commands), file=sys.stderr)
            return 2
        try:
            return by_name[name].run(["--help"])
        except SystemExit as e:  # argparse's --help exits
            return e.code if isinstance(e.code, int) else 0
    if version is not None and first in ("--version", "version"):
        print(f"{prog} {version}")
        return 0
    if first is None or first.startswith("-"):
        return by_name[default].run(argv)
    if first not in by_name:
        print(unknown_command(prog, first, commands), file=sys.stderr)
        return 2
    return by_name[first].run(argv[1:])


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
    p.add_argument("--secret-file", default="orbited.secret", type=Path)
    p.add_argument("--user", required=True)
    p.add_argument("--session", default="")
    p.add_argument("--location", default="")
    p.add_argument("--ttl", type=float, default=DEFAULT_TTL, help="seconds (default 3600)")
    return p


def _whereis(argv: list[str]) -> int:
    from orbited.whereis import whereis_command

    return whereis_command(argv)


def _cluster(argv: list[str]) -> int:
    from orbited.cluster import cluster_command

    return cluster_command(argv)


COMMANDS = (
    Command("node", "run an Orbited node in the foreground (the default)",
            lambda argv: node_command(_node_parser().parse_args(argv))),
    Command("token", "issue a browser token for a connection key",
            lambda argv: token_command(_token_parser().parse_args(argv))),
    Command("cluster", "run HaloD, two nodes, a spare and the cherrychat demo here "
            "(./dev run)", _cluster),
    Command("whereis", "which node (and pid) serves a connection key or route now",
            _whereis),
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
    except (OSError, ValueError, KeyError_) as e:
        print(f"orbited token: {e}", file=sys.stderr)
        return 2
    print(issue_token(secret, key, args.ttl))
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


def node_command(args: argparse.Namespace) -> int:
    def build(config: NodeConfig, reactor: object):  # noqa: ANN202
        from orbited.node import NodeService

        return NodeService(config, reactor)  # type: ignore[arg-type]

    from orbited.exposure import node_warnings

    return run_configured("orbited", NodeConfig, args, build, node_ready, node_warnings)


if __name__ == "__main__":
    sys.exit(main())
