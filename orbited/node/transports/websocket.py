"""WebSocket transport (autobahn): one text message per frame, acks from the browser.

URL: /orbited/ws?token=...&last=<stream>:<seq>. The browser may send
{"type": "ack", "seq": n} so the node can free what it has seen. Close codes are in
docs/protocol.md, "Errors".
"""

from __future__ import annotations

import base64
import binascii
import struct

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionRequest
from twisted.web.http import Request

from orbited.node import frames
from orbited.node.frames import Frame
from orbited.node.hub import Hub
from orbited.node.transports.common import (
    BAD_ACK,
    Attach,
    BrowserAuth,
    BrowserRequestError,
    authenticate,
    check_admitted,
    closed_reason,
    parse_ack,
)
from orbited.node.transports.http import apply_cors, send_json_error
from orbited.node.transports.limits import (
    BrowserLimits,
    BrowserLimitsConfig,
    WriteQueueWatch,
)
from orbited.runtime.twisted_compat import (
    NoDebugLogger,
    autobahn_send_idle,
    lazy_autobahn_pformat,
    unsent_bytes,
)
from orbited.runtime.web import JSONResource

CLOSE_RECONNECT = 4000  # reconnect (node shutting down, route moved); reason says why
CLOSE_REPLACED = 4001  # a newer connection took this key; do not reconnect
CLOSE_SLOW = 4002  # a reader too slow for max_write_queue; reconnect and resume
CLOSE_BAD_FRAME = 4400  # the browser sent something that is not a valid frame
WEBSOCKET_VERSION = b"13"  # RFC 6455; what every browser sends


def text_frame_header(length: int) -> bytes:
    """RFC 6455 header of an unmasked, unfragmented text frame (server to client)."""
    if length < 126:
        return bytes((0x81, length))
    if length < 65536:
        return struct.pack(">BBH", 0x81, 126, length)
    return struct.pack(">BBQ", 0x81, 127, length)


class BrowserWebSocket(WebSocketServerProtocol):
    factory: BrowserWebSocketFactory
    kind = "ws"  # the transport's name in per-key traces
    wants_pings = True

    def __init__(self) -> None:
        super().__init__()
        # autobahn logs at debug level on every send; skip those calls outright (they
        # cost more than the send) while keeping its warnings and errors.
        self.log = NoDebugLogger(f"{__name__}.BrowserWebSocket", source=self)
        self._attach: Attach | None = None
        self._error: BrowserRequestError | None = None
        self._counted = False  # one of the node's browser connections (limits)
        self._watch: WriteQueueWatch | None = None
        self.last_write = 0.0

    def onConnect(self, request: ConnectionRequest) -> None:
        # The origin and the handshake's headers were checked before the upgrade
        # (WebSocketEntry), with the same rule as every other transport.
        factory = self.factory
        try:
            factory.limits.check()  # before the token: an overloaded node does no more work
            attach = authenticate(factory.auth, request.params)
            check_admitted(factory.hub, attach.key)  # close 4429: the user's limit
            self._attach = attach
        except BrowserRequestError as e:
            # Accept, then close with a code the page's script can read (an HTTP refusal
            # of the upgrade is invisible to it).
            self._error = e

    def onOpen(self) -> None:
        if self._error is not None:
            self.sendClose(self._error.close_code, self._error.close_reason)
            return
        assert self._attach is not None
        factory = self.factory
        factory.limits.opened()
        self._counted = True
        self._watch = WriteQueueWatch(
            factory.limits.config.max_write_queue,
            factory.hub.clock,
            lambda: unsent_bytes(self.transport),
            self._slow,
        )
        factory.hub.attach(self._attach.key, self, self._attach.after)

    def _slow(self, unsent: int) -> None:
        self.factory.limits.slow()
        self.log.info("closing a slow WebSocket reader: {n} bytes unsent", n=unsent)
        # The close frame waits behind the unsent bytes; closeHandshakeTimeout drops the
        # connection (and frees them) if the browser does not read that far in time.
        self.sendClose(CLOSE_SLOW, f"slow: {unsent} bytes unsent, over max_write_queue")

    def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N803
        if self._attach is None:
            return
        if isBinary:
            self.sendClose(CLOSE_BAD_FRAME, "bad_frame: binary messages are not accepted")
            return
        try:
            seq = parse_ack(payload)
        except ValueError:
            self.sendClose(CLOSE_BAD_FRAME, BAD_ACK)
            return
        self.factory.hub.ack(self._attach.key, seq)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:  # noqa: N803
        if self._watch is not None:
            self._watch.stop()
        if self._counted:
            self._counted = False
            self.factory.limits.closed()
        if self._attach is not None:
            self.factory.hub.detach(self._attach.key, self)

    # -- Sink ---------------------------------------------------------------------------

    def deliver(self, out: list[Frame]) -> bool:
        transport = self.transport
        if self.state != self.STATE_OPEN or transport is None:
            return False
        if not autobahn_send_idle(self):
            for frame in out:
                self.sendMessage(frame.data)
        else:
            # Frame here and write once: autobahn's sendMessage costs more per message
            # than the write itself, and several frames then leave in one write.
            data: list[bytes] = []
            for frame in out:
                data += (text_frame_header(len(frame.data)), frame.data)
            transport.writeSequence(data)
        self.last_write = self.factory.hub.clock.seconds()
        return self._watch is None or not self._watch.wrote()

    def replaced(self) -> None:
        if self.state == self.STATE_OPEN:
            self.sendMessage(frames.REPLACED)
            self.sendClose(CLOSE_REPLACED, "replaced: a newer connection took this key")

    def reconnect(self, reason: str, route: int | None = None, spread: float | None = None) -> None:
        if self.state == self.STATE_OPEN:
            self.sendMessage(frames.reconnect(reason, route, spread))
            self.sendClose(CLOSE_RECONNECT, f"reconnect: {reason}"[:123])

    def closed(self, code: int, reason: str) -> None:
        if self.state == self.STATE_OPEN:
            users = self.factory.hub.config.users
            self.sendClose(code, closed_reason(code, reason, users.max_connections))


class BrowserWebSocketFactory(WebSocketServerFactory):
    # Twisted's stub wants a protocol whose ``factory`` is typed Factory[Self]; ours
    # names this subclass (autobahn's factories are not generic), which it is at runtime.
    protocol = BrowserWebSocket  # type: ignore[assignment]

    def __init__(
        self,
        hub: Hub,
        auth: BrowserAuth,
        cors_origins: list[str],
        limits: BrowserLimits | None = None,
    ) -> None:
        super().__init__()
        self.hub = hub
        self.auth = auth
        self.cors_origins = cors_origins
        self.limits = limits or BrowserLimits(BrowserLimitsConfig(), hub.clock)
        keepalive = hub.config.keepalive
        self.setProtocolOptions(
            maxFramePayloadSize=self.limits.config.max_client_message,
            maxMessagePayloadSize=self.limits.config.max_client_message,
            # Fail a connection with a close frame, not by dropping the TCP connection
            # (autobahn's default): the browser then sees 1009 for a message over
            # max_client_message, 1002 for a protocol violation, 1007 for text that is
            # not UTF-8 (docs/protocol.md, "WebSocket"), not a bare 1006.
            # closeHandshakeTimeout bounds the wait for the browser's close.
            failByDrop=False,
            autoPingInterval=keepalive,
            autoPingTimeout=keepalive,
            openHandshakeTimeout=10,
            closeHandshakeTimeout=5,
            tcpNoDelay=True,
        )


def _tokens(value: bytes | None) -> list[bytes]:
    return [t.strip().lower() for t in (value or b"").split(b",")]


class WebSocketEntry(JSONResource):
    """/orbited/ws: checks what autobahn would refuse with a bare HTTP status — the page's
    origin, then the upgrade request itself — and answers it with the JSON error body
    (docs/protocol.md, "Errors (browser side)"); a valid upgrade goes to autobahn."""

    head_allowed = False

    def __init__(self, factory: BrowserWebSocketFactory) -> None:
        super().__init__()
        self.factory = factory
        self.upgrade = WebSocketResource(factory)

    def render_GET(self, request: Request) -> bytes | int:  # noqa: N802
        try:
            apply_cors(request, self.factory.cors_origins)
            self._check_handshake(request)
        except BrowserRequestError as e:
            return send_json_error(request, e)
        return self.upgrade.render(request)

    @staticmethod
    def _check_handshake(request: Request) -> None:
        upgrade = b"websocket" in _tokens(request.getHeader(b"upgrade"))
        if not upgrade or request.getHeader(b"sec-websocket-version") != WEBSOCKET_VERSION:
            request.setHeader(b"upgrade", b"websocket")
            request.setHeader(b"connection", b"Upgrade")
            request.setHeader(b"sec-websocket-version", WEBSOCKET_VERSION)
            message = "this URL is a WebSocket" if not upgrade else "WebSocket version must be 13"
            raise BrowserRequestError(426, "upgrade_required", message)
        try:
            key_ok = len(base64.b64decode(request.getHeader(b"sec-websocket-key") or b"x",
                                          validate=True)) == 16  # fmt: skip
        except binascii.Error:
            key_ok = False
        if (
            not key_ok
            or b"upgrade" not in _tokens(request.getHeader(b"connection"))
            or not request.getHeader(b"host")
        ):
            raise BrowserRequestError(
                400, "bad_request", "not a WebSocket handshake (RFC 6455, section 4.1)"
            )


def websocket_resource(
    hub: Hub, auth: BrowserAuth, cors_origins: list[str], limits: BrowserLimits | None = None
) -> WebSocketEntry:
    # autobahn pretty-prints its option table on every new connection unless this is on.
    lazy_autobahn_pformat()
    factory = BrowserWebSocketFactory(hub, auth, cors_origins, limits)
    factory.startFactory()
    return WebSocketEntry(factory)
