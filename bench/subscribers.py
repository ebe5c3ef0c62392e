"""Load-generator process: many subscribers of one server, timestamping every event.

Generalises the former bench/ws_clients.py to every server of bench/peers.py and every
transport: WebSocket, SSE (EventSource-style, also Pushpin's http-stream) and long-poll.
Each subscriber is a small asyncio Protocol speaking HTTP/1.1 and RFC 6455 itself (a
server-to-client frame is unmasked; nothing but pongs and a close go back), so one process
holds thousands of connections at a few µs per event: the clients must not be the
bottleneck, and each process reports its CPU and event-loop lag so that can be checked.

    python -m bench.subscribers CONFIG.json

CONFIG: ``{"flavour": "orbited"|"raw"|"nchan"|"pushpin", "transport": "ws"|"sse"|"poll",
"urls": [...], "connect_rate": 1000}``. Connects at most ``connect_rate`` per second,
retrying a failed connect 3 times (0.5–4 s apart). Prints ``ready <connected> <failed>
<JSON list of the failed URLs' indices>`` once every subscriber connected or gave up (the
driver sends nothing to those), then obeys stdin lines:

- ``stats``: print one JSON line (below) and go on;
- ``stop``: print the JSON line, close everything and exit.

Every event's data is a JSON object ``{"t": send time (time.time()), "ph": phase, ...}``;
the server may wrap it (Orbited's ``{"type":"event","seq":…,"data":…}``). The JSON line:
``{"counts": {phase: n}, "latencies": {phase: [s, … ≤ 20 000 uniform samples]},
"buckets": {"<int(time*4)>": n}`` (receive-time histogram, ¼ s), ``"errors": {kind: n},
"closed": n`` (connections the server ended), ``"lag": [[time, seconds], …]`` (how late a
0.1 s timer fired, one sample per second: the loop's own backlog), ``"cpu_s": …``}.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import resource
import sys
import time
from typing import Any
from urllib.parse import urlsplit

MAX_SAMPLES = 20_000


class Stats:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.latencies: dict[str, list[float]] = {}
        self.buckets: dict[int, int] = {}
        self.errors: dict[str, int] = {}
        self.closed = 0
        self.lag: list[tuple[float, float]] = []

    def event(self, data: Any, now: float) -> None:
        phase = data["ph"]
        n = self.counts[phase] = self.counts.get(phase, 0) + 1
        samples = self.latencies.setdefault(phase, [])
        latency = now - data["t"]
        if len(samples) < MAX_SAMPLES:
            samples.append(latency)
        else:  # reservoir sampling: a uniform sample of every latency of the phase
            j = random.randrange(n)
            if j < MAX_SAMPLES:
                samples[j] = latency
        bucket = int(now * 4)
        self.buckets[bucket] = self.buckets.get(bucket, 0) + 1

    def frame(self, obj: Any, now: float) -> None:
        """One server frame: the event data itself (Nchan, Pushpin), or wrapped (Orbited,
        raw); hello/ping/other frames are ignored."""
        if isinstance(obj, dict):
            if "t" in obj:
                self.event(obj, now)
            elif obj.get("type") == "event":
                self.event(obj["data"], now)

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def report(self) -> dict[str, Any]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "counts": self.counts,
            "latencies": self.latencies,
            "buckets": {str(k): v for k, v in self.buckets.items()},
            "errors": self.errors,
            "closed": self.closed,
            "lag": self.lag,
            "cpu_s": usage.ru_utime + usage.ru_stime,
        }


class Subscriber(asyncio.Protocol):
    """One client: WebSocket, an SSE stream, or a long-poll loop on one keep-alive
    connection, chosen by ``transport``; ``opened`` resolves at the first response."""

    def __init__(self, url: str, flavour: str, transport: str, stats: Stats) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.target = parts.path + (f"?{parts.query}" if parts.query else "")
        self.flavour, self.transport, self.stats = flavour, transport, stats
        self.opened: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.buffer = b""
        self.head_done = False
        self.chunked = False
        self.remaining = -1  # Content-Length left of a poll response (-1: until chunked end)
        self.body = b""  # bytes of the current poll response / SSE line buffer
        self.headers: dict[str, str] = {}
        self.position: str | None = None  # Orbited long-poll: last=<stream>:<seq>
        self.etag: tuple[str, str] | None = None  # Nchan long-poll: Last-Modified, Etag
        self.transport_: asyncio.Transport | None = None
        self.fragments: list[bytes] = []

    # -- requests ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport_ = transport  # type: ignore[assignment]
        self._request()
        if self.transport == "poll" and self.flavour != "orbited" and not self.opened.done():
            self.opened.set_result(True)  # a held poll has no answer to wait for

    def _request(self) -> None:
        lines = [f"GET {self._target()} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        if self.transport == "ws":
            key = base64.b64encode(os.urandom(16)).decode()
            lines += ["Upgrade: websocket", "Connection: Upgrade", f"Sec-WebSocket-Key: {key}",
                      "Sec-WebSocket-Version: 13"]  # fmt: skip
        elif self.transport == "sse":
            lines += ["Accept: text/event-stream", "Cache-Control: no-cache"]
        elif self.etag is not None:
            lines += [f"If-Modified-Since: {self.etag[0]}", f"If-None-Match: {self.etag[1]}"]
        assert self.transport_ is not None
        self.transport_.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        self.head_done = False

    def _target(self) -> str:
        if self.transport == "poll" and self.flavour == "orbited":
            if self.position is None:  # the first poll answers at once: registered
                return self.target + "&timeout=0"
            return self.target + f"&timeout=60&last={self.position}"
        return self.target

    # -- responses ---------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        try:
            self._consume()
        except Exception as e:  # noqa: BLE001 - a protocol error ends this client, counted
            self._fail(f"{type(e).__name__}: {e}"[:80])

    def _consume(self) -> None:
        while self.buffer:
            if not self.head_done:
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                head, self.buffer = self.buffer[:end].decode("latin-1"), self.buffer[end + 4 :]
                status_line, *lines = head.split("\r\n")
                status = int(status_line.split(" ", 2)[1])
                self.headers = {}
                for line in lines:
                    name, _, value = line.partition(":")
                    self.headers[name.strip().lower()] = value.strip()
                if status not in (101, 200, 304):
                    self._fail(f"HTTP {status}")
                    return
                self.head_done = True
                self.chunked = self.headers.get("transfer-encoding", "").lower() == "chunked"
                length = self.headers.get("content-length")
                self.remaining = int(length) if length is not None else -1
                if not self.opened.done():
                    self.opened.set_result(True)
                if self.transport == "poll" and self.flavour == "nchan" and status == 200:
                    self.etag = (self.headers.get("last-modified", ""),
                                 self.headers.get("etag", ""))  # fmt: skip
                if self.transport != "ws" and self.remaining == 0 and not self.chunked:
                    self._response_end()
                continue
            if self.transport == "ws":
                if not self._ws_frames():
                    return
            elif self.chunked:
                if not self._chunk():
                    return
            else:
                self._body(self._take_plain())

    def _take_plain(self) -> bytes:
        if self.remaining < 0:  # until EOF (SSE without chunking)
            data, self.buffer = self.buffer, b""
            return data
        data, self.buffer = self.buffer[: self.remaining], self.buffer[self.remaining :]
        self.remaining -= len(data)
        if self.remaining == 0:
            self._body(data)
            self._response_end()
            return b""
        return data

    def _chunk(self) -> bool:
        """Decode one chunk of a chunked body; False when more bytes are needed."""
        end = self.buffer.find(b"\r\n")
        if end < 0:
            return False
        size = int(self.buffer[:end].split(b";", 1)[0] or b"0", 16)
        if len(self.buffer) < end + 2 + size + 2:
            return False
        data = self.buffer[end + 2 : end + 2 + size]
        self.buffer = self.buffer[end + 2 + size + 2 :]
        if size == 0:
            self._response_end()
        else:
            self._body(data)
        return True

    def _body(self, data: bytes) -> None:
        if not data:
            return
        if self.transport == "sse":
            self.body += data
            *lines, self.body = self.body.split(b"\n")
            now = time.time()
            for line in lines:
                if line.startswith(b"data:"):
                    self.stats.frame(json.loads(line[5:]), now)
        else:
            self.body += data

    def _response_end(self) -> None:
        """A long-poll answer is complete: count its events, ask again."""
        if self.transport != "poll":
            self.stats.closed += 1
            self._close()
            return
        body, self.body = self.body, b""
        now = time.time()
        if body:
            frames = json.loads(body)
            if self.flavour == "orbited":
                for frame in frames:
                    if frame.get("type") == "hello":
                        self.position = f"{frame['stream']}:{frame['seq']}"
                    elif frame.get("type") == "event":
                        self.position = f"{self.position.split(':')[0]}:{frame['seq']}"  # type: ignore[union-attr]
                    self.stats.frame(frame, now)
            else:
                self.stats.frame(frames, now)
        if self.headers.get("connection", "").lower() == "close":
            self.stats.closed += 1
            self._close()
            return
        self._request()

    def _ws_frames(self) -> bool:
        """Parse whole frames from the buffer; False when more bytes are needed."""
        buf = self.buffer
        if len(buf) < 2:
            return False
        opcode, n = buf[0] & 0x0F, buf[1] & 0x7F
        offset = 2
        if n == 126:
            if len(buf) < 4:
                return False
            n, offset = int.from_bytes(buf[2:4], "big"), 4
        elif n == 127:
            if len(buf) < 10:
                return False
            n, offset = int.from_bytes(buf[2:10], "big"), 10
        if len(buf) < offset + n:
            return False
        payload, self.buffer = buf[offset : offset + n], buf[offset + n :]
        fin = buf[0] & 0x80
        if opcode in (0, 1, 2):
            self.fragments.append(payload)
            if fin:
                message, self.fragments = b"".join(self.fragments), []
                self.stats.frame(json.loads(message), time.time())
        elif opcode == 9:  # ping → pong (masked with a zero key, as RFC 6455 allows)
            self._ws_send(0xA, payload)
        elif opcode == 8:
            self.stats.closed += 1
            self._close()
        return True

    def _ws_send(self, opcode: int, payload: bytes) -> None:
        assert self.transport_ is not None and len(payload) < 126
        self.transport_.write(bytes([0x80 | opcode, 0x80 | len(payload)]) + b"\0\0\0\0" + payload)

    # -- ends --------------------------------------------------------------------------

    def _fail(self, kind: str) -> None:
        self.stats.error(kind)
        if not self.opened.done():
            self.opened.set_result(False)
        self._close()

    def _close(self) -> None:
        if self.transport_ is not None:
            self.transport_.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.stats.error(f"closed before the response: {exc!r}"[:80])
            self.opened.set_result(False)


async def lag_monitor(stats: Stats) -> None:
    loop = asyncio.get_running_loop()
    last_sample = 0.0
    while True:
        start = loop.time()
        await asyncio.sleep(0.1)
        late = loop.time() - start - 0.1
        now = time.time()
        if now - last_sample >= 1.0 or late > 0.05:
            stats.lag.append((round(now, 3), round(late, 4)))
            last_sample = now


async def main(path: str) -> None:
    config = json.load(open(path))
    stats = Stats()
    loop = asyncio.get_running_loop()
    rate = config.get("connect_rate", 1000)
    monitor = asyncio.create_task(lag_monitor(stats))

    async def connect(url: str) -> Subscriber | None:
        """Connect, retrying a refused or reset connect (a real client reconnects too)."""
        for attempt in range(4):
            if attempt:
                await asyncio.sleep(0.5 * attempt + random.random())
            sub = Subscriber(url, config["flavour"], config["transport"], stats)
            try:
                await asyncio.wait_for(
                    loop.create_connection(lambda s=sub: s, sub.host, sub.port), timeout=60
                )
                if await asyncio.wait_for(asyncio.shield(sub.opened), timeout=60):
                    return sub
            except (OSError, TimeoutError) as e:
                stats.error(f"connect: {type(e).__name__}: {e}"[:80])
            sub._close()
        return None

    tasks = []
    wave = max(1, rate // 20)
    for i in range(0, len(config["urls"]), wave):  # connect in waves of 50 ms, not at once
        tasks += [asyncio.create_task(connect(u)) for u in config["urls"][i : i + wave]]
        await asyncio.sleep(0.05)
    subs = list(await asyncio.gather(*tasks))
    failed = [i for i, sub in enumerate(subs) if sub is None]
    print(f"ready {len(subs) - len(failed)} {len(failed)} {json.dumps(failed)}", flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).decode().strip():
        print(json.dumps(stats.report()), flush=True)
        if line == "stop":
            break
    monitor.cancel()
    for sub in subs:
        if sub is not None:
            sub._close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
