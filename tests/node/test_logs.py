"""Process logs: Twisted's "Starting factory" / "Stopping factory" lines are silenced in every
process Orbited starts (orbited.runtime.logs), checked on the logs of a real local cluster."""

from __future__ import annotations

import io
import json
import urllib.request
from pathlib import Path

import pytest
from twisted.internet.protocol import AbstractDatagramProtocol, Factory
from twisted.logger import Logger, globalLogPublisher, textFileLogObserver

from orbited.cluster import ClusterConfig, LocalCluster

NOISE = ("Starting factory", "Stopping factory")


def test_quiet_factories_silences_start_and_stop_but_not_other_lines(monkeypatch):
    monkeypatch.setattr(Factory, "noisy", True)  # as Twisted ships it; restored afterwards
    monkeypatch.setattr(AbstractDatagramProtocol, "noisy", True)
    out = io.StringIO()
    observer = textFileLogObserver(out)
    globalLogPublisher.addObserver(observer)
    try:
        from orbited.runtime.logs import quiet_factories

        quiet_factories()
        factory = Factory()
        factory.doStart()
        factory.doStop()
        Logger(namespace="test").info("still logged")
    finally:
        globalLogPublisher.removeObserver(observer)
    text = out.getvalue()
    assert "still logged" in text
    assert not [line for line in text.splitlines() if line and any(n in line for n in NOISE)]


def _post(url: str, body: dict, cookie: str = "") -> tuple[bytes, str]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"content-type": "application/json",
                                              "cookie": cookie})  # fmt: skip
    with urllib.request.urlopen(request, timeout=10) as r:
        return r.read(), r.headers.get("set-cookie", "")


@pytest.mark.slow
def test_a_real_cluster_logs_no_factory_lines(tmp_path: Path):
    config = ClusterConfig(state_dir=tmp_path, free_ports=True, fresh=True,
                           heartbeat_interval=0.25, grace=1.0)  # fmt: skip
    with LocalCluster(config) as cluster:
        # Traffic that opens and closes client factories: a login and a message (cherrychat
        # pushes through the route ports), presence webhooks (nodes -> cherrychat) and
        # cherrychat's polls of HaloD's status.
        _, cookie = _post(cluster.url + "login", {"nick": "alice"})
        cookie = cookie.split(";", 1)[0]
        _post(cluster.url + "rooms/lobby/join", {}, cookie)
        _post(cluster.url + "rooms/lobby/messages", {"text": "hello"}, cookie)
        cluster.stop()
    logs = {p.name: p.read_text() for p in (tmp_path / "logs").glob("*.log")}
    assert set(logs) == {"halod.log", "cherrychat.log", "n1.log", "n2.log", "n3.log"}
    assert "node n1 epoch" in logs["n1.log"]  # the logs are there and say something
    noisy = {name: line for name, text in logs.items() for line in text.splitlines()
             if any(n in line for n in NOISE)}  # fmt: skip
    assert noisy == {}
