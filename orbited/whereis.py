"""``orbited whereis``: which node serves a user, a connection key (or a route) right now.

A key's route is its hash under the cluster's hash version (docs/hashing.md), which
HaloD's ``/status`` names (``hash_version``; absent from an older HaloD: 1). Version 2
hashes the user part only, so a user alone names a route; version 1 hashes all three
parts. The route's node is what ``/status`` says now; its pid is in ``orbited
cluster``'s cluster.json when one runs here. :func:`locate` and :func:`route_for` are the
pure part.

    orbited whereis --user alice                  (hash version 2: every key of alice)
    orbited whereis --user alice --session "" --location /cherrychat
    orbited whereis --key '["alice", "", "/cherrychat"]'   (or '["alice", "*", "*"]': v2)
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

from orbited.core.hashing import check_hash_version, route_of, route_of_user
from orbited.core.keys import ConnectionKey, KeyError_, Selector, parse_recipient

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
    user: str | None = None  # asked for a user (hash version 2)
    hash_version: int | None = None  # the cluster's, when a key or user was hashed

    def line(self) -> str:
        head = f"route {self.route} of {self.routes}"
        if self.hash_version is not None:
            head += f" (hash version {self.hash_version})"
        if self.key is not None:
            head = f"key {json.dumps(list(self.key), ensure_ascii=False)}: {head}"
        elif self.user is not None:
            head = f"user {json.dumps(self.user, ensure_ascii=False)}: {head}"
        if self.node is None:
            return f"{head}: no node serves it now (HaloD is between owners; try again)"
        where = f"{self.node} ({self.state}, browsers {self.browser}, web apps {self.sp})"
        return f"{head}: {where}" + (f", pid {self.pid}" if self.pid is not None else "")


def locate(status: dict[str, Any], route: int, pids: dict[str, int] | None = None,
           key: ConnectionKey | None = None, user: str | None = None,
           hash_version: int | None = None) -> Placement:  # fmt: skip
    """The placement of ``route`` in HaloD's ``/status`` document; ``pids`` by node name
    (cluster.json's) adds the serving process's pid. ``key``/``user``/``hash_version``
    are shown with it (what was hashed, and how)."""
    routes = int(status["routes"])
    if not 1 <= route <= routes:
        raise ValueError(f"route must be from 1 to {routes}")
    k = (key.user, key.session, key.location) if key is not None else None
    for node in status["nodes"]:
        if node["state"] == "active" and route in node["routes"]:
            name = node["name"]
            return Placement(route, routes, name, node["state"], node["browser"], node["sp"],
                             (pids or {}).get(name), k, user, hash_version)  # fmt: skip
    return Placement(route, routes, None, key=k, user=user, hash_version=hash_version)


def cluster_hash_version(status: dict[str, Any]) -> int:
    """The hash version of HaloD's ``/status`` (absent: an older HaloD, version 1)."""
    try:
        return check_hash_version(status.get("hash_version", 1))
    except ValueError as e:
        raise ValueError(f"HaloD's status: {e}") from None


def route_for(status: dict[str, Any], target: ConnectionKey | str) -> int:
    """The route of a key, or of a user (a ``str``), under the cluster's hash version;
    ValueError for a user alone on a version-1 cluster."""
    routes, version = int(status["routes"]), cluster_hash_version(status)
    if isinstance(target, ConnectionKey):
        return route_of(target, routes, version)
    if version != 2:
        raise ValueError(
            f"this cluster hashes with version {version}: all three parts of a key make "
            'its route (docs/hashing.md), so give --session and --location too ("" when '
            "empty), or --route"
        )
    return route_of_user(target, routes)


def cluster_pids(state_dir: Path) -> tuple[dict[str, int], str | None]:
    """The live pids and HaloD status URL of the ``orbited cluster`` in ``state_dir``
    (empty when none runs there); with ``--ha``, the status URL of the HaloD that leads
    now (``leading_status``)."""
    try:
        info = json.loads((state_dir / "cluster.json").read_text())
    except (OSError, ValueError):
        return {}, None
    if not isinstance(info, dict):
        return {}, None
    return dict(info.get("pids") or {}), cluster_status(info)


def cluster_status(info: dict[str, Any]) -> str | None:
    """The HaloD status URL to ask, from cluster.json's ``info``: the leading one of its
    ``halod_statuses`` (two with ``--ha``), else its ``halod_status``."""
    urls = [u for u in info.get("halod_statuses") or [] if isinstance(u, str)]
    first = info.get("halod_status")
    first = first if isinstance(first, str) else None
    return leading_status(urls, first) if len(urls) > 1 else first


def leading_status(urls: list[str], fallback: str | None, timeout: float = 0.5) -> str | None:
    """The first of ``urls`` whose ``/status`` says ``role: leader``; else the first that
    answers at all (a follower answers with the leader's name), else ``fallback``. Every
    HaloD of a cluster on etcd serves ``/status``; only the leader has the nodes."""
    answering = None
    for url in urls:
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/status", timeout=timeout) as r:
                role = json.loads(r.read()).get("role")
        except (OSError, ValueError, AttributeError):
            continue
        if role in ("leader", "solo"):
            return url
        answering = answering or url
    return answering or fallback


def parser() -> argparse.ArgumentParser:
    from orbited.runtime.commands import ArgumentParser

    p = ArgumentParser(
        prog="orbited whereis",
        description="Which node serves a user, a connection key (or a route) now, from "
        "HaloD's status; with the pid when an `orbited cluster` runs in --state-dir. A key's "
        "route is its hash under the cluster's hash version (docs/hashing.md): version 2 "
        "hashes the user alone (--user is enough), version 1 the whole key.",
    )
    p.add_argument("--user", help="the user (alone: hash version 2), or the key's user")
    p.add_argument("--session", help='the key\'s session ("" for none)')
    p.add_argument("--location", help='the key\'s location ("" for none)')
    p.add_argument("--key", help='the key as JSON, e.g. \'["alice", "", "/cherrychat"]\' '
                   '(or a user\'s keys, \'["alice", "*", "*"]\': hash version 2)')  # fmt: skip
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


def _key(args: argparse.Namespace) -> ConnectionKey | str | None:
    """The key the flags name, a user (``--user`` alone), or None for --route;
    ValueError says what is missing."""
    parts = (args.user, args.session, args.location)
    given = [x is not None for x in parts]
    if sum(x is not None for x in (args.key, args.route)) + (any(given)) != 1:
        raise ValueError("give one of: --user [--session --location], --key or --route")
    if args.route is not None:
        return None
    if args.key is not None:
        try:  # a key, or a user's or session's selector (their route is the user's)
            recipient = parse_recipient(json.loads(args.key))
        except (ValueError, KeyError_) as e:
            raise ValueError(f"--key: {e}") from None
        return recipient.user if isinstance(recipient, Selector) else recipient
    if given == [True, False, False]:
        try:  # a valid key's user part
            return parse_recipient([args.user, "", ""]).user
        except KeyError_ as e:
            raise ValueError(f"--user: {e}") from None
    if not all(given):
        raise ValueError(
            "give --user alone (hash version 2: a user's keys share a route), or all three "
            '(--session "" / --location "" when empty), or --route'
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
    try:
        if key is None:
            placement = locate(status, args.route, pids)
        else:
            route = route_for(status, key)
            placement = locate(
                status, route, pids, key if isinstance(key, ConnectionKey) else None,
                key if isinstance(key, str) else None, cluster_hash_version(status),
            )  # fmt: skip
    except ValueError as e:
        p.error(str(e))
    route = placement.route
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
