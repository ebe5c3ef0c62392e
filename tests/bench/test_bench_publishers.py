"""The bench's publisher connections (bench/peers.py). ``_SPReq`` against a REP peer on
loopback that answers out of order: every reply reaches its request, in the order sent,
and no more than the window is ever in flight."""

from __future__ import annotations

import asyncio

from bench.peers import _HTTPPipe, _SPReq, _Statuses
from orbited.sp import wire


async def _exchange(window: int, batches: list[list[bytes]]) -> tuple[list[list[bytes]], int]:
    most = 0
    held: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal most
        sp = wire.SPConnection(wire.REP, wire.REQ)
        writer.write(wire.encode_header(wire.REP))
        while data := await reader.read(1 << 16):
            held.extend(sp.receive(data))
            most = max(most, len(held))
            await asyncio.sleep(0.01)  # let more arrive: answered in groups, last first
            while held:
                request = held.pop()
                writer.write(wire.encode_message(request[:4] + b"re:" + request[4:]))

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    conn = _SPReq(f"tcp://127.0.0.1:{port}", window)
    try:
        got = await asyncio.gather(*(conn.send_all(b) for b in batches))
    finally:
        await conn.close()
        server.close()
    return got, most


def test_replies_reach_their_requests_within_the_window() -> None:
    batches = [[b"%d-%d" % (b, i) for i in range(n)] for b, n in enumerate((1, 7, 25, 3))]
    got, most = asyncio.run(_exchange(5, batches))
    assert got == [[b"re:" + body for body in batch] for batch in batches]
    assert 1 < most <= 5


_PARTS = [
    b"HTTP/1.1 201 Created\r\nServer: nginx\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\n3;x=1\r\nabc\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
]
_RESPONSES = b"".join(_PARTS)


def test_pipelined_http_responses_are_cut_wherever_a_read_ends() -> None:
    """The HTTP publishers' responses (Content-Length, chunked, a close), in two reads cut
    anywhere: none counted before it is whole, each once it is, the close with the last."""
    ends = [sum(len(p) for p in _PARTS[: i + 1]) for i in range(3)]
    for cut in range(len(_RESPONSES) + 1):
        out: list[int] = []
        statuses = _Statuses(out)
        statuses.parser.feed_data(_RESPONSES[:cut])
        assert out == [s for s, end in zip([201, 202, 200], ends, strict=True) if end <= cut]
        assert statuses.closed is (cut == len(_RESPONSES))
        statuses.parser.feed_data(_RESPONSES[cut:])
        assert out == [201, 202, 200] and statuses.closed


def test_an_http_pipe_reads_every_pipelined_response() -> None:
    async def run() -> list[int]:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen = b""
            while seen.count(b"\r\n\r\n") < 3:
                seen += await reader.read(1 << 16)
            for i in range(0, len(_RESPONSES), 7):  # in small pieces
                writer.write(_RESPONSES[i : i + 7])
                await writer.drain()
                await asyncio.sleep(0)

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        pipe = _HTTPPipe(server.sockets[0].getsockname()[:2])
        try:
            return await pipe.exchange([b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"] * 3)
        finally:
            await pipe.close()
            server.close()

    assert asyncio.run(run()) == [201, 202, 200]


async def _answering(first: int, port: int = 0) -> asyncio.Server:
    """A REP peer that answers ``first`` requests of each connection, then resets it."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sp = wire.SPConnection(wire.REP, wire.REQ)
        writer.write(wire.encode_header(wire.REP))
        answered = 0
        while data := await reader.read(1 << 16):
            for request in sp.receive(data):
                if answered == first:
                    writer.transport.abort()
                    return
                writer.write(wire.encode_message(request[:4] + b"ok"))
                answered += 1

    return await asyncio.start_server(serve, "127.0.0.1", port)


def test_a_lost_connection_keeps_the_replies_that_came_and_the_next_send_reconnects() -> None:
    async def run() -> list[list[str]]:
        server = await _answering(1)
        conn = _SPReq(f"tcp://127.0.0.1:{server.sockets[0].getsockname()[1]}", 10)
        try:
            got = [await asyncio.wait_for(conn.send_all([b"a"] * 3), 5)]
            got.append(await asyncio.wait_for(conn.send_all([b"b"]), 5))
        finally:
            await conn.close()
            server.close()
        return [[r.decode() if isinstance(r, bytes) else type(r).__name__ for r in g] for g in got]

    first, again = asyncio.run(run())
    assert first == ["ok", "ConnectionError", "ConnectionError"]
    assert again == ["ok"]  # a new connection


def test_a_failed_connect_is_tried_again_by_the_next_send() -> None:
    async def run() -> tuple[list[object], list[object]]:
        probe = await _answering(0)  # a port nothing listens on once it is closed
        port = probe.sockets[0].getsockname()[1]
        probe.close()
        await probe.wait_closed()
        conn = _SPReq(f"tcp://127.0.0.1:{port}", 10)
        refused = await asyncio.wait_for(conn.send_all([b"a"]), 5)
        server = await _answering(100, port)
        try:
            answered = await asyncio.wait_for(conn.send_all([b"a"]), 5)
        finally:
            await conn.close()
            server.close()
        return refused, answered

    refused, answered = asyncio.run(run())
    assert [type(r).__name__ for r in refused] == ["ConnectionRefusedError"]
    assert answered == [b"ok"]
