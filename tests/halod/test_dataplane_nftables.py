"""The nftables data plane (halod/dataplane/nftables.py).

Pure tests of the sans-I/O core (owners → nft text, conntrack text → counts) and of the
Twisted shell with a fake libnftables need no kernel. The kernel tests run HaloD, the
nodes and every probe inside a network namespace of their own (created and deleted per
test) on 127.0.0.0/8 addresses only, so nothing touches the host's ruleset or leaves the
namespace: daemons run under ``ip netns exec``, in-process probes use a worker thread that
has entered the namespace with setns(2), nng probes are ``ip netns exec`` subprocesses.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode

import pytest
from twisted.internet import defer
from twisted.internet.error import ProcessDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from websockets.sync.client import connect

from halod.config import HaloDConfig
from halod.dataplane.base import Owner, Ports
from halod.dataplane.nftables import (
    NftablesDataPlane,
    NftError,
    Settings,
    check_privileges,
    connection_counts,
    counter_from_json,
    cut_from_json,
    cut_text,
    elements,
    elements_from_json,
    has_cap_net_admin,
    local_owners,
    moved,
    pinned_flows,
    ruleset_text,
    transaction_text,
    uncut_text,
)
from orbited.client import HaloDCluster
from orbited.core.settings import ConfigError
from orbited.core.tokens import issue_token
from tests.conftest import (
    SECRET,
    HaloDProcess,
    NodeProcess,
    keys_on_routes,
    moved_frame,
    next_frame,
    wait_for,
)

T = TypeVar("T")
PORTS = Ports("127.0.0.100", 8100, 9100, 4)
N1 = Owner("n1", ("127.0.0.2", 8000), ("127.0.0.2", 9000))
N2 = Owner("n2", ("127.0.0.3", 8000), ("127.0.0.3", 9000))

# -- the sans-I/O core ----------------------------------------------------------------------


def test_elements_map_both_ports_of_each_owned_route():
    elems, problems = elements({1: N1, 2: N2, 3: None}, PORTS)
    assert elems == {
        8100: ("127.0.0.2", 8000), 9100: ("127.0.0.2", 9000),
        8101: ("127.0.0.3", 8000), 9101: ("127.0.0.3", 9000),
    }  # fmt: skip
    assert problems == []


def test_elements_leave_out_names_and_the_vip_itself():
    named = Owner("n3", ("node3.example", 8000), ("127.0.0.4", 9000))
    looped = Owner("n4", ("127.0.0.100", 8000), ("0.0.0.0", 9000))
    elems, problems = elements({1: named, 2: looped}, PORTS)
    assert elems == {9100: ("127.0.0.4", 9000)}
    assert len(problems) == 3
    assert "not an IPv4 address" in problems[0] and "data-plane address" in problems[1]


def test_local_owners_are_loopback_nodes_behind_a_non_loopback_address():
    real = Ports("192.0.2.10", 8100, 9100, 4)
    remote = Owner("n5", ("192.0.2.20", 8000), ("192.0.2.20", 9000))
    assert local_owners({1: N1, 2: remote, 3: None}, real) == {("n1", "127.0.0.2")}
    assert local_owners({1: N1, 2: remote}, PORTS) == set()  # a loopback VIP: all local


def test_shell_warns_once_of_loopback_nodes_remote_clients_cannot_reach(tmp_path, monkeypatch):
    # An audit: nodes on 127/8 behind a real dataplane_host were mapped without a word,
    # and clients on other hosts hung until their connect timeout (the kernel drops a
    # packet DNATed to 127/8 unless route_localnet is on).
    from twisted.logger import capturedLogs

    import halod.dataplane.nftables as nftables

    localnet = tmp_path / "route_localnet"
    localnet.write_text("0\n")
    monkeypatch.setattr(nftables, "ROUTE_LOCALNET", str(localnet))
    plane, nft, reactor = shell(dataplane_host="192.0.2.10")
    with capturedLogs() as events:
        plane.start({1: N1, 2: N1, 3: N2, 4: None})
        plane.apply({1: N1, 2: N2, 3: N2, 4: N1})
    warned = [e for e in events if "route_localnet" in e.get("log_format", "")]
    assert sorted(e["name"] for e in warned) == ["n1", "n2"]  # once each, still mapped
    assert plane.elements[8100] == N1.browser
    localnet.write_text("1\n")
    plane2, _, _ = shell(dataplane_host="192.0.2.10")
    with capturedLogs() as events:
        plane2.start({1: N1})
    assert not [e for e in events if "route_localnet" in e.get("log_format", "")]


def test_ruleset_text_replaces_the_table_in_one_script():
    text = ruleset_text(Settings("halod", PORTS), {8101: ("127.0.0.3", 8000), 8100: N1.browser})
    lines = text.splitlines()
    assert lines[:3] == ["add table ip halod", "delete table ip halod", "table ip halod {"]
    assert "elements = { 8100 : 127.0.0.2 . 8000, 8101 : 127.0.0.3 . 8000 }" in text
    assert text.count("ip daddr 127.0.0.100 dnat ip to tcp dport map @routes") == 2
    assert text.count('tcp dport { 8100-8103, 9100-9103 } counter name "refused"') == 2
    assert "type nat hook prerouting priority dstnat" in text
    assert "type nat hook output priority -100" in text
    assert "masquerade" not in text
    # Flows pinned to a cut (port, old owner) pair: the client's packets get a reset, on
    # every filter hook (remote clients to local or remote nodes, local clients).
    reset = ("ct original ip daddr 127.0.0.100 ct direction original meta l4proto tcp "
             "ct original proto-dst . ct reply ip saddr . ct reply proto-src @cut "
             "tcp flags & rst == 0 reject with tcp reset")  # fmt: skip
    assert text.count(reset) == 3
    for hook in ("input", "forward", "output"):
        assert f"type filter hook {hook} priority filter; policy accept;" in text
    assert "type inet_service . ipv4_addr . inet_service\n    }" in text  # an empty set
    kept = ruleset_text(Settings("halod", PORTS), {}, [(8101, "127.0.0.2", 8000)])
    assert "elements = { 8101 . 127.0.0.2 . 8000 }" in kept
    empty = ruleset_text(Settings("t2", PORTS, masquerade=True), {})
    assert "elements" not in empty
    assert 'oifname != "lo" ct original ip daddr 127.0.0.100 ct status dnat masquerade' in empty


def test_transaction_text_touches_only_changed_elements():
    old, _ = elements({1: N1, 2: N1, 3: N1, 4: None}, PORTS)
    new, _ = elements({1: N1, 2: N2, 3: None, 4: N2}, PORTS)
    text = transaction_text("halod", old, new)
    assert text.splitlines() == [
        "delete element ip halod routes { 8101, 8102, 9101, 9102 }",
        "add element ip halod routes { 8101 : 127.0.0.3 . 8000, 8103 : 127.0.0.3 . 8000, "
        "9101 : 127.0.0.3 . 9000, 9103 : 127.0.0.3 . 9000 }",
    ]
    assert transaction_text("halod", new, dict(new)) == ""
    # A route back with an owner whose flows were cut: its pair leaves the cut set at once.
    back = transaction_text("halod", new, old, [(8101, "127.0.0.2", 8000)])
    assert back.splitlines()[-1] == "delete element ip halod cut { 8101 . 127.0.0.2 . 8000 }"
    # Flows to cut: those pinned to the old owner of each changed port.
    assert moved(old, new) == {8101: N1.browser, 8102: N1.browser, 9101: N1.sp, 9102: N1.sp}


def test_cut_and_conntrack_text():
    pairs = [(9101, "127.0.0.2", 9000), (8101, "127.0.0.2", 8000)]
    assert cut_text("halod", pairs) == (
        "add element ip halod cut { 8101 . 127.0.0.2 . 8000, 9101 . 127.0.0.2 . 9000 }\n"
    )
    assert uncut_text("halod", pairs[:1]) == (
        "delete element ip halod cut { 9101 . 127.0.0.2 . 9000 }\n"
    )
    assert cut_text("halod", []) == uncut_text("halod", []) == ""
    listing = (
        "tcp      6 431999 ESTABLISHED src=127.0.0.1 dst=127.0.0.100 sport=5 dport=8101 "
        "src=127.0.0.2 dst=127.0.0.1 sport=8000 dport=5 [ASSURED] mark=0 use=1\n"
        "tcp      6 431999 ESTABLISHED src=127.0.0.1 dst=127.0.0.100 sport=6 dport=8101 "
        "src=127.0.0.2 dst=127.0.0.1 sport=8000 dport=6 [ASSURED] mark=0 use=1\n"
        "tcp      6 80 TIME_WAIT src=127.0.0.1 dst=127.0.0.100 sport=7 dport=9100 "
        "src=127.0.0.2 dst=127.0.0.1 sport=9000 dport=7 [ASSURED] mark=0 use=1\n"
        "tcp      6 10 CLOSE src=127.0.0.1 dst=127.0.0.100 sport=8 dport=8102 "
        "src=127.0.0.100 dst=127.0.0.1 sport=8102 dport=8 mark=0 use=1\n"
    )
    assert connection_counts(listing) == {8101: 2}
    # Which (port, owner) pairs open flows are pinned to: what the cut set must keep.
    assert pinned_flows(listing) == {(8101, "127.0.0.2", 8000)}


def test_nft_json_parsing():
    listed = json.dumps({"nftables": [
        {"metainfo": {"version": "1.0.6"}},
        {"map": {"family": "ip", "name": "routes", "table": "halod", "elem": [
            [8100, {"concat": ["127.0.0.2", 8000]}],
            [9100, {"concat": ["127.0.0.2", 9000]}],
        ]}},
    ]})  # fmt: skip
    assert elements_from_json(listed) == {8100: N1.browser, 9100: N1.sp}
    counter = '{"nftables": [{"counter": {"name": "refused", "packets": 3, "bytes": 180}}]}'
    assert counter_from_json(counter) == 3
    cut = json.dumps({"nftables": [{"set": {"name": "cut", "elem": [
        {"concat": [9100, "127.0.0.3", 9000]}, {"concat": [8100, "127.0.0.2", 8000]},
    ]}}]})  # fmt: skip
    assert cut_from_json(cut) == {(9100, "127.0.0.3", 9000), (8100, "127.0.0.2", 8000)}


def test_cap_net_admin_from_proc_status():
    assert has_cap_net_admin("Name:\tx\nCapEff:\t0000000000001000\n")
    assert not has_cap_net_admin("CapEff:\t0000000000000400\n")
    assert has_cap_net_admin("CapEff:\t000001ffffffffff\n")


@pytest.mark.parametrize("euid", [0, 1000])
def test_privileges_need_cap_net_admin_even_as_root(tmp_path, euid):
    """docs/operations.md, "Privileges": a missing CAP_NET_ADMIN stops halod run with a
    message saying so (exit 2); root without it (a default Docker container) used to pass
    the check and fail later in libnftables (exit 1)."""
    status = tmp_path / "status"
    status.write_text("Name:\thalod\nCapEff:\t000001fffeffefff\n")  # all but NET_ADMIN
    with pytest.raises(ConfigError, match="needs (root or )?CAP_NET_ADMIN"):
        check_privileges(str(status), euid=euid)
    status.write_text("Name:\thalod\nCapEff:\t0000000000001000\n")
    check_privileges(str(status), euid=euid)
    check_privileges(str(tmp_path / "missing"), euid=0)  # no /proc: nft will say
    with pytest.raises(ConfigError, match="HaloD has neither"):
        check_privileges(str(tmp_path / "missing"), euid=1000)


def test_config_checks_the_nftables_keys():
    def config(**values: Any) -> None:
        HaloDConfig(dataplane="nftables", **values).validate()

    config(dataplane_host="10.0.0.100", nft_table="halod_a", nft_source_nat="masquerade")
    for bad in (
        {"dataplane_host": "localhost"},
        {"dataplane_host": "0.0.0.0"},
        {"dataplane_host": "::1"},
        {"nft_table": "no spaces"},
        {"nft_source_nat": "snat"},
        {"nft_stats_interval": -1.0},
    ):
        with pytest.raises(ConfigError):
            config(**bad)


# -- the Twisted shell, with a fake libnftables and fake processes --------------------------


class FakeNft:
    def __init__(self) -> None:
        self.commands: list[str] = []
        self.fail: str | None = None
        self.listed: str | None = None  # `nft -j list map` output, None: no table

    def run(self, commands: str, as_json: bool = False) -> str:
        if commands.startswith("list"):
            if self.listed is None:
                raise NftError("Error: No such file or directory")
            return self.listed
        self.commands.append(commands)
        if self.fail and self.fail in commands:
            raise NftError("Error: Could not process rule: No such file or directory")
        return ""

    def close(self) -> None:
        self.commands.append("<closed>")


class FakeProcessReactor(Clock):
    """A Clock whose spawnProcess records the call; the test ends the process."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, list[str], bytes]] = []

    def spawnProcess(self, proto, executable, args, env=None, **kw):  # noqa: ANN001, N802
        reactor = self

        class Transport:
            stdin = b""

            def write(self, data: bytes) -> None:
                self.stdin += data

            def closeStdin(self) -> None:  # noqa: N802
                reactor.spawned.append((proto, args, self.stdin))

            def signalProcess(self, sig: str) -> None:  # noqa: N802
                pass

        proto.makeConnection(Transport())
        return proto.transport


def finish(proto: Any, out: str = "", code: int = 0) -> None:
    proto.outReceived(out.encode())
    proto.processEnded(Failure(ProcessDone(0)) if code == 0 else Failure(RuntimeError()))


def shell(**values: Any) -> tuple[NftablesDataPlane, FakeNft, FakeProcessReactor]:
    values = {"dataplane_host": "127.0.0.100", **values}
    config = HaloDConfig(dataplane="nftables", routes=4,
                         browser_port_base=8100, sp_port_base=9100, move_close_delay=1.5,
                         nft_stats_interval=0.0, nft_conntrack="/bin/true", **values)  # fmt: skip
    config.validate()
    nft, reactor = FakeNft(), FakeProcessReactor()
    return NftablesDataPlane(config, reactor, nft=nft), nft, reactor


def test_shell_applies_changes_and_cuts_moved_routes_after_the_delay():
    plane, nft, reactor = shell()
    plane.start({1: N1, 2: N1, 3: None, 4: None})
    assert nft.commands[0].startswith("add table ip halod\ndelete table ip halod\n")
    plane.apply({1: N1, 2: N2, 3: None, 4: None})
    assert nft.commands[-1].startswith("delete element ip halod routes { 8101, 9101 }\n")
    plane.apply({1: N1, 2: N2, 3: None, 4: None})  # no change, no transaction
    assert len(nft.commands) == 2
    reactor.advance(1.4)
    assert len(nft.commands) == 2
    reactor.advance(0.2)
    # The cut is one nft transaction (the cut set), no conntrack run: the flows' entries
    # and NAT bindings stay, only the client's packets on them are answered with a reset.
    assert nft.commands[-1] == cut_text("halod", [(8101, *N1.browser), (9101, *N1.sp)])
    assert [argv[1] for _, argv, _ in reactor.spawned] == ["-L"]  # only start's listing
    assert plane.stats()["cut"] == 2 and plane.stats()["cut_pairs"] == 2
    assert plane.stats()["routes"]["2"] == {"browser": 0, "sp": 0}


def test_shell_skips_a_cut_when_the_route_moved_back_and_uncuts_a_returning_owner():
    plane, nft, reactor = shell()
    plane.start({1: N1})
    plane.apply({1: N2})
    plane.apply({1: N1})  # back within the delay: its flows go to the owner again
    reactor.advance(2)
    assert nft.commands[-1] == cut_text("halod", [(8100, *N2.browser), (9100, *N2.sp)])
    plane.apply({1: N2})  # back with n2 for good: its pairs leave the set in the same batch
    assert nft.commands[-1].splitlines()[-1] == (
        "delete element ip halod cut { 8100 . 127.0.0.3 . 8000, 9100 . 127.0.0.3 . 9000 }"
    )
    assert plane.stats()["cut_pairs"] == 0
    reactor.advance(2)
    assert nft.commands[-1] == cut_text("halod", [(8100, *N1.browser), (9100, *N1.sp)])
    assert plane.stats()["cut"] == 4


def test_shell_prunes_cut_pairs_no_flow_is_pinned_to():
    plane, nft, reactor = shell()
    plane.start({1: N1, 2: N1})
    plane.apply({1: N2, 2: N2})
    reactor.advance(1.5)
    assert plane.stats()["cut_pairs"] == 4
    plane._prune(reactor.seconds() - 1, set())  # a listing from before the cut: no say
    assert plane.stats()["cut_pairs"] == 4
    reactor.advance(1)
    plane._prune(reactor.seconds(), {(8100, *N1.browser)})  # one flow still pinned
    assert nft.commands[-1] == (
        "delete element ip halod cut { 8101 . 127.0.0.2 . 8000, "
        "9100 . 127.0.0.2 . 9000, 9101 . 127.0.0.2 . 9000 }\n"
    )
    assert list(plane.cut_pairs) == [(8100, *N1.browser)]


def test_shell_rebuilds_the_table_when_a_transaction_fails_and_waits_for_cuts_on_stop():
    plane, nft, reactor = shell(nft_keep_on_stop=False)
    plane.start({1: N1})
    nft.fail = "delete element"  # e.g. someone deleted the element by hand
    plane.apply({1: N2})
    assert nft.commands[-1].startswith("add table ip halod\ndelete table ip halod\n")
    assert "elements = { 8100 : 127.0.0.3 . 8000, 9100 : 127.0.0.3 . 9000 }" in nft.commands[-1]
    nft.fail = None
    stopped = plane.stop()
    assert not stopped.called  # the scheduled cut runs first
    reactor.advance(1.5)
    assert stopped.called
    assert nft.commands[-3:] == [cut_text("halod", [(8100, *N1.browser), (9100, *N1.sp)]),
                                 "delete table ip halod", "<closed>"]  # fmt: skip
    plane.apply({1: N1})  # after stop: ignored
    assert nft.commands[-1] == "<closed>"


def test_shell_start_keeps_cuts_and_cuts_what_changed_while_halod_was_away():
    plane, nft, reactor = shell()
    nft.listed = json.dumps({"nftables": [
        {"map": {"name": "routes", "elem": [
            [8100, {"concat": ["127.0.0.2", 8000]}],  # as restored: kept
            [8101, {"concat": ["127.0.0.2", 8000]}],  # now n2's
            [8102, {"concat": ["127.0.0.2", 8000]}],  # now unowned
        ]}},
        {"set": {"name": "cut", "elem": [
            {"concat": [8103, "127.0.0.3", 8000]},  # cut by the previous HaloD: stays cut
            {"concat": [8101, "127.0.0.3", 8000]},  # n2 owns 8101 again: no longer cut
        ]}},
    ]})  # fmt: skip
    plane.start({1: N1, 2: N2, 3: None})
    assert "8101 : 127.0.0.3 . 8000" in nft.commands[0]
    assert "elements = { 8103 . 127.0.0.3 . 8000 }" in nft.commands[0]
    reactor.advance(1.5)
    assert nft.commands[-1] == cut_text("halod", [(8101, *N1.browser), (8102, *N1.browser)])
    assert plane.stats()["cut_pairs"] == 3


def ct_line(port: int, owner: tuple[str, int], state: str = "ESTABLISHED") -> str:
    return (
        f"tcp      6 431999 {state} src=127.0.0.1 dst=127.0.0.100 sport=5 dport={port} "
        f"src={owner[0]} dst=127.0.0.1 sport={owner[1]} dport=5 [ASSURED] mark=0 use=1\n"
    )


def test_shell_start_cuts_flows_a_killed_halod_left_pinned_to_an_old_owner(monkeypatch):
    """A route moved, the map changed, and HaloD was SIGKILLed before the cut: the next
    HaloD finds the map as it left it (nothing "changed while away"), so only conntrack
    shows the flows still pinned to the old owner. They are cut move_close_delay after
    the start, as HAProxy's disabled slots with sessions are."""
    plane, nft, reactor = shell()
    monkeypatch.setattr(plane, "_off_thread", lambda fn, text: defer.succeed(fn(text)))
    nft.listed = json.dumps({"nftables": [{"map": {"name": "routes", "elem": [
        [8100, {"concat": ["127.0.0.3", 8000]}], [9100, {"concat": ["127.0.0.3", 9000]}],
        [8101, {"concat": ["127.0.0.2", 8000]}], [9101, {"concat": ["127.0.0.2", 9000]}],
    ]}}]})  # fmt: skip
    plane.start({1: N2, 2: N1})  # as the kernel holds it
    proto, argv, _ = reactor.spawned[-1]
    assert argv == ["/bin/true", "-L", "-p", "tcp", "--orig-dst", "127.0.0.100"]
    finish(proto, ct_line(8100, N1.browser)  # route 1 moved n1 → n2, not yet cut: stray
           + ct_line(8100, N2.browser)  # the new owner's flow: kept
           + ct_line(8101, N1.browser)  # an unmoved route: kept
           + ct_line(9100, N1.sp, "TIME_WAIT")  # over: nothing to cut
           + ct_line(7000, ("127.0.0.9", 80)))  # not a route port  # fmt: skip
    assert len(nft.commands) == 1
    reactor.advance(1.4)
    assert len(nft.commands) == 1
    reactor.advance(0.2)
    assert nft.commands[-1] == cut_text("halod", [(8100, *N1.browser)])
    assert plane.stats()["cut"] == 1 and plane.stats()["cut_pairs"] == 1


def test_shell_start_listing_failure_is_an_error_and_moves_back_skip_the_cut(monkeypatch):
    plane, nft, reactor = shell()
    plane.start({1: N2})
    finish(reactor.spawned[-1][0], "conntrack: Operation failed", code=1)
    assert plane.stats()["errors"] == 1
    plane, nft, reactor = shell()
    monkeypatch.setattr(plane, "_off_thread", lambda fn, text: defer.succeed(fn(text)))
    plane.start({1: N2})
    finish(reactor.spawned[-1][0], ct_line(8100, N1.browser))
    plane.apply({1: N1})  # back with n1 before the cut: its flows are the owner's again
    reactor.advance(2)
    cuts = [c for c in nft.commands if c.startswith("add element ip halod cut")]
    assert cuts == [cut_text("halod", [(8100, *N2.browser), (9100, *N2.sp)])]  # n2's: moved
    assert plane.stats()["errors"] == 0


def test_shell_logs_instead_of_raising_when_nft_keeps_failing():
    plane, nft, reactor = shell()
    plane.start({1: N1})
    nft.fail = "routes"
    plane.apply({1: N2})  # must not raise into HaloD's listener loop
    assert plane.stats()["errors"] == 1
    assert plane.elements == {8100: N1.browser, 9100: N1.sp}  # unchanged: not applied


def test_shell_counts_failed_conntrack_and_prune_runs_as_errors(monkeypatch):
    """docs/operations.md: `errors` counts "failed nft or conntrack runs"; a failed
    `conntrack -L` used to turn only counts_fresh false."""
    plane, nft, reactor = shell()
    plane.start({1: N1})
    plane._poll()
    proto, argv, _ = reactor.spawned[-1]
    assert argv[:2] == ["/bin/true", "-L"]
    finish(proto, "conntrack v1.4.7: Operation failed", code=1)
    assert plane.stats()["errors"] == 1 and plane.stats()["counts_fresh"] is False

    def no_fork(*args: Any, **kw: Any) -> None:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(reactor, "spawnProcess", no_fork)
    plane._poll()  # cannot even start the tool
    assert plane.stats()["errors"] == 2 and plane.stats()["counts_fresh"] is False
    monkeypatch.undo()

    plane.apply({1: N2})
    reactor.advance(1.5)
    nft.fail = "delete element ip halod cut"
    plane._prune(reactor.seconds() + 1, set())  # a failed nft run pruning the cut set
    assert plane.stats()["errors"] == 3 and plane.stats()["cut_pairs"] == 2


# -- the kernel, inside a network namespace of our own ---------------------------------------

VIP = "127.0.0.100"
CLONE_NEWNET = 0x40000000


def _kernel_skip_reason() -> str | None:
    if sys.platform != "linux":
        return "nftables needs Linux"
    if os.geteuid() != 0:
        return "needs root (network namespaces, nftables, conntrack)"
    for tool in ("ip", "nft", "conntrack"):
        if shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
            return f"{tool} is not installed"
    try:
        ctypes.CDLL("libnftables.so.1")
    except OSError:
        return "libnftables.so.1 is not installed"
    return None


class Netns:
    """A network namespace of our own with lo up; in-process probes run on a worker thread
    that entered it (setns affects only the calling thread)."""

    def __init__(self) -> None:
        self.name = f"halod-nft-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.path = f"/run/netns/{self.name}"
        self.prefix = ("ip", "netns", "exec", self.name)
        self.executor: ThreadPoolExecutor | None = None

    def create(self) -> Netns:
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        subprocess.run(["ip", "-n", self.name, "link", "set", "lo", "up"], check=True)
        self.executor = ThreadPoolExecutor(1, initializer=self._enter)
        self.call(lambda: None)  # fails here (BrokenThreadPool) if setns failed
        return self

    def _enter(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
        finally:
            os.close(fd)
        # Never probe from the host's namespace by mistake.
        assert os.stat("/proc/thread-self/ns/net").st_ino == os.stat(self.path).st_ino

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        assert self.executor is not None
        return self.executor.submit(fn, *args).result(timeout=30)

    def run(self, *argv: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.prefix, *argv], input=input, capture_output=True,
                              text=True, timeout=30)  # fmt: skip

    def delete(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True)  # the thread leaves with the namespace
        subprocess.run(["ip", "netns", "delete", self.name], capture_output=True)


@pytest.fixture
def ns() -> Iterator[Netns]:
    reason = _kernel_skip_reason()
    if reason:
        pytest.skip(f"nftables data-plane kernel tests: {reason}")
    space = Netns()
    try:
        space.create()
    except (subprocess.CalledProcessError, OSError) as e:
        space.delete()
        pytest.skip(f"cannot create a network namespace: {e}")
    yield space
    space.delete()
    assert space.name not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                            text=True).stdout  # fmt: skip


@pytest.fixture
def procs() -> Iterator[list]:
    started: list = []
    yield started
    for proc in reversed(started):
        if proc.proc is not None and proc.proc.poll() is None:
            proc.stop(signal.SIGKILL)


class NsHaloD(HaloDProcess):
    """HaloD inside the namespace; its status pages are read from inside it too."""

    def __init__(self, ns: Netns, tmp: Path, *flags: str) -> None:
        super().__init__(tmp, "--dataplane-host", VIP, "--nft-table", "halodtest",
                         "--nft-stats-interval", "0.2", *flags, dataplane="nftables")  # fmt: skip
        self.ns = ns
        self.prefix = ns.prefix

    def get(self, page: str) -> dict:
        return self.ns.call(super().get, page)

    def node_in_ns(self, tmp: Path, name: str, host: str) -> NodeProcess:
        folder = tmp / name
        folder.mkdir(exist_ok=True)
        node = NodeProcess(folder, "--name", name, "--halod", self.control)
        node.prefix = self.ns.prefix
        node.start(http=f"{host}:0", sp=f"tcp://{host}:0")
        wait_for(lambda: self.nodes().get(name, {}).get("connected"), f"{name} registered")
        return node

    def kernel_map(self) -> dict[int, tuple[str, int]]:
        listed = self.ns.run("nft", "-j", "list", "map", "ip", "halodtest", "routes")
        assert listed.returncode == 0, listed.stderr
        return elements_from_json(listed.stdout)


class Http:
    """A keep-alive HTTP/1.1 connection to a route port, made inside the namespace."""

    def __init__(self, ns: Netns, port: int) -> None:
        self.sock = ns.call(socket.create_connection, (VIP, port), 5)
        self.sock.settimeout(5)

    def health(self) -> str:
        """The answering node's name; raises ConnectionError when the flow was cut."""
        self.sock.sendall(b"GET /orbited/health HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("EOF")
            data += chunk
        return json.loads(data.split(b"\r\n\r\n", 1)[1])["node"]

    def close(self) -> None:
        self.sock.close()


def refused(ns: Netns, port: int) -> bool:
    def attempt() -> bool:
        try:
            socket.create_connection((VIP, port), 2).close()
        except ConnectionRefusedError:
            return True
        return False

    return ns.call(attempt)


SP_PROBE = """
import json, sys, pynng
with pynng.Req0(dial=sys.argv[1], recv_timeout=5000, send_timeout=5000) as req:
    req.send(sys.argv[2].encode())
    print(req.recv().decode())
"""


def sp_send(ns: Netns, port: int, key: Any, data: object) -> dict:
    """One event through a route's SP port, by nng in a subprocess inside the namespace."""
    event = json.dumps({"id": uuid.uuid4().hex, "to": [list(key)], "data": data})
    done = ns.run(sys.executable, "-c", SP_PROBE, f"tcp://{VIP}:{port}", event)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_route_ports_follow_the_table_in_the_kernel(tmp_path, ns, procs):
    halod = NsHaloD(ns, tmp_path, "--spares", "0", "--grace", "1", "--heartbeat-interval",
                    "0.2", "--move-close-delay", "1.5").start()  # fmt: skip
    procs.append(halod)
    # No owner: nothing listens on VIP:port, so the kernel refuses (RST).
    assert refused(ns, halod.browser_base)
    wait_for(lambda: halod.get("status")["dataplane"]["refused"] >= 1, "refused counted")

    n1 = halod.node_in_ns(tmp_path, "n1", "127.0.0.2")
    procs.append(n1)
    wait_for(lambda: len(halod.kernel_map()) == 48, "48 map elements")
    http_port = int(n1.http.rsplit(":", 1)[1])
    assert set(halod.kernel_map().values()) == {
        ("127.0.0.2", http_port),
        ("127.0.0.2", int(n1.sp.rsplit(":", 1)[1])),
    }

    # Browser and SP ports end to end: a WebSocket through route 20's browser port gets
    # an event sent through route 20's SP port.
    cluster = HaloDCluster(VIP, halod.sp_base, halod.browser_base)
    key, later = keys_on_routes([20], count=2)
    ws = ns.call(lambda: connect(cluster.browser_url(key, SECRET), open_timeout=5, legacy=True))
    assert json.loads(ws.recv(timeout=5))["type"] == "hello"
    reply = sp_send(ns, halod.sp_base + 19, key, {"n": 1})
    assert reply["results"][0]["status"] == "delivered"
    assert json.loads(ws.recv(timeout=5))["data"] == {"n": 1}

    moving, staying = Http(ns, halod.browser_base + 19), Http(ns, halod.browser_base + 4)
    assert moving.health() == staying.health() == "n1"
    wait_for(lambda: halod.get("status")["dataplane"]["routes"]["5"]["browser"] == 1,
             "per-route counts from conntrack")  # fmt: skip
    assert halod.get("status")["dataplane"]["routes"]["20"]["browser"] == 2  # ws + moving

    n2 = halod.node_in_ns(tmp_path, "n2", "127.0.0.3")  # takes routes 13-24
    procs.append(n2)
    wait_for(lambda: halod.kernel_map()[halod.browser_base + 19][0] == "127.0.0.3", "the move")
    assert moved_frame(next_frame(ws)) == {"type": "reconnect", "reason": "route_moved"}
    # New connections follow at once, on both port ranges.
    fresh = Http(ns, halod.browser_base + 19)
    assert fresh.health() == "n2"
    ws2 = ns.call(lambda: connect(cluster.browser_url(later, SECRET), open_timeout=5,
                                  legacy=True))  # fmt: skip
    assert json.loads(ws2.recv(timeout=5))["type"] == "hello"
    reply = sp_send(ns, halod.sp_base + 19, later, {"n": 2})
    assert reply["results"][0]["status"] == "delivered"
    assert json.loads(ws2.recv(timeout=5))["data"] == {"n": 2}

    # The established flow of the moved route is cut after move_close_delay (its next
    # packet gets a RST); the unmoved route's flow and the new owner's flows live on.
    wait_for(lambda: halod.get("status")["dataplane"]["cut"] >= 1, "the cut")
    with pytest.raises(ConnectionError):
        moving.health()
    assert staying.health() == "n1"
    assert fresh.health() == "n2"
    for conn in (moving, staying, fresh):
        conn.close()
    ws.close()
    ws2.close()


class Listener:
    """An SSE stream through a route's browser port, made inside the namespace: a client
    that only listens, as SSE and iframe browsers do (it sends nothing after its request)."""

    def __init__(self, ns: Netns, port: int, key: Any) -> None:
        self.ns = ns
        query = urlencode({"token": issue_token(SECRET, key, 600)})

        def open_stream() -> socket.socket:
            sock = socket.create_connection((VIP, port), 5)
            sock.sendall(f"GET /orbited/sse?{query} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            sock.settimeout(5)
            data = b""
            while b'"type":"hello"' not in data:
                chunk = sock.recv(65536)
                assert chunk, "EOF before hello"
                data += chunk
            return sock

        self.sock = ns.call(open_stream)

    def until_closed(self, timeout: float) -> tuple[bytes, str]:
        """What arrives until the connection ends: (data, "eof" / "reset" / "silent")."""

        def read() -> tuple[bytes, str]:
            data, deadline = b"", time.monotonic() + timeout
            while True:
                self.sock.settimeout(max(0.01, deadline - time.monotonic()))
                try:
                    chunk = self.sock.recv(65536)
                except TimeoutError:
                    return data, "silent"
                except ConnectionResetError:
                    return data, "reset"
                if not chunk:
                    return data, "eof"
                data += chunk

        return self.ns.call(read)

    def close(self) -> None:
        self.sock.close()


def test_a_cut_does_not_strand_a_listening_client_of_a_slow_old_owner(tmp_path, ns, procs):
    """The old owner acts on route_moved only after move_close_delay (a busy node): the cut
    must still let its reconnect frame reach a client that only listens, and must reset
    the client. (Deleting the flow's conntrack entry left such clients on a dead
    connection, silently: the old owner's writes were no longer un-NATed, the client's
    kernel reset them towards the node, and the client heard nothing.)"""
    timing = ("--grace", "10", "--heartbeat-interval", "1", "--missed-heartbeats", "20")
    halod = NsHaloD(ns, tmp_path, "--spares", "0", *timing, "--move-close-delay", "0.3").start()
    procs.append(halod)
    n1 = halod.node_in_ns(tmp_path, "n1", "127.0.0.2")
    procs.append(n1)
    wait_for(lambda: len(halod.kernel_map()) == 48, "48 map elements")
    moving_key, staying_key = keys_on_routes([20])[0], keys_on_routes([5])[0]
    moving_port = halod.browser_base + 19
    moving = Listener(ns, moving_port, moving_key)
    staying = Listener(ns, halod.browser_base + 4, staying_key)
    poller = Http(ns, moving_port)  # a client that sends: reset on its next request
    assert poller.health() == "n1"

    assert n1.proc is not None
    n1.proc.send_signal(signal.SIGSTOP)  # n1 will read route_moved late
    try:
        n2 = halod.node_in_ns(tmp_path, "n2", "127.0.0.3")  # takes routes 13-24
        procs.append(n2)
        wait_for(lambda: halod.kernel_map()[moving_port][0] == "127.0.0.3", "the move")
        wait_for(lambda: halod.get("status")["dataplane"]["cut"] >= 2, "the cut")
    finally:
        n1.proc.send_signal(signal.SIGCONT)

    data, end = moving.until_closed(5)
    assert b'{"type":"reconnect","reason":"route_moved","route":' in data, (data, end)
    assert end in ("eof", "reset")
    with pytest.raises(ConnectionError):
        poller.health()
    # The unmoved route's stream lives on; the moved key reaches n2 through the same port.
    assert staying.until_closed(0.5) == (b"", "silent")
    again, fresh = Listener(ns, moving_port, moving_key), Http(ns, moving_port)
    assert fresh.health() == "n2"
    for conn in (moving, staying, poller, again, fresh):
        conn.close()


def test_restart_keeps_the_table_and_established_connections(tmp_path, ns, procs):
    # With masquerade on, which must leave loopback traffic alone.
    halod = NsHaloD(ns, tmp_path, "--spares", "0", "--move-close-delay", "0.3",
                    "--nft-source-nat", "masquerade").start()  # fmt: skip
    procs.append(halod)
    n1 = halod.node_in_ns(tmp_path, "n1", "127.0.0.2")
    procs.append(n1)
    wait_for(lambda: len(halod.kernel_map()) == 48, "48 map elements")
    before = halod.kernel_map()
    conns = [Http(ns, halod.browser_base), Http(ns, halod.browser_base + 19)]
    assert [c.health() for c in conns] == ["n1", "n1"]

    halod.stop(signal.SIGKILL)
    # The kernel keeps forwarding while HaloD is away, old and new connections alike.
    assert [c.health() for c in conns] == ["n1", "n1"]
    extra = Http(ns, halod.browser_base + 7)
    assert extra.health() == "n1"

    halod.start()  # same database and ports: the table is replaced by the same table
    assert halod.kernel_map() == before
    time.sleep(0.6)  # > move_close_delay: nothing is cut
    assert [c.health() for c in (*conns, extra)] == ["n1", "n1", "n1"]
    assert halod.get("status")["dataplane"]["cut"] == 0

    assert halod.stop() == 0  # SIGTERM: the table stays (nft_keep_on_stop)
    assert halod.kernel_map() == before
    assert [c.health() for c in conns] == ["n1", "n1"]
    for conn in (*conns, extra):
        conn.close()

    halod.flags = (*halod.flags, "--no-nft-keep-on-stop")
    halod.start()
    assert halod.stop() == 0
    assert ns.run("nft", "list", "table", "ip", "halodtest").returncode != 0  # removed


def test_a_cut_pending_when_halod_is_sigkilled_is_made_after_the_restart(tmp_path, ns, procs):
    """n2 joins, routes move in the kernel map, and HaloD is SIGKILLed before their cut
    (move_close_delay 2 s). The restarted HaloD finds the map unchanged from what it
    restores, so only conntrack shows the flows still pinned to n1 on the moved routes:
    they are cut move_close_delay after the start; flows on n1's own routes live."""
    halod = NsHaloD(ns, tmp_path, "--spares", "0", "--grace", "5", "--move-rate", "0",
                    "--move-close-delay", "2").start()  # fmt: skip
    procs.append(halod)
    n1 = halod.node_in_ns(tmp_path, "n1", "127.0.0.2")
    procs.append(n1)
    wait_for(lambda: len(halod.kernel_map()) == 48, "48 map elements")
    n1_http = halod.kernel_map()[halod.browser_base]
    conns = {port: Http(ns, port) for port in range(halod.browser_base, halod.browser_base + 24)}
    assert {c.health() for c in conns.values()} == {"n1"}

    n2 = halod.node_in_ns(tmp_path, "n2", "127.0.0.3")
    procs.append(n2)
    wait_for(lambda: any(t[0] == "127.0.0.3" for t in halod.kernel_map().values()),
             "routes moved to n2 in the kernel map", timeout=1.5)  # fmt: skip
    halod.stop(signal.SIGKILL)  # before the cut
    assert "elements" not in ns.run("nft", "list", "set", "ip", "halodtest", "cut").stdout
    table = halod.kernel_map()
    moved_ports = [p for p in conns if table[p] != n1_http]
    kept_ports = [p for p in conns if table[p] == n1_http]
    assert moved_ports and kept_ports
    # Pinned to n1 by conntrack, the moved routes' old flows still reach n1.
    assert conns[moved_ports[0]].health() == "n1"

    halod.start()
    assert halod.kernel_map() == table  # nothing changed while HaloD was away

    def cut(port: int) -> bool:
        try:
            conns[port].health()
        except OSError:  # the kernel's reset
            return True
        return False

    took = wait_for(lambda: all(cut(p) for p in moved_ports), "old flows cut", timeout=8)
    assert took > 1.0  # move_close_delay after the start, not at once
    assert [conns[p].health() for p in kept_ports] == ["n1"] * len(kept_ports)
    assert Http(ns, moved_ports[0]).health() == "n2"
    assert halod.get("status")["dataplane"]["cut"] == len(moved_ports)
    for conn in conns.values():
        conn.close()


def test_nft_errors_carry_nfts_own_message(ns):
    from halod.dataplane.nftables import Nft

    def bad_syntax() -> str:
        nft = Nft()
        try:
            nft.run("add table ip halodtest\nadd chain ip halodtest c { type nat hook nowhere; }")
        except NftError as e:
            return str(e)
        finally:
            nft.close()
        return "no error"

    message = ns.call(bad_syntax)
    assert message.startswith("Error: syntax error") and "expecting priority" in message
    # The failed batch left nothing behind (one transaction).
    assert ns.run("nft", "list", "table", "ip", "halodtest").returncode != 0


def test_root_without_cap_net_admin_is_refused_with_exit_2(tmp_path, ns):
    capsh = shutil.which("capsh", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if capsh is None:
        pytest.skip("capsh is not installed (Debian package libcap2-bin)")
    argv = [sys.executable, "-m", "halod.cli", "run", "--db", str(tmp_path / "h.db"),
            "--control", "tcp://127.0.0.1:0", "--status-http", "", "--dataplane", "nftables",
            "--dataplane-host", VIP, "--nft-table", "halodtest"]  # fmt: skip
    done = ns.run(capsh, "--drop=cap_net_admin", "--", "-c", 'exec "$@"', "halod", *argv)
    assert done.returncode == 2, done.stderr
    assert "needs CAP_NET_ADMIN: HaloD runs as root but without it" in done.stderr
    assert ns.run("nft", "list", "table", "ip", "halodtest").returncode != 0


def test_halod_refuses_to_start_without_a_conntrack_tool(tmp_path, ns):
    halod = NsHaloD(ns, tmp_path, "--nft-conntrack", "/nonexistent/conntrack")
    with pytest.raises(RuntimeError, match="conntrack tool"):
        halod.start()
    assert halod.proc is not None and halod.proc.wait(5) == 2
