"""A real node process with ``otel = true`` exports its spans over OTLP/HTTP (the SDK's
exporter, configured by the standard OTEL_EXPORTER_OTLP_* variables) to a collector this
test runs on loopback, decoding what arrives with opentelemetry-proto: the web app's
send span (the blocking client), the node's dispatch, deliver and ack spans, one trace
(docs/operations.md, "OpenTelemetry")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk", reason="the otel extra is not installed")
pytest.importorskip("opentelemetry.exporter.otlp.proto.http")

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (  # noqa: E402
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)

from orbited.client import BlockingClient, Cluster, Node  # noqa: E402
from orbited.client.otel import ClientTracing  # noqa: E402
from orbited.core.keys import ConnectionKey  # noqa: E402
from tests.conftest import NodeProcess, wait_for  # noqa: E402

pytestmark = pytest.mark.slow


class Collector:
    """An OTLP/HTTP trace receiver: POST /v1/traces with an ExportTraceServiceRequest."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["content-length"]))
                ok = self.path == "/v1/traces" and collector.receive(body)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if ok else 404)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def receive(self, body: bytes) -> bool:
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        with self.lock:
            for resource_spans in request.resource_spans:
                resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append({
                            "name": span.name, "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(), "parent": span.parent_span_id.hex(),
                            "resource": resource, "scope": scope_spans.scope.name,
                            "attributes": {a.key: _value(a.value) for a in span.attributes},
                        })  # fmt: skip
        return True

    def named(self, name: str) -> list[dict[str, Any]]:
        with self.lock:
            return [s for s in self.spans if s["name"] == name]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _value(v: Any) -> object:
    return getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None


@pytest.fixture
def collector(monkeypatch: pytest.MonkeyPatch) -> Iterator[Collector]:
    c = Collector()
    # The node process inherits these: the SDK's own configuration.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", c.url)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    for name in ("OTEL_SDK_DISABLED", "OTEL_SERVICE_NAME", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    yield c
    c.close()


def test_a_node_process_exports_the_spans_of_a_traced_send(tmp_path, collector):
    config = tmp_path / "node.toml"
    config.write_text('[node]\nname = "n-otel"\notel = true\n')
    node = NodeProcess(tmp_path, "--config", str(config)).start()
    provider = TracerProvider()
    app_spans = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(app_spans))
    alice = ConnectionKey("alice", "s", "/t")
    try:
        with node.ws(node.token(alice.user, alice.session, alice.location)) as ws:
            assert json.loads(ws.recv(timeout=5))["type"] == "hello"
            cluster = Cluster([Node(node.sp, f"http://{node.http}")])
            with BlockingClient(cluster, otel=ClientTracing(provider)) as client:
                results = client.send([alice], {"text": "traced"}, event_id="ev-otel")
            assert results == {alice: {"status": "delivered", "seq": 1}}
            frame = json.loads(ws.recv(timeout=5))
            assert frame["data"] == {"text": "traced"}
            assert "traceparent" not in json.dumps(frame)  # not the page's business
            ws.send(json.dumps({"type": "ack", "seq": 1}))
            wait_for(lambda: collector.named("orbited.ack"), "the ack span at the collector")
    finally:
        node.stop()
        provider.shutdown()
    (send,) = [s for s in app_spans.get_finished_spans() if s.name == "orbited.send"]
    trace_id = f"{send.context.trace_id:032x}"
    (dispatch,) = collector.named("orbited.dispatch")
    (deliver,) = collector.named("orbited.deliver")
    (ack,) = collector.named("orbited.ack")
    assert dispatch["trace_id"] == deliver["trace_id"] == ack["trace_id"] == trace_id
    assert dispatch["parent"] == f"{send.context.span_id:016x}"
    assert deliver["parent"] == dispatch["span_id"] and ack["parent"] == deliver["span_id"]
    assert dispatch["resource"]["service.name"] == "orbited"
    assert dispatch["resource"]["service.instance.id"] == "n-otel"
    assert dispatch["scope"] == "orbited.node"
    assert dispatch["attributes"]["orbited.event_id"] == "ev-otel"
    assert dispatch["attributes"]["orbited.status.delivered"] == 1
    assert deliver["attributes"]["orbited.transport"] == "ws"
    assert ack["attributes"]["orbited.ack.outcome"] == "acked"


def test_a_node_without_otel_exports_nothing(tmp_path, collector):
    node = NodeProcess(tmp_path).start()
    alice = ConnectionKey("alice", "s", "/t")
    try:
        cluster = Cluster([Node(node.sp, f"http://{node.http}")])
        provider = TracerProvider()
        with BlockingClient(cluster, otel=ClientTracing(provider)) as client:
            assert client.send([alice], 1)[alice] == {"status": "no_connection"}
    finally:
        node.stop()  # a node with otel on exports what it has when it stops
    assert collector.spans == []


def test_otel_without_the_packages_is_a_config_error(tmp_path):
    """Exit 2 with what to install, before any port is bound."""
    hidden = tmp_path / "hidden" / "opentelemetry"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('not installed here')\n")
    config = tmp_path / "node.toml"
    config.write_text("[node]\notel = true\n")
    (tmp_path / "secret").write_bytes(b"s" * 32)
    done = subprocess.run(
        [sys.executable, "-m", "orbited.cli", "node", "--config", str(config),
         "--http", "127.0.0.1:0", "--sp", "tcp://127.0.0.1:0",
         "--secret-file", str(tmp_path / "secret")],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(tmp_path / "hidden")},
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().endswith(
        "orbited: otel: install orbited[otel] (pip install 'orbited[otel]')"
    )
