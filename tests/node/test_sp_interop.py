"""Our REP against nng's own REP (pynng Rep0), fed the same raw bytes: same outcome.

Outcomes: "answered" (reply with the same backtrace), "dropped" (no reply, connection
kept), "closed" (connection closed). See docs/sp.md, "Errors and limits".
"""

from __future__ import annotations

import socket
import threading

import pynng
import pytest

from orbited.sp import wire
from tests.conftest import NodeProcess

pytestmark = pytest.mark.slow

HOP = bytes.fromhex("00000001")
ID = bytes.fromhex("80000007")
PING = b'{"op":"ping"}'


def nng_rep_echo(address: str) -> pynng.Rep0:
    rep = pynng.Rep0(listen=address, recv_timeout=100)

    def serve() -> None:
        while True:
            try:
                msg = rep.recv_msg()
            except pynng.Timeout:
                continue
            except pynng.NNGException:
                return
            try:
                rep.send(b'{"ok":true}' if msg.bytes else b"")
            except pynng.NNGException:
                return

    threading.Thread(target=serve, daemon=True).start()
    return rep


FOLLOW_UP = bytes.fromhex("80000008")


def outcome(address: str, body: bytes) -> tuple[str, bytes]:
    """Send ``body``, then a valid request; the first reply tells whether ``body`` was
    answered or dropped (both REPs answer in order here), no reply that it closed."""
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(wire.encode_header(wire.REQ))
        assert sock.recv(8) == wire.encode_header(wire.REP)
        sock.sendall(wire.encode_message(body) + wire.encode_message(FOLLOW_UP + PING))
        conn = wire.SPConnection(wire.REQ, wire.REP)
        conn.receive(wire.encode_header(wire.REP))
        replies: list[bytes] = []
        while not replies:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                return "closed", b""
            replies = conn.receive(data)
        if replies[0].startswith(FOLLOW_UP):
            return "dropped", b""
        return "answered", replies[0]


CASES = {
    "direct": ID + PING,
    "7 hops": HOP * 7 + ID + PING,
    "8 hops (9 words)": HOP * 8 + ID + PING,
    "8 hop words, no id": HOP * 8,
    "no id": HOP * 2,
    "partial word": ID[:2],
}


@pytest.fixture(scope="module")
def nng_address():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    rep = nng_rep_echo(address)
    yield address
    rep.close()


@pytest.mark.parametrize("name", CASES)
def test_same_outcome_as_nng(name: str, nng_address: str, shared_node: NodeProcess):
    theirs = outcome(nng_address, CASES[name])
    ours = outcome(shared_node.sp, CASES[name])
    assert ours[0] == theirs[0], f"{name}: nng {theirs[0]}, orbited {ours[0]}"
    if ours[0] == "answered":
        backtrace = CASES[name][: CASES[name].index(ID) + 4]
        assert theirs[1].startswith(backtrace) and ours[1].startswith(backtrace)


# -- A request followed by FIN (half-close): docs/sp.md, "Half-close" -----------------------


def request_then_fin(address: str, body: bytes) -> bytes:
    """Header and one request, then shutdown(SHUT_WR); everything read until the close."""
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(wire.encode_header(wire.REQ) + wire.encode_message(body))
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    return data


def test_a_request_followed_by_fin_is_answered_every_time(shared_node: NodeProcess):
    """20 of 20, then the node closes (it had answered none or some: it closed the
    connection when reading hit the FIN, before the reply left)."""
    answered = 0
    for i in range(20):
        req_id = (0x80000100 + i).to_bytes(4, "big")
        data = request_then_fin(shared_node.sp, req_id + b'{"op":"ping","id":"fin%d"}' % i)
        conn = wire.SPConnection(wire.REQ, wire.REP)
        replies = conn.receive(data)
        if replies == [req_id + b'{"id":"fin%d","ok":true,"results":[]}' % i]:
            answered += 1
    assert answered == 20


def test_pipelined_requests_then_fin_all_answered(shared_node: NodeProcess):
    bodies = [(0x80000200 + i).to_bytes(4, "big") + b'{"op":"ping","id":"p%d"}' % i
              for i in range(50)]  # fmt: skip
    host, port = shared_node.sp.removeprefix("tcp://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(wire.encode_header(wire.REQ)
                     + b"".join(wire.encode_message(b) for b in bodies))  # fmt: skip
        sock.shutdown(socket.SHUT_WR)
        conn = wire.SPConnection(wire.REQ, wire.REP)
        replies: list[bytes] = []
        while chunk := sock.recv(65536):
            replies += conn.receive(chunk)
    assert [r[:4] for r in replies] == [b[:4] for b in bodies]
