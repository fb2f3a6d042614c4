"""The OTLP/HTTP receiver over real HTTP: good requests from the real OTel exporter and JSON,
bad ones refused with a 4xx and a reason, and the receiver still serving afterwards; forwarding
to an upstream with retries and counted drops."""

from __future__ import annotations

import gzip
import json
import time

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.trace.v1 import trace_pb2
from starlette.applications import Starlette

from agent.httpserver import ServerThread, parse_listen
from agent.metrics import Metrics
from agent.otlp_forward import OtlpForwarder
from agent.otlp_receiver import OtlpReceiver
from agent.proto import status_pb2
from agent.spans import SpanStore

pytestmark = pytest.mark.integration

TRACE = bytes.fromhex("0af7651916cd43dd8448eb211c80319c")
SPAN = bytes.fromhex("b7ad6b7169203331")


def request(n=1, trace_id=TRACE, attrs=True, first=1) -> trace_service_pb2.ExportTraceServiceRequest:
    req = trace_service_pb2.ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    kv = rs.resource.attributes.add()
    kv.key, kv.value.string_value = "service.name", "checkout"
    ss = rs.scope_spans.add()
    for i in range(n):
        sp = ss.spans.add(trace_id=trace_id, span_id=(first + i).to_bytes(8, "big"), name=f"op{i}",
                          start_time_unix_nano=1_000_000_000 + i, end_time_unix_nano=2_000_000_000)
        if attrs:
            a = sp.attributes.add()
            a.key, a.value.int_value = "spanflame.tid", 4242
            b = sp.attributes.add()
            b.key, b.value.int_value = "spanflame.pid", 777
    return req


@pytest.fixture()
def server():
    store, metrics = SpanStore(), Metrics()
    rx = OtlpReceiver(store, metrics=metrics, max_body=64 * 1024, max_decoded=256 * 1024)
    with ServerThread(Starlette(routes=rx.routes()), "127.0.0.1", 0) as srv:
        yield srv, store, metrics


def post(srv, body, ctype="application/x-protobuf", **headers):
    return httpx.post(f"{srv.url}/v1/traces", content=body,
                      headers={"content-type": ctype, **headers}, timeout=10)


def test_protobuf_gzip_and_json_are_accepted(server):
    srv, store, _ = server
    r = post(srv, request(2).SerializeToString())
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-protobuf"
    resp = trace_service_pb2.ExportTraceServiceResponse.FromString(r.content)
    assert not resp.HasField("partial_success")
    r = post(srv, gzip.compress(request(3, first=10).SerializeToString()),
             **{"content-encoding": "gzip"})
    assert r.status_code == 200
    doc = {"resourceSpans": [{"resource": {"attributes": [
        {"key": "service.name", "value": {"stringValue": "web"}}]},
        "scopeSpans": [{"spans": [{
            "traceId": "5b8efff798038103d269b633813fc60c", "spanId": "eee19b7ec3c1b174",
            "parentSpanId": "eee19b7ec3c1b173", "name": "GET /json",
            "startTimeUnixNano": "1544712660000000000", "endTimeUnixNano": "1544712661000000000",
            "kind": 2, "attributes": [{"key": "spanflame.tid", "value": {"intValue": "99"}},
                                      {"key": "spanflame.pid", "value": {"intValue": "5"}}]}]}]}]}
    r = post(srv, json.dumps(doc).encode(), "application/json")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    s = store.get("eee19b7ec3c1b174")
    assert s.trace_id == "5b8efff798038103d269b633813fc60c" and s.parent_span_id == "eee19b7ec3c1b173"
    assert (s.pid, s.tid, s.name, s.service, s.kind) == (5, 99, "GET /json", "web", "server")
    assert store.received == 2 + 3 + 1
    assert store.get((1).to_bytes(8, "big").hex()).service == "checkout"


def test_partial_success_names_the_rejected_spans(server):
    srv, store, metrics = server
    req = request(2)
    bad = req.resource_spans[0].scope_spans[0].spans.add(trace_id=b"\0" * 16, span_id=SPAN, name="x")
    assert bad
    r = post(srv, req.SerializeToString())
    assert r.status_code == 200
    resp = trace_service_pb2.ExportTraceServiceResponse.FromString(r.content)
    assert resp.partial_success.rejected_spans == 1
    assert "trace_id" in resp.partial_success.error_message
    assert store.received == 2
    assert b"spanflame_otlp_spans_rejected_total 1.0" in metrics.render()


@pytest.mark.parametrize("body,ctype,headers,status,reason", [
    (b"\xff\xff\xff\xff garbage", "application/x-protobuf", {}, 400, "malformed"),
    (b"{not json", "application/json", {}, 400, "malformed JSON"),
    (b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "zz"}]}]}]}',
     "application/json", {}, 400, "not hex"),
    (b"hello", "text/plain", {}, 415, "unsupported Content-Type"),
    (b"x" * 70_000, "application/x-protobuf", {}, 413, "exceeds the limit"),
    (gzip.compress(b"\0" * 300_000), "application/x-protobuf", {"content-encoding": "gzip"}, 413,
     "decompresses to more than"),
    (b"not gzip at all", "application/x-protobuf", {"content-encoding": "gzip"}, 400, "gzip"),
    (b"", "application/x-protobuf", {"content-encoding": "br"}, 415, "Content-Encoding"),
])
def test_bad_requests_get_a_4xx_with_a_reason_and_the_receiver_keeps_serving(
        server, body, ctype, headers, status, reason):
    srv, store, metrics = server
    r = post(srv, body, ctype, **headers)
    assert r.status_code == status
    if ctype == "application/json":
        msg = r.json()["message"]
    else:
        msg = status_pb2.Status.FromString(r.content).message
    assert reason in msg, msg
    ok = post(srv, request(1).SerializeToString())
    assert ok.status_code == 200 and store.received == 1
    assert f'result="rejected_{status}"'.encode() in metrics.render()


def test_wrong_method_and_path(server):
    srv, _, _ = server
    assert httpx.get(f"{srv.url}/v1/traces").status_code == 405
    assert httpx.post(f"{srv.url}/v1/metrics", content=b"").status_code == 404


def test_parse_listen():
    assert parse_listen("127.0.0.1:4318") == ("127.0.0.1", 4318)
    assert parse_listen("[::1]:4318") == ("::1", 4318)
    assert parse_listen(":4040") == ("0.0.0.0", 4040)
    assert parse_listen("4040") == ("127.0.0.1", 4040)
    with pytest.raises(Exception, match="HOST:PORT"):
        parse_listen("localhost:http")


def test_port_in_use_is_a_clear_error(server):
    srv, _, _ = server
    with pytest.raises(Exception, match="cannot listen on 127.0.0.1"):
        ServerThread(Starlette(), "127.0.0.1", srv.port)


def test_forwarding_retries_until_upstream_comes_up_and_counts_drops():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    metrics = Metrics()
    fwd = OtlpForwarder(f"http://127.0.0.1:{port}", backoff_s=0.2, max_attempts=20,
                        metrics=metrics, max_queue=2).start()
    body = gzip.compress(request(4).SerializeToString())
    fwd.submit(body, "application/x-protobuf", "gzip")
    time.sleep(0.5)  # upstream is down: the forwarder retries
    for _ in range(5):  # the queue holds 2 (one is in flight): the rest are dropped, counted
        fwd.submit(body, "application/x-protobuf", "gzip")
    upstream = SpanStore()
    rx = OtlpReceiver(upstream)
    with ServerThread(Starlette(routes=rx.routes()), "127.0.0.1", port):
        deadline = time.monotonic() + 20
        while upstream.received < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        fwd.close(drain_s=10)
    assert upstream.received == 4            # the same spans, unchanged (gzip passed through)
    assert fwd.dropped["queue_full"] >= 2
    assert fwd.sent >= 1
    text = metrics.render()
    assert b'spanflame_otlp_forward_dropped_total{reason="queue_full"}' in text
    assert b"spanflame_otlp_forward_retries_total" in text


def test_forwarding_drops_what_upstream_refuses():
    store = SpanStore()

    async def refuse(request):
        from starlette.responses import Response
        return Response(b"no", status_code=400)

    from starlette.routing import Route
    with ServerThread(Starlette(routes=[Route("/v1/traces", refuse, methods=["POST"])]),
                      "127.0.0.1", 0) as up:
        fwd = OtlpForwarder(up.url).start()
        fwd.submit(request(1).SerializeToString(), "application/x-protobuf", None)
        fwd.close(drain_s=5)
    assert fwd.dropped["rejected"] == 1 and fwd.sent == 0
    assert store.received == 0
