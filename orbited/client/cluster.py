"""Where a recipient lives: its route (docs/hashing.md) and that route's addresses.

Two layouts: a static list of nodes (route r → the node HaloD's table gives it for that
many nodes), or HaloD (route r → HaloD's web-app port and browser port for r).

A recipient is a connection key, or a Selector: every connection of a user
(``["alice", "*", "*"]``) or of one of its sessions (``["alice", "s1", "*"]``). Under hash
version 2 (the default) a route is the hash of the user alone, so a user's keys and its
selectors share one route; version 1 hashes the whole key and cannot route a selector.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlencode

from orbited.core.hashing import (
    DEFAULT_HASH_VERSION,
    DEFAULT_ROUTES,
    WILDCARDS_NEED_V2,
    check_hash_version,
    route_of,
    route_of_user,
    static_node,
)
from orbited.core.keys import ConnectionKey, Selector, parse_recipient
from orbited.core.settings import parse_host_port, parse_sp_address
from orbited.core.tokens import DEFAULT_TTL, issue_token

Recipient = ConnectionKey | Selector
RecipientLike = Recipient | Sequence[str]  # a key or selector, or its JSON form as a list


class WildcardNeedsV2(ValueError):
    """A selector under hash version 1: its keys may be on any route."""

    code = "hash_version_mismatch"

    def __init__(self) -> None:
        super().__init__(WILDCARDS_NEED_V2)


def recipient(value: RecipientLike) -> Recipient:
    """``value`` as a ConnectionKey or a Selector. A list or tuple is read as its JSON form
    (docs/protocol.md): three strings, ``"*"`` as session and location for a whole user,
    ``"*"`` as location for one session. Raises ValueError (``orbited.core.keys.KeyError_``)
    for anything else, with the node's ``bad_key`` message."""
    if isinstance(value, Selector | ConnectionKey):
        return value
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise ValueError(f"a recipient is a key or a selector, not {type(value).__name__}")
    return parse_recipient(list(value))


@dataclass(frozen=True)
class Node:
    sp: str  # tcp://host:port
    browser: str  # http(s)://host:port as pages reach it

    def __post_init__(self) -> None:
        parse_sp_address(self.sp)  # a bad one is refused here, not at the first send


class Cluster:
    follows_moves = False  # a node's address is fixed: a `moved` answer is final
    follows_hash = False  # the hash version is fixed (every node and web app set it alike)

    def __init__(
        self, nodes: list[Node], routes: int = DEFAULT_ROUTES,
        hash_version: int = DEFAULT_HASH_VERSION,
    ) -> None:  # fmt: skip
        if not 1 <= len(nodes) <= routes:
            raise ValueError(f"a static cluster has 1 to {routes} nodes")
        self.nodes = nodes
        self.routes = routes
        self.hash_version = check_hash_version(hash_version)
        self._owner = [static_node(r, len(nodes), routes) for r in range(1, routes + 1)]

    def route_of(self, value: RecipientLike) -> int:
        """The route of a key or a selector under the cluster's hash version. A selector
        under version 1 raises WildcardNeedsV2 (a ValueError)."""
        target = recipient(value)
        if isinstance(target, Selector):
            if self.hash_version < 2:
                raise WildcardNeedsV2()
            return route_of_user(target.user, self.routes)
        return route_of(target, self.routes, version=self.hash_version)

    def group_by_route(self, recipients: Iterable[RecipientLike]) -> dict[int, list[Recipient]]:
        """Distinct recipients by route, in first-seen order: one request goes per route.
        Under version 2 a user's keys and selectors all share its route, so one request
        carries them and the node gives a key reached twice the event once."""
        by_route: dict[int, list[Recipient]] = {}
        for target in dict.fromkeys(recipient(r) for r in recipients):
            by_route.setdefault(self.route_of(target), []).append(target)
        return by_route

    def follow_hash(self, version: object) -> bool:
        """A node said the cluster hashes with ``version`` (a ``moved`` result's or a
        ``hash_version_mismatch`` error's ``hash``). A cluster that follows switches to
        it; True if the version is now different from what it was."""
        if not self.follows_hash or type(version) is not int or version == self.hash_version:
            return False
        try:
            self.hash_version = check_hash_version(version)
        except ValueError:
            return False
        return True

    def node(self, route: int) -> Node:
        return self.nodes[self._owner[route - 1]]

    def sp_address(self, route: int) -> tuple[str, int]:
        return parse_sp_address(self.node(route).sp)

    def browser_base(self, key: ConnectionKey) -> str:
        """The base URL a page gives the JS client for this key."""
        return self.node(self.route_of(key)).browser

    def browser_url(self, key: ConnectionKey, secret: bytes, transport: str = "ws",
                    ttl: float = DEFAULT_TTL) -> str:  # fmt: skip
        """A ready-to-use transport URL for ``key``, token included."""
        base = self.browser_base(key)
        if transport == "ws":
            base = base.replace("http", "ws", 1)
        query = urlencode({"token": issue_token(secret, key, ttl)})
        return f"{base}/orbited/{transport}?{query}"


class HaloDCluster(Cluster):
    """Route r is reached at ``sp_port_base + r - 1`` and ``browser_port_base + r - 1``.

    ``hash_version``: ``"auto"`` (the default) starts at 2 and follows the version HaloD's
    nodes name in ``moved`` results and ``hash_version_mismatch`` errors (a ``halod
    rehash``, docs/hashing.md); 1 or 2 fixes it."""

    follows_moves = True  # HaloD's route ports lead to the current owner

    def __init__(
        self, host: str, sp_port_base: int, browser_port_base: int,
        routes: int = DEFAULT_ROUTES, scheme: str = "http",
        hash_version: int | Literal["auto"] = "auto",
    ) -> None:  # fmt: skip
        self.routes = routes
        self.host = host
        self.sp_port_base = sp_port_base
        self.browser_port_base = browser_port_base
        self.scheme = scheme
        self.follows_hash = hash_version == "auto"
        self.hash_version = (
            DEFAULT_HASH_VERSION if hash_version == "auto" else check_hash_version(hash_version)
        )
        # every route's SP port is a port (the browser base only makes browser URLs)
        if not (type(sp_port_base) is int and 1 <= sp_port_base <= 65536 - routes):
            raise ValueError(f"sp_port_base + {routes} routes must stay within 1..65535")
        parse_host_port(f"{host}:{sp_port_base}")

    def node(self, route: int) -> Node:
        return Node(
            f"tcp://{self.host}:{self.sp_port_base + route - 1}",
            f"{self.scheme}://{self.host}:{self.browser_port_base + route - 1}",
        )
