"""Failover through each data plane: SIGKILL an active node under 1000 browsers.

Owns the failover half of ``python -m bench dataplane`` (bench/dataplane.py owns the
driver, the environment and the output). Per back-end, in a fresh environment (the
benchmark's network namespace when it has one, so the nftables rules stay inside it):

1. HaloD (``--routes 24 --spares 1 --grace G --heartbeat-interval H --missed-heartbeats
   K``) and 3 real ``orbited node`` processes on 127.0.0.2-4: 2 active, 1 spare;
2. ``--clients`` simulated browsers (bench/browsers.py) in ``--browser-procs`` processes,
   WebSocket / long-poll / SSE 2:1:1, each on its key's route port; a web app
   (bench/sender.py) sending a numbered event to every key every 100 ms through the SP
   route ports;
3. once every browser has had its hello and events flow, SIGKILL one active node, and
   poll HaloD's /status every 10 ms: *noticed* = the victim shows disconnected, *detected*
   = its routes belong to another node (the failover; HaloD's ``failovers`` count);
4. after ``--settle`` seconds stop the sender, then the browsers, and analyse their
   reports with bench/chaos_report.py: a browser is *affected* when an outage began after
   the kill; its recovery = kill → first event received again (``receiving_again_at``),
   and its reconnect = kill → the hello of the session that ended the outage.

Reported: affected browsers, recovery p50/p99/max, those never receiving again, the split
detection (kill → HaloD's failover) vs the rest (browser backoff + reconnect + first
event), and lost events (accepted by a node but never received: the victim's mailboxes
die with it unless the acknowledged mode is on, so a loss here is expected).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from bench.chaos_report import analyse, percentile
from bench.dataplane import Env, HaloD, fmt, wait_ready
from orbited.core.routes import DEFAULT_ROUTES

T = TypeVar("T")
ROUTES = DEFAULT_ROUTES
CLONE_NEWNET = 0x40000000


class Probe:
    """HTTP reads of HaloD's status from where HaloD is: a worker thread that entered the
    namespace with setns(2) (which affects only the calling thread), or this thread."""

    def __init__(self, env: Env) -> None:
        self.executor: ThreadPoolExecutor | None = None
        if env.name:
            path = f"/run/netns/{env.name}"

            def enter() -> None:
                import ctypes

                fd = os.open(path, os.O_RDONLY)
                try:
                    if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns")
                finally:
                    os.close(fd)

            self.executor = ThreadPoolExecutor(1, initializer=enter)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        if self.executor is None:
            return fn(*args)
        return self.executor.submit(fn, *args).result(timeout=30)

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True)


def get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


class Node:
    def __init__(self, env: Env, halod: HaloD, name: str, host: str, secret: Path) -> None:
        ready = env.tmp / f"{name}.ready"
        self.name = name
        self.proc = env.py(
            "orbited.cli", "node", "--name", name, "--halod", halod.control,
            "--http", f"{host}:0", "--sp", f"tcp://{host}:0",
            "--secret-file", str(secret), "--no-create-secret", "--ready-file", str(ready),
            "--log-level", "warn", log=f"{name}.log",
        )  # fmt: skip
        wait_ready(env, self.proc, ready, f"{name}.log")


def one(env: Env, backend: str, args: argparse.Namespace) -> dict[str, Any]:
    tmp = env.tmp
    probe = Probe(env)
    secret = tmp / "secret"
    secret.write_bytes(os.urandom(48).hex().encode())
    timing = ["--spares", "1", "--grace", str(args.grace),
              "--heartbeat-interval", str(args.heartbeat),
              "--missed-heartbeats", str(args.missed)]  # fmt: skip
    halod = HaloD(env, backend, ROUTES, f"fo-{backend}", *timing)

    def status() -> dict[str, Any]:
        return probe.call(get_json, f"http://{halod.status}/status")

    def nodes() -> dict[str, dict[str, Any]]:
        return {n["name"]: n for n in status()["nodes"]}

    try:
        procs = {}
        for i, name in enumerate(("n1", "n2", "n3")):
            procs[name] = Node(env, halod, name, f"127.0.0.{i + 2}", secret).proc
            deadline = time.monotonic() + 15
            while not nodes().get(name, {}).get("connected"):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not register:\n{env.log(halod.log_name)}")
                time.sleep(0.05)
        # -- browsers and the web app ---------------------------------------------------
        per = -(-args.clients // args.browser_procs)
        browsers, ready_files, reports = [], [], []
        for i in range(args.browser_procs):
            offset, count = i * per, min(per, args.clients - i * per)
            if count <= 0:
                break
            ready, report = tmp / f"browsers-{i}.ready", tmp / f"browsers-{i}.json"
            ready_files.append(ready)
            reports.append(report)
            browsers.append(env.py(
                "bench.browsers", "--secret-file", str(secret),
                "--halod-browser-base", f"{halod.host}:{halod.browser_base}",
                "--routes", str(ROUTES), "--prefix", "b", "--offset", str(offset),
                "--count", str(count), "--transports", "ws=2,poll=1,sse=1",
                "--ready-file", str(ready), "--report", str(report), "--ramp", "400",
                "--progress", "0.5",
                log=f"browsers-{i}.log",
            ))  # fmt: skip
        t0 = time.monotonic()
        while not all(f.exists() for f in ready_files):
            if time.monotonic() - t0 > 60 or any(p.poll() is not None for p in browsers):
                logs = "\n".join(env.log(f"browsers-{i}.log") for i in range(len(browsers)))
                raise RuntimeError(f"browsers not ready:\n{logs}")
            time.sleep(0.1)
        connect_seconds = time.monotonic() - t0
        sender_report = tmp / "sender.json"
        sender = env.py(
            "bench.sender", "--halod-sp-base", f"{halod.host}:{halod.sp_base}",
            "--routes", str(ROUTES), "--prefix", "b", "--count", str(args.clients),
            "--interval", "100", "--drain", "3", "--report", str(sender_report),
            log="sender.log",
        )  # fmt: skip
        time.sleep(args.steady)  # events flowing everywhere before the kill
        settled_after = settle(status, env, len(browsers))
        # -- the kill -------------------------------------------------------------------
        before = nodes()
        victim = sorted(n for n, v in before.items() if v["state"] == "active")[0]
        victim_routes = set(before[victim]["routes"])
        failovers0 = status()["failovers"]
        log_mark = len(env.log(halod.log_name, tail=10**9))
        t_kill = time.time()
        procs[victim].send_signal(signal.SIGKILL)
        noticed = detected = None
        taker = None
        timeline: list[tuple[float, float, bool | None, int]] = []  # (asked, answered, ...)
        deadline = time.monotonic() + args.grace + 10
        while detected is None and time.monotonic() < deadline:
            asked = time.time()
            now_status = status()
            now = time.time()
            by_name = {n["name"]: n for n in now_status["nodes"]}
            v = by_name.get(victim)
            if len(timeline) < 300:
                connected = None if v is None else v["connected"]
                sample = (round(asked - t_kill, 4), round(now - t_kill, 4), connected)
                timeline.append((*sample, now_status["failovers"]))
            if noticed is None and (v is None or not v["connected"]):
                noticed = now - t_kill
            if now_status["failovers"] > failovers0:
                owners = [n for n in by_name.values() if victim_routes & set(n["routes"])]
                if owners and all(n["name"] != victim for n in owners):
                    detected = now - t_kill
                    taker = [n["name"] for n in owners]
            time.sleep(0.01)
        marks = [len(env.log(f"browsers-{i}.log", tail=10**9)) for i in range(len(browsers))]
        recovered_at = wait_recovered(env, marks, time.monotonic() + args.settle)
        time.sleep(1.0)  # the last reconnects' first events
        failovers_after = status()["failovers"]
        # HaloD's own account: why it removed the victim (log lines after the kill).
        why = [line.split("removed: ", 1)[1] for line in
               env.log(halod.log_name, tail=10**9)[log_mark:].splitlines()
               if f"node {victim} " in line and "removed: " in line]  # fmt: skip
        # -- stop and analyse -----------------------------------------------------------
        sender.send_signal(signal.SIGTERM)
        with contextlib.suppress(Exception):
            sender.wait(30)
        time.sleep(0.5)  # the last rounds reach the browsers
        for p in browsers:
            p.send_signal(signal.SIGTERM)
        for p in browsers:
            with contextlib.suppress(Exception):
                p.wait(30)
        clients = [c for r in reports for c in json.loads(r.read_text())["clients"]]
        sent = json.loads(sender_report.read_text())
        accepted = {k: v["accepted"] for k, v in sent["keys"].items()}
        window = (t_kill, t_kill + args.grace + 10 + args.settle)
        analysis = analyse(accepted, clients, sent["round_times"], [window])
        incident = analysis["summary"]["incidents"][0]
        reconnects = []  # kill → the hello that ended each affected browser's last outage
        for c in clients:
            hits = [o for o in c["outages"] if o[0] is not None and o[0] >= t_kill]
            if hits and hits[-1][2] is not None:
                reconnects.append(hits[-1][2] - t_kill)
        rec = incident["recovery"]
        route = {k: v["route"] for k, v in sent["keys"].items()}
        other_outages = sum(
            1 for c in clients
            if route.get(c["id"]) not in victim_routes
            and any(o[0] is not None and o[0] >= t_kill for o in c["outages"])
        )  # fmt: skip
        on_victim = sum(1 for c in sent["keys"].values() if c["route"] in victim_routes)
        result = {
            "backend": backend,
            "clients": args.clients,
            "browser_procs": len(browsers),
            "connect_seconds": connect_seconds,
            "settings": {
                "grace_s": args.grace,
                "heartbeat_interval_s": args.heartbeat,
                "missed_heartbeats": args.missed,
                "routes": ROUTES,
                "spares": 1,
                "browser_backoff": "base 0.2 s, max 2 s, equal jitter",
            },  # fmt: skip
            "victim": victim,
            "victim_routes": sorted(victim_routes),
            "clients_on_victim": on_victim,
            "taken_over_by": taker,
            "setup_failovers_s": settled_after,
            "all_receiving_again_by_progress_s": recovered_at and recovered_at - t_kill,
            "noticed_s": noticed,
            "halod_removed_victim_because": why[-1] if why else None,
            "failovers_before_kill": failovers0,
            "extra_failovers_after_kill": failovers_after - failovers0 - 1,
            "detected_s": detected,
            "affected": incident["affected"],
            "never_recovered": len(incident["never_recovered"]),
            "recovery_s": {"p50": rec["p50"], "p99": rec["p99"], "max": rec["max"]},
            "reconnect_s": {
                "p50": percentile(reconnects, 50),
                "p99": percentile(reconnects, 99),
                "max": max(reconnects, default=None),
            },  # fmt: skip
            "after_detection_s": None
            if detected is None or rec["max"] is None
            else {"p50": rec["p50"] - detected, "max": rec["max"] - detected},
            "lost_events": incident["lost"],
            "lost_outside_incident": analysis["summary"]["lost_outside_windows"],
            "duplicated": analysis["summary"]["duplicated"],
            "resets": analysis["summary"]["resets"],
            "outages_on_other_routes": other_outages,
            "status_polls": timeline,
            "browser_loop_lag_max_s": max(
                (json.loads(r.read_text())["loop_lag"] or {}).get("max") or 0 for r in reports
            ),
        }
        return result
    finally:
        probe.close()


def settle(status: Callable[[], dict[str, Any]], env: Env, procs: int) -> float:
    """Wait for 2 active nodes of 12 routes each + 1 spare, all connected, no failover for
    2 s, and no browser in an outage (a false failure during the set-up, e.g. a starved
    heartbeat, settles first: an outage still running at the kill would hide the kill's).
    Returns the seconds waited."""
    t0 = time.monotonic()
    deadline = t0 + 60
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        st = status()
        shape = sorted((n["state"], len(n["routes"]), n["connected"]) for n in st["nodes"])
        if st["failovers"] != last:
            last, since = st["failovers"], time.monotonic()
        want = [("active", ROUTES // 2, True)] * 2 + [("spare", 0, True)]
        if shape == want and time.monotonic() - since >= 2.0:
            last_lines = [re.findall(r"in_outage=(\d+)", env.log(f"browsers-{i}.log", 400))
                          for i in range(procs)]  # fmt: skip
            if all(found and found[-1] == "0" for found in last_lines):
                return time.monotonic() - t0
        time.sleep(0.1)
    raise RuntimeError(f"the cluster never settled: {status()['nodes']}")


def wait_recovered(env: Env, marks: list[int], deadline: float) -> float | None:
    """Poll the browsers' progress lines (written every 0.5 s) until every process reports
    nobody in an outage, from lines written after ``marks``; the wall time, or None."""
    while time.monotonic() < deadline:
        time.sleep(0.25)
        counts = []
        for i, mark in enumerate(marks):
            text = env.log(f"browsers-{i}.log", tail=10**9)[mark:]
            found = re.findall(r"in_outage=(\d+)", text)
            counts.append(int(found[-1]) if found else None)
        if all(c == 0 for c in counts):
            return time.time()
        if all(c is not None for c in counts):
            # re-read only what comes next: an earlier 0 must not count twice
            marks = [len(env.log(f"browsers-{i}.log", tail=10**9)) for i in range(len(marks))]
    return None


def run(tmp: Path, backends: list[str], netns: bool, args: argparse.Namespace) -> dict[str, Any]:
    results = []
    for backend in backends:
        folder = tmp / f"failover-{backend}"
        folder.mkdir(parents=True, exist_ok=True)
        env = Env(folder, netns)
        try:
            r = one(env, backend, args)
        except Exception as e:  # noqa: BLE001 - report it and go on with the next back-end
            print(f"failover {backend}: {e}", file=sys.stderr)
            r = {"backend": backend, "error": str(e)[-3000:]}
        finally:
            env.close()
        print(json.dumps(r), file=sys.stderr)
        results.append(r)
    return {"runs": results}


def print_failover(fo: dict[str, Any]) -> None:
    runs = fo["runs"]
    if not runs:
        return
    ok = [r for r in runs if "error" not in r]
    if ok:
        s = ok[0]["settings"]
        print(f"\nfailover: SIGKILL of 1 of 2 active nodes (+1 spare), {ok[0]['clients']} "
              f"browsers (ws:poll:sse 2:1:1), grace {s['grace_s']:g} s, heartbeat "
              f"{s['heartbeat_interval_s']:g} s × {s['missed_heartbeats']}; seconds from "
              "the kill")  # fmt: skip
        print(f"{'path':<10}{'affected':>9}{'never':>6}{'detected':>9}{'recov p50':>10}"
              f"{'p99':>7}{'max':>7}{'reconn max':>11}{'lost ev':>8}")  # fmt: skip
    for r in runs:
        if "error" in r:
            print(f"{r['backend']:<10} error: {r['error'][:200]}")
            continue
        rec = r["recovery_s"]
        print(f"{r['backend']:<10}{r['affected']:>9}{r['never_recovered']:>6}"
              f"{fmt(r['detected_s']):>9}{fmt(rec['p50']):>10}{fmt(rec['p99']):>7}"
              f"{fmt(rec['max']):>7}{fmt(r['reconnect_s']['max']):>11}"
              f"{r['lost_events']:>8}")  # fmt: skip
