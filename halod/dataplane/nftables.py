"""The nftables data plane: the kernel DNATs the 2×N route ports to the owners.

This back-end owns one nftables table (``nft_table``, family ``ip``) in HaloD's network
namespace and nothing else::

    table ip halod {
        counter refused { }                      # new connections to unowned routes
        map routes { type inet_service : ipv4_addr . inet_service; elements = {...} }
        set cut { type inet_service . ipv4_addr . inet_service; elements = {...} }
        chain prerouting { nat hook, priority dstnat: traffic from other hosts
            ip daddr VIP dnat ip to tcp dport map @routes
            ip daddr VIP tcp dport { route port ranges } counter name "refused" }
        chain output { the same at priority -100: traffic from this host }
        chain postrouting { only with nft_source_nat = masquerade }
        chain cut_input, cut_forward, cut_output { filter hooks: a client's packet on a
            flow whose route port . owner is in @cut gets a TCP reset }
    }

A route change is one atomic transaction that deletes and adds only the changed map
elements: new connections follow at once, established ones stay pinned to the old owner by
their conntrack entry. ``move_close_delay`` seconds later each moved route's (VIP port, old
owner) pair is added to the ``cut`` set: from then on every packet a client sends on a flow
still pinned to the old owner is answered with a TCP reset, while the old owner's packets
still reach the client, NATed as before. So a client that only listens (SSE, iframe) still
gets the ``reconnect`` frame of an old owner that was slow to act on the move, and its ACK
of it (or of the next keepalive) gets the reset; a client that sends (a web app, a poll)
gets the reset on its next request. The flows' conntrack entries are left alone:

- deleting them (``conntrack -D``, this back-end's first cut) strands a listening client
  silently: the old owner's later packets are no longer un-NATed, the client's kernel
  answers them with a reset to the node, and the client waits on a dead connection (its
  events go to a mailbox elsewhere) until its watchdog fires;
- marking them (``conntrack -U --mark``) is a dump-and-update per flow from user space
  that fails part-way under load (EPROTO, ENOBUFS), leaving flows uncut.

A pair leaves the set when its route maps to that owner again (same transaction as the
map change) or once conntrack shows no open flow pinned to it (the counts poll).

Because the forwarding state lives in the kernel, HaloD being down (or SIGKILLed) does not
cut anything: on start the table is replaced in one transaction with the restored owners
and the cut pairs it held (conntrack keeps existing flows' NAT bindings), one conntrack
listing finds flows pinned to owners the map no longer holds (a cut pending when HaloD was
killed) and cuts them move_close_delay later, and ``stop`` leaves the table in place
unless ``nft_keep_on_stop`` is off.

The sans-I/O part (owners → elements → nft text, conntrack text → counts) is plain
functions; :class:`NftablesDataPlane` is the Twisted shell around libnftables (ctypes) and
the ``conntrack`` tool (counts). docs/operations.md, "nftables back-end", is the operator's
view.
"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from twisted.internet import defer, protocol, task, threads
from twisted.internet.error import ProcessDone
from twisted.internet.interfaces import IProcessTransport
from twisted.logger import Logger
from twisted.python.failure import Failure

from halod.dataplane.base import Owner, Ports
from orbited.core.settings import ConfigError

if TYPE_CHECKING:
    from halod.config import HaloDConfig

T = TypeVar("T")
BROWSER, SP = "browser", "sp"
MAP = "routes"
CUT = "cut"
REFUSED = "refused"
CAP_NET_ADMIN = 12
LIBNFTABLES = "libnftables.so.1"
NFT_CTX_OUTPUT_JSON = 1 << 4
PROCESS_TIMEOUT = 30.0  # a conntrack run that takes longer is killed

Target = tuple[str, int]  # (owner ip, owner port) a route port is DNATed to
Elements = dict[int, Target]  # route port → target: the kernel map's contents
Pinned = tuple[int, str, int]  # (route port, old owner ip, old owner port): a cut set element


# -- sans-I/O: owners → map elements → nft text ----------------------------------------


@dataclass(frozen=True)
class Settings:
    """What the ruleset text depends on."""

    table: str
    ports: Ports
    masquerade: bool = False


def ipv4(host: str) -> str | None:
    """``host`` as a usable IPv4 address literal, or None (names, IPv6, 0.0.0.0)."""
    try:
        address = ipaddress.IPv4Address(host)
    except ValueError:
        return None
    return None if address.is_unspecified or address.is_multicast else str(address)


def elements(owners: Mapping[int, Owner | None], ports: Ports) -> tuple[Elements, list[str]]:
    """The map the kernel should hold for ``owners``, and problems that left a route out.

    nft maps need IPv4 literals, so an owner advertising a host name is left out (its
    route is refused) rather than resolved on the reactor; an owner on the VIP itself
    would DNAT to itself, so it is left out too.
    """
    result: Elements = {}
    problems: list[str] = []
    for route in range(1, ports.routes + 1):
        owner = owners.get(route)
        if owner is None:
            continue
        for port, (host, target_port) in ((ports.browser(route), owner.browser),
                                           (ports.sp(route), owner.sp)):  # fmt: skip
            address = ipv4(host)
            if address is None:
                problems.append(f"route {route}: {owner.name} advertises {host!r}, "
                                "not an IPv4 address; route left unmapped")  # fmt: skip
            elif address == ports.host:
                problems.append(f"route {route}: {owner.name} advertises the data-plane "
                                f"address {host}; route left unmapped")  # fmt: skip
            else:
                result[port] = (address, target_port)
    return result, problems


def local_owners(owners: Mapping[int, Owner | None], ports: Ports) -> set[tuple[str, str]]:
    """(node name, address) of owners on a loopback address while the data-plane address
    is not: the kernel drops a packet from another host that DNAT sends to 127/8 unless
    ``route_localnet`` is on for the interface it came in on (only clients on this host
    get through)."""
    vip = ipv4(ports.host)
    if vip is None or ipaddress.IPv4Address(vip).is_loopback:
        return set()
    found = set()
    for owner in owners.values():
        if owner is None:
            continue
        for host, _ in (owner.browser, owner.sp):
            address = ipv4(host)
            if address is not None and ipaddress.IPv4Address(address).is_loopback:
                found.add((owner.name, address))
    return found


ROUTE_LOCALNET = "/proc/sys/net/ipv4/conf/all/route_localnet"


def _route_localnet() -> bool:
    """``route_localnet`` is on for every interface (``all``)."""
    try:
        return Path(ROUTE_LOCALNET).read_text().strip() == "1"
    except OSError:
        return False


def _element(port: int, target: Target) -> str:
    return f"{port} : {target[0]} . {target[1]}"


def _pinned(key: Pinned) -> str:
    return f"{key[0]} . {key[1]} . {key[2]}"


def _port_ranges(ports: Ports) -> str:
    last = ports.routes - 1
    return (f"{ports.browser_base}-{ports.browser_base + last}, "
            f"{ports.sp_base}-{ports.sp_base + last}")  # fmt: skip


def ruleset_text(settings: Settings, elems: Elements, cut: Iterable[Pinned] = ()) -> str:
    """One transaction that (re)creates the whole table with ``elems`` and the ``cut``
    pairs.

    ``add table`` + ``delete table`` first makes the replace work whether or not the
    table exists. Replacing rules does not touch conntrack, so established flows keep
    their NAT binding: a HaloD restart does not cut anything.
    """
    table, ports = settings.table, settings.ports
    vip = ports.host
    dnat = f"ip daddr {vip} dnat ip to tcp dport map @{MAP}"
    refused = f'ip daddr {vip} tcp dport {{ {_port_ranges(ports)} }} counter name "{REFUSED}"'
    # A client's packets (the original direction) on a flow pinned to a cut pair get a
    # reset; its own resets pass, so the old owner hears of the close too.
    reset = (f"ct original ip daddr {vip} ct direction original meta l4proto tcp "
             f"ct original proto-dst . ct reply ip saddr . ct reply proto-src @{CUT} "
             "tcp flags & rst == 0 reject with tcp reset")  # fmt: skip
    lines = [
        f"add table ip {table}",
        f"delete table ip {table}",
        f"table ip {table} {{",
        f"    counter {REFUSED} {{ }}",
        f"    map {MAP} {{",
        "        type inet_service : ipv4_addr . inet_service",
    ]
    if elems:
        body = ", ".join(_element(p, elems[p]) for p in sorted(elems))
        lines.append(f"        elements = {{ {body} }}")
    lines += [
        "    }",
        f"    set {CUT} {{",
        "        type inet_service . ipv4_addr . inet_service",
    ]
    if cut:
        lines.append(f"        elements = {{ {', '.join(_pinned(k) for k in sorted(cut))} }}")
    lines += [
        "    }",
        "    chain prerouting {",  # traffic from other hosts
        "        type nat hook prerouting priority dstnat; policy accept;",
        f"        {dnat}",
        f"        {refused}",  # dnat is terminal: only unmapped ports get here
        "    }",
        "    chain output {",  # traffic from local processes (the nat output hook)
        "        type nat hook output priority -100; policy accept;",
        f"        {dnat}",
        f"        {refused}",
        "    }",
    ]
    for hook in ("input", "forward", "output"):  # local nodes, remote nodes, local clients
        lines += [
            f"    chain cut_{hook} {{",
            f"        type filter hook {hook} priority filter; policy accept;",
            f"        {reset}",
            "    }",
        ]
    if settings.masquerade:
        lines += [
            "    chain postrouting {",
            "        type nat hook postrouting priority srcnat; policy accept;",
            # Not on lo: local nodes answer locally anyway, and masquerading loopback
            # traffic breaks it (the connection times out).
            f'        oifname != "lo" ct original ip daddr {vip} ct status dnat masquerade',
            "    }",
        ]
    lines.append("}")
    return "\n".join(lines) + "\n"


def transaction_text(table: str, old: Elements, new: Elements,
                     uncut: Iterable[Pinned] = ()) -> str:  # fmt: skip
    """One transaction turning map ``old`` into ``new``, touching only changed elements
    ("" when nothing changed), and taking the ``uncut`` pairs out of the cut set (routes
    back with an owner whose flows were cut: they are its own again). A changed element is
    deleted and re-added in the same batch, so no new connection ever sees the route
    unmapped."""
    gone = sorted(p for p in old if new.get(p) != old[p])
    added = sorted(p for p in new if old.get(p) != new[p])
    lines = []
    if gone:
        lines.append(f"delete element ip {table} {MAP} {{ {', '.join(map(str, gone))} }}")
    if added:
        body = ", ".join(_element(p, new[p]) for p in added)
        lines.append(f"add element ip {table} {MAP} {{ {body} }}")
    if uncut:
        body = ", ".join(_pinned(k) for k in sorted(uncut))
        lines.append(f"delete element ip {table} {CUT} {{ {body} }}")
    return "".join(line + "\n" for line in lines)


def cut_text(table: str, pairs: Iterable[Pinned]) -> str:
    """Add ``pairs`` to the cut set ("" for none); adding one already there is no error."""
    pairs = sorted(pairs)
    if not pairs:
        return ""
    return f"add element ip {table} {CUT} {{ {', '.join(_pinned(k) for k in pairs)} }}\n"


def uncut_text(table: str, pairs: Iterable[Pinned]) -> str:
    """Take ``pairs`` out of the cut set ("" for none)."""
    pairs = sorted(pairs)
    if not pairs:
        return ""
    return f"delete element ip {table} {CUT} {{ {', '.join(_pinned(k) for k in pairs)} }}\n"


def moved(old: Elements, new: Elements) -> dict[int, Target]:
    """Route ports whose flows must be cut: port → the old target they are pinned to."""
    return {p: t for p, t in old.items() if new.get(p) != t}


def elements_from_json(text: str) -> Elements:
    """The map's elements from ``nft -j list map`` output (to diff with on start)."""
    result: Elements = {}
    for item in json.loads(text).get("nftables", []):
        for elem in item.get("map", {}).get("elem", []):
            port, value = elem
            if isinstance(port, dict):  # an element with options: {"elem": {"val": ...}}
                port = port.get("elem", {}).get("val")
            address, target_port = value["concat"]
            result[int(port)] = (str(address), int(target_port))
    return result


def cut_from_json(text: str) -> set[Pinned]:
    """The cut set's elements from ``nft -j list set`` output (kept across a restart)."""
    result: set[Pinned] = set()
    for item in json.loads(text).get("nftables", []):
        for elem in item.get("set", {}).get("elem", []):
            if isinstance(elem, dict) and "elem" in elem:  # an element with options
                elem = elem["elem"].get("val")
            port, address, target_port = elem["concat"]
            result.add((int(port), str(address), int(target_port)))
    return result


def counter_from_json(text: str) -> int:
    for item in json.loads(text).get("nftables", []):
        if "counter" in item:
            return int(item["counter"].get("packets", 0))
    return 0


# -- sans-I/O: conntrack ------------------------------------------------------------------

_DPORT = re.compile(r"\bdport=(\d+)")
_REPLY_SOURCE = re.compile(r"\bsrc=(\S+) dst=\S+ sport=(\d+)")
CLOSED_STATES = frozenset({"TIME_WAIT", "CLOSE"})


def pinned_flows(listing: str) -> set[Pinned]:
    """(VIP port, owner ip, owner port) of the open flows in ``conntrack -L -p tcp``
    output: which cut pairs still have flows pinned to them."""
    result: set[Pinned] = set()
    for line in listing.splitlines():
        port = _open_dport(line)
        sources = _REPLY_SOURCE.findall(line)
        if port is not None and len(sources) >= 2:
            address, target_port = sources[1]  # the reply direction's source: the owner
            result.add((port, address, int(target_port)))
    return result


def _open_dport(line: str) -> int | None:
    """The original destination port of a ``conntrack -L`` line of an open TCP flow."""
    fields = line.split(None, 4)
    if len(fields) < 5 or fields[0] != "tcp" or fields[3] in CLOSED_STATES:
        return None
    match = _DPORT.search(line)  # the first dport= is the original direction's
    return int(match.group(1)) if match else None


def connection_counts(listing: str) -> Counter[int]:
    """Open flows per original destination port in ``conntrack -L -p tcp`` output.

    TIME_WAIT and CLOSE entries are connections already over (or refused)."""
    counts: Counter[int] = Counter()
    for line in listing.splitlines():
        port = _open_dport(line)
        if port is not None:
            counts[port] += 1
    return counts


def per_route(counts: Mapping[int, int], ports: Ports) -> dict[str, dict[str, int]]:
    return {
        str(r): {BROWSER: counts.get(ports.browser(r), 0), SP: counts.get(ports.sp(r), 0)}
        for r in range(1, ports.routes + 1)
    }


def has_cap_net_admin(proc_status: str) -> bool:
    """Whether /proc/self/status's effective capability set holds CAP_NET_ADMIN."""
    for line in proc_status.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    return False


# -- libnftables through ctypes -----------------------------------------------------------


class NftError(RuntimeError):
    """An nft command failed; the message carries nft's own error buffer."""


class Nft:
    """One libnftables context. Calls are synchronous: a transaction of a few elements
    takes ~0.1 ms (the ``nft`` CLI's fork/exec costs ~15 ms), less than the reactor spends
    on one HTTP request, and keeping them on the reactor thread keeps transactions in
    table-change order with no locking. The context is not thread-safe: reactor only."""

    def __init__(self, library: str = LIBNFTABLES) -> None:
        try:
            lib = ctypes.CDLL(library)
        except OSError as e:
            raise ConfigError(
                f"dataplane nftables needs libnftables ({library}; Debian package "
                f"libnftables1): {e}"
            ) from None
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        for name in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
            getattr(lib, name).restype = ctypes.c_int
        for name in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
            getattr(lib, name).restype = ctypes.c_char_p
        lib.nft_ctx_output_get_flags.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_get_flags.restype = ctypes.c_uint
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_ctx_output_set_flags.restype = None
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_free.restype = None
        self.lib = lib
        self.ctx = lib.nft_ctx_new(0)  # NFT_CTX_DEFAULT
        if not self.ctx:
            raise ConfigError("libnftables: nft_ctx_new failed")
        if lib.nft_ctx_buffer_output(self.ctx) or lib.nft_ctx_buffer_error(self.ctx):
            raise ConfigError("libnftables: cannot buffer output")
        self.flags = lib.nft_ctx_output_get_flags(self.ctx)

    def run(self, commands: str, as_json: bool = False) -> str:
        """Run ``commands`` (nft syntax, one batch = one transaction); return the output.
        Raises NftError with nft's error text (position markers included)."""
        if self.ctx is None:
            raise NftError("libnftables context is closed")
        flags = self.flags | NFT_CTX_OUTPUT_JSON if as_json else self.flags
        self.lib.nft_ctx_output_set_flags(self.ctx, flags)
        rc = self.lib.nft_run_cmd_from_buffer(self.ctx, commands.encode())
        output = (self.lib.nft_ctx_get_output_buffer(self.ctx) or b"").decode(errors="replace")
        error = (self.lib.nft_ctx_get_error_buffer(self.ctx) or b"").decode(errors="replace")
        if rc != 0:
            raise NftError(error.strip() or f"nft failed (rc {rc})")
        return output

    def close(self) -> None:
        if self.ctx is not None:
            self.lib.nft_ctx_free(self.ctx)
            self.ctx = None


# -- processes (conntrack) ----------------------------------------------------------------


class _Collect(protocol.ProcessProtocol):
    """Feeds stdin, collects stdout/stderr; fires (out, err, exit code)."""

    transport: IProcessTransport

    def __init__(self, stdin: bytes) -> None:
        self.stdin = stdin
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self.done: defer.Deferred[tuple[str, str, int]] = defer.Deferred()

    def connectionMade(self) -> None:  # noqa: N802
        if self.stdin:
            self.transport.write(self.stdin)
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:  # noqa: N802
        self.out.append(data)

    def errReceived(self, data: bytes) -> None:  # noqa: N802
        self.err.append(data)

    def processEnded(self, reason: Failure) -> None:  # noqa: N802
        code = 0 if reason.check(ProcessDone) else getattr(reason.value, "exitCode", None)
        self.done.callback((b"".join(self.out).decode(errors="replace"),
                            b"".join(self.err).decode(errors="replace"),
                            -1 if code is None else code))  # fmt: skip


def find_tool(name: str) -> str | None:
    """``name`` on PATH or in the sbin directories (HaloD may run with a user's PATH)."""
    if os.sep in name:
        return name if os.access(name, os.X_OK) else None
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return shutil.which(name, path=path)


# -- the Twisted shell --------------------------------------------------------------------


class NftablesDataPlane:
    """DataPlane over an nftables DNAT map (see the module docstring)."""

    log = Logger()

    def __init__(self, config: HaloDConfig, reactor: Any, nft: Nft | None = None) -> None:
        self.ports = config.ports()
        self._warned_local: set[tuple[str, str]] = set()  # (local_owners): warned once each
        self.settings = Settings(
            config.nft_table, self.ports, config.nft_source_nat == "masquerade"
        )
        self.reactor = reactor
        self.close_delay = config.move_close_delay
        self.keep_on_stop = config.nft_keep_on_stop
        self.stats_interval = config.nft_stats_interval
        if nft is None:  # the checks a real kernel needs, up front (a ConfigError exits 2)
            check_privileges()
        conntrack = find_tool(config.nft_conntrack)
        if conntrack is None:
            raise ConfigError(f"dataplane nftables needs the conntrack tool "
                              f"({config.nft_conntrack!r} not found; Debian package "
                              "conntrack)")  # fmt: skip
        self.conntrack = conntrack
        self.nft = nft if nft is not None else Nft()
        self.elements: Elements = {}  # what the kernel map holds (as far as we know)
        self.cut_pairs: dict[Pinned, float] = {}  # the kernel cut set → when it was added
        self.counts: Counter[int] = Counter()
        self.refused = 0
        self.cut = 0
        self.errors = 0
        self.polled = False
        self._pending: dict[Any, defer.Deferred[None]] = {}  # delayed cut → its completion
        self._poller: task.LoopingCall | None = None
        self._polling = False
        self._stopped = False

    # -- DataPlane -----------------------------------------------------------------------

    def start(self, owners: dict[int, Owner | None]) -> None:
        """Replace the table with ``owners`` in one transaction. Raises (HaloD does not
        start) if the kernel refuses: without its data plane HaloD would be useless."""
        table = self.settings.table
        try:
            previous = elements_from_json(self.nft.run(f"list map ip {table} {MAP}", as_json=True))
        except (NftError, ValueError, KeyError, TypeError):
            previous = {}  # no table yet (first start) or not ours to diff with
        try:  # flows a previous HaloD cut stay cut
            kept = cut_from_json(self.nft.run(f"list set ip {table} {CUT}", as_json=True))
        except (NftError, ValueError, KeyError, TypeError):
            kept = set()  # no table yet, or one from before the cut set
        new = self._elements(owners)
        kept = {k for k in kept if new.get(k[0]) != (k[1], k[2])}  # unless owners again
        try:
            self.nft.run(ruleset_text(self.settings, new, kept))
        except NftError as e:
            raise NftError(f"cannot install nftables table {table}: {e}") from None
        self.elements = new
        now = self.reactor.seconds()
        self.cut_pairs = dict.fromkeys(kept, now)
        self.log.info(
            "nftables data plane: table ip {table}, {vip} ports {b}+ and {s}+ → {n} mapped",
            table=self.settings.table, vip=self.ports.host, b=self.ports.browser_base,
            s=self.ports.sp_base, n=len(new),
        )  # fmt: skip
        # Flows pinned to owners the restored table no longer has (the table changed
        # while this HaloD was away, e.g. another HaloD ran) are cut as after a move.
        doomed = moved(previous, new)
        self._schedule_cut(doomed)
        self._cut_strays({(p, t[0], t[1]) for p, t in doomed.items()} | kept)
        if self.stats_interval > 0:
            self._poller = task.LoopingCall(self._poll)
            self._poller.clock = self.reactor
            self._poller.start(self.stats_interval, now=True).addErrback(
                lambda f: self.log.failure("conntrack polling stopped", f)
            )

    def apply(self, owners: dict[int, Owner | None]) -> None:
        """One transaction with the changed elements; never raises (logged instead)."""
        if self._stopped:
            return
        new = self._elements(owners)
        # Cut pairs of routes back with that owner: its flows are the owner's again.
        uncut = [k for k in self.cut_pairs if new.get(k[0]) == (k[1], k[2])]
        text = transaction_text(self.settings.table, self.elements, new, uncut)
        if not text:
            return
        try:
            self.nft.run(text)
        except NftError as e:
            # Our view of the map and the kernel's differ (someone edited the table or
            # deleted it): rebuild it whole, still one transaction.
            self.log.warn("nftables update failed ({error}); replacing the table", error=e)
            kept = [k for k in self.cut_pairs if k not in uncut]
            try:
                self.nft.run(ruleset_text(self.settings, new, kept))
            except NftError as e2:
                self.errors += 1
                self.log.error("nftables data plane NOT updated: {error}", error=e2)
                return
        for key in uncut:
            del self.cut_pairs[key]
        doomed = moved(self.elements, new)
        self.elements = new
        self._schedule_cut(doomed)

    def stop(self) -> defer.Deferred[None]:
        """Wait for scheduled cuts (≤ move_close_delay), then leave the table (the kernel
        keeps forwarding while HaloD is away) or delete it (nft_keep_on_stop = false)."""
        self._stopped = True
        if self._poller is not None and self._poller.running:
            self._poller.stop()
        pending = list(self._pending.values())

        def remove(_: object) -> None:
            if not self.keep_on_stop:
                try:
                    self.nft.run(f"delete table ip {self.settings.table}")
                    self.log.info("nftables table {t} removed", t=self.settings.table)
                except NftError as e:
                    self.log.warn("cannot remove nftables table: {error}", error=e)
            self.nft.close()

        done = defer.gatherResults(pending, consumeErrors=True) if pending else defer.succeed([])
        return done.addBoth(remove)

    def stats(self) -> dict[str, Any]:
        routes = per_route(self.counts, self.ports)
        return {
            "backend": "nftables",
            "host": self.ports.host,
            "browser_base": self.ports.browser_base,
            "sp_base": self.ports.sp_base,
            "table": self.settings.table,
            "mapped": len(self.elements),
            "routes": routes,
            "connections": sum(sum(v.values()) for v in routes.values()),
            "refused": self.refused,
            "cut": self.cut,
            "cut_pairs": len(self.cut_pairs),
            "errors": self.errors,
            "counts_fresh": self.polled,
        }

    # -- internals -----------------------------------------------------------------------

    def _elements(self, owners: Mapping[int, Owner | None]) -> Elements:
        new, problems = elements(owners, self.ports)
        for problem in problems:
            self.log.error("nftables data plane: {problem}", problem=problem)
        local = local_owners(owners, self.ports) - self._warned_local
        if local and not _route_localnet():
            for name, address in sorted(local):
                self.log.warn(
                    "nftables data plane: {name} advertises the loopback address {address} "
                    "and dataplane_host {host} is not on loopback: clients on other hosts "
                    "cannot reach it (the kernel drops their packets) unless "
                    "net.ipv4.conf.<interface>.route_localnet is 1; give nodes an address "
                    "of a real interface", name=name, address=address, host=self.ports.host,
                )  # fmt: skip
                self._warned_local.add((name, address))
        return new

    def _schedule_cut(self, doomed: dict[int, Target]) -> None:
        self._schedule_pairs([(p, t[0], t[1]) for p, t in doomed.items()])

    def _schedule_pairs(self, doomed: list[Pinned]) -> None:
        if not doomed:
            return
        done: defer.Deferred[None] = defer.Deferred()
        call = self.reactor.callLater(self.close_delay, self._cut, doomed, done)
        self._pending[call] = done
        done.addBoth(lambda result: (self._pending.pop(call, None), result)[1])

    def _cut_strays(self, handled: set[Pinned]) -> None:
        """On start, cut the open flows pinned to a target the map no longer has for their
        route port (other than the ``handled`` pairs): a cut that was still pending when
        the previous HaloD was killed, after the map had changed. Like any cut, it comes
        move_close_delay later (after the listing: one ``conntrack -L``)."""
        argv = [self.conntrack, "-L", "-p", "tcp", "--orig-dst", self.ports.host]
        ports = self.ports
        route_ports = {*range(ports.browser_base, ports.browser_base + ports.routes),
                       *range(ports.sp_base, ports.sp_base + ports.routes)}  # fmt: skip

        def parse(result: tuple[str, str, int]) -> defer.Deferred[set[Pinned]]:
            out, err, code = result
            if code != 0:
                raise RuntimeError(f"conntrack -L exited {code}: {err.strip()}")
            return self._off_thread(pinned_flows, out)

        def schedule(pinned: set[Pinned]) -> None:
            strays = sorted(k for k in pinned - handled - set(self.cut_pairs)
                            if k[0] in route_ports and self.elements.get(k[0]) != (k[1], k[2])
                            and k[1] != ports.host)  # fmt: skip
            if not strays or self._stopped:
                return
            self.log.info(
                "{n} (route port, old owner) pairs still have open flows to an owner the map "
                "no longer has (a cut pending when HaloD stopped, or flows left when the route "
                "address moved away): cut in {delay} s", n=len(strays), delay=self.close_delay,
            )  # fmt: skip
            self._schedule_pairs(strays)

        def failed(f: Failure) -> None:
            self.errors += 1
            self.log.warn("conntrack listing at start failed ({error}): flows a killed "
                          "HaloD left uncut stay until they end",
                          error=f.getErrorMessage())  # fmt: skip

        # (maybeDeferred: a tool that cannot be started, OSError, fails the same way)
        defer.maybeDeferred(self._run, argv).addCallback(parse).addCallbacks(schedule, failed)

    def _off_thread(self, fn: Callable[[str], T], text: str) -> defer.Deferred[T]:
        """Parse a (possibly megabytes long) conntrack listing in a thread."""
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), fn, text)

    def _cut(self, doomed: list[Pinned], done: defer.Deferred[None]) -> None:
        """Add the moved routes' (port, old owner) pairs to the cut set: from now on the
        clients of flows still pinned to the old owner get a reset on their next packet."""
        # A route that moved back to the same target since is left alone: its flows go
        # to the current owner.
        pairs = [k for k in sorted(set(doomed)) if self.elements.get(k[0]) != (k[1], k[2])]
        text = cut_text(self.settings.table, pairs)
        if text:
            try:
                self.nft.run(text)
            except NftError as e:
                self.errors += 1
                self.log.error("nftables cut failed: {error}", error=e)
            else:
                now = self.reactor.seconds()
                for key in pairs:
                    if key not in self.cut_pairs:
                        self.cut += 1
                    self.cut_pairs[key] = now
        done.callback(None)

    def _run(self, argv: list[str], stdin: bytes = b"") -> defer.Deferred[tuple[str, str, int]]:
        """Run a tool without blocking the reactor; killed after PROCESS_TIMEOUT."""
        proto = _Collect(stdin)
        process = self.reactor.spawnProcess(proto, argv[0], argv, env=os.environ)
        timeout = self.reactor.callLater(PROCESS_TIMEOUT, _kill, process)

        def finished(result: tuple[str, str, int]) -> tuple[str, str, int]:
            if timeout.active():
                timeout.cancel()
            return result

        return proto.done.addBoth(finished)

    def _poll(self) -> defer.Deferred[None] | None:
        """Refresh per-route counts from conntrack (a child process, parsed in a thread:
        a big table's listing is megabytes) and the refused counter (libnftables)."""
        if self._polling or self._stopped:
            return None
        self._polling = True
        try:
            self.refused = counter_from_json(
                self.nft.run(f"list counter ip {self.settings.table} {REFUSED}", as_json=True)
            )
        except (NftError, ValueError) as e:
            self.log.debug("cannot read the refused counter: {error}", error=e)
        argv = [self.conntrack, "-L", "-p", "tcp", "--orig-dst", self.ports.host]
        started = self.reactor.seconds()
        try:
            d = self._run(argv)
        except OSError as e:  # cannot fork (EMFILE, ENOMEM): try again next interval
            self._polling = False
            self.polled = False
            self.errors += 1
            self.log.warn("conntrack poll failed: {error}", error=e)
            return None

        def parse(result: tuple[str, str, int]) -> defer.Deferred[Listing]:
            out, err, code = result
            if code != 0:
                raise RuntimeError(f"conntrack -L exited {code}: {err.strip()}")
            return self._off_thread(_parse_listing, out)

        def store(listing: Listing) -> None:
            self.counts, pinned = listing
            self.polled = True
            self._prune(started, pinned)

        def failed(f: Failure) -> None:
            self.polled = False
            self.errors += 1  # "errors: failed nft or conntrack runs" (operations.md)
            self.log.warn("conntrack poll failed: {error}", error=f.getErrorMessage())

        def done(_: object) -> None:
            self._polling = False

        d.addCallback(parse).addCallbacks(store, failed).addBoth(done)
        return None  # the LoopingCall does not wait: a slow poll just skips a beat

    def _prune(self, listed_at: float, pinned: set[Pinned]) -> None:
        """Take out of the cut set the pairs (cut before the listing began) that no open
        flow is pinned to any more: no new flow can be (new flows go to the route's current
        owner; a route back with its old owner leaves the set in ``apply``)."""
        if self._stopped:
            return
        stale = [k for k, t in self.cut_pairs.items() if t < listed_at and k not in pinned]
        text = uncut_text(self.settings.table, stale)
        if not text:
            return
        try:
            self.nft.run(text)
        except NftError as e:
            self.errors += 1
            self.log.warn("cannot prune the nftables cut set: {error}", error=e)
            return
        for key in stale:
            del self.cut_pairs[key]


Listing = tuple[Counter[int], set[Pinned]]


def _parse_listing(listing: str) -> Listing:
    return connection_counts(listing), pinned_flows(listing)


def _kill(process: Any) -> None:
    try:
        process.signalProcess("KILL")
    except Exception:  # already gone
        pass


def check_privileges(status_path: str = "/proc/self/status", euid: int | None = None) -> None:
    """nftables and conntrack need CAP_NET_ADMIN in HaloD's network namespace. Root is
    not enough: a root process can lack it (a default Docker container drops it)."""
    try:
        with open(status_path) as f:
            status = f.read()
    except OSError:
        status = ""
    root = (os.geteuid() if euid is None else euid) == 0
    if root and "CapEff:" not in status:
        return  # cannot tell (no /proc): let nft say
    if not has_cap_net_admin(status):
        if root:
            raise ConfigError(
                "dataplane nftables needs CAP_NET_ADMIN: HaloD runs as root but without "
                "it (e.g. a container started without --cap-add NET_ADMIN)"
            )
        raise ConfigError(
            "dataplane nftables needs root or CAP_NET_ADMIN (e.g. systemd "
            "AmbientCapabilities=CAP_NET_ADMIN); HaloD has neither"
        )
