"""Simulated HaloD nodes, many per process: one real TCP control connection each.

    python -m bench.control_nodes CONTROL_ADDRESS NAME [NAME ...]

Speaks the control protocol (orbited/core/control.py) over SP pair0 framing (orbited/sp/wire.py)
with plain non-blocking sockets and one selectors loop, so thousands of nodes at 10 Hz fit
in a process or two. Each node registers, then heartbeats at the interval its ``welcome``
names, on a fixed schedule with a random phase (due times advance by exactly one interval,
so a late loop shows up as lateness, not as a slower rate). Every message from the server
is read; ``assign``, ``route_moved``, ``error`` and closes are kept as timestamped events.

Driven by bench/control.py: one JSON command per line on stdin, one JSON reply per line on
stdout (see ``Sim.command``). Times are ``time.monotonic()``, which is system-wide, so the
driver can compare times taken in different processes. Exits on EOF.
"""

from __future__ import annotations

import collections
import json
import os
import random
import selectors
import socket
import struct
import sys
import time
from typing import Any

from orbited.sp.wire import PAIR_V0, encode_header

HEADER = encode_header(PAIR_V0)
LENGTH = struct.Struct(">Q")
ACK_PREFIX = b'{"type":"heartbeat_ack"'
MAX_RTT_SAMPLES = 200_000


class Node:
    __slots__ = (
        "name", "sock", "inbuf", "outbuf", "state", "role", "node_id", "routes", "seq",
        "due", "beating", "last_sent", "sent", "header_seen", "victim", "generation",
    )  # fmt: skip

    def __init__(self, name: str) -> None:
        self.name = name
        self.sock: socket.socket | None = None
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.state = "new"  # new → registering → up → closed
        self.role: str | None = None
        self.node_id: int | None = None
        self.routes: list[int] = []
        self.seq = 0
        self.due = 0.0
        self.beating = False
        self.last_sent = 0.0
        self.sent: collections.deque[tuple[int, float]] = collections.deque()
        self.header_seen = False
        self.victim = False  # closes and errors are expected (crash / hang victims)
        self.generation = 0  # bumped on every new connection: stale schedule entries skip


class Sim:
    def __init__(self, control: str, names: list[str]) -> None:
        host, port = control.removeprefix("tcp://").rsplit(":", 1)
        self.address = (host, int(port))
        self.nodes = {name: Node(name) for name in names}
        self.sel = selectors.DefaultSelector()
        self.schedule: collections.deque[tuple[float, int, Node]] = collections.deque()
        self.interval = 0.1
        self.to_join: collections.deque[Node] = collections.deque()
        self.join_rate = 0.0
        self.join_window = 1
        self.next_join = 0.0
        self.registering = 0
        self.events: list[dict[str, Any]] = []
        self.unexpected: dict[str, int] = {}  # "closed" / error codes at non-victims
        self.first_unexpected: float | None = None  # when the first of those happened
        self.stdin_buf = b""
        self.running = True
        self.reset()

    # -- counters for a measurement window -----------------------------------------------

    def reset(self) -> None:
        self.t_mark = time.monotonic()
        self.cpu_mark = sum(os.times()[:2])
        self.sent_count = 0
        self.acks = 0
        self.rtts: list[float] = []
        self.max_late = 0.0
        self.late_over_interval = 0
        self.events = []

    # -- connections ---------------------------------------------------------------------

    def connect(self, node: Node) -> None:
        sock = socket.create_connection(self.address, timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        node.sock = sock
        node.inbuf.clear()
        node.outbuf.clear()
        node.header_seen = False
        node.state = "registering"
        node.role = None
        node.node_id = None
        node.routes = []
        node.beating = False
        node.sent.clear()
        node.generation += 1
        self.registering += 1
        self.sel.register(sock, selectors.EVENT_READ, node)
        body = json.dumps({
            "type": "register", "version": 1, "name": node.name,
            "browser": "127.0.0.1:1", "sp": "tcp://127.0.0.1:1", "capacity": 1,
            "hashes": [1, 2],  # as a node of this release (a version-2 table refuses others)
        }, separators=(",", ":")).encode()  # fmt: skip
        self.write(node, HEADER + LENGTH.pack(len(body)) + body)

    def write(self, node: Node, data: bytes) -> None:
        if node.sock is None:
            return
        if node.outbuf:
            node.outbuf += data
            return
        try:
            n = node.sock.send(data)
        except BlockingIOError:
            n = 0
        except OSError:
            self.closed(node, "send failed")
            return
        if n < len(data):
            node.outbuf += data[n:]
            self.sel.modify(node.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, node)

    def flush(self, node: Node) -> None:
        try:
            n = node.sock.send(node.outbuf)
        except BlockingIOError:
            return
        except OSError:
            self.closed(node, "send failed")
            return
        del node.outbuf[:n]
        if not node.outbuf:
            self.sel.modify(node.sock, selectors.EVENT_READ, node)

    def close(self, node: Node) -> None:
        """Drop the connection without a word, as a crashed process would."""
        if node.sock is not None:
            self.sel.unregister(node.sock)
            node.sock.close()
            node.sock = None
        if node.state == "registering":
            self.registering -= 1
        node.state = "closed"
        node.beating = False

    def closed(self, node: Node, why: str) -> None:
        if node.state == "closed":
            return
        self.event(node, "closed", why=why)
        if not node.victim:
            key = "dropped while registering" if node.state == "registering" else "closed"
            self.count_unexpected(key)
        self.close(node)

    def count_unexpected(self, key: str) -> None:
        self.unexpected[key] = self.unexpected.get(key, 0) + 1
        if self.first_unexpected is None:
            self.first_unexpected = time.monotonic()

    def event(self, node: Node, kind: str, **fields: Any) -> None:
        self.events.append({"t": time.monotonic(), "name": node.name, "type": kind, **fields})

    # -- receiving -----------------------------------------------------------------------

    def readable(self, node: Node) -> None:
        try:
            data = node.sock.recv(262144)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.closed(node, "eof")
            return
        buf = node.inbuf
        buf += data
        pos = 0
        if not node.header_seen:
            if len(buf) < 8:
                return
            if bytes(buf[:8]) != HEADER:
                self.closed(node, "bad SP header")
                return
            node.header_seen = True
            pos = 8
        end = len(buf)
        while end - pos >= 8:
            (length,) = LENGTH.unpack_from(buf, pos)
            if end - pos - 8 < length:
                break
            body = bytes(buf[pos + 8 : pos + 8 + length])
            pos += 8 + length
            self.message(node, body)
            if node.state == "closed":
                return
        del buf[:pos]

    def message(self, node: Node, body: bytes) -> None:
        if body.startswith(ACK_PREFIX):
            seq = int(body[body.rindex(b":") + 1 : -1])
            sent = node.sent
            while sent and sent[0][0] < seq:
                sent.popleft()
            if sent and sent[0][0] == seq:
                if len(self.rtts) < MAX_RTT_SAMPLES:
                    self.rtts.append(time.monotonic() - sent.popleft()[1])
                else:
                    sent.popleft()
            self.acks += 1
            return
        msg = json.loads(body)
        kind = msg.get("type")
        if kind == "welcome":
            node.state = "up"
            self.registering -= 1
            node.role, node.node_id = msg.get("role"), msg.get("node_id")
            node.routes = msg.get("routes") or []
            self.interval = float(msg.get("heartbeat_interval", self.interval))
            node.beating = True
            node.due = time.monotonic() + random.random() * self.interval
            self.insert(node)
            self.event(node, "welcome", role=node.role, n_routes=len(node.routes))
        elif kind == "assign":
            node.role, node.node_id = msg.get("role"), msg.get("node_id")
            node.routes = msg.get("routes") or []
            self.event(node, "assign", role=node.role, routes=node.routes)
        elif kind == "route_moved":
            self.event(node, "route_moved", routes=[m["route"] for m in msg.get("moves", [])])
        elif kind == "error":
            code = msg.get("code", "?")
            self.event(node, "error", code=code)
            if not node.victim:
                self.count_unexpected(code)
        else:
            self.event(node, str(kind))

    # -- heartbeats ----------------------------------------------------------------------

    def insert(self, node: Node) -> None:
        """Keep the schedule sorted by due time. Everyone shares one interval, so a node
        re-queued at due + interval (or a new one at now + phase < now + interval) almost
        always belongs at the end; the rare exception is walked into place."""
        entry = (node.due, node.generation, node)
        schedule = self.schedule
        if not schedule or schedule[-1][0] <= node.due:
            schedule.append(entry)
            return
        i = len(schedule)
        while i > 0 and schedule[i - 1][0] > node.due:
            i -= 1
        schedule.insert(i, entry)

    def beat(self, now: float) -> None:
        schedule = self.schedule
        interval = self.interval
        while schedule and schedule[0][0] <= now:
            due, generation, node = schedule.popleft()
            if not node.beating or generation != node.generation:
                continue
            late = now - due
            if late > self.max_late:
                self.max_late = late
            if late > interval:
                self.late_over_interval += 1
            node.seq += 1
            body = b'{"type":"heartbeat","seq":%d,"connections":0}' % node.seq
            node.sent.append((node.seq, now))
            if len(node.sent) > 64:
                node.sent.popleft()
            node.last_sent = now
            self.sent_count += 1
            self.write(node, LENGTH.pack(len(body)) + body)
            node.due = due + interval
            if node.due < now:  # too late to catch up: keep the rate, skip the backlog
                node.due = now + interval
            schedule.append((node.due, node.generation, node))

    def join_some(self, now: float) -> None:
        while (
            self.to_join
            and self.registering < self.join_window
            and (self.join_rate <= 0 or now >= self.next_join)
        ):
            node = self.to_join.popleft()
            try:
                self.connect(node)
            except OSError as e:
                self.event(node, "connect_failed", why=str(e))
                self.count_unexpected("connect_failed")
                continue
            if self.join_rate > 0:
                self.next_join = max(self.next_join + 1 / self.join_rate, now - 0.05)

    # -- commands from the driver --------------------------------------------------------

    def command(self, cmd: dict[str, Any]) -> dict[str, Any]:
        op = cmd["cmd"]
        if op == "join":  # register every node not yet registered, paced
            self.join_rate, self.join_window = float(cmd["rate"]), int(cmd["window"])
            self.next_join = time.monotonic()
            self.to_join.extend(n for n in self.nodes.values() if n.state == "new")
            return {"ok": True}
        if op == "status":
            roles: dict[str, int] = {}
            for n in self.nodes.values():
                if n.state == "up":
                    roles[n.role or "?"] = roles.get(n.role or "?", 0) + 1
            return {
                "up": sum(1 for n in self.nodes.values() if n.state == "up"),
                "waiting": len(self.to_join) + self.registering,
                "roles": roles,
                "unexpected": self.unexpected,
                "first_unexpected": self.first_unexpected,
            }
        if op == "mark":
            self.reset()
            return {"t": self.t_mark}
        if op == "stats":
            now = time.monotonic()
            rtts = sorted(self.rtts)

            def pct(q: float) -> float | None:
                return rtts[min(len(rtts) - 1, int(q * len(rtts)))] if rtts else None

            return {
                "seconds": now - self.t_mark,
                "cpu": sum(os.times()[:2]) - self.cpu_mark,
                "sent": self.sent_count,
                "acks": self.acks,
                "rtt_p50": pct(0.5),
                "rtt_p99": pct(0.99),
                "rtt_max": rtts[-1] if rtts else None,
                "max_late": self.max_late,
                "late_over_interval": self.late_over_interval,
                "unexpected": self.unexpected,
            }
        if op == "nodes":
            return {
                "nodes": [
                    [n.name, n.role, n.node_id]
                    for n in self.nodes.values()
                    if n.state == "up" and not n.victim
                ]
            }
        if op == "crash":  # close the connection abruptly
            node = self.nodes[cmd["name"]]
            node.victim = True
            routes = list(node.routes)
            self.close(node)
            return {"t": time.monotonic(), "routes": routes}
        if op == "hang":  # stop heartbeating, keep the connection open
            node = self.nodes[cmd["name"]]
            node.victim = True
            node.beating = False
            return {"t": time.monotonic(), "t_last": node.last_sent, "routes": list(node.routes)}
        if op == "rejoin":  # the victim comes back as a new node (it is a spare now)
            node = self.nodes[cmd["name"]]
            if node.state != "closed":
                self.close(node)
            node.victim = False
            node.state = "new"
            self.connect(node)
            return {"ok": True}
        if op == "events":
            since = float(cmd.get("since", 0))
            return {"events": [e for e in self.events if e["t"] >= since]}
        if op == "quit":
            self.running = False
            return {"ok": True}
        return {"error": f"unknown command {op!r}"}

    def stdin_readable(self) -> None:
        data = os.read(0, 65536)
        if not data:
            self.running = False
            return
        self.stdin_buf += data
        while b"\n" in self.stdin_buf:
            line, self.stdin_buf = self.stdin_buf.split(b"\n", 1)
            if line.strip():
                reply = self.command(json.loads(line))
                sys.stdout.write(json.dumps(reply) + "\n")
                sys.stdout.flush()

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> None:
        self.sel.register(0, selectors.EVENT_READ, None)
        read_ready, write_ready = selectors.EVENT_READ, selectors.EVENT_WRITE
        while self.running:
            now = time.monotonic()
            self.beat(now)
            self.join_some(now)
            timeout = 0.05
            if self.schedule:
                timeout = min(timeout, self.schedule[0][0] - now)
            if self.to_join and self.registering < self.join_window and self.join_rate > 0:
                timeout = min(timeout, self.next_join - now)
            for key, mask in self.sel.select(max(0.0, timeout)):
                node = key.data
                if node is None:
                    self.stdin_readable()
                    continue
                if node.sock is None:
                    continue
                if mask & write_ready:
                    self.flush(node)
                    if node.sock is None:
                        continue
                if mask & read_ready:
                    self.readable(node)
        for node in self.nodes.values():
            if node.sock is not None:
                node.sock.close()


def main(argv: list[str]) -> int:
    random.seed(os.getpid())
    Sim(argv[0], argv[1:]).run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
