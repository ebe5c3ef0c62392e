"""Real HaloDs on etcd moving the route address between hosts in network namespaces, for
tests/halod/test_vip.py. Run inside the client namespace of a vip_net.Lan:

    ip netns exec <tag>c python -m tests.halod.vip_ha TAG TMP

Host a (10.77.0.1) and host b (10.77.0.2) each run an etcd member and a ``halod`` with
``store = "etcd"``, the built-in proxy on the route address (10.77.0.100, the same ports
on both hosts) and ``vip_address`` set; the client namespace (10.77.0.10) runs the third
etcd member, one node given both HaloD control addresses, simulated browsers
(bench/browsers.py) and a web app (bench/sender.py, acknowledged mode) through the
route address. Once h1 leads and host a holds the address, every process of host a is
SIGKILLed. The figures (JSON on stdout's last line): when host b held the address, when
h2 led, and the browsers' and the web app's outcome.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.browsers import BrowserProcesses
from bench.chaos_report import analyse
from bench.sender import SenderProcess
from halod.etcd.local import ETCD
from tests.conftest import NodeProcess, wait_for
from tests.halod import vip_net

HOST_IPS = {"a": vip_net.HOSTS["a"], "b": vip_net.HOSTS["b"], "c": vip_net.CLIENT}
VIP_IP = vip_net.VIP.split("/")[0]
BROWSERS = 60
ROUTES = 24


class Etcd:
    """One etcd member per namespace, on that namespace's address (ports 2379/2380)."""

    def __init__(self, tag: str, tmp: Path) -> None:
        self.tag, self.tmp = tag, tmp
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.initial = ",".join(f"m{h}=http://{ip}:2380" for h, ip in HOST_IPS.items())

    @property
    def endpoints(self) -> list[str]:
        return [f"http://{ip}:2379" for ip in HOST_IPS.values()]

    def start(self) -> None:
        for host, ip in HOST_IPS.items():
            log = (self.tmp / f"etcd-{host}.log").open("ab")
            self.procs[host] = subprocess.Popen([
                "ip", "netns", "exec", self.tag + host, ETCD, "--name", f"m{host}",
                "--data-dir", str(self.tmp / f"etcd-{host}"),
                "--listen-client-urls", f"http://{ip}:2379",
                "--advertise-client-urls", f"http://{ip}:2379",
                "--listen-peer-urls", f"http://{ip}:2380",
                "--initial-advertise-peer-urls", f"http://{ip}:2380",
                "--initial-cluster", self.initial, "--initial-cluster-state", "new",
                "--initial-cluster-token", self.tag,
                "--heartbeat-interval", "25", "--election-timeout", "250",
                "--logger", "zap", "--log-outputs", "stderr",
            ], stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        wait_for(lambda: all(healthy(e) for e in self.endpoints), "etcd healthy", 20)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)


ETCD_FLAGS = ("--store", "--etcd-endpoint", "--etcd-prefix", "--etcd-lease-ttl", "--etcd-name")
VIP_FLAGS = ("--vip-address", "--vip-interface", "--vip-router-id", "--vip-priority")


def ha_wiring_missing(flags: tuple[str, ...] = ETCD_FLAGS) -> str | None:
    """What of HaloD's etcd wiring (issue 19 phase 2a) this tree lacks, or None: its HA
    test helpers (tests/integration/test_halod_ha.py) and ``halod run``'s ``flags``."""
    try:
        from tests.integration import test_halod_ha  # noqa: F401
    except ImportError as e:
        return f"tests/integration/test_halod_ha.py (EtcdHaloD, start_nodes) is missing: {e}"
    help_text = subprocess.run([sys.executable, "-m", "halod.cli", "run", "--help"],
                               capture_output=True, text=True, timeout=30).stdout  # fmt: skip
    missing = [flag for flag in flags if flag not in help_text]
    if missing:
        return f"halod run has no {', '.join(missing)} yet (phase 2a's HaloD config keys)"
    return None


def healthy(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(endpoint + "/health", timeout=1) as r:
            return bool(json.loads(r.read()).get("health") == "true")
    except (OSError, ValueError):
        return False


def vip_on(tag: str, host: str) -> bool:
    out = subprocess.run(["ip", "-n", tag + host, "-4", "-o", "addr", "show", "dev", f"v{host}"],
                         capture_output=True, text=True, timeout=10).stdout  # fmt: skip
    return vip_net.VIP in out


def scenario(tag: str, tmp: Path, kill: str = "host") -> dict[str, Any]:
    """``kill``: ``host`` SIGKILLs every process of host a, ``halod`` only its HaloD."""
    from tests.integration.test_halod_ha import EtcdHaloD

    etcd = Etcd(tag, tmp)
    halods: list[Any] = []
    node: NodeProcess | None = None
    browsers: BrowserProcesses | None = None
    sender: SenderProcess | None = None
    figures: dict[str, Any] = {}
    try:
        etcd.start()
        for name, host in (("h1", "a"), ("h2", "b")):
            ip = HOST_IPS[host]
            h = EtcdHaloD(tmp, name, etcd.endpoints, "--spares", "0", "--grace", "3",
                          "--heartbeat-interval", "0.5", "--missed-heartbeats", "8",
                          "--dataplane-host", VIP_IP, "--vip-address", vip_net.VIP,
                          "--vip-interface", f"v{host}", "--vip-router-id",
                          str(vip_net.ROUTER_ID), "--vip-priority", "100",
                          dataplane="proxy")  # fmt: skip
            if halods:  # the route ports are the same on every host
                h.browser_base, h.sp_base = halods[0].browser_base, halods[0].sp_base
            h.flags = (*h.flags, "--browser-port-base", str(h.browser_base),
                       "--sp-port-base", str(h.sp_base), "--proxy-on-exit", "stop")  # fmt: skip
            h.control, h.status_http = f"tcp://{ip}:7600", f"{ip}:7601"
            # HaloD runs on its host, from its own folder (its state stays there)
            h.prefix = ("ip", "netns", "exec", tag + host, "env", "-C", str(h.tmp))
            halods.append(h)
            h.start()
            if name == "h1":
                wait_for(h.leads, "h1 leads", 15)
        h1, h2 = halods
        wait_for(lambda: h2.role() == "follower", "h2 follows", 15)
        wait_for(lambda: vip_on(tag, "a"), "host a holds the address", 10)
        assert not vip_on(tag, "b")

        folder = tmp / "n1"
        folder.mkdir()
        node = NodeProcess(folder, "--name", "n1", "--halod", f"{h1.control},{h2.control}")
        node.start(http=f"{vip_net.CLIENT}:8001", sp=f"tcp://{vip_net.CLIENT}:9001")
        wait_for(lambda: any(n["connected"] for n in h1.status()["nodes"]), "n1 registered")
        wait_for(lambda: h2.owners() == h1.owners(), "h2 warm")

        prefix = "vipha-"
        bfolder = tmp / "browsers"
        bfolder.mkdir()
        browsers = BrowserProcesses(bfolder, BROWSERS, 1, [
            "--secret-file", str(node.secret_file), "--prefix", prefix, "--routes", str(ROUTES),
            "--halod-browser-base", f"{VIP_IP}:{h1.browser_base}",
            "--transports", "ws=2,poll=1,sse=1,iframe=1",
        ])  # fmt: skip
        browsers.wait_ready(60)
        sender = SenderProcess(tmp, [
            "--halod-sp-base", f"{VIP_IP}:{h1.sp_base}", "--routes", str(ROUTES),
            "--prefix", prefix, "--count", str(BROWSERS), "--interval", "200",
            "--ack-timeout", "10", "--timeout", "12", "--resend", "3", "--retries", "8",
            "--backoff", "0.2", "--drain", "10",
            *[a for f in browsers.ready_files for a in ("--wait-for", str(f))],
        ], "acked")  # fmt: skip
        time.sleep(3)

        t = time.time()
        t0 = time.monotonic()
        killed = 0  # every process of host a: h1, its keepalived and proxy worker, etcd
        pids = subprocess.run(["ip", "netns", "pids", tag + "a"], capture_output=True,
                              text=True, timeout=10).stdout.split()  # fmt: skip
        if kill == "halod":
            assert h1.proc is not None
            pids = [str(h1.proc.pid)]
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        figures["killed"] = killed
        seen: dict[str, float] = {}
        while len(seen) < 2 and time.monotonic() - t0 < 10:
            if "address_on_b_s" not in seen and vip_on(tag, "b"):
                seen["address_on_b_s"] = round(time.monotonic() - t0, 3)
            if "h2_leads_s" not in seen and h2.leads():
                seen["h2_leads_s"] = round(time.monotonic() - t0, 3)
            time.sleep(0.02)
        figures.update(seen)
        window = (t, time.time() + 6)
        time.sleep(6)
        report = sender.stop(60)
        time.sleep(1)
        clients = BrowserProcesses.clients(browsers.stop())
        accepted = {k: v["accepted"] for k, v in report["keys"].items()}
        summary = analyse(accepted, clients, report["round_times"], [window])["summary"]
        incident = summary["incidents"][0]
        outages = [o for c in clients for o in c["outages"] if window[0] <= o[0] <= window[1]]
        reconnected = [o[2] - t for o in outages if o[2] is not None]
        receiving = [o[1] - t for o in outages if o[1] is not None]
        figures.update({
            "browsers": len(clients), "rounds": report["rounds"],
            "statuses": report["status_counts"], "accepted": summary["accepted"],
            "lost": summary["lost"], "duplicated": summary["duplicated"],
            "missing_clients": summary["missing_clients"], "affected": incident["affected"],
            "never_recovered": len(incident["never_recovered"]),
            "receiving_again_s": incident["recovery"],
            "reconnected_after_kill_max_s": round(max(reconnected, default=-1), 3),
            "receiving_after_kill_max_s": round(max(receiving, default=-1), 3),
        })  # fmt: skip
        return figures
    finally:
        if sender is not None:
            sender.kill()
        if browsers is not None:
            browsers.kill()
        if node is not None and node.alive():
            node.stop(signal.SIGKILL)
        for h in halods:
            if h.alive():
                h.stop(signal.SIGTERM)
        etcd.stop()


if __name__ == "__main__":
    result = scenario(sys.argv[1], Path(sys.argv[2]), *sys.argv[3:4])
    print(json.dumps(result), flush=True)
