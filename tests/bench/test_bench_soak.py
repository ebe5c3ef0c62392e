"""Smoke test of ``python -m bench soak --quick`` (bench/soak.py): HaloD with the built-in
proxy, 3 real nodes, two web apps and 200 churning browsers for 45 s. It asserts that the
harness works end to end — samples of every process, churn on every transport, events
delivered, nothing died, everything stopped — never memory figures (those belong to the
full run, bench/results/soak.json)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TRANSPORTS = {"ws", "poll", "sse", "iframe"}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone too (its parent, the harness, has exited)
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def test_quick_soak_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "soak", "--quick", "--json", str(out),
         "--keep", str(tmp_path / "logs")],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["died"] == []
    samples = result["samples"]
    assert len(samples) >= 10
    names = set(result["processes"]) | set(result["load_processes"])
    assert {"halod", "n1", "n2", "n3", "sender-plain", "sender-acked"} <= names
    assert sum(n.startswith("browsers-") for n in names) == 2
    for s in samples:  # every process sampled every time, with its memory and fds
        assert set(s["procs"]) == names
        for name, p in s["procs"].items():
            assert p is not None and p["rss"] > 0 and p["fds"] > 0, (s["t"], name)
        for node in ("n1", "n2", "n3"):
            assert "mailboxes" in s["health"][node]["gauges"], s["health"][node]
        assert "halod_route_connections" in s["halod"]
    for name in ("halod", "n1", "n2", "n3"):
        g = result["processes"][name]
        assert g["rss_warmup_mb"] > 0 and g["rss_end_mb"] > 0 and g["growth_mb_per_h"] is not None
    # the active nodes held mailboxes; the spare none
    at_end = result["gauges_at_end"]
    assert sorted(at_end[n]["mailboxes"] > 0 for n in ("n1", "n2", "n3")) == [False, True, True]
    churn = result["churn"]
    assert set(churn["sessions_by_transport"]) == TRANSPORTS
    assert min(churn["sessions_by_transport"].values()) > 200 / 4  # more than one life each
    assert churn["resumed"] > 0 and churn["fresh_keys"] > 0 and churn["fresh_connects"] > 0
    assert churn["switch"] > 0 and churn["away"] > 0 and churn["new"] > 0
    events = result["events"]
    assert events["received"] > 0 and events["missing_clients"] == 0
    statuses = events["sender_statuses"]
    assert statuses.get("delivered", 0) > 0 and statuses.get("acked", 0) > 0
    assert events["resets"] > 0  # some pages stayed away past the 3 s linger
    # the pages there at the end, never reset, got every event (bench/README.md, "soak")
    assert events["lost_by_clients_without_reset"] == 0, events
    # everything the harness started has stopped
    assert [n for n, pid in result["pids"].items() if alive(pid)] == []
    assert "soak:" in done.stdout and "churn:" in done.stdout
