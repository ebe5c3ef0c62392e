"""Where a connection key lives: its route (docs/hashing.md) and that route's addresses.

Two layouts: a static list of nodes (route r → the node HaloD's table gives it for that
many nodes), or HaloD (route r → HaloD's web-app port and browser port for r).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlencode

from orbited.core.hashing import DEFAULT_ROUTES, route_of, static_node
from orbited.core.keys import ConnectionKey
from orbited.core.settings import parse_host_port, parse_sp_address
from orbited.core.tokens import DEFAULT_TTL, issue_token


@dataclass(frozen=True)
class Node:
    sp: str  # tcp://host:port
    browser: str  # http(s)://host:port as pages reach it


class Cluster:
    follows_moves = False  # a node's address is fixed: a `moved` answer is final

    def __init__(self, nodes: list[Node], routes: int = DEFAULT_ROUTES) -> None:
        if not 1 <= len(nodes) <= routes:
            raise ValueError(f"a static cluster has 1 to {routes} nodes")
        self.nodes = nodes
        self.routes = routes
        self._owner = [static_node(r, len(nodes), routes) for r in range(1, routes + 1)]

    def route_of(self, key: ConnectionKey) -> int:
        return route_of(key, self.routes)

    def group_by_route(self, keys: list[ConnectionKey]) -> dict[int, list[ConnectionKey]]:
        """Distinct keys by route, in first-seen order: one request goes per route."""
        by_route: dict[int, list[ConnectionKey]] = {}
        for key in dict.fromkeys(keys):
            by_route.setdefault(self.route_of(key), []).append(key)
        return by_route

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
    """Route r is reached at ``sp_port_base + r - 1`` and ``browser_port_base + r - 1``."""

    follows_moves = True  # HaloD's route ports lead to the current owner

    def __init__(
        self, host: str, sp_port_base: int, browser_port_base: int,
        routes: int = DEFAULT_ROUTES, scheme: str = "http",
    ) -> None:  # fmt: skip
        self.routes = routes
        self.host = host
        self.sp_port_base = sp_port_base
        self.browser_port_base = browser_port_base
        self.scheme = scheme
        parse_host_port(f"{host}:{sp_port_base}")

    def node(self, route: int) -> Node:
        return Node(
            f"tcp://{self.host}:{self.sp_port_base + route - 1}",
            f"{self.scheme}://{self.host}:{self.browser_port_base + route - 1}",
        )
