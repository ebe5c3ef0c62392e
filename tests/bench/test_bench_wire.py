"""bench/wire.py, the simulated browsers' connections, checked against the node's own
RFC 6455 framing (orbited/node/transports/wsframe.py) and a scripted server, without a
network: what the generator sends must be what a browser sends, and it must read every
framing a server may use."""

from __future__ import annotations

import asyncio

import pytest

from bench.wire import HTTPConn, HTTPStatusError, WSClosed, WSConn
from orbited.node.transports import wsframe


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.sent = b""
        self.aborted = False

    def write(self, data: bytes) -> None:  # type: ignore[override]
        self.sent += data

    def is_closing(self) -> bool:
        return self.aborted

    def abort(self) -> None:
        self.aborted = True


def upgraded_ws(loop: asyncio.AbstractEventLoop, got: list[bytes]) -> tuple[WSConn, FakeTransport]:
    ws, transport = WSConn(loop, got.append), FakeTransport()
    ws.connection_made(transport)
    ws.upgrade("127.0.0.1", 8000, "/orbited/ws?token=t")
    head = dict(line.split(b": ", 1) for line in transport.sent.split(b"\r\n")[1:] if b": " in line)
    key = head[b"Sec-WebSocket-Key"]
    ws.data_received(wsframe.handshake_response(key))
    transport.sent = b""
    return ws, transport


def test_client_frames_are_masked_and_read_by_the_node_s_parser():
    loop = asyncio.new_event_loop()
    try:
        ws, transport = upgraded_ws(loop, [])
        assert ws._upgraded.done() and ws._upgraded.exception() is None
        for payload in (b"", b'{"type":"ack","seq":7}', b"x" * 200, "é".encode() * 40000):
            ws.send_text(payload)
            assert transport.sent[1] & 0x80  # masked, as a browser must
            messages = wsframe.ClientFrames(1 << 20).feed(transport.sent)
            assert [(m.opcode, m.payload) for m in messages] == [(wsframe.OP_TEXT, payload)]
            transport.sent = b""
    finally:
        loop.close()


def test_server_frames_in_any_split_fragmented_and_control_frames():
    loop = asyncio.new_event_loop()
    try:
        got: list[bytes] = []
        ws, transport = upgraded_ws(loop, got)
        big = b"y" * 70000  # a 64-bit length
        stream = (
            wsframe.frame(wsframe.OP_TEXT, b'{"a":1}')
            + wsframe.frame(wsframe.OP_TEXT, b"z" * 300)  # a 16-bit length
            + bytes([0x01, 3]) + b"abc" + wsframe.frame(wsframe.OP_PING, b"p")
            + bytes([0x80, 2]) + b"de"  # fragments with a ping between them
            + wsframe.frame(wsframe.OP_TEXT, big)
        )  # fmt: skip
        for i in range(len(stream)):  # one byte at a time: every split
            ws.data_received(stream[i : i + 1])
        assert got == [b'{"a":1}', b"z" * 300, b"abcde", big]
        pong = wsframe.ClientFrames(1000).feed(transport.sent)
        assert [(m.opcode, m.payload) for m in pong] == [(wsframe.OP_PONG, b"p")]
        ws.data_received(wsframe.close_frame(4401, "token expired"))
        error = ws.closed.exception()
        assert isinstance(error, WSClosed) and (error.code, error.reason) == (4401, "token expired")
        assert transport.aborted
    finally:
        loop.close()


def test_a_refused_upgrade_is_an_http_status_error():
    loop = asyncio.new_event_loop()
    try:
        ws, transport = WSConn(loop, print), FakeTransport()
        ws.connection_made(transport)
        ws.upgrade("127.0.0.1", 8000, "/orbited/ws")
        ws.data_received(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 2\r\n\r\n{}")
        error = ws._upgraded.exception()
        assert isinstance(error, HTTPStatusError) and error.status == 401
        ws, transport = WSConn(loop, print), FakeTransport()
        ws.connection_made(transport)
        ws.upgrade("127.0.0.1", 8000, "/orbited/ws")
        bad = b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: nope\r\n\r\n"
        ws.data_received(bad)  # a 101 for another key is no upgrade
        assert isinstance(ws._upgraded.exception(), HTTPStatusError)
    finally:
        loop.close()


def test_a_stream_whole_in_one_read_is_still_handed_to_its_consumer():
    # The node's answer to an SSE request that is a reconnect frame and the stream's end
    # comes in one read, before the browser starts reading the stream. Before, the
    # message's end dropped the chunks: the frame was lost, the browser saw a stream that
    # ended for no reason and came back to the same port (an audit: SSE browsers never
    # followed a rehash).
    loop = asyncio.new_event_loop()
    try:
        conn, transport = HTTPConn(loop, "127.0.0.1", 8000), FakeTransport()
        conn.connection_made(transport)
        conn.send("GET", "/orbited/sse")
        frame = b'data: {"type":"reconnect","reason":"route_moved","route":7}\n\n'
        conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                           + b"%x\r\n%s\r\n0\r\n\r\n" % (len(frame), frame))  # fmt: skip
        chunks: list[bytes] = []
        conn.stream(chunks.append)
        assert b"".join(chunks) == frame and conn._done.done()
        conn.send("GET", "/orbited/poll")  # the next request starts with none
        conn.stream(chunks.append)
        assert b"".join(chunks) == frame
    finally:
        loop.close()


@pytest.mark.parametrize("split", [1, 7, 1000])
def test_http_responses_chunked_with_length_and_until_eof(split):
    loop = asyncio.new_event_loop()
    try:
        conn, transport = HTTPConn(loop, "127.0.0.1", 8000), FakeTransport()
        conn.connection_made(transport)

        def feed(data: bytes) -> None:
            for i in range(0, len(data), split):
                conn.data_received(data[i : i + split])

        conn.send("GET", "/orbited/poll?x=1")
        assert transport.sent.startswith(b"GET /orbited/poll?x=1 HTTP/1.1\r\nHost: 127.0.0.1:8000")
        feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        assert conn._head.result()[0] == 200 and conn._done.result() == b"hello"
        assert conn.reusable
        conn.send("GET", "/orbited/sse")
        chunks: list[bytes] = []
        feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nab")
        conn.stream(chunks.append)  # what came before the consumer is handed over first
        feed(b"c\r\n2\r\nde\r\n0\r\n\r\n")
        assert b"".join(chunks) == b"abcde" and conn._done.done()
        conn.send("GET", "/orbited/iframe")
        feed(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil eof")
        conn.connection_lost(None)
        assert conn._done.result() == b"until eof" and not conn.reusable
    finally:
        loop.close()
