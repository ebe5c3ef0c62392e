"""The command-line dispatcher both ``orbited`` and ``halod`` use: a default command for
bare flags, an unknown command is an error (exit 2) with a suggestion, and a parser whose
"unrecognized arguments" error names the closest flag."""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose "unrecognized arguments" error names the closest flag
    (``--nmae`` → did you mean --name?). Every command's parser is one."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments: "):
            # The flags as the help lists them (argparse's table of them is private).
            flags = sorted(set(re.findall(r"--[A-Za-z0-9][-\w]*", self.format_help())))
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
      closest command when one is close, and exit 2 — never the default's help.

    A reader that goes away (``halod status | head -1``) ends the command quietly, exit
    1, without a BrokenPipeError traceback."""
    try:
        code = _dispatch(prog, description, commands, default, argv, version)
        sys.stdout.flush()  # (a reader gone shows here, not as a message at exit)
        return code
    except BrokenPipeError:
        # What is still buffered can go nowhere: point stdout at /dev/null so that the
        # interpreter's last flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _dispatch(
    prog: str, description: str, commands: Sequence[Command], default: str,
    argv: list[str], version: str | None,
) -> int:  # fmt: skip
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
