"""pynng → node → N WebSocket clients: throughput, latency, CPU and RSS per connection.

Runs Orbited and the raw baseline (bench/raw_server.py: same SP and autobahn code, none of
Orbited's work) in one run, interleaved, and prints figures and the Orbited/raw ratios.
Clients live in separate processes (bench/ws_clients.py) so they are not the server's
bottleneck; on a 2-core box they still share the machine, which the ratio cancels out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pynng

from orbited.keys import ConnectionKey
from orbited.tokens import issue_token

SECRET = b"bench-secret-bench-secret-bench-secret!"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Server:
    def __init__(self, kind: str, tmp: Path) -> None:
        self.kind = kind
        ready = tmp / f"{kind}.ready"
        ready.unlink(missing_ok=True)
        if kind == "orbited":
            secret = tmp / "secret"
            secret.write_bytes(SECRET)
            cmd = [
                sys.executable,
                *os.environ.get("BENCH_PY_ARGS", "").split(),
                "-m",
                "orbited.cli",
                "node",
                "--http",
                "127.0.0.1:0",
                "--sp",
                "tcp://127.0.0.1:0",
                "--secret-file",
                str(secret),
                "--keepalive",
                "600",
                "--log-level",
                "warn",
                "--ready-file",
                str(ready),
            ]
        else:
            cmd = [sys.executable, "-m", "bench.raw_server", str(ready)]
        self.proc = subprocess.Popen(cmd)
        deadline = time.monotonic() + 20
        while not ready.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"{kind} server did not start")
            time.sleep(0.05)
        time.sleep(0.05)
        info = json.loads(ready.read_text())
        self.http, self.sp, self.pid = info["http"], info["sp"], info["pid"]

    def url(self, user: str) -> str:
        if self.kind == "orbited":
            token = issue_token(SECRET, ConnectionKey(user, "b", "/bench"), ttl=3600)
            return f"ws://{self.http}/orbited/ws?token={token}"
        return f"ws://{self.http}/?u={user}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class Clients:
    def __init__(self, urls: list[str], procs: int, tmp: Path) -> None:
        self.procs = []
        per = -(-len(urls) // procs)
        for i in range(procs):
            chunk = urls[i * per : (i + 1) * per]
            if not chunk:
                continue
            path = tmp / f"urls-{i}.json"
            path.write_text(json.dumps(chunk))
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "bench.ws_clients", str(path)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        self.connected = sum(int(p.stdout.readline().split()[1]) for p in self.procs)

    def finish(self) -> dict:
        counts: dict[str, int] = {}
        latencies: dict[str, list[float]] = {}
        errors = 0
        kinds: dict[str, int] = {}
        for p in self.procs:
            p.stdin.write("stop\n")
            p.stdin.flush()
        for p in self.procs:
            result = json.loads(p.stdout.readline())
            p.wait(10)
            errors += result["errors"]
            for kind, n in result["error_kinds"].items():
                kinds[kind] = kinds.get(kind, 0) + n
            for phase, n in result["counts"].items():
                counts[phase] = counts.get(phase, 0) + n
            for phase, samples in result["latencies"].items():
                latencies.setdefault(phase, []).extend(samples)
        return {"counts": counts, "latencies": latencies, "errors": errors, "error_kinds": kinds}


def drive(
    sp: str, users: list[str], total: int, batch: int, inflight: int, rate: float | None, phase: str
) -> tuple[float, int]:
    """Send events of ``batch`` recipients each until ``total`` deliveries were asked for.
    Returns (seconds from first send to last reply, deliveries the node reported)."""
    requests = total // batch
    next_index = [0]
    lock = threading.Lock()
    reported = [0]
    interval = (1.0 / rate) if rate else 0.0
    start = time.monotonic()

    with pynng.Req0(dial=sp, send_timeout=30_000, recv_timeout=30_000) as sock:

        def worker() -> None:
            ctx = sock.new_context()
            while True:
                with lock:
                    i = next_index[0]
                    if i >= requests:
                        break
                    next_index[0] += 1
                if interval:
                    delay = start + i * interval - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                to = [[users[(i * batch + j) % len(users)], "b", "/bench"] for j in range(batch)]
                body = {"id": f"{phase}-{i}", "to": to, "data": {"t": time.time(), "ph": phase}}
                ctx.send(json.dumps(body).encode())
                reply = json.loads(ctx.recv_msg().bytes)
                ok = sum(1 for r in reply.get("results", []) if r["status"] == "delivered")
                with lock:
                    reported[0] += ok if "results" in reply else batch
            ctx.close()

        threads = [threading.Thread(target=worker) for _ in range(1 if rate else inflight)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return time.monotonic() - start, reported[0]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def run_once(kind: str, args: argparse.Namespace, tmp: Path) -> dict:
    server = Server(kind, tmp)
    try:
        users = [f"u{i}" for i in range(args.clients)]
        rss0 = rss_kb(server.pid)
        clients = Clients([server.url(u) for u in users], args.procs, tmp)
        time.sleep(0.5)
        rss1 = rss_kb(server.pid)
        cpu0 = cpu_seconds(server.pid)
        seconds, delivered = drive(
            server.sp, users, args.events, args.batch, args.inflight, None, "tput"
        )
        cpu = cpu_seconds(server.pid) - cpu0
        rate = args.events / seconds
        lat_rate = max(1.0, rate * args.latency_load / args.batch)  # requests/s
        lat_total = int(lat_rate * args.latency_seconds) * args.batch
        drive(server.sp, users, lat_total, args.batch, 1, lat_rate, "lat")
        time.sleep(1.0)
        result = clients.finish()
        lat = result["latencies"].get("lat", [])
        return {
            "server": kind,
            "connected": clients.connected,
            "rss_per_conn_kb": (rss1 - rss0) / max(1, clients.connected),
            "deliveries_per_s": rate,
            "cpu_us_per_delivery": cpu / args.events * 1e6,
            "received": result["counts"].get("tput", 0),
            "expected": args.events,
            "latency_rate_per_s": lat_rate * args.batch,
            "p50_ms": percentile(lat, 0.50) * 1e3,
            "p99_ms": percentile(lat, 0.99) * 1e3,
            "client_errors": result["errors"],
            "client_error_kinds": result["error_kinds"],
        }
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench dispatch", description=__doc__)
    p.add_argument("--clients", type=int, default=1000, help="WebSocket clients (≤ 10000+)")
    p.add_argument("--procs", type=int, default=4, help="client processes")
    p.add_argument("--events", type=int, default=50_000, help="deliveries in the throughput phase")
    p.add_argument("--batch", type=int, default=10, help="recipients per SP request")
    p.add_argument("--inflight", type=int, default=16, help="pynng contexts in flight")
    p.add_argument("--latency-load", type=float, default=0.5, help="fraction of saturation")
    p.add_argument("--latency-seconds", type=float, default=5.0)
    p.add_argument("--reps", type=int, default=1, help="interleaved repetitions")
    p.add_argument("--json", type=Path, help="write all results here")
    args = p.parse_args(argv)

    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.reps):
            for kind in ("orbited", "raw"):
                runs.append(run_once(kind, args, Path(tmp)))
                print(json.dumps(runs[-1]), file=sys.stderr)

    def med(kind: str, field: str) -> float:
        return statistics.median(r[field] for r in runs if r["server"] == kind)

    fields = ["deliveries_per_s", "cpu_us_per_delivery", "p50_ms", "p99_ms", "rss_per_conn_kb"]
    print(
        f"\ndispatch: {args.clients} WebSocket clients, {args.events} deliveries, "
        f"{args.batch} recipients/request, {args.reps} rep(s), medians"
    )
    print(f"{'figure':<22}{'orbited':>12}{'raw':>12}{'orbited/raw':>14}")
    for field in fields:
        o, r = med("orbited", field), med("raw", field)
        print(f"{field:<22}{o:>12.2f}{r:>12.2f}{o / r if r else float('nan'):>14.2f}")
    lost = [r for r in runs if r["received"] != r["expected"]]
    for r in lost:
        print(f"note: {r['server']} clients received {r['received']} of {r['expected']}")
    if args.json:
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": str(args.json)}, "runs": runs}, indent=1)
        )
    return 0
