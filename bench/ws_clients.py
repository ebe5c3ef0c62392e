"""Load-generator process: holds many WebSocket connections and timestamps every event.

    python -m bench.ws_clients URLS.json

URLS.json is a list of WebSocket URLs. Prints "ready <n>" once all are connected, then
counts events until a line arrives on stdin; prints one JSON line of results and exits.
Every event's data carries {"t": send time, "ph": phase}; latency = receive - send time.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time

from websockets.asyncio.client import connect

MAX_SAMPLES = 50_000


class Stats:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.latencies: dict[str, list[float]] = {}
        self.seen: dict[str, int] = {}
        self.errors = 0
        self.error_kinds: dict[str, int] = {}

    def record(self, phase: str, latency: float) -> None:
        n = self.seen[phase] = self.seen.get(phase, 0) + 1
        self.counts[phase] = n
        samples = self.latencies.setdefault(phase, [])
        if len(samples) < MAX_SAMPLES:
            samples.append(latency)
        else:  # reservoir sampling keeps a uniform sample of every latency
            j = random.randrange(n)
            if j < MAX_SAMPLES:
                samples[j] = latency


async def hold(url: str, stats: Stats, connected: asyncio.Event, remaining: list[int]) -> None:
    try:
        async with connect(url, open_timeout=60, ping_interval=None, max_queue=None) as ws:
            remaining[0] -= 1
            if remaining[0] == 0:
                connected.set()
            async for message in ws:
                now = time.time()
                if '"event"' not in message:
                    continue
                data = json.loads(message)["data"]
                stats.record(data["ph"], now - data["t"])
    except Exception as e:
        stats.errors += 1
        kind = f"{type(e).__name__}: {e}"[:80]
        stats.error_kinds[kind] = stats.error_kinds.get(kind, 0) + 1
        remaining[0] -= 1
        if remaining[0] == 0:
            connected.set()


async def main(path: str) -> None:
    urls = json.load(open(path))
    stats = Stats()
    connected = asyncio.Event()
    remaining = [len(urls)]
    tasks = []
    for i in range(0, len(urls), 200):  # connect in waves, not all at once
        tasks += [
            asyncio.create_task(hold(u, stats, connected, remaining)) for u in urls[i : i + 200]
        ]
        await asyncio.sleep(0.05)
    await connected.wait()
    print(f"ready {len(urls) - stats.errors}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    for task in tasks:
        task.cancel()
    print(
        json.dumps(
            {
                "counts": stats.counts,
                "latencies": stats.latencies,
                "errors": stats.errors,
                "error_kinds": stats.error_kinds,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
