"""The browser-facing HTTP site of a node: URL layout of docs/protocol.md, "URLs"."""

from __future__ import annotations

import json

from twisted.web import resource, server

from orbited import __version__
from orbited.hub import Hub
from orbited.transports.common import BrowserAuth
from orbited.transports.longpoll import LongPollResource
from orbited.transports.streaming import IframeResource, SSEResource
from orbited.transports.websocket import websocket_resource


class HealthResource(resource.Resource):
    isLeaf = True

    def __init__(self, hub: Hub, name: str) -> None:
        super().__init__()
        self.hub = hub
        self.name = name

    def render_GET(self, request: server.Request) -> bytes:  # noqa: N802
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(
            {"ok": True, "node": self.name, "epoch": self.hub.epoch, "version": __version__}
        ).encode()


def browser_site(
    hub: Hub, auth: BrowserAuth, cors_origins: list[str], name: str, iframe_max_bytes: int
) -> server.Site:
    orbited = resource.Resource()
    orbited.putChild(b"ws", websocket_resource(hub, auth, cors_origins))
    orbited.putChild(b"poll", LongPollResource(hub, auth, cors_origins))
    orbited.putChild(b"sse", SSEResource(hub, auth, cors_origins))
    orbited.putChild(b"iframe", IframeResource(hub, auth, cors_origins, iframe_max_bytes))
    orbited.putChild(b"health", HealthResource(hub, name))
    root = resource.Resource()
    root.putChild(b"orbited", orbited)
    site = server.Site(root)
    site.displayTracebacks = False
    site.noisy = False
    return site
