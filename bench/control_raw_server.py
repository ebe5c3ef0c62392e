"""Baseline server for bench/control.py: HaloD's transport with none of HaloD's work.

The same Twisted TCP listener, SP pair0 framing (orbited.sp.wire) and JSON encoding as
halod/server.py, but no validation, membership, route table, deadlines, persistence or
logging: a ``register`` gets a ``welcome`` with no routes, each ``heartbeat`` an ack.
What HaloD costs beyond this is its own logic.

    python -m bench.control_raw_server READY_FILE
"""

from __future__ import annotations

import json
import os
import sys

from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol

from orbited.sp.wire import PAIR_V0, SPConnection, SPProtocolError, encode_message


def encode(message: dict) -> bytes:
    return encode_message(json.dumps(message, separators=(",", ":")).encode())


class RawControl(Protocol):
    def connectionMade(self):  # noqa: N802
        self.transport.setTcpNoDelay(True)
        self._sp = SPConnection(PAIR_V0, PAIR_V0)
        self.transport.write(self._sp.initial_bytes())

    def dataReceived(self, data):  # noqa: N802
        try:
            bodies = self._sp.receive(data)
        except SPProtocolError:
            self.transport.abortConnection()
            return
        for body in bodies:
            msg = json.loads(body)
            kind = msg.get("type")
            if kind == "heartbeat":
                self.transport.write(encode({"type": "heartbeat_ack", "seq": msg["seq"]}))
            elif kind == "register":
                welcome = {"type": "welcome", "node_id": None, "role": "spare", "routes": [],
                           "total_routes": 1, "heartbeat_interval": INTERVAL,
                           "missed_heartbeats": 3}  # fmt: skip
                self.transport.write(encode(welcome))


INTERVAL = 0.1


def main(ready_file: str, interval: str = "0.1") -> None:
    global INTERVAL
    INTERVAL = float(interval)
    factory = Factory.forProtocol(RawControl)
    port = reactor.listenTCP(0, factory, backlog=1024, interface="127.0.0.1")  # as HaloD
    tmp = ready_file + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"control": f"tcp://127.0.0.1:{port.getHost().port}", "pid": os.getpid()}, f)
    os.replace(tmp, ready_file)
    reactor.run()


if __name__ == "__main__":
    main(*sys.argv[1:])
