"""The route address across HaloD hosts (halod/vip.py).

Unit tests of the sans-I/O part (settings, keepalived.conf, what leadership writes, log
parsing), then real keepalived in network namespaces this test creates (tests/halod/
vip_net.py): two HaloD hosts and a client on one Ethernet segment. Killing the leader's
HaloD, or every process of the leader's host, moves the address to the other host, and a
browser stand-in streaming through the address reconnects through it within 3 s.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from halod.vip import (
    KEEPALIVED,
    Role,
    VipFiles,
    VipSettings,
    VirtualAddress,
    VrrpState,
    alive_script,
    effective_priority,
    host_setup,
    keepalived_argv,
    keepalived_conf,
    track_value,
    vrrp_state,
)
from orbited.core.settings import ConfigError
from tests.halod import vip_ha, vip_net

ROOT = Path(__file__).resolve().parents[2]
S = VipSettings(address="10.77.0.100/24", interface="eth0", router_id=77, priority=100)

# -- settings ----------------------------------------------------------------------------


def test_defaults_validate() -> None:
    S.validate()
    assert effective_priority(S, Role.LEADER) == 200
    assert effective_priority(S, Role.FOLLOWER) == 100


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"address": "10.77.0.100"}, "prefix length"),
        ({"address": "fd00::1/64"}, "IPv4"),
        ({"address": "10.77.0.300/24"}, "IPv4"),
        ({"address": "10.77.0.0/24"}, "network or broadcast"),
        ({"address": "10.77.0.255/24"}, "network or broadcast"),
        ({"interface": ""}, "vip_interface"),
        ({"interface": "eth0 dev lo"}, "vip_interface"),
        ({"interface": "a" * 16}, "vip_interface"),
        ({"interface": "eth0\n}"}, "vip_interface"),
        ({"interface": "lo"}, "vip_interface must not be a loopback interface"),
        ({"router_id": 0}, "vip_router_id"),
        ({"router_id": 256}, "vip_router_id"),
        ({"router_id": True}, "vip_router_id"),
        ({"priority": 0}, "vip_priority must be an integer 1-154 "),
        ({"priority": 155}, "vip_priority must be an integer 1-154 "),
        ({"priority": 255}, "vip_priority must be an integer 1-154 "),
        ({"priority": 205, "lead_boost": 50}, "vip_priority must be an integer 1-204 "),
        ({"lead_boost": 0}, "the lead boost"),
        ({"advert_int": 0}, "vip_advert_int"),
        ({"advert_int": 41}, "vip_advert_int"),
        ({"advert_int": 0.125}, "centiseconds"),
        ({"state_dir": 'a"b'}, "state_dir"),
        ({"state_dir": ""}, "state_dir"),
        ({"stop_timeout": 0}, "stop_timeout"),
        ({"stale_after": 0.5}, "etcd_lease_ttl must be 1-3600 seconds with vip_address"),
        ({"stale_after": 3601}, "etcd_lease_ttl must be 1-3600 seconds with vip_address"),
        # keepalived splits alive.sh's path at white space and turns the check off
        (
            {"state_dir": "/var/lib/halo d/vip"},
            "state_dir must be a path without quotes or white space",
        ),
        ({"state_dir": "/var/lib/it's/vip"}, "state_dir"),
    ],
)
def test_bad_settings_are_refused_by_name(change: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError, match=words.replace("+", r"\+")):
        replace(S, **change).validate()


@pytest.mark.parametrize(
    ("dataplane", "host", "refused"),
    [
        ("proxy", "127.0.0.1", True),  # the default: the address would serve nothing
        ("proxy", "10.77.0.100", False),
        ("proxy", "0.0.0.0", False),
        ("haproxy", "10.77.0.101", True),
        ("nftables", "10.77.0.100", False),
        ("nftables", "127.0.0.1", True),
        ("none", "127.0.0.1", False),
    ],
)
def test_halod_refuses_a_data_plane_that_is_not_on_the_route_address(
    tmp_path: Path, dataplane: str, host: str, refused: bool
) -> None:
    from halod.config import HaloDConfig

    config = HaloDConfig(store="etcd", vip_address="10.77.0.100/24", vip_interface="eth0",
                         dataplane=dataplane, dataplane_host=host,
                         db=str(tmp_path / "h.db"))  # fmt: skip
    if not refused:
        config.validate()
        return
    with pytest.raises(ConfigError, match=rf"dataplane_host {host} is not the route address "
                                          r"10\.77\.0\.100 \(vip_address\)"):  # fmt: skip
        config.validate()


def test_halod_refuses_a_db_folder_keepalived_cannot_run_its_check_from(tmp_path: Path) -> None:
    # An audit: with a space in db's path keepalived split alive.sh's path, disabled the
    # check, and a hung leader's host kept the address (nothing in HaloD's log).
    from halod.config import HaloDConfig

    spaced = tmp_path / "halo d" / "h.db"
    config = HaloDConfig(store="etcd", vip_address="10.77.0.100/24", vip_interface="eth0",
                         dataplane_host="10.77.0.100", db=str(spaced))  # fmt: skip
    with pytest.raises(ConfigError, match=r"db .*halo d/h\.db: with vip_address its folder"):
        config.validate()
    HaloDConfig(store="etcd", dataplane_host="10.77.0.100", db=str(spaced)).validate()  # no VIP


def test_timings_follow_vrrp() -> None:
    # RFC 5798: skew = (256 - priority) * interval / 256; master down = 3 * interval + skew
    assert S.skew() == pytest.approx(156 * 0.2 / 256)
    assert S.takeover_interval() == pytest.approx(0.6 + 156 * 0.2 / 256)


# -- keepalived.conf and what leadership writes ------------------------------------------


def test_conf_one_instance_tracking_the_leader_file(tmp_path: Path) -> None:
    files = VipFiles(tmp_path)
    conf = keepalived_conf(S, files)
    assert f'file "{tmp_path}/leader"' in conf
    assert "vrrp_instance orbited_halod_77 {" in conf
    for line in ("state BACKUP", "interface eth0", "virtual_router_id 77", "priority 100",
                 "advert_int 0.2", "halod_leader weight 100", "10.77.0.100/24 dev eth0",
                 "vrrp_version 3"):  # fmt: skip
        assert (
            line in conf.splitlines()
            or f"  {line}" in conf.splitlines()
            or (f"    {line}" in conf.splitlines())
        ), line
    assert "nopreempt" not in conf  # the leader's higher priority must take the address
    assert conf.count("{") == conf.count("}")


def test_conf_carries_each_setting(tmp_path: Path) -> None:
    s = replace(S, router_id=5, priority=20, lead_boost=30, advert_int=0.05, interface="vb")
    conf = keepalived_conf(s, VipFiles(tmp_path))
    assert "  advert_int 0.05\n" in conf
    assert "  priority 20\n" in conf
    assert "    halod_leader weight 30\n" in conf
    assert "    10.77.0.100/24 dev vb\n" in conf
    assert "vrrp_instance orbited_halod_5 {" in conf
    assert "  advert_int 1\n" in keepalived_conf(replace(S, advert_int=1.0), VipFiles(tmp_path))


def test_conf_takes_the_boost_away_while_the_track_file_is_stale(tmp_path: Path) -> None:
    files = VipFiles(tmp_path)
    conf = keepalived_conf(replace(S, lead_boost=30), files)
    assert f'  script "{tmp_path}/alive.sh"\n' in conf
    assert "  interval 1\n" in conf
    assert "    halod_alive weight -30\n" in conf  # the leader's boost, taken back


@pytest.mark.parametrize(("age", "fresh"), [(0.0, True), (1.5, True), (2.6, False)])
def test_alive_script_judges_the_track_files_age(tmp_path: Path, age: float,
                                                  fresh: bool) -> None:  # fmt: skip
    files = VipFiles(tmp_path)
    files.alive.write_text(
        alive_script(S, files, shutil.which("stat") or "", shutil.which("date") or "")
    )  # S.stale_after: 2 s; tools as HaloD finds them
    files.track.write_text("1\n")
    then = time.time() - age
    os.utime(files.track, (then, then))
    done = subprocess.run(["/bin/sh", str(files.alive)], capture_output=True, timeout=10)
    assert (done.returncode == 0) is fresh, done
    files.track.unlink()  # no file (HaloD never wrote it): not alive
    assert subprocess.run(["/bin/sh", str(files.alive)], timeout=10).returncode != 0


def test_a_disabled_check_is_logged_as_an_error(tmp_path: Path) -> None:
    from twisted.internet.task import Clock
    from twisted.logger import capturedLogs

    vip = VirtualAddress(replace(S, state_dir=str(tmp_path)), Clock())
    with capturedLogs() as events:
        vip._line(None, "Script `/x y/alive.sh` cannot be accessed")  # type: ignore[arg-type]
        vip._line(None, "Disabling track script halod_alive since not found/accessible")  # type: ignore[arg-type]
    assert sum("disabled its check" in e["log_format"] for e in events) == 1


def test_halod_refreshes_the_track_file_until_stopped(tmp_path: Path) -> None:
    from twisted.internet.task import Clock

    clock = Clock()
    vip = VirtualAddress(replace(S, state_dir=str(tmp_path)), clock)
    vip._start = lambda: None  # type: ignore[method-assign]  # (no keepalived here)
    vip.follow()
    track = VipFiles.of(vip.settings).track
    os.utime(track, (1000.0, 1000.0))
    clock.advance(S.refresh_interval())
    assert time.time() - track.stat().st_mtime < 5  # rewritten: HaloD is alive
    vip.stop()
    os.utime(track, (1000.0, 1000.0))
    clock.advance(S.refresh_interval() * 4)
    assert track.stat().st_mtime == 1000.0  # a stopped HaloD does not


def test_leader_writes_one_follower_zero() -> None:
    assert track_value(Role.LEADER) == "1\n"
    assert track_value(Role.FOLLOWER) == "0\n"
    # any leader outbids any follower whose base priority is within lead_boost
    low_leader = replace(S, priority=60)
    high_follower = replace(S, priority=150)
    assert effective_priority(low_leader, Role.LEADER) > effective_priority(
        high_follower, Role.FOLLOWER)  # fmt: skip


def test_argv_dies_with_halod_and_uses_state_dir(tmp_path: Path) -> None:
    files = VipFiles(tmp_path)
    argv = keepalived_argv(S, files, setpriv="/usr/bin/setpriv")
    assert argv[:4] == ["/usr/bin/setpriv", "--pdeathsig", "TERM", "--"]
    assert argv[4] == KEEPALIVED
    assert "--dont-fork" in argv and "--vrrp" in argv
    for flag, path in (("--use-file", files.conf), ("--pid", files.pid),
                       ("--vrrp_pid", files.vrrp_pid)):  # fmt: skip
        assert argv[argv.index(flag) + 1] == str(path)
        assert path.parent == tmp_path


def test_files_are_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    files = VipFiles.of(replace(S, state_dir="state/vip"))
    assert files.track == tmp_path / "state/vip/leader"


def test_host_setup_keeps_the_address_local_and_quiet() -> None:
    setup = host_setup(replace(S, interface="va"))
    assert setup.loopback_address == "10.77.0.100/32"
    assert setup.ip_argv("/usr/sbin/ip") == [
        "/usr/sbin/ip", "address", "replace", "10.77.0.100/32", "dev", "lo"]  # fmt: skip
    assert dict(setup.sysctls) == {
        "/proc/sys/net/ipv4/conf/va/arp_ignore": "1",
        "/proc/sys/net/ipv4/conf/va/arp_announce": "2",
    }


def test_state_lines() -> None:
    i = S.instance
    assert vrrp_state(f"Sun Dec  6 05:07:23 2026: ({i}) Entering MASTER STATE", i) is (
        VrrpState.MASTER)  # fmt: skip
    assert vrrp_state(f"x: ({i}) Entering BACKUP STATE (init)", i) is VrrpState.BACKUP
    assert vrrp_state(f"x: ({i}) Entering FAULT STATE", i) is VrrpState.FAULT
    assert vrrp_state("x: (other_1) Entering MASTER STATE", i) is None
    assert vrrp_state(f"x: ({i}) Entering WEIRD STATE", i) is None
    assert vrrp_state(f"x: ({i}) removing VIPs.", i) is None


# -- real keepalived in network namespaces -----------------------------------------------


def _netns_skip() -> str | None:
    if not os.access(KEEPALIVED, os.X_OK):
        return "keepalived is not installed (./dev test installs it as root)"
    return vip_net.netns_usable()


needs_netns = pytest.mark.skipif(_netns_skip() is not None, reason=str(_netns_skip()))


class Proc:
    """A program in a namespace; its stdout lines arrive on a queue."""

    def __init__(self, popen: subprocess.Popen[str]) -> None:
        self.popen = popen
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.put(line.rstrip("\n"))

    def expect(self, prefix: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line starting {prefix!r} in {timeout} s") from None
            if line.startswith(prefix):
                return line
            if line.startswith("error"):
                raise AssertionError(line)


class Host(Proc):
    def command(self, cmd: str, timeout: float = 15.0) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(cmd + "\n")
        self.popen.stdin.flush()
        self.expect(f"ok {cmd}", timeout)


class Client(Proc):
    def __init__(self, popen: subprocess.Popen[str], net: vip_net.Lan) -> None:
        super().__init__(popen)
        self.net = net
        self.seen: list[dict[str, Any]] = []

    def events(self, timeout: float = 0.0) -> list[dict[str, Any]]:
        out = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                out.append(
                    json.loads(self.lines.get(timeout=max(0.0, deadline - time.monotonic())))
                )
            except queue.Empty:
                return out

    def wait_connected(self, host: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in self.events(0.1):
                self.seen.append(e)
                if e["event"] == "connected" and e["host"] == host:
                    return e
        raise AssertionError(f"the client did not connect to host {host} in {timeout} s; "
                             f"its last events: {self.seen[-5:]}\n{self.net.state()}")  # fmt: skip


@pytest.fixture
def net() -> Iterator[vip_net.Lan]:
    with vip_net.lan() as lan:
        yield lan


def start_host(net: vip_net.Lan, name: str, priority: int, tmp_path: Path) -> Host:
    argv = [
        sys.executable,
        "-m",
        "tests.halod.vip_net",
        "host",
        name,
        vip_net.VIP,
        net.iface(name),
        str(priority),
        str(tmp_path / f"{name}-vip"),
        str(vip_net.PORT),
    ]
    host = Host(net.popen(name, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=(tmp_path / f"{name}.err").open("w"), cwd=ROOT))  # fmt: skip
    host.expect("ready")
    return host


def start_client(net: vip_net.Lan, tmp_path: Path, silence: float = 0.6) -> Client:
    """The browser stand-in; ``silence``: its watchdog (s without data = cut)."""
    argv = [sys.executable, "-m", "tests.halod.vip_net", "client", vip_net.VIP.split("/")[0],
            str(vip_net.PORT), str(silence)]  # fmt: skip
    return Client(net.popen("c", argv, stdout=subprocess.PIPE, cwd=ROOT,
                            stderr=(tmp_path / "client.err").open("w")), net)  # fmt: skip


def vip_on(net: vip_net.Lan, host: str) -> bool:
    return vip_net.VIP in net.addresses(host)


def wait_for(cond: Any, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.02)
    return time.monotonic() - start


def leader_a_follower_b(net: vip_net.Lan, tmp_path: Path, tell_b: bool = True,
                        silence: float = 0.6) -> tuple[Host, Host, Client]:  # fmt: skip
    """a leads, b follows (``tell_b`` False: b's HaloD was told nothing yet; its
    keepalived runs as a follower from the start anyway)."""
    a = start_host(net, "a", 100, tmp_path)
    b = start_host(net, "b", 100, tmp_path)
    a.command("lead")
    if tell_b:
        b.command("follow")
    else:
        wait_for(lambda: (tmp_path / "b-vip" / "vrrp.pid").exists(), 10, "b's keepalived runs")
    wait_for(lambda: vip_on(net, "a"), 10, "the leader's host a takes the address")
    assert not vip_on(net, "b")
    client = start_client(net, tmp_path, silence)
    client.wait_connected("a", 10)
    return a, b, client


def report(what: str, seconds: float) -> None:
    print(f"\nVIP figure: {what}: {seconds:.2f} s")


@needs_netns
def test_leadership_moves_the_address(net: vip_net.Lan, tmp_path: Path) -> None:
    a, b, client = leader_a_follower_b(net, tmp_path)
    t0 = time.monotonic()
    a.command("follow")
    b.command("lead")
    wait_for(lambda: vip_on(net, "b") and not vip_on(net, "a"), 5, "the address moves to b")
    e = client.wait_connected("b", 3)
    report("planned move, client on the new host after", e["t"] - t0)
    # the established stream through a was cut (b's kernel has no such connection)
    # and the client came back through the same address
    # no flapping: a follower's keepalived leaves the address alone
    time.sleep(1.5)
    assert vip_on(net, "b") and not vip_on(net, "a")
    # a clean stop of the leader's HaloD releases the address at once
    t0 = time.monotonic()
    b.command("stop")
    assert not vip_on(net, "b")
    wait_for(lambda: vip_on(net, "a"), 2, "a takes the address")
    client.wait_connected("a", 3)
    report("clean stop of the holder, client on the other host after", time.monotonic() - t0)


@needs_netns
def test_halod_killed_address_moves_before_a_new_leader(net: vip_net.Lan, tmp_path: Path) -> None:
    a, b, client = leader_a_follower_b(net, tmp_path)
    keepalived_pid = int((tmp_path / "a-vip" / "keepalived.pid").read_text())
    t0 = time.monotonic()
    a.popen.kill()  # kill -9 of HaloD (here: the stand-in that runs VirtualAddress)
    # keepalived dies with its HaloD (setpriv --pdeathsig): it releases the address...
    wait_for(lambda: not os.path.exists(f"/proc/{keepalived_pid}"), 5, "a's keepalived exits")
    assert not vip_on(net, "a")
    # ...and host b takes it while its HaloD still follows (its lease has not ended yet)
    moved = wait_for(lambda: vip_on(net, "b"), 3, "b takes the address")
    e = client.wait_connected("b", 3)
    report("HaloD kill -9, address on b after", moved + 0)
    report("HaloD kill -9, client reconnected through b after", e["t"] - t0)
    assert e["t"] - t0 < 3.0
    b.command("lead")  # its election, a lease TTL later
    a2 = start_host(net, "a", 100, tmp_path)  # a restarted HaloD follows: b keeps the address
    a2.command("follow")
    time.sleep(1.5)
    assert vip_on(net, "b") and not vip_on(net, "a")


@needs_netns
def test_frozen_halod_gives_the_address_to_the_new_leader(net: vip_net.Lan, tmp_path: Path) -> None:
    # A hung leader (SIGSTOP: its keepalived runs on) cannot write 0 to its track file
    # when another HaloD takes the lease. Before, both hosts then advertised priority 200
    # and VRRP left the address on the hung host for as long as it hung. Its file goes
    # stale instead: keepalived takes the lead boost away and the new leader's host wins.
    a, b, client = leader_a_follower_b(net, tmp_path)
    stale = S.stale_after  # the stand-in runs with the default
    t0 = time.monotonic()
    a.popen.send_signal(signal.SIGSTOP)
    try:
        b.command("lead")  # its election, once a's lease has ended
        moved = wait_for(lambda: vip_on(net, "b") and not vip_on(net, "a"), stale + 4,
                         "the hung leader's host gives the address to b")  # fmt: skip
        e = client.wait_connected("b", 3)
        report("leader HaloD frozen, address on b after", moved)
        report("leader HaloD frozen, client reconnected through b after", e["t"] - t0)
    finally:
        a.popen.send_signal(signal.SIGCONT)
    a.command("follow")  # it wakes, finds its lease gone and follows: b keeps the address
    time.sleep(1.5)
    assert vip_on(net, "b") and not vip_on(net, "a")


@needs_netns
def test_leader_host_processes_killed_address_moves_within_3s(
    net: vip_net.Lan, tmp_path: Path
) -> None:
    # The case: every process of the leader's host is SIGKILLed, its kernel lives.
    # The client's watchdog is 30 s: it reconnects because its stream was closed (the
    # kernel closes a killed process's sockets), not because it timed out.
    a, b, client = leader_a_follower_b(net, tmp_path, silence=30)
    t0 = time.monotonic()
    killed = net.kill_all("a")
    assert len(killed) >= 2
    moved = wait_for(lambda: vip_on(net, "b"), 3, "b takes the address")
    e = client.wait_connected("b", 3)
    report("host a's processes killed, address on b after", moved)
    report("host a's processes killed, client reconnected through b after", e["t"] - t0)
    assert e["t"] - t0 < 3.0


@needs_netns
def test_leader_host_dies_address_moves_within_3s(net: vip_net.Lan, tmp_path: Path) -> None:
    a, b, client = leader_a_follower_b(net, tmp_path, tell_b=False)
    t0 = time.monotonic()
    # A powered-off host: its link goes dark first (no last word from keepalived gets
    # out), then every process of the host dies, keepalived included.
    net.run("c", ["ip", "link", "set", "pa", "down"])
    killed = net.kill_all("a")
    assert len(killed) >= 2
    moved = wait_for(lambda: vip_on(net, "b"), 3, "b takes the address")
    e = client.wait_connected("b", 3)
    report("host a dies, address on b after", moved)
    report("host a dies, client reconnected through b after", e["t"] - t0)
    assert e["t"] - t0 < 3.0
    b.command("lead")
    assert vip_on(net, "b")


@needs_netns
def test_keepalived_that_cannot_run_is_a_clear_error(net: vip_net.Lan, tmp_path: Path) -> None:
    # A wrong interface name: keepalived refuses its config; lead() fails and says why.
    argv = [sys.executable, "-m", "tests.halod.vip_net", "host", "a", vip_net.VIP, "nosuch0",
            "100", str(tmp_path / "a-vip"), str(vip_net.PORT)]  # fmt: skip
    host = Host(net.popen("a", argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=(tmp_path / "a.err").open("w"), cwd=ROOT))  # fmt: skip
    host.expect("ready")
    assert host.popen.stdin is not None
    host.popen.stdin.write("lead\n")
    host.popen.stdin.flush()
    line = host.expect("error lead", 15)
    assert "vip_interface nosuch0 does not exist" in line, line
    host.command("stop")


@needs_netns
def test_keepalived_killed_is_restarted_and_the_leader_takes_back(
    net: vip_net.Lan, tmp_path: Path
) -> None:
    a, b, client = leader_a_follower_b(net, tmp_path)
    pid_file = tmp_path / "a-vip" / "keepalived.pid"
    first = int(pid_file.read_text())
    os.kill(first, 9)  # keepalived dies under a living HaloD
    # its VRRP child goes with it (releasing the address): b holds it meanwhile
    wait_for(lambda: vip_on(net, "b") and not vip_on(net, "a"), 5, "b covers for a")
    # HaloD a restarts keepalived (after 1 s) as the leader: a takes the address back
    wait_for(lambda: vip_on(net, "a") and not vip_on(net, "b"), 10, "a's keepalived is back")
    assert int(pid_file.read_text()) != first
    client.wait_connected("a", 5)


HA_MISSING = vip_ha.ha_wiring_missing(vip_ha.ETCD_FLAGS + vip_ha.VIP_FLAGS)


@needs_netns
@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.skipif(HA_MISSING is not None,
                    reason=f"needs HaloD on etcd (issue 19 phase 2a): {HA_MISSING}")  # fmt: skip
@pytest.mark.parametrize("kill", ["host", "halod"])
def test_real_halods_browsers_follow_the_address(
    net: vip_net.Lan, tmp_path: Path, kill: str
) -> None:
    """Real ``halod`` processes on a 3-member etcd cluster across the namespaces, the
    built-in proxy on the address, 60 simulated browsers and a web app through it
    (tests/halod/vip_ha.py). ``host``: every process of the leader's host is SIGKILLed;
    ``halod``: only the leading HaloD (its proxy worker forwards on, keepalived goes)."""
    done = subprocess.run(
        ["ip", "netns", "exec", net.ns["c"], sys.executable, "-m", "tests.halod.vip_ha",
         net.tag, str(tmp_path), kill],
        cwd=ROOT, capture_output=True, text=True, timeout=200,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\nVIP figures, real HaloDs, kill {kill}: {json.dumps(figures)}")
    # host: h1, its keepalived (2 processes), its proxy worker, etcd
    assert figures["killed"] >= (4 if kill == "host" else 1)
    assert figures["address_on_b_s"] < 3.0
    assert figures["h2_leads_s"] < 3.0
    assert figures["missing_clients"] == [] and figures["browsers"] == vip_ha.BROWSERS
    assert figures["lost"] == 0 and figures["duplicated"] == 0, figures
    assert figures["never_recovered"] == 0
    if kill == "host":  # every browser was cut with its host
        assert figures["affected"] == vip_ha.BROWSERS
    # the cut browsers stream again through the other host (a connection left open on
    # the old host's proxy worker is reset at the browser's next packet)
    assert figures["affected"] > 0
    assert 0 < figures["reconnected_after_kill_max_s"] < 3.0, figures
