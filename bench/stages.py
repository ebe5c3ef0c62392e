"""Where a node's CPU goes, stage by stage: the per-stage cost table of docs/performance.md.

    python -m bench run stages [--transports ws,sse,poll] [--accept ws] [--clients 1000]
        [--rate 5000] [--poll-rate 2000] [--seconds 4] [--reps 2] [--quick] [--json FILE]

For each transport, one run of the A/B driver (bench/ab.py) with this work tree's node and
Nchan (one worker) interleaved: ``--clients`` subscribers, one SP publisher offering
``--rate`` events/s (``--poll-rate`` for long-poll) for ``--seconds``, each event to the
next client, ``--reps`` repetitions. py-spy samples the node over the event phase
(``--pyspy event``, 1 000 samples/s, no instrumentation); for the transports of
``--accept``, a second run samples the connect phase instead. Every sample is charged to
one stage by its innermost frame (``classify``): the system calls by the line that makes
them, Python code by the module it runs in. A stage's µs per event is its share of the
samples times the node's CPU per delivered event (or accepted connection) measured in the
same run; Nchan's figure of the same run is the yardstick.

py-spy reads the node's memory while it runs (``--nonblocking``): the node is not paused,
so the CPU figures are those of the node at work, with a sampler beside it on the box.
The shares are of the samples, so of the node's busy time; the µs are as exact as the
run's CPU per event (bench/ab.py: utime+stime from /proc).

Results JSON (default bench/results/stages.json; ``--quick`` writes none):

    {"args", "machine", "started", "finished", "loadavg",
     "phases": [{"transport", "phase": "event" | "accept", "samples",
                 "orbited_us": spread, "nchan_us": spread,
                 "stages": {stage: share of the samples}}]}
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.report import (
    LoadSampler,
    med_range,
    num,
    previous_table,
    results_header,
    spread,
    write_results,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "stages.json"
PY_SPY = ROOT / ".venv" / "bin" / "py-spy"

# The stages, in the order of an event's path; ``classify`` returns one of these.
RECV = "read: recv and Twisted's read path"
ACCEPT = "accept, connection set-up and close"
REACTOR = "reactor: epoll_wait, dispatch (Twisted)"
SP = "SP framing (orbited/sp, node/rep.py)"
PARSE = "request parse (node/events.py, orjson)"
HUB = "hub: dispatch, mailbox, dedup, attach"
FRAMES = "frames (node/frames.py, wsframe.py)"
FRONT = "browser front: HTTP, sinks, flush"
TOKEN = "token check (core/tokens.py)"
SEND_BROWSER = "send to browsers (kernel)"
SEND_SP = "SP replies: send (kernel)"
TWISTED = "other Twisted"
OTHER = "other"
IDLE = "idle"  # not a stage: samples left out of the shares
KERNEL = (RECV, SEND_BROWSER, SEND_SP)  # stages that are a system call (and its wrapper)
STAGES = (RECV, ACCEPT, REACTOR, SP, PARSE, HUB, FRAMES, FRONT, TOKEN, SEND_BROWSER, SEND_SP,
          TWISTED, OTHER)  # fmt: skip

# Modules by stage (a frame's file, as py-spy names it: relative to its sys.path entry).
_MODULES = (
    (SP, ("orbited/sp/", "orbited/node/rep.py")),
    (PARSE, ("orbited/node/events.py", "orbited/core/keys.py")),
    (HUB, ("orbited/node/hub.py", "orbited/node/mailbox.py", "orbited/node/dedup.py",
           "orbited/node/handoff.py", "orbited/node/observe.py", "orbited/node/users.py")),
    (FRAMES, ("orbited/node/frames.py", "orbited/node/transports/wsframe.py")),
    (TOKEN, ("orbited/core/tokens.py",)),
    (FRONT, ("orbited/node/transports/", "orbited/node/flush.py")),
)  # fmt: skip
# Functions whose own time is a system call: the write helpers (orbited.runtime.
# twisted_compat) are a socket call and its return value's check.
_SENDS = ("write_through", "writev_through", "send_through", "send_now")
_REACTOR_FILES = ("twisted/internet/epollreactor.py", "twisted/internet/posixbase.py",
                  "twisted/internet/base.py", "twisted/python/log.py",
                  "twisted/python/context.py")  # fmt: skip


def frame_parts(frame: str) -> tuple[str, str]:
    """``("Hub._deliver", "orbited/node/hub.py")`` of py-spy's ``Hub._deliver (orbited/
    node/hub.py:1406)``."""
    name, _, where = frame.rpartition(" (")
    return name, where.rsplit(":", 1)[0]


def classify(stack: list[str]) -> str:
    """The stage of one sample: ``stack`` outermost first, as py-spy collapses it."""
    if not stack:
        return OTHER
    name, path = frame_parts(stack[-1])
    function = name.rpartition(".")[2]
    if name == "EPollReactor.doPoll":
        return IDLE  # in epoll_wait: py-spy does not always see the thread asleep
    if function in _SENDS:  # whose send: its caller's (browser writes run inside SP reads)
        caller = frame_parts(stack[-2])[1] if len(stack) > 1 else ""
        sp = caller.startswith(("orbited/sp/", "orbited/node/rep.py"))
        return SEND_SP if sp else SEND_BROWSER
    if path == "orbited/runtime/twisted_compat.py":  # the browser port's own transport
        if name.startswith("CountedPort."):
            return ACCEPT  # the accept loop
        if function in ("doRead", "first_read"):
            return RECV
        if function == "doWrite":
            return SEND_BROWSER
        if name.startswith(("LeanConnection.", "CountedServer.")):
            return ACCEPT  # a connection's set-up and close
    if path == "twisted/internet/tcp.py":
        if name.startswith("Port.") or "accept" in function.lower() or name.startswith("Server."):
            return ACCEPT
        if function in ("doRead", "_dataReceived"):
            return RECV
        if function in ("writeSomeData", "doWrite", "_writev"):  # Twisted's buffered writes
            return SEND_BROWSER
        return TWISTED
    if path in _REACTOR_FILES:
        return REACTOR
    for stage, prefixes in _MODULES:
        if path.startswith(prefixes):
            return stage
    if path.startswith("twisted/"):
        return TWISTED
    # a library the node calls (httptools, orjson, hmac...): the stage of its caller
    for frame in reversed(stack[:-1]):
        caller = frame_parts(frame)[1]
        for stage, prefixes in _MODULES:
            if caller.startswith(prefixes):
                return stage
        if caller.startswith("orbited/"):
            return OTHER
    return OTHER


def fold(paths: list[Path]) -> tuple[int, dict[str, float]]:
    """Samples in py-spy's collapsed-stack files, and each stage's share of them."""
    counts = dict.fromkeys((*STAGES, IDLE), 0)
    for path in paths:
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if stack and count.isdigit():
                counts[classify(stack.split(";"))] += int(count)
    total = sum(counts.values()) - counts[IDLE]
    return total, {s: (counts[s] / total if total else 0.0) for s in STAGES}


def one_phase(transport: str, phase: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One A/B driver run (this tree's node and Nchan) with py-spy over ``phase``."""
    out = work / f"{transport}-{phase}"
    out.mkdir()
    rate = args.poll_rate if transport == "poll" else args.rate
    cmd = [sys.executable, "-m", "bench.ab", "--variants", "orbited=.,nchan",
           "--transport", transport, "--clients", str(args.clients),
           "--connect-rate", str(args.connect_rate), "--rate", str(rate),
           "--seconds", str(args.seconds), "--reps", str(args.reps), "--pyspy", phase,
           "--out", str(out), "--json", str(out / "ab.json")]  # fmt: skip
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"bench.ab failed ({done.returncode}): {done.stderr[-2000:]}")
    runs = json.loads((out / "ab.json").read_text())
    key = "event_us" if phase == "event" else "accept_us"
    samples, shares = fold(sorted(out.glob("spy-orbited-*.txt")))
    mine = [r for r in runs if r["variant"] == "orbited"]
    return {
        "transport": transport, "phase": phase, "samples": samples,
        "orbited_us": spread([r[key] for r in mine]),
        "orbited_sys_us": spread([r[key.replace("_us", "_sys_us")] for r in mine]),
        "nchan_us": spread([r[key] for r in runs if r["variant"] == "nchan"]),
        "stages": shares,
    }  # fmt: skip


def split_us(shares: dict[str, float], total_us: float, sys_us: float | None) -> dict[str, float]:
    """µs per stage with the kernel's stages scaled to the node's system time and the
    others to its user time (both measured): py-spy's wall-time samples overcharge a
    ``send`` that waits for a core. Without a system time (or without samples on either
    side), the plain ``share × total``."""
    kernel = sum(shares[s] for s in KERNEL)
    if sys_us is None or not 0 < kernel < 1:
        return {s: share * total_us for s, share in shares.items()}
    user_us = max(total_us - sys_us, 0.0)
    return {s: (share / kernel * sys_us if s in KERNEL else share / (1 - kernel) * user_us)
            for s, share in shares.items()}  # fmt: skip


def text_table(result: dict[str, Any]) -> str:
    lines = []
    for p in result["phases"]:
        us = (p["orbited_us"] or {}).get("median") or 0.0
        lines.append(f"\n{p['transport']} {p['phase']}: {us:.1f} µs per "
                     f"{'event' if p['phase'] == 'event' else 'connection'}, Nchan "
                     f"{(p['nchan_us'] or {}).get('median')}; {p['samples']} samples")  # fmt: skip
        for stage, share in p["stages"].items():
            if share:
                lines.append(f"  {100 * share:5.1f} %  {share * us:6.1f} µs  {stage}")
    return "\n".join(lines)


# The settings the section's command line shows even when they are the defaults.
SHOWN = ("transports", "accept", "clients", "rate", "poll_rate", "seconds", "reps")


def report(results: dict[str, Any], images: Path) -> str:
    """The "Where the CPU goes" section of docs/performance.md."""
    from bench.report import command_line, machine_line

    a = results["args"]
    out = [
        "```",
        command_line("stages", parser(), a, always=SHOWN),
        "```",
        "",
        machine_line(results),
    ]
    if results.get("commit"):
        out += ["", f"The node of commit {results['commit']}; Nchan with one worker."]
    phases = results["phases"]
    for p in phases:
        what = "delivered event" if p["phase"] == "event" else "accepted connection"
        o, n = p["orbited_us"] or {}, p["nchan_us"] or {}
        sys_us = (p.get("orbited_sys_us") or {}).get("median")
        us = o.get("median") or 0.0
        ratio = f"{us / n['median']:.2f}×" if n.get("median") else "—"
        kernel = "" if sys_us is None else f", {num(sys_us)} µs of it in the kernel"
        split = split_us(p["stages"], us, sys_us)
        out += [
            "",
            f"**{p['transport']}, {p['phase']}**: node CPU per {what} "
            f"{med_range(o, unit=' µs')}{kernel}; Nchan {med_range(n, unit=' µs')} "
            f"({ratio}); {p['samples']} py-spy samples.",
            "",
            f"| stage | share of the node's samples | µs per {what} (share × CPU) "
            "| µs, kernel stages scaled to the system time |",
            "|---|---|---|---|",
        ]
        for stage, share in p["stages"].items():
            if share >= 0.001:
                out.append(f"| {stage} | {100 * share:.1f} % | {num(share * us)} "
                           f"| {num(split[stage])} |")  # fmt: skip
    out += [
        "",
        "Each sample is charged to the stage of its innermost frame: a socket call to the "
        "stage that makes it (the write helpers' `send`/`sendmsg`, Twisted's `recv` and "
        "`accept`), Python code to the module it runs in, a C library (orjson, httptools, "
        "hmac) to its caller's stage; samples in `epoll_wait` are idle and left out. "
        "py-spy samples wall time while the node is runnable, so a `send` that wakes its "
        "reader on the same core is charged the time the node then waits for a core: the "
        "last column scales the system-call stages (recv and the sends) to the node's "
        "measured system time and the other stages to its user time. Figures are of the "
        "same run (the connect phase's CPU is read in 10 ms clock ticks: ± a few µs per "
        "connection); py-spy runs beside the node while it is measured.",
    ]
    out += previous_table(
        results,
        ["transport", "phase", "node µs", "before", "Nchan µs", "before"],
        _beside,
    )
    return "\n".join(out)


def _beside(now: dict[str, Any], before: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, p in now.items():
        b = before.get(name) or {}
        transport, _, phase = name.partition(" ")
        rows.append([transport, phase, med_range(p.get("orbited_us")),
                     med_range(b.get("orbited_us")), med_range(p.get("nchan_us")),
                     med_range(b.get("nchan_us"))])  # fmt: skip
    return rows


def summarize(phases: list[dict[str, Any]]) -> dict[str, Any]:
    """Per "transport phase": the two CPU figures (what ``previous`` keeps)."""
    return {
        f"{p['transport']} {p['phase']}": {"orbited_us": p["orbited_us"], "nchan_us": p["nchan_us"]}
        for p in phases
    }


def commit() -> str:
    """The measured tree's commit, with "+changes" when the work tree differs from it."""
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()  # fmt: skip
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no", "--", "orbited"],
                           capture_output=True, text=True).stdout.strip()  # fmt: skip
    return (head or "unknown") + (" +changes" if dirty else "")


def available() -> str | None:
    """Why this scenario cannot run here, or None."""
    if not PY_SPY.exists():
        return f"py-spy is not installed ({PY_SPY})"
    return None


def parser() -> argparse.ArgumentParser:
    """``python -m bench stages``'s options (also what ``report`` reproduces a run from)."""
    p = argparse.ArgumentParser(prog="python -m bench stages", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--transports", default="ws,sse,poll", help="event phases")
    p.add_argument("--accept", default="ws", help="transports whose connect phase is sampled")
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--connect-rate", type=int, default=1000)
    p.add_argument("--rate", type=int, default=5000, help="events/s offered (ws, sse)")
    p.add_argument("--poll-rate", type=int, default=2000, help="events/s offered (poll)")
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="smoke: 200 clients, 2 s, 1 rep, ws")
    p.add_argument("--json", type=Path, help=f"results (default {RESULTS}; --quick: none)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.quick:
        args.transports, args.accept, args.clients, args.connect_rate = "ws", "ws", 200, 400
        args.rate, args.poll_rate, args.seconds, args.reps = 2000, 500, 2.0, 1
    if args.json is None and not args.quick:
        args.json = RESULTS
    why = available()
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    todo = [(t, "event") for t in args.transports.split(",") if t]
    todo += [(t, "accept") for t in args.accept.split(",") if t]
    result = results_header(args, {}) | {"commit": commit(), "phases": []}
    with LoadSampler() as load, tempfile.TemporaryDirectory(prefix="bench-stages-") as tmp:
        for transport, phase in todo:
            result["phases"].append(one_phase(transport, phase, args, Path(tmp)))
    result["loadavg"] = load.summary()
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    result["summary"] = summarize(result["phases"])
    print(text_table(result))
    write_results(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
