"""The browser-facing HTTP site of a node: URL layout of docs/protocol.md, "URLs"."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

from twisted.web import server

from orbited import __version__
from orbited.node.hub import Hub
from orbited.node.traceapi import TraceResource
from orbited.node.transports.ack import AckResource
from orbited.node.transports.common import BrowserAuth
from orbited.node.transports.http import orbited_site
from orbited.node.transports.limits import BrowserLimits, BrowserLimitsConfig
from orbited.node.transports.longpoll import LongPollResource
from orbited.node.transports.streaming import IframeResource, SSEResource
from orbited.node.transports.websocket import websocket_resource
from orbited.runtime.web import JSONResource, OrbitedSite


class HealthResource(JSONResource):
    def __init__(
        self, hub: Hub, name: str, limits: Callable[[], dict[str, int]] | None = None
    ) -> None:
        super().__init__()
        self.hub = hub
        self.name = name
        self.limits = limits  # the node's limit counters (docs/operations.md, "Limits")

    def render_GET(self, request: server.Request) -> bytes:  # noqa: N802
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(
            {
                "ok": True,
                "node": self.name,
                "epoch": self.hub.epoch,
                "version": __version__,
                "gauges": self.hub.gauges(),
                "stats": self.hub.stats,
                "limits": self.limits() if self.limits is not None else {},
            }
        ).encode()


_EXPORT = re.compile(r"^export ((?:async )?function|const|class) (\w+)", re.MULTILINE)


def client_source() -> str:
    """js/orbited.js from the source tree, or from where the package installed it."""
    for candidate in (
        Path(__file__).resolve().parents[2] / "js" / "orbited.js",
        Path(sys.prefix) / "share" / "orbited" / "js" / "orbited.js",
    ):
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8")
    raise FileNotFoundError("js/orbited.js not found")


def classic_script(module: str) -> str:
    """The ES module as a classic script defining window.Orbited (one <script> tag)."""
    names = _EXPORT.findall(module)
    body = _EXPORT.sub(r"\1 \2", module)
    exports = ", ".join(name for _, name in names)
    return f"(function () {{\n{body}\nwindow.Orbited = {{ {exports} }};\n}})();\n"


class ClientScriptResource(JSONResource):
    """The JS client at a stable URL; public code, so any origin may load it."""

    def __init__(self, source: str, module: bool) -> None:
        super().__init__()
        self.body = (source if module else classic_script(source)).encode("utf-8")

    def render_GET(self, request: server.Request) -> bytes:  # noqa: N802
        request.setHeader(b"content-type", b"text/javascript; charset=utf-8")
        request.setHeader(b"access-control-allow-origin", b"*")
        request.setHeader(b"cache-control", b"public, max-age=300")
        return self.body


def browser_site(
    hub: Hub, auth: BrowserAuth, cors_origins: list[str], name: str, iframe_max_bytes: int,
    limits: BrowserLimits | None = None,
    counters: Callable[[], dict[str, int]] | None = None, trace_key: bytes | None = None,
) -> OrbitedSite:  # fmt: skip
    """``limits`` is shared by every browser transport; ``counters`` is what /health
    shows under "limits" (default: ``limits``' own counters). ``trace_key``: serve
    ``/orbited/trace`` (orbited.node.traceapi) for that bearer key; None: no such path."""
    source = client_source()
    limits = limits or BrowserLimits(BrowserLimitsConfig(), hub.clock)
    extra = {} if trace_key is None else {b"trace": TraceResource(hub, trace_key)}
    site = orbited_site(
        {
            **extra,
            b"ws": websocket_resource(hub, auth, cors_origins, limits),
            b"poll": LongPollResource(hub, auth, cors_origins, limits),
            b"sse": SSEResource(hub, auth, cors_origins, limits),
            b"iframe": IframeResource(hub, auth, cors_origins, iframe_max_bytes, limits),
            b"ack": AckResource(hub, auth, cors_origins, limits),
            b"health": HealthResource(hub, name, counters or limits.snapshot),
            b"client.js": ClientScriptResource(source, module=False),
            b"client.mjs": ClientScriptResource(source, module=True),
        },
        head_limits=limits.config,
    )
    if not isinstance(site, OrbitedSite):  # what orbited_site builds; the node's shutdown
        raise TypeError(f"orbited_site built a {type(site).__name__}")  # needs its methods
    return site
