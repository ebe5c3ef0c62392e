"""The node service inside this process's reactor (pytest-twisted): wiring and shutdown."""

import json

import pynng
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.web.client import Agent, readBody

from orbited.core.keys import ConnectionKey
from orbited.core.tokens import issue_token
from orbited.node.config import NodeConfig
from orbited.node.service import NodeService
from tests.conftest import SECRET


def pynng_request(address: str, body: dict) -> dict:
    with pynng.Req0(dial=address, send_timeout=5000, recv_timeout=5000) as req:
        req.send(json.dumps(body).encode())
        return json.loads(req.recv_msg().bytes)


@pytest_twisted.inlineCallbacks
def test_service_dispatches_and_stops_cleanly(tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    config = NodeConfig(
        http="127.0.0.1:0", sp="tcp://127.0.0.1:0", secret_file=str(secret), create_secret=False
    )
    # Timers other tests left behind (e.g. twisted.web's channel timeouts) are not this
    # node's: only what is scheduled from here on counts.
    earlier = set(reactor.getDelayedCalls())
    node = NodeService(config, reactor)
    node.startService()
    try:
        token = issue_token(SECRET, ConnectionKey("svc", "s", "/t"), ttl=60)
        base = f"http://{node.http_address}/orbited/poll?token={token}".encode()
        agent = Agent(reactor)
        hello = json.loads((yield readBody((yield agent.request(b"GET", base + b"&timeout=0")))))
        stream = hello[0]["stream"]
        reply = yield deferToThread(
            pynng_request, node.sp_address, {"id": "svc-1", "to": [["svc", "s", "/t"]], "data": 7}
        )
        assert reply["results"] == [{"status": "queued", "seq": 1}]
        response = yield agent.request(b"GET", base + f"&last={stream}:0".encode())
        frames = json.loads((yield readBody(response)))
        assert frames[1] == {"type": "event", "seq": 1, "id": "svc-1", "data": 7}
        health = yield agent.request(b"GET", f"http://{node.http_address}/orbited/health".encode())
        assert json.loads((yield readBody(health)))["epoch"] == node.hub.epoch
    finally:
        yield node.stopService()
    assert not node.sp_server.running and not node.http_server.running
    ours = [c for c in reactor.getDelayedCalls() if c not in earlier and _ours(c.func, node)]
    assert ours == []


def _ours(func: object, node: NodeService) -> bool:
    """A timer this node left behind. twisted.web channels of other tests' sites (their
    60 s idle timeouts) may schedule their 15 s abort while this test runs: a channel's
    timer counts only if the channel belongs to this node's site."""
    site = getattr(getattr(func, "__self__", None), "site", None)
    if site is not None:
        return site is node.site
    return "orbited" in repr(func)


def test_a_missing_key_file_names_its_config_key(tmp_path):
    """The node exits 2 with the message: it must say which key names the file."""
    import pytest

    missing = tmp_path / "nowhere.key"
    for key in ("secret_file", "publish_key_file", "halod_secret_file"):
        overrides: dict = {"secret_file": str(tmp_path / "secret"), key: str(missing)}
        if key == "secret_file":
            overrides["create_secret"] = False
        if key == "publish_key_file":
            overrides["publish_http"] = "127.0.0.1:0"
        if key == "halod_secret_file":
            overrides["halod"] = "tcp://127.0.0.1:1"
        config = NodeConfig.load(None, overrides)
        with pytest.raises(ValueError, match=rf"^{key} {missing}: No such file"):
            NodeService(config, reactor)


@pytest_twisted.inlineCallbacks
def test_a_node_without_its_speedups_says_so_at_start(tmp_path, monkeypatch):
    """Where orbited.core._speedups was not built (an install without a compiler or
    OpenSSL's headers), the operator is told at start: the node works, at more CPU."""
    from twisted.logger import formatEvent, globalLogPublisher

    from orbited.core import speedups

    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    config = NodeConfig(
        http="127.0.0.1:0", sp="tcp://127.0.0.1:0", secret_file=str(secret), create_secret=False
    )
    for native, warned in ((None, True), (object(), False)):
        monkeypatch.setattr(speedups, "native", native)
        said: list[str] = []

        def observe(event: dict, said: list[str] = said) -> None:
            said.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        node = NodeService(config, reactor)
        try:
            node.startService()
        finally:
            globalLogPublisher.removeObserver(observe)
            yield node.stopService()
        assert any("_speedups is not built" in line for line in said) is warned, said
        assert any("browsers on http://" in line for line in said)
