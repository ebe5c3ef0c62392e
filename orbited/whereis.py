"""``orbited whereis``: which node serves a connection key (or a route) right now.

A key's route is its hash (docs/hashing.md: all three parts, so a user alone does not
name a route); the route's node is what HaloD's ``/status`` says now; its pid is in
``orbited cluster``'s cluster.json when one runs here. :func:`locate` is the pure part.

    orbited whereis --user alice --session "" --location /cherrychat
    orbited whereis --key '["alice", "", "/cherrychat"]'
    orbited whereis --route 22 [--pid | --json]
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from orbited.core.hashing import route_of
from orbited.core.keys import ConnectionKey, KeyError_

DEFAULT_STATUS = "http://127.0.0.1:7601"
DEFAULT_STATE_DIR = Path(".orbited-cluster")


@dataclass(frozen=True)
class Placement:
    """Where a route is served: ``node`` None when no active node holds it now."""

    route: int
    routes: int
    node: str | None
    state: str | None = None
    browser: str | None = None
    sp: str | None = None
    pid: int | None = None
    key: tuple[str, str, str] | None = None

    def line(self) -> str:
        head = f"route {self.route} of {self.routes}"
        if self.key is not None:
            head = f"key {json.dumps(list(self.key), ensure_ascii=False)}: {head}"
        if self.node is None:
            return f"{head}: no node serves it now (HaloD is between owners; try again)"
        where = f"{self.node} ({self.state}, browsers {self.browser}, web apps {self.sp})"
        return f"{head}: {where}" + (f", pid {self.pid}" if self.pid is not None else "")


def locate(status: dict[str, Any], route: int, pids: dict[str, int] | None = None,
           key: ConnectionKey | None = None) -> Placement:  # fmt: skip
    """The placement of ``route`` in HaloD's ``/status`` document; ``pids`` by node name
    (cluster.json's) adds the serving process's pid."""
    routes = int(status["routes"])
    if not 1 <= route <= routes:
        raise ValueError(f"route must be from 1 to {routes}")
    k = (key.user, key.session, key.location) if key is not None else None
    for node in status["nodes"]:
        if node["state"] == "active" and route in node["routes"]:
            name = node["name"]
            return Placement(route, routes, name, node["state"], node["browser"], node["sp"],
                             (pids or {}).get(name), k)  # fmt: skip
    return Placement(route, routes, None, key=k)


def cluster_pids(state_dir: Path) -> tuple[dict[str, int], str | None]:
    """The live pids and HaloD status URL of the ``orbited cluster`` in ``state_dir``
    (empty when none runs there)."""
    try:
        info = json.loads((state_dir / "cluster.json").read_text())
    except (OSError, ValueError):
        return {}, None
    return dict(info.get("pids") or {}), info.get("halod_status")


def parser() -> argparse.ArgumentParser:
    from orbited.runtime.commands import ArgumentParser

    p = ArgumentParser(
        prog="orbited whereis",
        description="Which node serves a connection key (or a route) now, from HaloD's "
        "status; with the pid when an `orbited cluster` runs in --state-dir. A key's route "
        "hashes all three parts (docs/hashing.md): give the whole key, or the route.",
    )
    p.add_argument("--user", help="the key's user")
    p.add_argument("--session", help='the key\'s session ("" for none)')
    p.add_argument("--location", help='the key\'s location ("" for none)')
    p.add_argument("--key", help='the key as JSON, e.g. \'["alice", "", "/cherrychat"]\'')
    p.add_argument("--route", type=int, help="a route number instead of a key")
    p.add_argument("--url", help="HaloD's status_http (default: the cluster's in --state-dir, "
                   f"else {DEFAULT_STATUS})")  # fmt: skip
    p.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help=f"an `orbited cluster`'s state directory (default: {DEFAULT_STATE_DIR})",
    )
    out = p.add_mutually_exclusive_group()
    out.add_argument("--pid", action="store_true", help="print only the serving node's pid")
    out.add_argument("--json", action="store_true", help="print the placement as JSON")
    return p


def _key(args: argparse.Namespace) -> ConnectionKey | None:
    """The key the flags name, or None for --route; ValueError says what is missing."""
    parts = (args.user, args.session, args.location)
    given = [x is not None for x in parts]
    if sum(x is not None for x in (args.key, args.route)) + (any(given)) != 1:
        raise ValueError("give one of: --user/--session/--location, --key or --route")
    if args.route is not None:
        return None
    if args.key is not None:
        try:
            return ConnectionKey.from_json(json.loads(args.key))
        except (ValueError, KeyError_) as e:
            raise ValueError(f"--key: {e}") from None
    if not all(given):
        raise ValueError(
            "a key's route hashes user, session and location together (docs/hashing.md), "
            'so give all three (--session "" / --location "" when empty), or --route'
        )
    try:
        return ConnectionKey.from_json(list(parts))
    except KeyError_ as e:
        raise ValueError(str(e)) from None


def whereis_command(argv: list[str]) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        key = _key(args)
    except ValueError as e:
        p.error(str(e))
    pids, cluster_status = cluster_pids(args.state_dir)
    url = (args.url or cluster_status or DEFAULT_STATUS).rstrip("/") + "/status"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            status = json.load(response)
    except (OSError, ValueError, urllib.error.URLError) as e:
        print(f"orbited whereis: cannot read HaloD's {url}: {e}", file=sys.stderr)
        return 1
    route = args.route if key is None else route_of(key, int(status["routes"]))
    try:
        placement = locate(status, route, pids, key)
    except ValueError as e:
        p.error(str(e))
    if args.json:
        print(json.dumps(asdict(placement)))
    elif args.pid:
        if placement.pid is None:
            why = "no node serves it now" if placement.node is None else (
                f"{placement.node}'s pid is not in {args.state_dir / 'cluster.json'}")  # fmt: skip
            print(f"orbited whereis: route {route}: {why}", file=sys.stderr)
            return 1
        print(placement.pid)
    else:
        print(placement.line())
    return 0 if placement.node is not None else 1
