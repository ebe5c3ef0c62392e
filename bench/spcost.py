"""The SP REP server's CPU per request, over a real loopback socket, in one process.

    .venv/bin/python -m bench.spcost [--batch 50] [--batches 400] [--reps 5] [--handler stub|hub]

The node's SP server (``orbited.node.rep``: ``RepFactory`` on the real reactor) in this
process; a client in a child process (plain blocking sockets, REQ) writes ``--batch``
one-recipient event requests (the bodies ``bench dispatch``'s publisher sends) in one
write, reads every reply, and does that ``--batches`` times, as ``python -m bench.ab``'s
publisher does every 10 ms. Printed: this process's CPU (``time.process_time``: user and
system, so the ``recv``, ``sendmsg`` and ``epoll_wait`` are in) from the SP connection's
``connectionMade`` to its ``connectionLost``, per request, the best of ``--reps``
connections (µs).

``--handler stub``: every request answered with one fixed reply body (the SP server's own
cost: reading, framing, backtraces, replies); ``hub``: the node's ``Hub.handle_request``
with a delivery batch per read, to keys whose attached sink accepts every frame and
writes nothing (``bench.hubcost``'s ``BatchingSink``): the SP half of an event without
the browser's socket. To measure another commit's SP server, run this file with that
work tree first on the path: ``PYTHONPATH=<work tree> .venv/bin/python bench/spcost.py``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer

CLIENT = r"""
import json, socket, sys, time
port, batch, batches = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
s = socket.create_connection(("127.0.0.1", port))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
s.sendall(b"\x00SP\x00\x00\x30\x00\x00")
head = b""
while len(head) < 8:
    head += s.recv(8 - len(head))
rid = 0x80000000
n = 0
chunks = []
for b in range(batches):
    out = []
    for _ in range(batch):
        body = json.dumps({"id": f"p-{n}", "to": [[f"c{n % 1000}", "b", "/bench"]],
                           "data": {"t": time.time(), "ph": "m", "n": n}},
                          separators=(",", ":")).encode()
        msg = rid.to_bytes(4, "big") + body
        out.append(len(msg).to_bytes(8, "big") + msg)
        rid = 0x80000000 | ((rid + 1) & 0x7FFFFFFF)
        n += 1
    chunks.append(b"".join(out))
buf = bytearray()
for chunk in chunks:
    s.sendall(chunk)
    got = 0
    while got < batch:
        data = s.recv(1 << 18)
        if not data:
            sys.exit("server closed")
        buf += data
        while len(buf) >= 8:
            length = int.from_bytes(buf[:8], "big")
            if len(buf) < 8 + length:
                break
            del buf[: 8 + length]
            got += 1
s.close()
"""


def build_handler(kind: str) -> tuple[Any, Any, Any]:
    """(handler, batch scope, many) for ``RepFactory``, as the node's."""
    if kind == "stub":
        reply = b'{"id":"p-1","results":[{"to":["c1","b","/bench"],"status":"delivered"}]}'
        return (lambda body: reply), None, None
    from twisted.internet import reactor

    from bench.hubcost import BatchingSink
    from orbited.core.keys import ConnectionKey
    from orbited.node.hub import Hub, HubConfig

    hub = Hub(reactor, HubConfig(), epoch="ep")
    for i in range(1000):
        hub.attach(ConnectionKey(f"c{i}", "b", "/bench"), BatchingSink(hub), None)
    return hub.handle_request, hub.batch, getattr(hub, "handle_requests", None)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.spcost", description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=50, help="requests per write (per read)")
    p.add_argument("--batches", type=int, default=400)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--handler", choices=["stub", "hub"], default="stub")
    args = p.parse_args()

    from twisted.internet import reactor as _reactor

    from orbited.node import collector, rep

    reactor: Any = _reactor

    handler, scope, many = build_handler(args.handler)
    results: list[float] = []
    codes: list[int] = []  # the clients' exit codes: 0 when every reply came back
    waiting: list[defer.Deferred[float]] = []

    class TimedRep(rep.RepProtocol):
        started = 0.0

        def connectionMade(self) -> None:  # noqa: N802
            self.started = time.process_time()
            super().connectionMade()

        def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
            super().connectionLost(reason)
            waiting.pop(0).callback(time.process_time() - self.started)

    rep.RepProtocol = TimedRep  # type: ignore[misc]  # what RepFactory builds
    # (many only where the hub has handle_requests: an older tree's RepFactory has no many)
    extra = {"many": many} if many is not None else {}
    factory = rep.RepFactory(handler, clock=reactor, batch=scope, **extra)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    number = port.getHost().port

    @defer.inlineCallbacks
    def run() -> Any:
        collector.tune()
        for i in range(args.reps + 1):
            d: defer.Deferred[float] = defer.Deferred()
            waiting.append(d)
            child = subprocess.Popen(
                [sys.executable, "-c", CLIENT, str(number), str(args.batch), str(args.batches)]
            )
            took = yield d
            codes.append(child.wait())
            if i:  # the first is a warm-up
                results.append(took / (args.batch * args.batches) * 1e6)
        reactor.stop()

    reactor.callWhenRunning(run)
    reactor.run()
    if any(codes) or len(results) != args.reps:
        sys.exit(f"a client failed (exit codes {codes})")
    results.sort()
    tree = Path(rep.__file__).resolve().parents[2]
    print(
        f"{results[0]:.2f} µs of CPU per request (best of {args.reps}; median "
        f"{results[len(results) // 2]:.2f}); handler {args.handler}, {args.batch} per read, "
        f"{args.batches} reads; {tree}"
    )


if __name__ == "__main__":
    main()
