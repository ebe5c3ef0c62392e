"""Baseline server for bench/dispatch.py: the same stack with none of Orbited's work.

Our SP REP server and autobahn, but no tokens, mailboxes, sequence numbers, dedup or
validation: each request's ``data`` is wrapped and sent to the WebSocket of each named
user. What Orbited costs beyond this is its own overhead.

    python -m bench.raw_server READY_FILE
"""

from __future__ import annotations

import json
import os
import sys

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import reactor

from orbited.node.rep import RepFactory

connections: dict[str, WebSocketServerProtocol] = {}


class RawProtocol(WebSocketServerProtocol):
    user: str | None = None  # set once the handshake request is read

    def onConnect(self, request):  # noqa: ANN001, ANN201, N802
        self.user = request.params["u"][0]

    def onOpen(self):  # noqa: ANN201, N802
        connections[self.user] = self

    def onClose(self, wasClean, code, reason):  # noqa: ANN001, ANN201, N802, N803
        connections.pop(self.user, None)


def handle(payload: bytes) -> bytes:
    doc = json.loads(payload)
    frame = json.dumps({"type": "event", "data": doc["data"]}).encode()
    for user, _, _ in doc["to"]:
        conn = connections.get(user)
        if conn is not None:
            conn.sendMessage(frame)
    return b'{"ok":true}'


def main(ready_file: str) -> None:
    ws = WebSocketServerFactory()
    ws.protocol = RawProtocol
    ws_port = reactor.listenTCP(0, ws, backlog=1024, interface="127.0.0.1")  # as Orbited
    sp_port = reactor.listenTCP(0, RepFactory(handle), interface="127.0.0.1")
    with open(ready_file, "w") as f:
        json.dump(
            {
                "http": f"127.0.0.1:{ws_port.getHost().port}",
                "sp": f"tcp://127.0.0.1:{sp_port.getHost().port}",
                "pid": os.getpid(),
            },
            f,
        )
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1])
