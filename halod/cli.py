"""The ``halod`` command.

    halod [run] [--config FILE] [--control tcp://HOST:PORT] ...   the daemon
    halod status [--url http://HOST:PORT]                          nodes as a table
    halod plan --routes N --nodes M [--json] [--svg FILE]          the canonical table
    halod drain NAME | halod undrain NAME                          operator actions
    halod rehash --to 2                                            move the hash version

``halod --help`` lists the commands; an unknown command is an error (exit 2) with a
suggestion, as for ``orbited`` (one dispatcher: orbited.runtime.commands.run_commands). Flags of
``halod run`` are the keys of the config file's [halod] table (docs/operations.md,
"HaloD configuration"); docs/halod.md explains the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from halod.config import HaloDConfig
from halod.svg import Row, table_svg
from orbited import __version__
from orbited.core.control import MAX_ROUTES
from orbited.core.hashing import HASH_VERSIONS
from orbited.core.routes import DEFAULT_ROUTES, RouteTableError, canonical, format_ranges
from orbited.core.tokens import load_secret
from orbited.runtime.commands import Command, run_commands
from orbited.runtime.daemon import run_configured

STATUS_URL = f"http://{HaloDConfig.status_http}"  # the status and operator commands' --url
OPERATOR_KEY_ENV = "HALOD_OPERATOR_KEY_FILE"  # --operator-key-file's default


def plan_text(routes: int, nodes: int) -> str:
    width = len(str(nodes))
    lines = []
    for m in range(1, nodes + 1):
        table = canonical(routes, m)
        label = f"{m:>{width}} node{'s' if m > 1 else ' '}:"
        lines.append(f"{label} " + " || ".join(format_ranges(table[i]) for i in sorted(table)))
    return "\n".join(lines)


def plan_json(routes: int, nodes: int) -> list[dict[str, list[int]]]:
    return [
        {str(i): held for i, held in sorted(canonical(routes, m).items())}
        for m in range(1, nodes + 1)
    ]


def plan_svg(routes: int, nodes: int) -> str:
    """Rows: node count 1..M; columns: routes 1..N; colour: the owning node id."""
    rows: list[Row] = [(f"{m} node{'s' if m > 1 else ''}", canonical(routes, m), {})
            for m in range(1, nodes + 1)]  # fmt: skip
    return table_svg(routes, f"HaloD route table, {routes} routes, 1-{nodes} nodes", rows)


def _plan_parser() -> argparse.ArgumentParser:
    plan = argparse.ArgumentParser(
        prog="halod plan", description="Print the canonical route table for 1..M nodes."
    )
    plan.add_argument(
        "--routes", type=int, default=DEFAULT_ROUTES, help=f"N (default {DEFAULT_ROUTES})"
    )
    plan.add_argument("--nodes", type=int, required=True, help="M")
    plan.add_argument("--json", action="store_true", help="a JSON list instead of text")
    plan.add_argument("--svg", type=Path, help="also write a picture of the progression")
    return plan


def _run_parser() -> argparse.ArgumentParser:
    run = argparse.ArgumentParser(
        prog="halod run",
        description="Run the HaloD daemon. Every flag is also a key of the config file's "
        "[halod] table (docs/operations.md); flags win.",
    )
    run.add_argument("--config", type=Path, help="TOML file with a [halod] table")
    run.add_argument("--ready-file", type=Path, help="write the bound addresses here as JSON")
    HaloDConfig.add_flags(run)
    return run


def _status_parser() -> argparse.ArgumentParser:
    status = argparse.ArgumentParser(
        prog="halod status", description="Show HaloD's nodes as a table."
    )
    status.add_argument("--url", default=STATUS_URL, help="HaloD's status_http")
    status.add_argument("--json", action="store_true", help="print the raw JSON")
    return status


COMMANDS = (
    Command("run", "run the HaloD daemon in the foreground (the default)",
            lambda argv: run_command(_run_parser().parse_args(argv))),
    Command("status", "show the nodes, their routes and connections as a table",
            lambda argv: status_command(_status_parser().parse_args(argv))),
    Command("plan", "print the canonical route table for 1..M nodes (text, JSON, SVG)",
            lambda argv: plan_command(_plan_parser().parse_args(argv))),
    Command("drain", "move a node's routes away now, keeping it registered",
            lambda argv: operator_command("drain", _operator_parser("drain").parse_args(argv))),
    Command("undrain", "return a drained node to service",
            lambda argv: operator_command("undrain",
                                          _operator_parser("undrain").parse_args(argv))),
    Command("rehash", "move the cluster to another hash version (docs/halod.md, Rehash)",
            lambda argv: rehash_command(_rehash_parser().parse_args(argv))),
)  # fmt: skip
SUBCOMMANDS = tuple(c.name for c in COMMANDS)
DESCRIPTION = (
    "HaloD: the route table of an Orbited cluster. Nodes register over the control port; "
    "HaloD moves routes when nodes join, fail or are drained (docs/halod.md)."
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return run_commands("halod", DESCRIPTION, COMMANDS, "run", argv, __version__)


def plan_command(args: argparse.Namespace) -> int:
    if not 1 <= args.routes <= MAX_ROUTES:  # as HaloD's own routes (nodes refuse more)
        print(f"halod plan: --routes must be from 1 to {MAX_ROUTES}", file=sys.stderr)
        return 2
    if not 1 <= args.nodes <= args.routes:
        print(f"halod plan: --nodes must be from 1 to --routes ({args.routes})", file=sys.stderr)
        return 2
    try:
        if args.json:
            print(json.dumps(plan_json(args.routes, args.nodes)))
        else:
            print(plan_text(args.routes, args.nodes))
        if args.svg:
            args.svg.write_text(plan_svg(args.routes, args.nodes))
    except RouteTableError as e:
        print(f"halod plan: {e}", file=sys.stderr)
        return 2
    return 0


def status_table(status: dict) -> str:
    """Nodes as a fixed-width table, active ones by id, then spares, then failed."""
    rows = [("ID", "NAME", "STATE", "ROUTES", "CONNS", "MAILBOXES", "HEARTBEAT", "HASHES",
             "BROWSER", "SP")]  # fmt: skip
    # A follower (or a candidate) has the leader's table but no node connects to it: how
    # long since it last saw one would read as an outage.
    standby = status.get("role") in ("follower", "candidate")
    for node in status["nodes"]:
        if node["connected"]:
            beat = f"{node['last_heartbeat_age']:.1f}s ago"
        elif standby:
            beat = "at the leader"
        else:
            beat = f"lost {node['disconnected_for']:.1f}s"
        rows.append((
            str(node["id"] or "-"), node["name"], node["state"], node["ranges"] or "-",
            str(node["connections"]), _count(node.get("mailboxes")), beat,
            ",".join(map(str, node.get("hashes") or [])) or "-", node["browser"], node["sp"],
        ))  # fmt: skip
    for failed in status["failed"]:
        rows.append(("-", failed["name"], "failed", "-", "-", "-", failed["why"], "-", "-", "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]  # fmt: skip
    spares = status.get("spares")
    head = (
        f"{status['routes']} routes, policy {status['policy']}, "
        f"{status['spares_wanted']} spare(s) wanted, "
        + ("" if spares is None else f"{spares} available, ")
        + f"failovers {status['failovers']}, table version {status['table_version']}, "
        f"hash version {status.get('hash_version', 1)}"
    )
    rehash = status.get("rehash")
    if rehash:
        head += (f"\nrehash to hash version {rehash['hash_version']} running: "
                 f"{len(rehash['pending'])} hand-offs to go")  # fmt: skip
    role = status.get("role")
    if role not in (None, "solo"):  # HaloD on etcd (docs/halod.md, "High availability")
        leader = status.get("leader") or {}
        head += f"\nthis HaloD: {role}; leader: {leader.get('name') or 'none'}"
        etcd = status.get("etcd") or {}
        down = [e["url"] for e in etcd.get("endpoints", []) if e.get("healthy") is False]
        if down:
            # (healthy is etcd's /health: a running member without quorum is unhealthy too)
            head += f"; etcd endpoints unhealthy: {', '.join(down)}"
    warnings = [f"WARNING: {w}" for w in status.get("warnings", [])]
    return "\n".join([head, *lines, *warnings])


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


def _operator_parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"halod {command}",
        description="Move a node's routes away now, keeping it registered (drain), or "
        "return it to service (undrain).",
    )
    parser.add_argument("name", help="the node's name")
    parser.add_argument("--url", default=STATUS_URL, help="HaloD's status_http")
    _operator_key_flag(parser)
    return parser


def _operator_key_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--operator-key-file", type=Path, default=os.environ.get(OPERATOR_KEY_ENV) or None,
        help="HaloD's operator key (operator_key_file), sent as a bearer token "
        f"(default: ${OPERATOR_KEY_ENV}, else none)",
    )  # fmt: skip


def _authorized(command: str, args: argparse.Namespace, headers: dict[str, str]
                ) -> dict[str, str] | None:  # fmt: skip
    """``headers`` plus ``Authorization: Bearer <key>`` when an operator key file is
    given; None after printing why the file cannot be used."""
    if args.operator_key_file is None:
        return headers
    try:
        key = load_secret(Path(args.operator_key_file))
    except (OSError, ValueError) as e:
        print(f"halod {command}: {e}", file=sys.stderr)
        return None
    return {**headers, "authorization": "Bearer " + key.decode("ascii", "replace")}


def _rehash_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="halod rehash",
        description="Move the cluster to another hash version (docs/hashing.md): HaloD "
        "saves it and every node exchanges mailboxes as in a planned move "
        "(docs/halod.md, Rehash).",
    )
    parser.add_argument("--to", type=int, required=True, choices=HASH_VERSIONS,
                        help="the hash version")  # fmt: skip
    parser.add_argument("--url", default=STATUS_URL, help="HaloD's status_http")
    _operator_key_flag(parser)
    return parser


def rehash_command(args: argparse.Namespace) -> int:
    url = f"{args.url.rstrip('/')}/rehash"
    body = json.dumps({"hash_version": args.to}).encode()
    headers = _authorized("rehash", args, {"content-type": "application/json"})
    if headers is None:
        return 2
    answer = _post("rehash", urllib.request.Request(url, body, headers, method="POST"))
    if answer is None:
        return 1
    if answer["previous"] == answer["hash_version"]:
        print(f"the cluster already hashes with version {answer['hash_version']}")
    else:
        print(f"hash version {answer['previous']} -> {answer['hash_version']}: "
              f"{len(answer['nodes'])} nodes told to rehash")  # fmt: skip
    return 0


def _post(command: str, request: urllib.request.Request) -> dict | None:
    """The JSON answer of an operator POST; None after printing why it failed."""
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        # The status port's JSON error body: {"error": {"code", "message"}}.
        try:
            body = json.load(e)
        except ValueError:
            body = None
        error = body.get("error") if isinstance(body, dict) else None
        message = error.get("message", e) if isinstance(error, dict) else (error or e)
        print(f"halod {command}: {message}", file=sys.stderr)
        return None
    except (OSError, ValueError) as e:
        print(f"halod {command}: cannot reach {request.full_url}: {e}", file=sys.stderr)
        return None


def operator_command(command: str, args: argparse.Namespace) -> int:
    name = urllib.parse.quote(args.name, safe="")
    url = f"{args.url.rstrip('/')}/nodes/{name}/{command}"
    headers = _authorized(command, args, {})
    if headers is None:
        return 2
    answer = _post(command, urllib.request.Request(url, headers=headers, method="POST"))
    if answer is None:
        return 1
    print(f"{answer['name']}: {answer['state']}")
    return 0


def status_command(args: argparse.Namespace) -> int:
    url = args.url.rstrip("/") + "/status"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            status = json.load(response)
    except (OSError, ValueError, urllib.error.URLError) as e:
        print(f"halod status: cannot read {url}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(status, indent=1) if args.json else status_table(status))
    return 0


def run_command(args: argparse.Namespace) -> int:
    def build(config: HaloDConfig, reactor: object):  # noqa: ANN202
        from halod.server import HaloDService

        return HaloDService(config, reactor)  # type: ignore[arg-type]

    def ready(daemon) -> dict[str, object]:  # noqa: ANN001
        return {"control": daemon.control_address, "status": daemon.status_address}

    from halod.exposure import halod_warnings

    return run_configured("halod", HaloDConfig, args, build, ready, halod_warnings)


if __name__ == "__main__":
    sys.exit(main())
