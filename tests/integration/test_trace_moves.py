"""Per-key delivery tracing across a planned move and a crash, with real processes (issue 22).

HaloD (built-in proxy data plane), 3 nodes and a spare, every node tracing every key
(``--trace all``). 60 simulated browsers (bench/browsers.py: 20 users × 3 tabs, mixed
transports) reach the cluster through HaloD's route ports, plus a fourth tab per user
whose page goes away before the incident (its events wait in its mailbox). The web app
is this test: a
real nng REQ (pynng) per node, sending every 200 ms one event to every key, straight to
the key's route owner as HaloD's ``/routes`` names it, so it knows **which node answered
each request**; half of the users' events in the acknowledged mode. A ``moved`` answer is
resent to the node it names, a request a dead node never answered to the route's next
owner (same body, so the same request digest).

(a) Planned move: ``halod drain`` of an active node. For every key of the drained routes,
``orbited trace --json`` shows every dispatch the web app got a reply for, with ``node``
the node that answered and the reply's status (the record's ``outcome`` in the
acknowledged mode), the key's hand-off from the old owner to the new, and ``acked`` on
every event the browser received (all are acknowledged once the run is quiet: the
browsers acknowledge every second), and the away tabs' events travel unwritten with the
mailbox (``handed: out:<new owner>``), their verdict following them to the new owner.

(b) Crash: SIGKILL of the owner of some keys. Records after the failover are on the new
owner with the status it answered; acknowledged-mode events the dead node held for an
away tab, resent by the web app to the new owner, are acknowledged there once the tab is
back; the answer lists the dead node in ``failed_nodes``, and the verdict for an
event only the dead node held says it is lost with that node (docs/operations.md,
"Tracing a delivery").
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pynng
import pytest

from bench.browsers import BrowserProcesses, key_id
from orbited.core.hashing import route_of
from orbited.core.keys import ConnectionKey
from tests.conftest import HaloDProcess, NodeProcess, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ROUTES = 24
USERS, TABS = 20, 3
INTERVAL = 0.2  # s between a key's events
ACK_WAIT = 5.0
GRACE = 3.0
# The proxy worker stops with HaloD (it outlives a SIGTERM by default: docs/halod.md).
TIMING = ("--spares", "1", "--grace", str(GRACE), "--heartbeat-interval", "0.5",
          "--missed-heartbeats", "8", "--move-close-delay", "0.5",
          "--proxy-on-exit", "stop")  # fmt: skip
# Every dispatch of the run stays in each key's ring (≈ 25 s at 5 events/s).
TRACE = ("--trace", "all", "--trace-per-key", "256")
MIX = "ws=2,poll=1,sse=1,iframe=1"  # the pages' transports
OPERATOR_KEY = b"operator-key-0123456789-abcdefghijklmnopqrstuvwxyz"


@dataclass
class Sent:
    """One event request of the web app and what became of it."""

    key: ConnectionKey
    event: str
    n: int
    acked_mode: bool
    sent_at: float
    # (node name, status) of every reply, in order: a ``moved`` then the new owner's.
    replies: list[tuple[str, str]] = field(default_factory=list)
    unanswered: list[str] = field(default_factory=list)  # nodes that never answered it


class WebApp:
    """The web app: an asyncio loop in a thread, one pynng REQ socket per node address."""

    def __init__(self, halod: HaloDProcess, keys: list[ConnectionKey], acked: set[str]) -> None:
        self.halod = halod
        self.keys = keys
        self.acked_users = acked
        self.sent: list[Sent] = []
        self.errors: list[str] = []
        self.sockets: dict[str, pynng.Req0] = {}
        self.owners: dict[int, tuple[str, str]] = {}  # route -> (name, sp)
        self.by_sp: dict[str, str] = {}  # sp address -> node name (every node seen)
        self.running = True
        self.pending: set[asyncio.Task[None]] = set()
        self.loop = asyncio.new_event_loop()
        self.refresh()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self.run(),),
                                       daemon=True)  # fmt: skip
        self.thread.start()

    def refresh(self) -> None:
        owners = self.halod.get("routes")["owners"]
        self.owners = {int(r): (o["name"], o["sp"]) for r, o in owners.items() if o}
        for name, sp in self.owners.values():
            self.by_sp[sp] = name

    def socket(self, sp: str) -> pynng.Req0:
        if sp not in self.sockets:
            # nng's own resend off: a resend is this app's decision (to another node)
            self.sockets[sp] = pynng.Req0(dial=sp, block_on_dial=False, resend_time=-1,
                                          recv_timeout=int(ACK_WAIT * 1000) + 3000,
                                          send_timeout=3000)  # fmt: skip
        return self.sockets[sp]

    async def run(self) -> None:
        n = 0
        while self.running:
            n += 1
            started = time.monotonic()
            await asyncio.to_thread(self.refresh)  # the table as HaloD has it now
            for i, key in enumerate(self.keys):
                sent = Sent(key, f"e{n}-{i}", n, key.user in self.acked_users, time.time())
                self.sent.append(sent)
                task = asyncio.ensure_future(self.guarded(sent))
                self.pending.add(task)
                task.add_done_callback(self.pending.discard)
            await asyncio.sleep(max(0.0, INTERVAL - (time.monotonic() - started)))
        if self.pending:
            await asyncio.wait(self.pending, timeout=ACK_WAIT + 15)
        for s in self.sockets.values():
            s.close()

    async def guarded(self, sent: Sent) -> None:
        try:
            await self.send(sent)
        except Exception as e:  # noqa: BLE001 - reported by stop()
            self.errors.append(f"{sent.event}: {e!r}")

    async def send(self, sent: Sent) -> None:
        request: dict[str, object] = {"id": sent.event, "to": [list(sent.key)],
                                      "data": {"n": sent.n, "t": sent.sent_at,
                                               "k": key_id(sent.key)}}  # fmt: skip
        if sent.acked_mode:
            request["ack"] = ACK_WAIT
        body = json.dumps(request).encode()
        route = route_of(sent.key, ROUTES)
        sp = self.owners[route][1]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            name = self.by_sp.get(sp, sp)
            ctx = self.socket(sp).new_context()
            try:
                await ctx.asend(body)
                reply = json.loads(await ctx.arecv())
            except pynng.NNGException:  # a dead node: resend to the route's next owner
                sent.unanswered.append(name)
                await asyncio.sleep(0.2)
                await asyncio.to_thread(self.refresh)
                sp = self.owners[route][1]
                continue
            finally:
                ctx.close()
            result = reply["results"][0]
            sent.replies.append((name, result["status"]))
            if result["status"] != "moved":
                return
            await asyncio.to_thread(self.refresh)
            sp = result.get("to") or self.owners[route][1]
            self.by_sp.setdefault(sp, self.owners[route][0])

    def stop(self) -> None:
        self.running = False
        self.thread.join(ACK_WAIT + 30)
        assert not self.thread.is_alive(), "the web app did not finish"
        assert self.errors == [], self.errors[:5]


def trace(halod: HaloDProcess, key_file: Path, user: str, event: str | None = None) -> dict:
    """``orbited trace --json`` through HaloD (the operator key from its file)."""
    cmd = [sys.executable, "-m", "orbited.cli", "trace", "--user", user, "--json", "--url",
           f"http://{halod.status_http}", "--operator-key-file", str(key_file)]  # fmt: skip
    if event is not None:
        cmd += ["--event", event]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert run.returncode in (0, 1) and run.stdout, run.stderr
    return json.loads(run.stdout)


def records_by_event(answer: dict) -> dict[tuple[tuple[str, ...], str], list[dict]]:
    out: dict[tuple[tuple[str, ...], str], list[dict]] = defaultdict(list)
    for entry in answer["keys"]:
        for record in entry["dispatches"]:
            out[(tuple(entry["key"]), record["event"])].append(record)
    return out


def received_events(clients: list[dict]) -> dict[str, set[int]]:
    """Key id → the n its page received (bench/browsers.py's run-length ranges)."""
    out: dict[str, set[int]] = {}
    for c in clients:
        got: set[int] = set()
        for lo, hi in c["received"]:
            got.update(range(lo, hi + 1))
        out[c["id"]] = got
    return out


def check_dispatches(app: WebApp, answers: dict[str, dict], keys: set[ConnectionKey],
                     since: float, until: float) -> int:  # fmt: skip
    """Every reply the web app got for ``keys`` in [since, until) is in the trace, on the
    node that answered, with the status it answered. Returns the rows checked."""
    checked = 0
    problems = []
    for sent in app.sent:
        if sent.key not in keys or not (since <= sent.sent_at < until):
            continue
        records = records_by_event(answers[sent.key.user]).get((tuple(sent.key), sent.event), [])
        for node, status in sent.replies:
            checked += 1
            mine = [r for r in records if r["node"] == node]
            if sent.acked_mode and status in ("acked", "unacked"):
                ok = any(r.get("outcome") == status for r in mine)
            else:
                ok = any(r["status"] == status for r in mine)
            if not ok:
                problems.append((sent.event, list(sent.key), node, status, records))
    assert problems == [], problems[:5]
    return checked


def start_browsers(cluster: dict, folder: Path, keys: list[ConnectionKey],
                   transports: str) -> BrowserProcesses:  # fmt: skip
    """Simulated pages (bench/browsers.py) for ``keys``, through HaloD's route ports."""
    folder.mkdir()
    keys_file = folder / "keys.json"
    keys_file.write_text(json.dumps([list(k) for k in keys]))
    return BrowserProcesses(folder, len(keys), 1, [
        "--secret-file", str(cluster["tmp"] / "n1" / "secret"), "--keys-file", str(keys_file),
        "--routes", str(ROUTES), "--halod-browser-base",
        f"127.0.0.1:{cluster['halod'].browser_base}", "--transports", transports])  # fmt: skip


@pytest.fixture
def cluster(tmp_path: Path):
    key_file = tmp_path / "operator.key"
    key_file.write_bytes(OPERATOR_KEY)
    key_file.chmod(0o600)
    halod = HaloDProcess(tmp_path, *TIMING, "--operator-key-file", str(key_file),
                         dataplane="proxy").start()  # fmt: skip
    nodes: dict[str, NodeProcess] = {}
    browsers: BrowserProcesses | None = None
    away: BrowserProcesses | None = None
    try:
        for name in ("n1", "s1", "n2", "n3"):
            nodes[name] = halod.node(tmp_path, name, *TRACE)
        prefix = f"trace{os.getpid()}-"
        keys = [ConnectionKey(f"{prefix}u{u}", f"s{j}", "/bench")
                for u in range(USERS) for j in range(TABS)]  # fmt: skip
        # A fourth tab per user whose page goes away before the move or the crash: its
        # mailbox lingers, and the events sent to it wait there.
        away_keys = [ConnectionKey(f"{prefix}u{u}", "away", "/bench") for u in range(USERS)]
        base = {"halod": halod, "tmp": tmp_path}
        browsers = start_browsers(base, tmp_path / "browsers", keys, MIX)
        away = start_browsers(base, tmp_path / "away", away_keys, "ws")
        browsers.wait_ready(60)
        away.wait_ready(60)
        yield {"halod": halod, "nodes": nodes, "browsers": browsers, "keys": keys,
               "away": away, "away_keys": away_keys, "key_file": key_file,
               "tmp": tmp_path}  # fmt: skip
    finally:
        for group in (browsers, away):
            if group is not None:
                group.kill()
        for proc in nodes.values():
            proc.stop(signal.SIGKILL)
        halod.stop(signal.SIGTERM)


def run_app(cluster: dict) -> WebApp:
    keys = cluster["keys"]
    acked = {k.user for k in keys[: len(keys) // 2]}  # whole users (TABS keys each)
    return WebApp(cluster["halod"], keys + cluster["away_keys"], acked)


def keys_of(owner: str, owners: dict[int, str | None], keys: list[ConnectionKey]) -> set:
    return {k for k in keys if owners[route_of(k, ROUTES)] == owner}


def test_a_planned_move_shows_every_dispatch_the_hand_off_and_the_acks(cluster: dict):
    halod, keys = cluster["halod"], cluster["keys"]
    app = run_app(cluster)
    try:
        time.sleep(3)  # steady state
        cluster["away"].kill()  # those pages go: their next events wait in the mailboxes
        time.sleep(1)
        before = halod.owners()
        old = next(n for n in ("n1", "n2", "n3") if keys_of(n, before, keys))
        moved = keys_of(old, before, keys)
        away_moved = keys_of(old, before, cluster["away_keys"])
        t0 = time.time()
        drain = subprocess.run(
            [sys.executable, "-m", "halod.cli", "drain", old, "--url",
             f"http://{halod.status_http}", "--operator-key-file", str(cluster["key_file"])],
            capture_output=True, text=True, timeout=30)  # fmt: skip
        assert drain.returncode == 0, drain.stderr
        wait_for(lambda: all(halod.owners()[route_of(k, ROUTES)] != old for k in moved),
                 "the drained routes to move")  # fmt: skip
        time.sleep(4)
    finally:
        app.stop()
    time.sleep(3)  # the browsers acknowledge what they have (every second)
    after = halod.owners()
    clients = [c for r in cluster["browsers"].stop() for c in r["clients"]]
    got = received_events(clients)
    users = {k.user for k in moved}
    answers = {u: trace(halod, cluster["key_file"], u) for u in users}

    assert check_dispatches(app, answers, moved | away_moved, 0, time.time()) > 0
    # The move shows: rows answered by the old owner before it, by the new one after.
    nodes_seen = {r["node"] for u in users for e in answers[u]["keys"] for r in e["dispatches"]}
    assert {old, *(after[route_of(k, ROUTES)] for k in moved)} <= nodes_seen
    for key in moved:
        entry = next(e for e in answers[key.user]["keys"] if tuple(e["key"]) == tuple(key))
        new = after[route_of(key, ROUTES)]
        assert entry["owner_now"] == new
        # The mailbox handed out by the old owner and in on the new one; the events it
        # carried unwritten are marked handed out, each record keeping its node.
        moved_at = [n["t"] for n in entry["notes"] if n["node"] == old
                    and n["what"] == "moved" and n.get("handed") is True]  # fmt: skip
        assert moved_at, entry["notes"]
        assert any(n["what"] == "handed_in" and n["node"] == new and n.get("origin") == old
                   for n in entry["notes"]), entry["notes"]  # fmt: skip
        carried = [r for r in entry["dispatches"] if r["node"] == old
                   and r["status"] in ("queued", "delivered")
                   and (r["written"] is None or r["written"] > moved_at[0])]  # fmt: skip
        assert all((r["handed"] or "").startswith("out") for r in carried), carried
        # Every event the page received is acknowledged in the trace: the browser's ack.
        by_event = defaultdict(list)
        for r in entry["dispatches"]:
            by_event[r["event"]].append(r)
        mine = [s for s in app.sent if s.key == key and s.sent_at >= t0 - 2]
        unacked = [s.event for s in mine if s.n in got[key_id(key)]
                   and not any(r.get("acked") for r in by_event[s.event])]  # fmt: skip
        assert unacked == [], (key, [r for r in entry["dispatches"] if r["event"] in unacked],
                               entry["notes"])  # fmt: skip
    # The tabs that went away: their events waited in the mailbox and travelled with it,
    # unwritten, and the verdict follows them to the new owner.
    assert away_moved
    for key in away_moved:
        entry = next(e for e in answers[key.user]["keys"] if tuple(e["key"]) == tuple(key))
        new = after[route_of(key, ROUTES)]
        carried = [r for r in entry["dispatches"] if r["node"] == old
                   and r["status"] == "queued" and r["written"] is None]  # fmt: skip
        assert carried, entry["dispatches"][-5:]
        assert all(r["handed"] == f"out:{new}" for r in carried), carried
        answer = trace(halod, cluster["key_file"], key.user, carried[-1]["event"])
        texts = [v["text"] for v in answer["verdicts"] if v["key"] == list(key)]
        assert texts and "handed over" in texts[0] and new in texts[0], texts


def test_a_crash_names_the_dead_node_and_the_resent_events_are_on_the_new_owner(cluster):
    halod, keys, nodes = cluster["halod"], cluster["keys"], cluster["nodes"]
    away_keys, tmp = cluster["away_keys"], cluster["tmp"]
    app = run_app(cluster)
    returned: BrowserProcesses | None = None
    try:
        time.sleep(3)
        # The away tabs go: acknowledged-mode events to them wait on their owner for the
        # browser (pages acknowledge within milliseconds, so only these are sure to be
        # in flight when the owner dies).
        cluster["away"].kill()
        time.sleep(1)
        before = halod.owners()
        acked = app.acked_users
        victim = next(n for n in ("n1", "n2", "n3")
                      if any(k.user in acked for k in keys_of(n, before, away_keys))
                      and any(k.user not in acked for k in keys_of(n, before, keys)))  # fmt: skip
        lost_keys = keys_of(victim, before, keys) | keys_of(victim, before, away_keys)
        t_kill = time.time()
        nodes[victim].stop(signal.SIGKILL)
        wait_for(lambda: victim not in halod.nodes(), f"{victim} failed over", GRACE + 5)
        t_failover = time.time()
        # The away tabs come back, now to the new owners, where the web app resends.
        returned = start_browsers(cluster, tmp / "returned", away_keys, "ws")
        returned.wait_ready(60)
        time.sleep(ACK_WAIT + 5)  # every resend answered (after the REQ's time-out)
    finally:
        app.stop()
        if returned is not None:
            returned.kill()
    time.sleep(3)
    after = halod.owners()
    cluster["browsers"].stop()
    users = {k.user for k in lost_keys}
    answers = {u: trace(halod, cluster["key_file"], u) for u in users}

    for answer in answers.values():
        assert victim in [f["name"] for f in answer["failed_nodes"]], answer["failed_nodes"]
    # After the failover every reply is in the trace, on the new owner, as answered.
    assert check_dispatches(app, answers, lost_keys, t_failover + 0.5, time.time()) > 0
    for key in lost_keys:
        entry = next(e for e in answers[key.user]["keys"] if tuple(e["key"]) == tuple(key))
        assert entry["owner_now"] == after[route_of(key, ROUTES)] != victim
        assert all(r["node"] != victim for r in entry["dispatches"])  # lost with its process
    # Acknowledged-mode events the dead node never answered were resent to the new owner
    # (same body: the same request) and are acknowledged there.
    resent = [s for s in app.sent if s.acked_mode and s.key in lost_keys and s.unanswered]
    assert resent, "no acknowledged-mode event was in flight on the dead node"
    for s in resent:
        new = after[route_of(s.key, ROUTES)]
        assert s.unanswered == [victim] and s.replies[-1] == (new, "acked"), (s.event, s.replies)
        records = records_by_event(answers[s.key.user])[(tuple(s.key), s.event)]
        assert any(r["node"] == new and r.get("outcome") == "acked" for r in records), records
    # An event only the dead node held: the verdict says it went with that node.
    held = next(s for s in app.sent if s.key in lost_keys and not s.acked_mode and s.replies
                and s.replies[-1][0] == victim and s.sent_at < t_kill - 0.5)  # fmt: skip
    answer = trace(halod, cluster["key_file"], held.key.user, held.event)
    texts = [v["text"] for v in answer["verdicts"] if v["event"] == held.event]
    assert texts and any(victim in t for t in texts), answer["verdicts"]
