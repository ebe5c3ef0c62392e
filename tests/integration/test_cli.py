"""The ``orbited`` command line: commands listed in --help, unknown commands refused with a
suggestion, and ``orbited --flags`` (no command) still running a node as README shows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from orbited.cli import main
from tests.conftest import SECRET

COMMANDS = ("node", "token", "cluster", "whereis", "trace")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orbited.cli", *args], capture_output=True,
                          text=True, timeout=30)  # fmt: skip


@pytest.mark.parametrize("flag", ["--help", "-h", "help"])
def test_help_lists_every_command(flag, capsys):
    assert main([flag]) == 0
    out = capsys.readouterr().out
    commands = out.split("commands:", 1)[1]
    listed = [line.split()[0] for line in commands.splitlines() if line.startswith("  ")]
    assert listed == list(COMMANDS)
    assert "orbited COMMAND --help" in out


def test_help_of_a_command_is_that_commands_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["token", "--help"])
    assert exit_.value.code == 0
    assert "usage: orbited token" in capsys.readouterr().out
    assert main(["help", "cluster"]) == 0
    assert "usage: orbited cluster" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, suggestion",
    [
        (["frobnicate", "--help"], None),
        (["tokn", "--user", "a"], "token"),
        (["nodes"], "node"),
        (["clustre"], "cluster"),
        (["help", "tokne"], "token"),
    ],
)
def test_an_unknown_command_is_an_error_with_a_suggestion(argv, suggestion, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    bad = argv[1] if argv[0] == "help" else argv[0]
    assert f"orbited: unknown command {bad!r}" in captured.err
    if suggestion:
        assert f"did you mean {suggestion!r}?" in captured.err
    else:
        assert "did you mean" not in captured.err
    assert "commands: " + ", ".join(COMMANDS) in captured.err


def test_unknown_command_as_a_real_process_exits_2_without_the_nodes_help():
    done = run("frobnicate", "--help")
    assert done.returncode == 2
    assert "unknown command 'frobnicate'" in done.stderr
    assert "--max-payload" not in done.stdout + done.stderr  # not the node's help


def test_version(capsys):
    from orbited import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"orbited {__version__}\n"


@pytest.mark.slow
def test_flags_without_a_command_still_run_a_node(tmp_path: Path):
    """README: ``orbited --name n1 --halod ... --http ...`` (no command) is ``orbited node``."""
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "orbited.cli", "--name", "n1", "--http", "127.0.0.1:0",
         "--sp", "tcp://127.0.0.1:0", "--secret-file", str(secret), "--no-create-secret",
         "--ready-file", str(ready)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        from tests.conftest import wait_for

        wait_for(lambda: ready.exists() or proc.poll() is not None, "the node", timeout=15)
        assert proc.poll() is None
        import urllib.request

        http = json.loads(ready.read_text())["http"]
        with urllib.request.urlopen(f"http://{http}/orbited/health", timeout=5) as r:
            assert json.loads(r.read())["node"] == "n1"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize(
    "argv, suggestion",
    [
        (["node", "--nmae", "n1"], "--name"),
        (["--max-paylod=5"], "--max-payload"),
        (["token", "--user", "a", "--sesion", "s"], "--session"),
        (["cluster", "--fre-ports"], "--free-ports"),
        (["whereis", "--rute", "3"], "--route"),
        (["trace", "--user", "a", "--evnt", "42"], "--event"),
    ],
)
def test_a_mistyped_flag_is_an_error_naming_the_closest_flag(argv, suggestion, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" in err and f"did you mean {suggestion}?" in err


@pytest.mark.parametrize("part", ["--session", "--location", "--user"])
def test_a_reserved_wildcard_in_a_token_is_a_clear_error(part, tmp_path, capsys):
    """A "*" part is reserved in keys (docs/protocol.md, wildcard addressing): the token
    command says so and exits 2, with no traceback."""
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    argv = ["token", "--secret-file", str(secret), "--user", "alice", part, "*"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("orbited token: ") and "*" in captured.err


def test_trace_help_and_usage_as_a_real_process():
    """``orbited trace --help`` exits 0 with its flags; a usage error exits 2; HaloD not
    answering exits 1 (docs/operations.md, "Tracing a delivery")."""
    done = run("trace", "--help")
    assert done.returncode == 0 and "usage: orbited trace" in done.stdout
    for flag in ("--user", "--event", "--node", "--key-file", "--operator-key-file", "--json"):
        assert flag in done.stdout
    assert run("trace").returncode == 2
    nobody = run(
        "trace", "--user", "alice", "--url", "http://127.0.0.1:9", "--state-dir", "/nonexistent"
    )
    assert nobody.returncode == 1 and "orbited trace: cannot reach" in nobody.stderr


def test_trace_asks_a_standalone_node_with_its_key(tmp_path: Path):
    """``orbited trace --node URL --key-file F`` against a real node with ``trace_key_file``:
    an event sent to a connected browser shows as written, with the verdict; a wrong key
    is refused (exit 1, the node's 401); nothing traced for another user exits 1."""
    from tests.conftest import NodeProcess

    key_file = tmp_path / "trace.key"
    key_file.write_bytes(b"t" * 40)
    node = NodeProcess(tmp_path, "--trace", "all", "--trace-key-file", str(key_file)).start()
    try:
        with node.ws(node.token("alice", "s1", "/chat")) as ws:
            json.loads(ws.recv(timeout=5))  # hello
            with node.req() as req:
                req.send(json.dumps({"id": "42", "to": [["alice", "s1", "/chat"]],
                                     "data": "hi"}).encode())  # fmt: skip
                assert json.loads(req.recv())["results"][0]["status"] == "delivered"
            assert json.loads(ws.recv(timeout=5))["id"] == "42"
            url = f"http://{node.http}"
            done = run("trace", "--user", "alice", "--event", "42", "--node", url,
                       "--key-file", str(key_file))  # fmt: skip
            assert done.returncode == 0, done.stderr
            assert 'key ["alice","s1","/chat"]' in done.stdout
            verdict = [line for line in done.stdout.splitlines() if line.startswith("event 42")]
            assert len(verdict) == 1 and "written to ws on " in verdict[0]
            as_json = json.loads(run("trace", "--user", "alice", "--node", url, "--key-file",
                                     str(key_file), "--json").stdout)  # fmt: skip
            (entry,) = as_json["keys"]
            (record,) = [r for r in entry["dispatches"] if r["event"] == "42"]
            assert record["status"] == "delivered" and record["transport"] == "ws"
            wrong = tmp_path / "wrong.key"
            wrong.write_bytes(b"w" * 40)
            refused = run("trace", "--user", "alice", "--node", url, "--key-file", str(wrong))
            assert refused.returncode == 1 and "401 unauthorized" in refused.stderr
            nobody = run("trace", "--user", "bob", "--node", url, "--key-file", str(key_file))
            assert nobody.returncode == 1
            assert "no node has a record of any event for this user" in nobody.stdout
    finally:
        node.stop()


@pytest.mark.parametrize("code", [
    "from halod.cli import main; sys.exit(main(['plan', '--routes', '4096', '--nodes', '4096']))",
    # a long output of orbited's own: its help, many times
    "from orbited.cli import main; sys.exit(max(main(['--help']) for _ in range(2000)))",
])  # fmt: skip
def test_a_reader_that_goes_away_ends_a_command_without_a_traceback(code):
    """``halod plan … | head -1``: the pipe closes under a long output."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys; " + code],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline()
    proc.stdout.close()  # the reader goes away
    _, err = proc.communicate(timeout=60)
    assert b"Traceback" not in err and b"BrokenPipeError" not in err, err[-2000:]
