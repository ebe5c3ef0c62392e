"""The floor: what serving WebSocket subscribers costs a Python process on this reactor
before any of Orbited's work.

The node's own socket path, nothing of its work. Browser sockets are accepted exactly as
the node's browser port accepts them (``GatedTCPServer``'s port: ``CountedPort`` with
``LeanConnection`` transports, TCP_NODELAY from the listening socket and
TCP_DEFER_ACCEPT, orbited.node.transports.gate); each request head is read as the
node reads it: the common head by the C reader (orbited.core._speedups, where built),
any other by llhttp (httptools) with a callback for the one header needed; the 101 is the
node's (``wsframe.handshake_response``); events leave by the node's write-through
(``LeanConnection.send_now``) with the node's frame header; requests arrive on the
node's SP REP server (orbited.node.rep) and are decoded by orjson, as the node's are.

Not done, because it is Orbited's own work: no token check, no connection key, no
mailbox, sequence number, hello frame, dedup, limit, keepalive or per-recipient status;
a client frame is ignored (the bench's subscribers send none but a close). Each request's
``data`` goes to the WebSocket of each named user as ``{"type":"event","data":…}`` and
the reply is ``{"ok":true}``. What a node costs beyond this server, in the same run, is
Orbited's own work per accept and per event (bench/README.md, "ab").

    python -m bench.raw_server READY_FILE
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import httptools
import orjson
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from orbited.core import speedups
from orbited.node.rep import RepFactory
from orbited.node.transports import wsframe
from orbited.node.transports.gate import DEFER_ACCEPT
from orbited.runtime.twisted_compat import CountedTCPServer

OK = b'{"ok":true}'
EVENT = b'{"type":"event","data":%s}'
connections: dict[bytes, RawProtocol] = {}
# The node's C head reader where built (orbited.node.transports.httpfront.HeadReader)
READ_GET_HEAD: Any = None if speedups.native is None else speedups.native.read_get_head
KEY_HEADER = frozenset((b"sec-websocket-key",))


class RawProtocol(Protocol):
    __slots__ = ("parser", "url", "key", "user", "done")
    transport: Any  # a LeanConnection

    def __init__(self) -> None:
        self.parser: Any = None  # llhttp's, for a head the C reader leaves (as the node)
        self.url = b""
        self.key = b""
        self.user: bytes | None = None
        self.done = False

    # llhttp's callbacks
    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"sec-websocket-key":
            self.key = value

    def on_headers_complete(self) -> None:
        self.done = True

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.user is not None:
            return  # an open WebSocket: client frames are not read (module docstring)
        head = None
        if self.parser is None and not self.done and READ_GET_HEAD is not None:
            head = READ_GET_HEAD(data, KEY_HEADER, 100, 16384)
        if head is not None:
            self.url, headers = head[0], head[1]
            self.key = headers.get(b"sec-websocket-key", b"")
            self.done = True
        else:
            self._parse(data)
        if not self.done:
            return
        self.parser = None
        user = self.url.partition(b"?u=")[2]
        if not user or not self.key:
            self.transport.loseConnection()
            return
        self.user = user
        connections[user] = self
        self.transport.send_now(wsframe.handshake_response(self.key))

    def _parse(self, data: bytes) -> None:
        if self.parser is None:
            self.parser = httptools.HttpRequestParser(self)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # the upgrade's head is whole
        except httptools.HttpParserError:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:  # noqa: N802
        if self.user is not None and connections.get(self.user) is self:
            del connections[self.user]


class RawFactory(Factory):
    protocol = RawProtocol
    lean_transport = True  # what GatedTCPServer reads: LeanConnection transports

    def buildProtocol(self, addr: Any) -> RawProtocol:  # noqa: N802
        return RawProtocol()


def handle(payload: bytes) -> bytes:
    doc = orjson.loads(payload)
    data = EVENT % orjson.dumps(doc["data"])
    frame = wsframe.text_header(len(data)) + data
    for user, _, _ in doc["to"]:
        conn = connections.get(user.encode())
        if conn is not None:
            conn.transport.send_now(frame)
    return OK


def main(ready_file: str) -> None:
    browsers = CountedTCPServer(0, RawFactory(), on_open=lambda: None, on_close=lambda: None,
                                backlog=1024, interface="127.0.0.1", nodelay=True, lean=True,
                                defer_accept=DEFER_ACCEPT)  # fmt: skip
    browsers.startService()
    ws_port: Any = browsers._port
    tcp: Any = reactor
    sp_port = tcp.listenTCP(0, RepFactory(handle), interface="127.0.0.1")
    with open(ready_file, "w") as f:
        json.dump(
            {
                "http": f"127.0.0.1:{ws_port.getHost().port}",
                "sp": f"tcp://127.0.0.1:{sp_port.getHost().port}",
                "pid": os.getpid(),
            },
            f,
        )
    tcp.run()


if __name__ == "__main__":
    main(sys.argv[1])
