"""Run cherrychat: ``python -m cherrychat`` with ``demos/`` on the Python path.

Normally started by ``orbited cluster`` (orbited/cluster.py), which passes the HaloD
route ports, the shared secret and the presence settings; the flags are for running it
against a cluster of your own.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from twisted.application import internet, service
from twisted.web.server import Site

from orbited.core.hashing import DEFAULT_ROUTES
from orbited.core.settings import ConfigError, parse_host_port


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cherrychat", description="The cherrychat demo web app.")
    p.add_argument("--http", default="127.0.0.1:8080", help="listen host:port")
    p.add_argument("--db", type=Path, default=Path("cherrychat.sqlite3"), help="SQLite file")
    p.add_argument("--secret-file", type=Path, default=Path("orbited.secret"),
                   help="the token secret shared with the nodes")  # fmt: skip
    p.add_argument("--halod-host", default="127.0.0.1", help="HaloD's route port address")
    p.add_argument("--browser-port-base", type=int, default=8100)
    p.add_argument("--sp-port-base", type=int, default=9100)
    p.add_argument("--routes", type=int, default=DEFAULT_ROUTES)
    p.add_argument("--halod-status", default="",
                   help="HaloD's status URL, to see users of failed nodes go offline")  # fmt: skip
    p.add_argument("--fresh-presence", action="store_true",
                   help="forget who was online (the nodes are starting afresh)")  # fmt: skip
    p.add_argument("--offline-hook", action="store_true",
                   help="the nodes' offline_url is this app's /orbited/offline: ask them for "
                        "offline notices of chat messages")  # fmt: skip
    p.add_argument("--offline-after", type=float, default=10.0,
                   help="seconds a message may stay unacknowledged before a notice")  # fmt: skip
    p.add_argument("--user-max-connections", type=int, default=0,
                   help="the nodes' user_max_connections (0: none), shown to users")  # fmt: skip
    p.add_argument("--ready-file", type=Path, help="write the bound address here as JSON")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warn", "error"])
    return p


class ChatService(service.Service):
    """The web app and its listener as one service (started and stopped together)."""

    def __init__(self, args: argparse.Namespace, reactor: object) -> None:
        from cherrychat.app import ChatApp
        from cherrychat.store import Store
        from orbited.client.cluster import HaloDCluster
        from orbited.client.twisted import TwistedClient
        from orbited.core.tokens import load_secret

        host, port = parse_host_port(args.http)
        secret = load_secret(args.secret_file)
        store = Store(args.db)
        if args.fresh_presence:
            store.clear_presence()
        cluster = HaloDCluster(args.halod_host, args.sp_port_base, args.browser_port_base,
                               routes=args.routes)  # fmt: skip
        client = TwistedClient(cluster, reactor, timeout=5.0)  # type: ignore[arg-type]
        if args.offline_after <= 0 or args.user_max_connections < 0:
            raise ValueError("--offline-after must be positive, --user-max-connections >= 0")
        self.chat = ChatApp(
            store, secret, cluster, client, reactor, args.halod_status,  # type: ignore[arg-type]
            offline_hook=args.offline_hook, offline_after=args.offline_after,
            max_tabs=args.user_max_connections,
        )  # fmt: skip
        site = Site(self.chat.app.resource())
        if args.log_level != "debug":
            site.log = lambda request: None  # type: ignore[method-assign]  # no access log
        self.server = internet.TCPServer(port, site, interface=host)

    def startService(self) -> None:  # noqa: N802
        super().startService()
        self.server.startService()
        self.chat.start()

    def stopService(self):  # noqa: ANN201, N802
        self.chat.stop()
        self.chat.store.close()
        super().stopService()
        return self.server.stopService()

    @property
    def address(self) -> str:
        bound = self.server._port.getHost()  # type: ignore[attr-defined]
        return f"{bound.host}:{bound.port}"


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from twisted.internet import reactor

    from orbited.runtime.daemon import run_service
    from orbited.runtime.logs import start_logging

    start_logging(args.log_level)
    try:
        chat = ChatService(args, reactor)
    except (OSError, ValueError, ConfigError) as e:
        print(f"cherrychat: {e}", file=sys.stderr)
        return 2
    return run_service("cherrychat", chat, lambda: {"http": chat.address}, args.ready_file)


if __name__ == "__main__":
    sys.exit(main())
