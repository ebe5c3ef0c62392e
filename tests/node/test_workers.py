"""``orbited node --workers N`` (orbited/node/workers.py): the pure decisions (names and
ports, restarts), then real processes: HaloD with its built-in proxy and a worker parent
on loopback, a BlockingClient routing through HaloD, a worker killed with SIGKILL, the
parent stopped with SIGTERM."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.sync.client import ClientConnection, connect

from orbited.cli import _node_parser
from orbited.client import BlockingClient, HaloDCluster
from orbited.core.keys import ConnectionKey
from orbited.core.settings import ConfigError
from orbited.node.config import NodeConfig
from orbited.node.workers import (
    GiveUp,
    PrefixedStream,
    Restart,
    RestartPolicy,
    WorkerHistory,
    host_addresses,
    on_exit,
    plan_workers,
    worker_count,
)
from tests.conftest import SECRET, DaemonProcess, HaloDProcess, keys_on_routes, wait_for

# -- names and ports ----------------------------------------------------------------------


def test_each_worker_gets_its_name_and_every_port_plus_its_index():
    config = NodeConfig(name="edge", http="127.0.0.1:8000", sp="tcp://127.0.0.1:9000",
                        publish_http="127.0.0.1:8100", advertise_http="10.0.0.5:8000",
                        advertise_sp="tcp://10.0.0.5:9000", publish_key_file="k")  # fmt: skip
    plans = plan_workers(config, 3)
    assert [p.name for p in plans] == ["edge-0", "edge-1", "edge-2"]
    assert [p.http for p in plans] == ["127.0.0.1:8000", "127.0.0.1:8001", "127.0.0.1:8002"]
    assert [p.sp for p in plans] == [f"tcp://127.0.0.1:{9000 + i}" for i in range(3)]
    assert plans[2].publish_http == "127.0.0.1:8102"
    assert plans[2].advertise_http == "10.0.0.5:8002"
    assert plans[2].advertise_sp == "tcp://10.0.0.5:9002"
    assert plans[2].orbit_legacy == ""  # off stays off


def test_a_name_too_long_for_the_workers_names_is_refused():
    # each worker registers as <name>-<i>, which HaloD takes up to 64 characters
    assert plan_workers(NodeConfig(name="a" * 62), 10)[-1].name == "a" * 62 + "-9"
    with pytest.raises(ConfigError, match="at most 64 characters: shorten name"):
        plan_workers(NodeConfig(name="a" * 62), 11)


def test_port_zero_stays_zero_a_free_port_per_worker():
    config = NodeConfig(http="127.0.0.1:0", sp="tcp://127.0.0.1:0")
    assert {(p.http, p.sp) for p in plan_workers(config, 4)} == {
        ("127.0.0.1:0", "tcp://127.0.0.1:0")
    }


def test_colliding_ports_are_refused_with_the_rule_named():
    # worker 1's browser port would be worker 0's SP port
    config = NodeConfig(http="127.0.0.1:8000", sp="tcp://127.0.0.1:8001")
    with pytest.raises(ConfigError, match=r"port 8001 would be both orbited-0's sp and "
                                          r"orbited-1's http .*port \+ i"):  # fmt: skip
        plan_workers(config, 2)
    assert len(plan_workers(config, 1)) == 1  # one worker: no collision
    # the same port on different loopback addresses is fine; on 0.0.0.0 it is not
    apart = NodeConfig(http="127.0.0.2:8000", sp="tcp://127.0.0.3:8001")
    assert len(plan_workers(apart, 2)) == 2
    wildcard = NodeConfig(http="0.0.0.0:8000", sp="tcp://127.0.0.3:8001")
    with pytest.raises(ConfigError, match="port 8001"):
        plan_workers(wildcard, 2)


def test_collisions_are_found_however_the_host_is_written():
    # Before, hosts were compared as text: each pair passed and its worker 0 could not
    # bind, restarted five times and the parent exited 1 some 20 s later.
    for http, sp in [
        ("localhost:8000", "tcp://127.0.0.1:8001"),
        ("127.0.0.1:8000", "tcp://localhost:8001"),
        ("127.0.8.3:8000", "tcp://127.0.2051:8001"),
    ]:  # (inet_aton's spelling)
        with pytest.raises(ConfigError, match="port 8001 would be both"):
            plan_workers(NodeConfig(http=http, sp=sp), 2)
    assert host_addresses("127.0.2051") == {"127.0.8.3"}
    assert host_addresses("::") == {"*"} == host_addresses("0.0.0.0")
    assert host_addresses("no-such-host.invalid") == {"no-such-host.invalid"}


def test_a_port_past_65535_is_refused():
    with pytest.raises(ConfigError, match="http port 65535 \\+ 1 is past 65535"):
        plan_workers(NodeConfig(http="127.0.0.1:65535"), 2)


def test_the_node_config_refuses_collisions_and_negative_workers():
    with pytest.raises(ConfigError, match="would be both"):
        NodeConfig.load(None, {"workers": 2, "http": "127.0.0.1:8000",
                               "sp": "tcp://127.0.0.1:8001"})  # fmt: skip
    with pytest.raises(ConfigError, match="workers must be 0-256 .*not -1"):
        NodeConfig.load(None, {"workers": -1})
    # a mistyped count: before, 10**8 was accepted and planning it ran out of memory
    with pytest.raises(ConfigError, match="workers must be 0-256 .*not 100000000"):
        NodeConfig.load(None, {"workers": 10**8, "http": "127.0.0.1:0", "sp": "tcp://127.0.0.1:0"})
    assert NodeConfig.load(None, {"workers": 256, "http": "127.0.0.1:0",
                                  "sp": "tcp://127.0.0.1:0"}).workers == 256  # fmt: skip
    assert NodeConfig.load(None, {}).workers == 1


def test_worker_count_zero_means_one_per_core():
    assert worker_count(3, 8) == 3
    assert worker_count(0, 8) == 8
    assert worker_count(0, None) == 1


def test_a_workers_flags_win_over_the_parents():
    plan = plan_workers(NodeConfig(name="a", http="127.0.0.1:7000"), 2)[1]
    args = _node_parser().parse_args(["--workers", "2", "--name", "a", "--linger", "3",
                                      *plan.flags()])  # fmt: skip
    assert (args.workers, args.name, args.http, args.linger) == (1, "a-1", "127.0.0.1:7001", 3)


# -- restarts -----------------------------------------------------------------------------


def test_restart_delays_double_up_to_the_cap_then_the_parent_gives_up():
    policy = RestartPolicy(first_delay=0.5, max_delay=3.0, stable=30.0, max_failures=4)
    history, now, delays = WorkerHistory(started=0.0), 0.0, []
    for _ in range(4):
        now += 1.0  # each process lives 1 s: not stable
        decision = on_exit(policy, history, now)
        assert isinstance(decision, Restart)
        delays.append(decision.at - now)
        history, now = WorkerHistory(decision.at, decision.history.failures), decision.at
    assert delays == [0.5, 1.0, 2.0, 3.0]
    assert on_exit(policy, history, now + 1.0) == GiveUp(4)


def test_a_worker_that_ran_stable_starts_the_row_afresh():
    policy = RestartPolicy(first_delay=0.5, stable=30.0, max_failures=2)
    decision = on_exit(policy, WorkerHistory(started=100.0, failures=2), 131.0)
    assert decision == Restart(131.5, WorkerHistory(started=100.0, failures=1))


def test_a_bad_policy_is_refused():
    with pytest.raises(ValueError):
        RestartPolicy(first_delay=5, max_delay=1)
    with pytest.raises(ValueError):
        RestartPolicy(max_failures=0)


def test_worker_log_lines_carry_the_name():
    out = io.StringIO()
    stream = PrefixedStream(out, "[n-1] ")
    stream.write("one\ntwo ")
    stream.write("still two\n")
    stream.write("tb line 1\ntb line 2\n")
    assert out.getvalue() == "[n-1] one\n[n-1] two still two\n[n-1] tb line 1\n[n-1] tb line 2\n"


# -- real processes -----------------------------------------------------------------------


class WorkersProcess(DaemonProcess):
    """``orbited node --workers N`` registered with a HaloD, on free loopback ports."""

    def __init__(self, tmp: Path, *flags: str) -> None:
        self.secret_file = tmp / "secret"
        self.secret_file.write_bytes(SECRET)
        self.ready_file = tmp / "workers-ready.json"
        self.log_file = tmp / "workers.log"
        self.flags = flags

    def start(self) -> dict:
        return self.spawn([
            sys.executable, "-m", "orbited.cli", "node", "--name", "w",
            "--http", "127.0.0.1:0", "--sp", "tcp://127.0.0.1:0",
            "--secret-file", str(self.secret_file), "--no-create-secret",
            "--ready-file", str(self.ready_file), *self.flags,
        ])  # fmt: skip

    def ready(self) -> dict:
        return json.loads(self.ready_file.read_text())


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[HaloDProcess, WorkersProcess, HaloDCluster]]:
    halod = HaloDProcess(tmp_path, "--spares", "0", "--heartbeat-interval", "0.2",
                         "--grace", "1", proxy=True).start()  # fmt: skip
    workers = WorkersProcess(tmp_path, "--workers", "2", "--halod", halod.control,
                             "--linger", "30")  # fmt: skip
    try:
        workers.start()
        yield halod, workers, HaloDCluster("127.0.0.1", halod.sp_base, halod.browser_base)
    finally:
        if workers.alive():
            workers.stop(signal.SIGKILL)  # the workers die with it (PR_SET_PDEATHSIG)
        halod.stop()


def routes_of(halod: HaloDProcess, name: str) -> list[int]:
    return [r for r, owner in halod.owners().items() if owner == name]


def browser(cluster: HaloDCluster, key: ConnectionKey) -> ClientConnection:
    ws = connect(cluster.browser_url(key, SECRET), open_timeout=5, legacy=True)
    assert json.loads(ws.recv(timeout=5))["type"] == "hello"
    return ws


def both_own_routes(halod: HaloDProcess) -> bool:
    return (
        bool(routes_of(halod, "w-0"))
        and bool(routes_of(halod, "w-1"))
        and all(halod.owners().values())
        and halod.synced()
    )


@pytest.mark.slow
def test_each_worker_registers_owns_routes_and_delivers_through_halod(cluster):
    halod, workers, hx = cluster
    ready = workers.ready()
    assert [w["name"] for w in ready["workers"]] == ["w-0", "w-1"]
    assert len({w["http"] for w in ready["workers"]}) == 2  # each its own browser port
    wait_for(lambda: both_own_routes(halod), "both workers own routes")
    for w in ("w-0", "w-1"):
        assert halod.nodes()[w]["connected"]
    keys = {w: keys_on_routes(routes_of(halod, w), prefix=w)[0] for w in ("w-0", "w-1")}
    sockets = {w: browser(hx, key) for w, key in keys.items()}
    with BlockingClient(hx, timeout=10) as app:
        results = app.send(list(keys.values()), {"n": 1}, event_id="workers-1")
    assert all(r["status"] == "delivered" for r in results.values()), results
    for ws in sockets.values():
        assert json.loads(ws.recv(timeout=5))["data"] == {"n": 1}
        ws.close()


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_rejoins(cluster):
    halod, workers, hx = cluster
    wait_for(lambda: both_own_routes(halod), "both workers own routes")
    old = {w["name"]: w["pid"] for w in workers.ready()["workers"]}
    os.kill(old["w-1"], signal.SIGKILL)
    wait_for(lambda: {w["name"]: w["pid"] for w in workers.ready()["workers"]}["w-1"]
             != old["w-1"], "the parent restarted w-1", timeout=20)  # fmt: skip
    assert alive(old["w-0"]), "the other worker kept running"
    wait_for(lambda: halod.nodes().get("w-1", {}).get("connected") and both_own_routes(halod),
             "w-1 registered again with routes", timeout=20)  # fmt: skip
    key = keys_on_routes(routes_of(halod, "w-1"), prefix="back")[0]
    ws = browser(hx, key)
    with BlockingClient(hx, timeout=10) as app:
        assert app.send([key], "again")[key]["status"] == "delivered"
    assert json.loads(ws.recv(timeout=5))["data"] == "again"
    ws.close()
    assert "w-1 exited (-9); restarting in" in workers.log_file.read_text()


@pytest.mark.slow
def test_sigterm_stops_every_worker_and_halod_sees_them_leave(cluster):
    halod, workers, _ = cluster
    wait_for(lambda: both_own_routes(halod), "both workers own routes")
    pids = [w["pid"] for w in workers.ready()["workers"]]
    assert workers.stop(signal.SIGTERM) == 0
    assert not any(alive(pid) for pid in pids)
    wait_for(lambda: not any(n.get("connected") for n in halod.nodes().values()),
             "HaloD saw both workers leave")  # fmt: skip
    log = workers.log_file.read_text()
    assert "[w-0] " in log and "[w-1] " in log  # worker log lines carry the name


@pytest.mark.slow
def test_killing_the_parent_takes_the_workers_with_it(cluster):
    _, workers, _ = cluster
    pids = [w["pid"] for w in workers.ready()["workers"]]
    workers.stop(signal.SIGKILL)
    wait_for(lambda: not any(alive(pid) for pid in pids), "the workers died with the parent")


def test_colliding_ports_are_refused_before_anything_starts(tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    done = subprocess.run(
        [sys.executable, "-m", "orbited.cli", "node", "--workers", "2", "--http",
         "127.0.0.1:18000", "--sp", "tcp://127.0.0.1:18001", "--secret-file", str(secret)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 2
    assert "port 18001 would be both orbited-0's sp and orbited-1's http" in done.stderr


def _run_parent(
    tmp_path: Path, *flags: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    return subprocess.run(
        [sys.executable, "-m", "orbited.cli", "node", "--workers", "2", "--http",
         "127.0.0.1:0", "--sp", "tcp://127.0.0.1:0", "--secret-file", str(secret), *flags],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


@pytest.mark.slow
def test_a_configuration_every_worker_refuses_ends_the_parent_with_exit_2(tmp_path):
    # A node refuses a trace_key_file it cannot read with exit 2 at once. Before, the
    # parent restarted its workers five times and exited 1 after ≈ 20 s.
    done = _run_parent(tmp_path, "--trace", "all", "--trace-key-file", str(tmp_path / "no"),
                       "--log-level", "warn")  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "trace_key_file" in done.stderr
    assert "before it was ready: the configuration is refused" in done.stderr
    assert "restarting in" not in done.stderr
    # log_level warn: the parent's own info lines ("started orbited-0 ...") are not shown
    assert "#info] started" not in done.stderr


def test_a_ready_file_in_a_missing_folder_is_refused_at_start(tmp_path):
    # Before: the parent crashed with a traceback once every worker was up (SIGKILLing
    # them), and a single node logged a traceback and ran on without the file.
    missing = tmp_path / "nodir" / "ready.json"
    for workers in ("2", "1"):
        done = _run_parent(tmp_path, "--workers", workers, "--ready-file", str(missing))
        assert done.returncode == 2, done.stderr
        assert f"--ready-file {missing}: the folder {missing.parent} does not exist" in (
            done.stderr
        )
        assert "Traceback" not in done.stderr


def test_a_missing_secret_is_named_by_the_workers_parent_as_by_a_node(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "orbited.cli", "node", "--workers", "2", "--http",
         "127.0.0.1:0", "--sp", "tcp://127.0.0.1:0", "--secret-file",
         str(tmp_path / "none.secret"), "--no-create-secret"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 2
    assert f"secret_file {tmp_path / 'none.secret'}: No such file or directory" in done.stderr


@pytest.mark.slow
def test_a_worker_that_keeps_dying_makes_the_parent_give_up(tmp_path):
    # Worker 1's browser port is taken, so it exits at each start; with a quick policy the
    # parent gives up after 2 deaths in a row, stops worker 0 too and returns 1.
    import socket

    from orbited.node.workers import Supervisor

    taken = socket.socket()
    for _ in range(20):
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1] - 1
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) != 0:
                break
        taken.close()
        taken = socket.socket()
    taken.listen()
    (tmp_path / "secret").write_bytes(SECRET)
    config = NodeConfig(name="d", http=f"127.0.0.1:{port}", sp="tcp://127.0.0.1:0",
                        secret_file=str(tmp_path / "secret"))  # fmt: skip
    argv = ["--http", config.http, "--sp", config.sp, "--secret-file", config.secret_file]
    # run() installs its own SIGTERM/SIGINT handlers: put pytest's back afterwards
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    policy = RestartPolicy(first_delay=0.1, max_delay=0.2, stable=60, max_failures=2)
    supervisor = Supervisor(config, argv, 2, tmp_path / "ready.json", policy, stop_timeout=10)
    try:
        assert supervisor.run() == 1
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        taken.close()
    assert all(w.proc is None or w.proc.poll() is not None for w in supervisor.workers)
    assert not (tmp_path / "ready.json").exists()  # never were all workers ready
