"""Smoke tests of ``python -m bench dispatch --quick`` (bench/dispatch.py) and of the server
launchers (bench/peers.py): for every installed server, the harness starts it, connects
subscribers on each of its transports, delivers events at two rates, writes its JSON and
stops every process it started (also when interrupted). Figures exist; their values are
the bench's business, never asserted here."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.dispatch import report
from bench.peers import SERVERS, available

ROOT = Path(__file__).resolve().parents[2]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("server", ["orbited", "raw", "nchan", "pushpin", "orbited2"])
def test_quick_dispatch(server: str, tmp_path: Path) -> None:
    if not available(server):
        pytest.skip(f"{server} is not installed")
    out = tmp_path / "dispatch.json"
    transports = SERVERS[server].transports
    done = subprocess.run(
        [sys.executable, "-m", "bench", "dispatch", "--quick", "--servers", server,
         "--transports", ",".join(transports), "--pair-transports", ",".join(transports),
         "--json", str(out),
         "--workdir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=150,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    runs = result["runs"]
    assert {(r["server"], r["transport"]) for r in runs} == {(server, t) for t in transports}
    for run in runs:
        assert run["connected"] == 200 and run["connect_failed"] == 0, run["client_errors"]
        first = run["steps"][0]
        assert first["sent"] > 0 and first["received"] > 0, first
        assert first["server_cpu_cores"] > 0  # the server's process tree was sampled
        assert run["latency"]["received"] > 0 and len(run["latency"]["cdf_ms"]) == 101
        stray = [pid for pid in run["pids"] if alive(pid)]
        assert not stray, f"{server}/{run['transport']} left processes {stray}"
    assert server in result["summary"][transports[0]]
    assert "delivered/s" in done.stdout
    # the report section and its plots come out of the same JSON
    text = report(result, tmp_path / "images")
    assert f"| {server} |" in text
    for png in ("perf-dispatch-rates.png", "perf-dispatch-latency.png"):
        assert f"images/{png}" in text
        assert (tmp_path / "images" / png).stat().st_size > 1000


LAUNCH = """
import sys, json, time
from pathlib import Path
from bench.peers import make_server, exit_on_signals, descendants
exit_on_signals()
with make_server(sys.argv[1], Path(sys.argv[2])) as server:
    print(json.dumps(descendants(server.pids())), flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("server", ["nchan2", "pushpin"])
def test_interrupted_launcher_stops_its_process_tree(
    server: str, sig: signal.Signals, tmp_path: Path
) -> None:
    if not available(server):
        pytest.skip(f"{server} is not installed")
    proc = subprocess.Popen(
        [sys.executable, "-c", LAUNCH, server, str(tmp_path)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        pids = json.loads(proc.stdout.readline())  # type: ignore[union-attr]
        assert len(pids) >= 3  # master + workers, or the runner + its services
        assert all(alive(p) for p in pids)
        os.kill(proc.pid, sig)
        proc.wait(60)  # each child gets SIGTERM, then SIGKILL after 5 s; slow on a busy box
        deadline = time.monotonic() + 10
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in pids if alive(p)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class FakeStep:
    """A step of ``measure_step`` on a fake clock: the publisher sends ``rate``/s for
    ``seconds`` from ``start``; the server delivers each event 2 ms after it is sent, or,
    with ``serve`` below ``rate``, at ``serve``/s (a backlog that drains after the step).
    The subscribers' ¼ s receive-time histogram is built from those arrival times."""

    def __init__(self, start: float, rate: float, seconds: float, serve: float) -> None:
        self.now, self.rate, self.seconds, self.serve = start, rate, seconds, serve
        self.arrivals: list[float] = []

    # the module's clock (time.time, time.sleep)
    def time(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s

    # the server, subscribers and publishers measure_step talks to
    def pids(self) -> list[int]:
        return []

    def run(self, phase: str, rate: float, seconds: float) -> dict:
        t0, n = self.now, int(rate * seconds)
        sends = [t0 + i / rate for i in range(n)]
        self.arrivals = [max(s, t0 + i / self.serve) + 0.002 for i, s in enumerate(sends)]
        self.now += seconds + 0.01  # the publisher's last batch and its replies
        return {"sent": n, "ok": n, "failed": 0, "cpu_s": 0.1, "seconds": seconds,
                "behind_s": 0.0}  # fmt: skip

    def stats(self) -> dict:
        buckets: dict[str, int] = {}
        for t in self.arrivals:
            if t <= self.now:
                buckets[str(int(t * 4))] = buckets.get(str(int(t * 4)), 0) + 1
        got = sum(buckets.values())
        return {"buckets": buckets, "counts": {"s0": got}, "latencies": {"s0": [0.002] * got},
                "lag": []}  # fmt: skip


@pytest.mark.parametrize("seconds", [1.5, 4.0])  # --quick's step and the default
@pytest.mark.parametrize("start", [1000.0, 1000.07, 1000.13, 1000.21])  # ¼ s bucket phases
@pytest.mark.parametrize(("rate", "serve"), [(300.0, 300.0), (300.0, 200.0), (2500.0, 2500.0)])
def test_delivered_rate_is_taken_over_the_time_the_deliveries_covered(
    monkeypatch: pytest.MonkeyPatch, seconds: float, start: float, rate: float, serve: float
) -> None:
    # A server that delivers every event 2 ms after it is sent was rated 241-265/s at
    # 300/s in --quick (the last, partly filled ¼ s bucket counted as a whole one), so the
    # step was SATURATED and the ladder stopped; one that keeps up must rate ≈ the offered
    # rate, one that falls behind at its own pace.
    from bench import dispatch
    from bench.peers import Usage

    fake = FakeStep(start, rate, seconds, serve)
    monkeypatch.setattr(dispatch, "time", fake)
    monkeypatch.setattr(dispatch, "usage", lambda pids: Usage(0.0, 0, 0))
    args = argparse.Namespace(step_seconds=seconds, drain=1.0)
    step = dispatch.measure_step(fake, fake, fake, "s0", rate, args)
    assert step["delivered_per_s"] == pytest.approx(serve, rel=0.02)
    assert step["saturated"] is (serve < 0.9 * rate)
    if serve == rate:
        assert step["lost"] == 0
