"""GRIP backend behind Pushpin for the benchmarks: holds every client on its own channel.

The web app a Pushpin user writes, reduced to what the 1:1 dispatch needs. The channel is
the last path segment, so a client of ``/<kind>/<channel>`` receives what is published to
``<channel>``:

- ``GET /sse/<ch>``: ``Grip-Hold: stream`` + ``Grip-Channel`` with a ``text/event-stream``
  head (publish ``http-stream`` content ``data: ...\\n\\n``);
- ``GET /poll/<ch>``: ``Grip-Hold: response`` (publish ``http-response``); no buffer
  between polls, so Pushpin's long-poll loses what arrives between two polls;
- ``POST /ws/<ch>`` with ``Content-Type: application/websocket-events`` (a WebSocket
  through an ``over_http`` route, WebSocket-over-HTTP): ``OPEN`` is accepted with
  ``Sec-WebSocket-Extensions: grip`` and a ``TEXT`` control message
  ``c:{"type":"subscribe","channel":ch}``; later events (``TEXT``, ``PING``, ``CLOSE``)
  get an empty answer (``CLOSE`` echoed). Publish ``ws-message``.

One asyncio process, HTTP/1.1 keep-alive with Content-Length bodies (what Pushpin's
zurl sends). Prints nothing; ``READY_FILE`` gets ``{"port": ..., "pid": ...}`` once
listening.

    python -m bench.grip_backend HOST:PORT READY_FILE
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

WS_EVENTS = "application/websocket-events"


def ws_event(kind: str, content: bytes | None = None) -> bytes:
    """One WebSocket-over-HTTP event: ``TYPE[ hexlen]\\r\\n[content\\r\\n]``."""
    if content is None:
        return f"{kind}\r\n".encode()
    return f"{kind} {len(content):x}\r\n".encode() + content + b"\r\n"


def response(status: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    lines = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def answer(method: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
    kind, _, channel = path.split("?", 1)[0].strip("/").rpartition("/")
    if not channel:
        return response("404 Not Found", {})
    if kind == "sse" and method == "GET":
        return response(
            "200 OK",
            {
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "Grip-Hold": "stream",
                "Grip-Channel": channel,
            },
            b":ok\n\n",
        )
    if kind == "poll" and method == "GET":
        return response(
            "200 OK",
            {
                "Content-Type": "application/json",
                "Grip-Hold": "response",
                "Grip-Channel": channel,
                "Grip-Timeout": "60",
            },
            b"[]",
        )
    if kind == "ws" and headers.get("content-type", "").startswith(WS_EVENTS):
        out = b""
        if body.startswith(b"OPEN"):
            sub = json.dumps({"type": "subscribe", "channel": channel}).encode()
            out = ws_event("OPEN") + ws_event("TEXT", b"c:" + sub)
        elif b"CLOSE" in body:
            out = ws_event("CLOSE", b"\x03\xe8")
        return response(
            "200 OK", {"Content-Type": WS_EVENTS, "Sec-WebSocket-Extensions": "grip"}, out
        )
    return response("404 Not Found", {})


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *lines = head.decode("latin-1").split("\r\n")
            method, path, _ = request_line.split(" ", 2)
            headers = {}
            for line in lines:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            writer.write(answer(method, path, headers, body))
            if headers.get("connection", "").lower() == "close":
                break
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def main(address: str, ready_file: str) -> None:
    host, port = address.rsplit(":", 1)
    server = await asyncio.start_server(serve, host, int(port), backlog=4096)
    bound = server.sockets[0].getsockname()[1]
    with open(ready_file + ".tmp", "w") as f:
        json.dump({"port": bound, "pid": os.getpid()}, f)
    os.replace(ready_file + ".tmp", ready_file)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
