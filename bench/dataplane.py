"""HaloD's data planes: forwarding cost as a ratio to a direct connection, and failover time.

    python -m bench dataplane [--paths direct,proxy,nftables,haproxy] [--rounds 5]
                              [--seconds 2] [--clients 1000] [--quick] [--json FILE]

Owns the data-plane scenario (bench/README.md, docs/performance.md "Data plane").

**Forwarding cost.** One HaloD per back-end (``halod run --dataplane X``, 4 routes, no
spare), each with one fake node (bench/dataplane_node.py: bench/control_nodes.py's node,
registered over the real control protocol) whose advertised browser/SP addresses are
ports of our own download/echo server (bench/dataplane_server.py, 2 processes sharing the
ports with SO_REUSEPORT). Every path has its own server ports. Load-generator processes
(bench/dataplane_load.py, ``--load-procs``) run three loads against route 1's browser port
of each back-end and against the server itself (``direct``):

- ``bulk``: downloads over ``--bulk-conns`` connections per process, MB/s;
- ``conn``: connect → 1 byte → echo → close, ``--conn-conc`` in flight per process, /s,
  with errors;
- ``rr``: 64-byte request/response on ``--rr-conns`` keep-alive connections per process, /s.

Every round measures every path for each load back to back, the order of the paths
rotated per round, and each figure's ratio to ``direct`` is taken within its round; the
median and range over rounds are reported. HaloD's CPU (utime+stime of the process, its
live descendants and its reaped children, from /proc; not a daemonized haproxy's) per GB, per
connection and per request, and the machine's idle share during each window (from
/proc/stat: ≈ 0 means the 2 cores were saturated, so the ratio is the whole box's cost of
the path, not the proxy's alone).

When run as root with ``ip``, ``nft`` and libnftables present, everything runs inside a
network namespace this bench creates (loopback only) and deletes at the end, so the
nftables back-end never touches the host's ruleset and all paths share one loopback.

**Failover** (bench/dataplane_failover.py): per back-end, HaloD + 2 real ``orbited node``s
+ 1 spare, ``--clients`` simulated browsers (bench/browsers.py) and a sender
(bench/sender.py); SIGKILL one active node; kill → every affected browser receiving again.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.report import results_header, select_available
from orbited.cluster import free_port_block

CLK_TCK = os.sysconf("SC_CLK_TCK")
SBIN = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
VIP = "127.0.0.100"  # nftables: the route ports' address (any 127/8 address is local)
BACKENDS = ("proxy", "nftables", "haproxy")
LOADS = ("bulk", "conn", "rr")
RESULTS = Path(__file__).parent / "results" / "dataplane.json"


# -- processes and the namespace -------------------------------------------------------------


def _die_with_parent() -> None:
    """Children get SIGTERM if the driver dies without cleaning up (Linux); it survives
    ``ip netns exec``'s exec."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def cpu_seconds(pid: int, children: bool = True) -> float:
    """utime+stime (+ reaped children's: HaloD's nft/conntrack/haproxy helpers) from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


def descendants(pid: int) -> list[int]:
    """``pid`` and every live process below it (from /proc/PID/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                todo += [int(c) for c in task.read_text().split()]
    return out


def busy_idle() -> tuple[float, float]:
    """The machine's busy and idle jiffies so far (all CPUs), from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values[:8]) - idle, idle


class Env:
    """Where every process of the bench runs: the host's loopback, or a namespace of ours."""

    def __init__(self, tmp: Path, netns: bool) -> None:
        self.tmp = tmp
        self.name: str | None = None
        self.prefix: list[str] = []
        self.procs: list[subprocess.Popen] = []
        if netns:
            self.name = f"bench-dp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
            subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
            self.prefix = ["ip", "netns", "exec", self.name]
            self.run("ip", "link", "set", "lo", "up", check=True)

    def run(self, *argv: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.prefix, *argv], capture_output=True, text=True,
                              timeout=30, check=check)  # fmt: skip

    def spawn(self, argv: list[str], log: str, **kw: Any) -> subprocess.Popen:
        out = open(self.tmp / log, "ab")  # noqa: SIM115 - the child keeps it
        proc = subprocess.Popen([*self.prefix, *argv], stdout=kw.pop("stdout", out),
                                stderr=out, preexec_fn=_die_with_parent, **kw)  # fmt: skip
        out.close()
        self.procs.append(proc)
        return proc

    def py(self, module: str, *args: str, log: str, **kw: Any) -> subprocess.Popen:
        return self.spawn([sys.executable, "-m", module, *args], log, **kw)

    def log(self, name: str, tail: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return (self.tmp / name).read_text(errors="replace")[-tail:]
        return ""

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        # A proxy worker or HAProxy a SIGKILLed HaloD left (detached: not our children)
        for pid_file, name in (("proxy/worker.pid", b"proxy_worker"),
                               ("haproxy/haproxy.pid", b"haproxy")):  # fmt: skip
            for path in self.tmp.glob(pid_file):
                with contextlib.suppress(OSError, ValueError):
                    pid = int(path.read_text().split()[0])
                    if name in Path(f"/proc/{pid}/cmdline").read_bytes():
                        os.kill(pid, signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.name:
            subprocess.run(["ip", "netns", "delete", self.name], capture_output=True)
            self.name = None


def wait_ready(env: Env, proc: subprocess.Popen, ready: Path, log: str, timeout: float = 20):
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{log} did not start:\n{env.log(log)}")
        time.sleep(0.03)
    return json.loads(ready.read_text())


def free_ports(env: Env, count: int, start: int, avoid: range = range(0)) -> int:
    """A base b with b..b+count-1 free (not overlapping ``avoid``). In our own namespace
    every port is free; on the host's loopback a block that binds now."""
    if env.name:
        return start
    return free_port_block(count, avoid)


def netns_possible() -> str | None:
    """Why the nftables variant (and its namespace) cannot run here, or None."""
    if os.geteuid() != 0:
        return "not root"
    for tool in ("ip", "nft", "conntrack"):
        if shutil.which(tool, path=SBIN) is None:
            return f"{tool} not installed"
    try:
        ctypes.CDLL("libnftables.so.1")
    except OSError:
        return "libnftables.so.1 not installed"
    return None


def available_backends(names: list[str], netns: str) -> tuple[list[str], dict[str, str], bool]:
    """The back-ends of ``names`` that can run here, why each other cannot, and whether
    to run in a namespace of our own (``netns``: auto, yes or no; nftables needs one)."""
    nft_why = netns_possible()
    use_netns = netns == "yes" or (netns == "auto" and nft_why is None)

    def why_not(backend: str) -> str | None:
        if backend == "nftables":
            return nft_why or (None if use_netns else "--netns no")
        if backend == "haproxy":
            return haproxy_possible()
        return None if backend in BACKENDS else "unknown back-end"

    chosen, skipped = select_available(names, why_not)
    return chosen, skipped, use_netns


def haproxy_possible() -> str | None:
    if not Path("/usr/sbin/haproxy").exists() and shutil.which("haproxy", path=SBIN) is None:
        return "haproxy not installed"
    if importlib.util.find_spec("halod.dataplane.haproxy") is None:
        return "halod has no haproxy back-end yet (halod/dataplane/haproxy.py)"
    from halod import dataplane

    if "haproxy" not in Path(dataplane.__file__).read_text():
        return "halod.dataplane.build() does not build haproxy yet"
    return None


# -- HaloD with one fake node ----------------------------------------------------------------


class HaloD:
    """``halod run --dataplane BACKEND`` in ``env``; ``flags`` add to the defaults."""

    def __init__(self, env: Env, backend: str, routes: int, tag: str, *flags: str) -> None:
        self.env, self.backend, self.routes = env, backend, routes
        self.host = VIP if backend == "nftables" else "127.0.0.1"
        self.browser_base = free_ports(env, routes, 20000 + 1000 * BACKENDS.index(backend))
        self.sp_base = free_ports(
            env,
            routes,
            self.browser_base + routes + 200,
            avoid=range(self.browser_base, self.browser_base + routes),
        )
        ready = env.tmp / f"halod-{tag}.ready"
        self.log_name = f"halod-{tag}.log"
        extra: list[str] = []
        if backend == "nftables":
            # Stats polling forks `conntrack -L` (an operator convenience, listing every
            # flow): off, so that the figures are the forwarding's alone.
            extra = ["--dataplane-host", VIP, "--nft-table", f"bench{tag.replace('-', '')}",
                     "--nft-stats-interval", "0", "--no-nft-keep-on-stop"]  # fmt: skip
        elif backend == "proxy":
            # The worker outlives a killed HaloD (a restart re-attaches to it); the bench's
            # clean stop at the end ends it too.
            extra = ["--proxy-on-exit", "stop"]
        elif backend == "haproxy":  # likewise HAProxy
            extra = ["--haproxy-on-exit", "stop"]
        self.ready = ready
        self.argv = [
            "halod.cli", "run",
            "--control", "tcp://127.0.0.1:0", "--status-http", "127.0.0.1:0",
            "--db", str(env.tmp / f"halod-{tag}.sqlite3"),
            "--routes", str(routes), "--dataplane", backend,
            "--browser-port-base", str(self.browser_base), "--sp-port-base", str(self.sp_base),
            "--ready-file", str(ready), "--log-level", "info", *extra, *flags,
        ]  # fmt: skip
        self.start()

    def start(self) -> None:
        """Start (or, after a kill, restart) HaloD with the same arguments: the same state
        file and route ports; pass fixed --control/--status-http flags to keep those too."""
        self.ready.unlink(missing_ok=True)
        self.proc = self.env.py(*self.argv, log=self.log_name)
        info = wait_ready(self.env, self.proc, self.ready, self.log_name)
        self.control, self.status, self.pid = info["control"], info["status"], info["pid"]

    def cpu(self) -> float:
        """HaloD's CPU with its live descendants' (a daemonized haproxy is not one)."""
        return sum(cpu_seconds(pid) for pid in descendants(self.pid))

    def port(self, route: int = 1) -> int:
        return self.browser_base + route - 1


class FakeNode:
    def __init__(self, env: Env, halod: HaloD, name: str, browser: str, sp: str) -> None:
        self.proc = env.py("bench.dataplane_node", halod.control, name, browser, sp,
                           log=f"node-{name}.log", stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)  # fmt: skip
        self.proc.stdin.write(json.dumps({"cmd": "join", "rate": 0, "window": 1}) + "\n")
        self.proc.stdin.flush()
        self.proc.stdout.readline()
        deadline = time.monotonic() + 10
        while True:
            self.proc.stdin.write('{"cmd": "status"}\n')
            self.proc.stdin.flush()
            status = json.loads(self.proc.stdout.readline())
            if status["roles"].get("active"):
                return
            if time.monotonic() > deadline:
                log = env.log(halod.log_name)
                raise RuntimeError(f"fake node {name} not active: {status}\n{log}")
            time.sleep(0.05)


# -- forwarding cost ---------------------------------------------------------------------------


class Loaders:
    """The load-generator processes; ``run`` sends one command to all and sums the answers."""

    def __init__(self, env: Env, count: int) -> None:
        self.procs = [
            env.py(
                "bench.dataplane_load",
                log=f"load-{i}.log",
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            for i in range(count)
        ]
        self.env = env
        self.run({"op": "ping", "host": "", "port": 0, "start": 0, "seconds": 0, "conc": 0})

    def _ask(self, p: subprocess.Popen, cmd: dict[str, Any]) -> None:
        p.stdin.write(json.dumps(cmd) + "\n")
        p.stdin.flush()

    def run(self, cmd: dict[str, Any]) -> dict[str, Any]:
        for p in self.procs:
            self._ask(p, cmd)
        total: dict[str, Any] = {"bytes": 0, "ops": 0, "errors": 0, "cpu": 0.0, "kinds": {}}
        for i, p in enumerate(self.procs):
            line = p.stdout.readline()
            if not line:
                raise RuntimeError(f"load generator exited:\n{self.env.log(f'load-{i}.log')}")
            reply = json.loads(line)
            if "error" in reply:
                raise RuntimeError(f"load generator: {reply['error']}")
            for k in ("bytes", "ops", "errors", "cpu"):
                total[k] += reply.get(k, 0)
            for k, v in reply.get("error_kinds", {}).items():
                total["kinds"][k] = total["kinds"].get(k, 0) + v
        return total


def measure(load: str, target: tuple[str, int], halod: HaloD | None, loaders: Loaders,
            args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    conc = {"bulk": args.bulk_conns, "conn": args.conn_conc, "rr": args.rr_conns}[load]
    start = time.monotonic() + 0.3  # every process connected (bulk, rr) and waiting
    cmd = {"op": load, "host": target[0], "port": target[1], "conc": conc, "size": 64,
           "start": start, "seconds": args.seconds}  # fmt: skip
    cpu0 = halod.cpu() if halod else None
    busy0, idle0 = busy_idle()
    total = loaders.run(cmd)
    busy1, idle1 = busy_idle()
    halod_cpu = halod.cpu() - cpu0 if halod and cpu0 is not None else None
    seconds = args.seconds
    out: dict[str, Any] = {
        "errors": total["errors"],
        "idle_pct": 100 * (idle1 - idle0) / max(1, (busy1 - busy0) + (idle1 - idle0)),
        "load_cpu_s": total["cpu"],
        "halod_cpu_s": halod_cpu,
    }
    if total["kinds"]:
        out["error_kinds"] = total["kinds"]
    if load == "bulk":
        out["value"] = total["bytes"] / seconds / 1e6  # MB/s
        if halod_cpu is not None and total["bytes"]:
            out["halod_cpu_per_gb_s"] = halod_cpu / (total["bytes"] / 1e9)
    else:
        out["value"] = total["ops"] / seconds
        if halod_cpu is not None and total["ops"]:
            out["halod_cpu_per_op_us"] = halod_cpu / total["ops"] * 1e6
    return out


def forwarding(env: Env, backends: list[str], args: argparse.Namespace) -> dict[str, Any]:
    paths = ["direct", *backends]
    # Ports: direct, then per back-end its node's browser and SP ports (never shared).
    base = free_ports(env, 2 * len(paths) + 1, 40000)
    listen = {"direct": [f"127.0.0.1:{base}"]}
    for i, backend in enumerate(backends):
        listen[backend] = [f"127.0.0.1:{base + 1 + 2 * i}", f"127.0.0.1:{base + 2 + 2 * i}"]
    servers = []
    every = [a for addrs in listen.values() for a in addrs]
    for i in range(args.server_procs):
        ready = env.tmp / f"server-{i}.ready"
        proc = env.py("bench.dataplane_server", "--ready-file", str(ready), "--reuse-port",
                      *every, log=f"server-{i}.log")  # fmt: skip
        servers.append(wait_ready(env, proc, ready, f"server-{i}.log")["pid"])
    targets: dict[str, tuple[str, int]] = {"direct": ("127.0.0.1", base)}
    halods: dict[str, HaloD] = {}
    for backend in backends:
        halod = HaloD(env, backend, args.routes, f"fwd-{backend}", "--spares", "0")
        browser, sp = listen[backend]
        FakeNode(env, halod, f"fake-{backend}", browser, f"tcp://{sp}")
        halods[backend] = halod
        targets[backend] = (halod.host, halod.port(1))
    loaders = Loaders(env, args.load_procs)
    # One throw-away pass per path: first connections, page faults, conntrack set-up.
    warm = argparse.Namespace(**{**vars(args), "seconds": min(0.5, args.seconds)})
    for path in paths:
        measure("rr", targets[path], halods.get(path), loaders, warm)
    rounds: list[dict[str, dict[str, Any]]] = []
    for rnd in range(args.rounds):
        order = paths[rnd % len(paths) :] + paths[: rnd % len(paths)]
        row: dict[str, dict[str, Any]] = {load: {} for load in LOADS}
        for load in LOADS:
            for path in order:
                row[load][path] = m = measure(load, targets[path], halods.get(path), loaders, args)
                if load == "conn" and env.name:
                    # TIME_WAIT flows of this window must not fill the namespace's conntrack
                    # table (shared limit) nor collide with the next window's.
                    env.run("conntrack", "-F")
                line = f"round {rnd + 1} {load:<4} {path:<9} {m['value']:>10.1f}"
                print(f"{line}  errors {m['errors']}  idle {m['idle_pct']:.0f}%", file=sys.stderr)
            for path in paths:
                m = row[load][path]
                direct = row[load]["direct"]["value"]
                m["ratio"] = m["value"] / direct if direct else None
        rounds.append(row)
    return {"paths": paths, "rounds": rounds, "summary": summarize(rounds, paths),
            "server_procs": args.server_procs, "load_procs": args.load_procs}  # fmt: skip


def spread(values: list[float]) -> dict[str, float] | None:
    values = [v for v in values if v is not None and v == v]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(rounds: list[dict[str, dict[str, Any]]], paths: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for load in LOADS:
        out[load] = {}
        for path in paths:
            ms = [r[load][path] for r in rounds]
            cpu_key = "halod_cpu_per_gb_s" if load == "bulk" else "halod_cpu_per_op_us"
            out[load][path] = {
                "value": spread([m["value"] for m in ms]),
                "ratio": spread([m["ratio"] for m in ms]),
                "errors": sum(m["errors"] for m in ms),
                "idle_pct": spread([m["idle_pct"] for m in ms]),
                "halod_cpu": spread([m.get(cpu_key) for m in ms]),
            }
    return out


# -- output ------------------------------------------------------------------------------------

REFERENCE = {  # a reference measurement on a 2-vCPU Debian 12 box: bulk, conn/s, requests/s
    "direct": (1.00, 1.00, 1.00),
    "nftables": (0.79, 0.87, 0.89),
    "haproxy": (0.46, 0.43, 0.45),
    "proxy": (0.20, 0.14, 0.14),
}
UNITS = {"bulk": ("MB/s", "s/GB"), "conn": ("conn/s", "µs/conn"), "rr": ("req/s", "µs/req")}


def fmt(value: Any, spec: str = ".2f") -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return format(value, spec)


def print_forwarding(fwd: dict[str, Any]) -> None:
    s = fwd["summary"]
    rounds = len(fwd["rounds"])
    print(f"\nforwarding cost: median of {rounds} interleaved round(s), ratio to direct "
          f"within each round [min-max]; ref = a reference measurement on a like box")  # fmt: skip
    for load in LOADS:
        unit, cpu_unit = UNITS[load]
        print(f"\n{load:<6}{'path':<10}{unit:>12}{'ratio':>8}{'[range]':>14}{'ref':>6}"
              f"{'errors':>8}{'idle%':>7}{'HaloD ' + cpu_unit:>16}")  # fmt: skip
        for path in fwd["paths"]:
            f = s[load][path]
            r = f["ratio"] or {}
            rng = f"[{fmt(r.get('min'))}-{fmt(r.get('max'))}]"
            ref = REFERENCE.get(path, (None,) * 3)[LOADS.index(load)]
            cpu = (f["halod_cpu"] or {}).get("median")
            print(f"{'':<6}{path:<10}{fmt((f['value'] or {}).get('median'), ',.0f'):>12}"
                  f"{fmt(r.get('median')):>8}{rng:>14}{fmt(ref):>6}{f['errors']:>8}"
                  f"{fmt((f['idle_pct'] or {}).get('median'), '.0f'):>7}"
                  f"{fmt(cpu, '.2f' if load == 'bulk' else '.1f'):>16}")  # fmt: skip


def parser() -> argparse.ArgumentParser:
    """``python -m bench dataplane``'s options (also what ``report`` reproduces a run from)."""
    p = argparse.ArgumentParser(prog="python -m bench dataplane", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument(
        "--paths",
        default="proxy,nftables,haproxy",
        help="back-ends to measure (those that cannot run here are skipped)",
    )
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=2.0, help="per load, per path, per round")
    p.add_argument("--load-procs", type=int, default=2)
    p.add_argument("--server-procs", type=int, default=2)
    p.add_argument("--bulk-conns", type=int, default=2, help="per load process")
    p.add_argument("--conn-conc", type=int, default=8, help="cycles in flight per load process")
    p.add_argument("--rr-conns", type=int, default=8, help="per load process")
    p.add_argument("--routes", type=int, default=4)
    p.add_argument(
        "--netns",
        choices=("auto", "yes", "no"),
        default="auto",
        help="run inside a network namespace of our own (root; needed for nftables)",
    )
    p.add_argument("--clients", type=int, default=1000, help="failover: simulated browsers")
    p.add_argument("--browser-procs", type=int, default=4, help="failover: browser processes")
    p.add_argument("--grace", type=float, default=1.0, help="failover: HaloD --grace")
    p.add_argument("--heartbeat", type=float, default=0.5, help="failover: heartbeat interval")
    p.add_argument("--missed", type=int, default=3, help="failover: HaloD --missed-heartbeats")
    p.add_argument(
        "--steady", type=float, default=3.0, help="failover: s of events before the kill"
    )
    p.add_argument(
        "--settle",
        type=float,
        default=30.0,
        help="failover: at most s after the failover for every browser to receive again",
    )
    p.add_argument("--failover-paths", help="back-ends for failover (default: --paths)")
    p.add_argument("--skip", default="", help="comma-separated: forwarding, failover")
    p.add_argument(
        "--quick", action="store_true", help="smoke: 1 round of 0.5 s per load and path, 50 clients"
    )
    p.add_argument("--json", type=Path, help=f"results (default {RESULTS}; --quick: none)")
    p.add_argument("--keep", type=Path, help="keep logs in this directory")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.quick:
        args.rounds, args.seconds = 1, 0.5
        if args.clients == 1000:
            args.clients = 50
        args.browser_procs = min(args.browser_procs, 2)
        args.steady, args.settle = 1.0, 10.0
    if args.json is None and not args.quick:
        args.json = RESULTS
    skip = set(filter(None, args.skip.split(",")))

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)

    backends, skipped, use_netns = available_backends(args.paths.split(","), args.netns)
    result: dict[str, Any] = {
        **results_header(args, skipped),
        "netns": use_netns,
    }
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            tmp = args.keep
        if "forwarding" not in skip:
            env = Env(tmp, use_netns)
            try:
                result["forwarding"] = forwarding(env, backends, args)
            finally:
                env.close()
            print_forwarding(result["forwarding"])
        if "failover" not in skip:
            from bench import dataplane_failover

            fo_backends = backends
            if args.failover_paths:
                fo_backends = [b for b in args.failover_paths.split(",") if b in backends]
            result["failover"] = dataplane_failover.run(tmp, fo_backends, use_netns, args)
            dataplane_failover.print_failover(result["failover"])
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    result["machine"]["loadavg_at_end"] = os.getloadavg()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        if args.json.exists() and not args.quick:
            result = merge_previous(json.loads(args.json.read_text()), result)
        args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
        print(f"\nwrote {args.json}", file=sys.stderr)
    return 0


def merge_previous(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """A partial rerun (``--skip forwarding``, ``--failover-paths X``) updates the recorded
    results instead of discarding the rest: parts not rerun, and failover runs of other
    back-ends, are kept from ``old``, marked with the run they came from."""
    merged = dict(new)
    if "forwarding" not in new and "forwarding" in old:
        # the page describes the full run; partial reruns are listed with their arguments
        merged["args"], merged["machine"] = old["args"], old["machine"]
        merged["started"] = old.get("started")
        merged["reruns"] = old.get("reruns", []) + [
            {"args": new["args"], "machine": new["machine"], "started": new.get("started")}
        ]
    if "forwarding" not in new and "forwarding" in old:
        merged["forwarding"] = old["forwarding"] | {
            "from_run": old["forwarding"].get("from_run", old.get("started"))
        }
    if "failover" in old and "failover" in new:
        fresh = {r["backend"] for r in new["failover"]["runs"]}
        kept = [
            r | {"from_run": r.get("from_run", old.get("started"))}
            for r in old["failover"]["runs"]
            if r["backend"] not in fresh
        ]
        ran = [r | {"from_run": new.get("started")} for r in new["failover"]["runs"]]
        merged["failover"] = new["failover"] | {"runs": kept + ran}
    elif "failover" not in new and "failover" in old:
        merged["failover"] = old["failover"]
    rerun = {r["backend"] for r in new.get("failover", {}).get("runs", [])}
    # A note about a failover that was just rerun describes the old run: drop it.
    notes = [
        n for n in old.get("notes", []) if not any(n.startswith(f"failover {b}") for b in rerun)
    ]
    merged["notes"] = notes + new.get("notes", [])
    return merged


if __name__ == "__main__":
    sys.exit(main())


# -- report (docs/performance.md, python -m bench report) ------------------------------------

REPORT_UNITS = {"bulk": ("bulk MB/s", "halod_cpu_per_gb_s", "s/GB"),
         "conn": ("new conn/s", "halod_cpu_per_op_us", "µs/conn"),
         "rr": ("req/s", "halod_cpu_per_op_us", "µs/req")}  # fmt: skip


def report(results: dict[str, Any], images: Path) -> str:
    """Markdown section from bench/results/dataplane.json: forwarding ratios, failover per
    back-end, and their plots."""
    from bench.report import command_line, machine_line, med_range, num, pyplot

    a = results["args"]
    out = [
        "```",
        command_line("dataplane", parser(), a, always=("paths", "rounds", "seconds", "clients")),
        "```",
        "",
        machine_line(results),
    ]
    for rerun in results.get("reruns", []):
        ra, load = rerun["args"], rerun["machine"].get("loadavg_at_start", [0])[0]
        parts = "failover" if "forwarding" in ra.get("skip", "") else "forwarding and failover"
        which = ra.get("failover_paths") or ra["paths"]
        out += ["", f"Rerun {rerun['started']}: {parts} for `{which}` (1-min load average at"
                f" its start {load:.1f}); its rows say so."]  # fmt: skip
    if results.get("skipped"):
        out += ["", "Skipped: " + "; ".join(f"{k} ({v})" for k, v in results["skipped"].items())]
    fwd = results.get("forwarding")
    plt = pyplot()
    if fwd:
        when = fwd.get("from_run")
        also = f" (forwarding measured in the run of {when})" if when else ""
        out += ["", f"Forwarding cost, {a['rounds']} rounds × {a['seconds']} s per load and "
                "path, each ratio to `direct` in its round; median [min–max] over rounds"
                f"{also}:", ""]  # fmt: skip
        out += ["| path | bulk MB/s | ratio | conn/s | ratio | req/s | ratio | HaloD CPU "
                "per GB / conn / req |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for path in fwd["paths"]:
            cells = [path]
            cpu = []
            for load in LOADS:
                f = fwd["summary"][load].get(path)
                if not f:
                    cells += ["—", "—"]
                    continue
                cells += [num(f["value"]["median"]), med_range(f["ratio"], 2)]
                if f.get("halod_cpu"):
                    cpu.append(num(f["halod_cpu"]["median"]) + " " + REPORT_UNITS[load][2])
            cells.append(" / ".join(cpu) if cpu else "—")
            out.append("| " + " | ".join(cells) + " |")
        fig, ax = plt.subplots(figsize=(6.5, 3.2))
        paths = [p for p in fwd["paths"] if p != "direct"]
        width = 0.8 / max(1, len(paths))
        for i, path in enumerate(paths):
            meds, lo, hi = [], [], []
            for load in LOADS:
                r = fwd["summary"][load][path]["ratio"]
                meds.append(r["median"])
                lo.append(r["median"] - r["min"])
                hi.append(r["max"] - r["median"])
            xs = [j + i * width for j in range(len(LOADS))]
            ax.bar(xs, meds, width, yerr=[lo, hi], capsize=3, label=path)
        ax.axhline(1.0, color="grey", linestyle=":")
        ax.set_xticks([j + width * (len(paths) - 1) / 2 for j in range(len(LOADS))],
                      [REPORT_UNITS[load][0] for load in LOADS])  # fmt: skip
        ax.set_ylabel("throughput / direct")
        ax.set_title("Data plane forwarding cost (median, min–max over rounds)", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(images / "perf-dataplane-forwarding.png", dpi=110)
        plt.close(fig)
        out += ["", "![forwarding cost](images/perf-dataplane-forwarding.png)"]
    fo = results.get("failover")
    if fo and fo.get("runs"):
        s = fo["runs"][0].get("settings", {})
        out += ["", f"Failover: SIGKILL of 1 of 2 active nodes (+1 spare), {a['clients']} "
                f"browsers (ws:poll:sse 2:1:1), grace {s.get('grace_s')} s, heartbeat "
                f"{s.get('heartbeat_interval_s')} s × {s.get('missed_heartbeats')}; seconds "
                "from the kill:", "",
                "| path | affected | never again | HaloD failover | reconnected p50 / max "
                "| receiving again p50 | p99 | max | lost events | run |",
                "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip

        def sec(v: float | None) -> str:
            return "—" if v is None else f"{v:.2f}"

        order = {b: i for i, b in enumerate(BACKENDS)}
        runs = sorted(fo["runs"], key=lambda r: order.get(r["backend"], 9))
        for r in runs:
            if "error" in r:
                out.append(f"| {r['backend']} | error: {r['error'][:80]} |" + " |" * 8)
                continue
            rec, con = r["recovery_s"], r["reconnect_s"]
            when = r.get("from_run") or results.get("started", "")
            out.append(
                f"| {r['backend']} | {r['affected']} | {r['never_recovered']} "
                f"| {sec(r['detected_s'])} | {sec(con['p50'])} / {sec(con['max'])} "
                f"| {sec(rec['p50'])} | {sec(rec['p99'])} | {sec(rec['max'])} "
                f"| {r['lost_events']} | {when} |"
            )
            extra = r.get("failovers_before_kill", 0) or r.get("extra_failovers_after_kill", 0)
            if extra:
                out.append(f"| ↳ {r['backend']}: {r.get('failovers_before_kill', 0)} false "
                           f"failovers before the kill, {r.get('extra_failovers_after_kill', 0)}"
                           " after it |" + " |" * 9)  # fmt: skip
        fig, ax = plt.subplots(figsize=(6, 3))
        done = [r for r in runs if "error" not in r and r["recovery_s"]["p50"] is not None]
        for i, r in enumerate(done):
            rec = r["recovery_s"]
            ax.barh(i, rec["max"], color="#c8d6e8")
            ax.barh(i, rec["p50"], color="#4c72b0")
            ax.plot([r["detected_s"]] * 2, [i - 0.4, i + 0.4], color="black")
        ax.set_yticks(range(len(done)), [r["backend"] for r in done])
        ax.set_xlabel("s from SIGKILL (bar: p50 / max receiving again; line: HaloD failover)")
        ax.set_title("Failover under 1000 browsers, per data plane", fontsize=9)
        fig.tight_layout()
        fig.savefig(images / "perf-dataplane-failover.png", dpi=110)
        plt.close(fig)
        out += ["", "![failover per data plane](images/perf-dataplane-failover.png)"]
    if results.get("notes"):
        out += ["", "Notes recorded with the results:", *[f"- {n}" for n in results["notes"]]]
    return "\n".join(out)
