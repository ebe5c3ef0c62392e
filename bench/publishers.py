"""Publisher process: offers events at a set rate to individual clients, round robin.

    python -m bench.publishers SPEC.json

SPEC: ``{"server": <bench.peers publish_spec>, "clients": ["c0", …], "inflight": 8}``.
Then stdin lines ``run PHASE RATE SECONDS``: for SECONDS, every 10 ms, the events due by
then (RATE per second) are published as one batch (``Publisher.publish``), each a
distinct event ``{"t": time.time(), "ph": PHASE, "n": k}`` to the next client in turn; at
most ``inflight`` batches are awaited at once (more would only queue in this process: a
publisher that cannot keep up sends less, and says so). Prints one JSON line per run:
``{"phase", "offered", "sent", "ok", "failed", "seconds", "cpu_s", "behind_s"}`` —
``sent`` events left this process, ``ok``/``failed`` as the server answered (Pushpin
answers before delivering), ``behind_s`` how far the last batch was late. ``stop`` ends.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time

from bench.peers import Published, make_publisher

TICK = 0.01


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run(pub, clients: list[str], state: dict, phase: str, rate: float,  # noqa: ANN001
              seconds: float, inflight: int) -> dict:  # fmt: skip
    total = Published()
    slots = asyncio.Semaphore(inflight)
    pending: set[asyncio.Task] = set()
    cpu0, start = cpu_s(), time.monotonic()
    offered = int(rate * seconds)
    sent = 0
    behind = 0.0

    async def one(batch: list[tuple[str, str]]) -> None:
        try:
            result = await pub.publish(batch)
            total.ok += result.ok
            total.failed += result.failed
        finally:
            slots.release()

    while sent < offered:
        now = time.monotonic()
        due = min(offered, int((now - start) * rate) + 1) - sent
        if due > 0:
            await slots.acquire()
            behind = max(0.0, time.monotonic() - start - sent / rate)
            due = min(offered, int((time.monotonic() - start) * rate) + 1) - sent
            t = time.time()
            batch = []
            for k in range(sent, sent + due):
                client = clients[state["next"] % len(clients)]
                state["next"] += 1
                batch.append((client, f'{{"t":{t:.6f},"ph":"{phase}","n":{k}}}'))
            sent += due
            task = asyncio.create_task(one(batch))
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.sleep(max(0.0, start + (sent / rate) + TICK - time.monotonic()))
    if pending:
        await asyncio.gather(*pending)
    return {
        "phase": phase, "offered": offered, "sent": sent, "ok": total.ok,
        "failed": total.failed, "seconds": time.monotonic() - start,
        "cpu_s": cpu_s() - cpu0, "behind_s": round(behind, 3),
    }  # fmt: skip


async def main(path: str) -> None:
    spec = json.load(open(path))
    pub = make_publisher(spec["server"])
    clients = spec["clients"]
    state = {"next": 0}
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).decode().split():
        if line[0] != "run":
            break
        _, phase, rate, seconds = line
        result = await run(pub, clients, state, phase, float(rate), float(seconds),
                           spec.get("inflight", 8))  # fmt: skip
        print(json.dumps(result), flush=True)
    await pub.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
