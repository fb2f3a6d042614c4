"""The OTLP receiver under hostile and heavy input: deep JSON is a 400, decoding never holds the
event loop, and a full queue answers 429 with Retry-After."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from agent.httpserver import ServerThread
from agent.metrics import Metrics
from agent.otlp_receiver import OtlpReceiver
from agent.spans import SpanStore
from agent.spanwriter import Overloaded, SpanWriter

pytestmark = [pytest.mark.integration]


def _serve(rx: OtlpReceiver) -> ServerThread:
    async def healthz(request):
        return PlainTextResponse("ok")

    app = Starlette(routes=rx.routes() + [Route("/healthz", healthz)])
    return ServerThread(app, "127.0.0.1", 0)  # started by `with`


def _body(n: int, first: int = 1) -> bytes:
    req = trace_service_pb2.ExportTraceServiceRequest()
    ss = req.resource_spans.add().scope_spans.add()
    for i in range(first, first + n):
        sp = ss.spans.add(trace_id=(i + 1).to_bytes(16, "big"), span_id=i.to_bytes(8, "big"),
                          name="op", start_time_unix_nano=10**18 + i,
                          end_time_unix_nano=10**18 + i + 5)
        for k in ("a", "b", "c"):
            kv = sp.attributes.add()
            kv.key, kv.value.string_value = k, "v" * 20
    return req.SerializeToString()


def test_json_nested_100000_deep_is_a_400():
    store = SpanStore()
    with _serve(OtlpReceiver(store)) as srv:
        deep = b'{"resourceSpans": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        r = httpx.post(f"{srv.url}/v1/traces", content=deep,
                       headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == 400 and "nested deeper" in r.text
        # deep but under the recursion limit: still refused, before any recursive step
        mid = b'{"resourceSpans": [{"resource": {"attributes": ' + b"[" * 500 + b"]" * 500 + b"}}]}"
        r = httpx.post(f"{srv.url}/v1/traces", content=mid,
                       headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == 400 and "nested deeper" in r.text
        # and a normal request still works
        r = httpx.post(f"{srv.url}/v1/traces", content=_body(3),
                       headers={"content-type": "application/x-protobuf"}, timeout=30)
        assert r.status_code == 200 and len(store) == 3


def test_decoding_a_large_batch_does_not_hold_the_event_loop():
    """A batch that takes a while to decode (60k spans) must not delay other requests."""
    store = SpanStore(max_bytes=1 << 30)
    body = _body(60_000)
    with _serve(OtlpReceiver(store, max_body=64 << 20, max_decoded=64 << 20)) as srv:
        done = threading.Event()
        status = []

        def post():
            status.append(httpx.post(f"{srv.url}/v1/traces", content=body, timeout=60,
                                     headers={"content-type": "application/x-protobuf"})
                          .status_code)
            done.set()

        t = threading.Thread(target=post)
        t0 = time.monotonic()
        t.start()
        worst = 0.0
        probes = 0
        with httpx.Client(timeout=10) as c:
            while not done.is_set():
                p0 = time.monotonic()
                assert c.get(f"{srv.url}/healthz").status_code == 200
                worst = max(worst, time.monotonic() - p0)
                probes += 1
                time.sleep(0.01)
        t.join()
        took = time.monotonic() - t0
        assert status == [200] and len(store) == 60_000
        assert probes >= 5, f"the batch took {took:.2f} s, too short to tell"
        # main held the loop for the whole decode (worst == took); a busy machine adds delays
        assert worst < max(0.25, took / 3), f"/healthz waited {worst:.2f} s of {took:.2f} s"


def test_full_queue_answers_429_with_retry_after():
    metrics = Metrics()
    release = Future()
    pending: list[Future] = []

    def sink(spans):  # a writer that does not finish until released
        f = Future()
        pending.append(f)
        release.add_done_callback(lambda _r: f.set_result(len(spans)))
        return f

    rx = OtlpReceiver(SpanStore(), metrics=metrics, sink=sink, max_inflight=2)
    with _serve(rx) as srv:
        results: list[int] = []

        def post(i):
            r = httpx.post(f"{srv.url}/v1/traces", content=_body(2, first=10 * i + 1),
                           headers={"content-type": "application/x-protobuf"}, timeout=30)
            results.append(r.status_code)

        ts = [threading.Thread(target=post, args=(i,)) for i in range(2)]
        for t in ts:
            t.start()
        deadline = time.monotonic() + 10
        while len(pending) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        r = httpx.post(f"{srv.url}/v1/traces", content=_body(2, first=100),
                       headers={"content-type": "application/x-protobuf"}, timeout=30)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        release.set_result(None)
        for t in ts:
            t.join()
        assert results == [200, 200]
    text = metrics.render().decode()
    assert 'spanflame_otlp_requests_total{result="rejected_429"} 1.0' in text


def test_span_writer_queue_is_bounded_and_commits_in_groups(tmp_path):
    from agent.store import Store

    store = Store(tmp_path)
    gate = threading.Event()
    real = store.insert_spans

    def slow_insert(rows):
        gate.wait(10)
        real(rows)

    store.insert_spans = slow_insert
    spans = SpanStore()
    with SpanWriter(store, spans, max_pending_spans=130) as w:
        from agent.spans import SpanRecord

        def batch(k):
            return [SpanRecord(f"{k:032x}", f"{k * 1000 + i + 1:016x}", "", "op", "svc", 0, 0,
                               10**18, 10**18 + 5) for i in range(40)]

        f1 = w.submit(batch(1))
        time.sleep(0.1)  # the writer holds batch 1 (waiting on the gate)
        f2, f3 = w.submit(batch(2)), w.submit(batch(3))
        with pytest.raises(Overloaded):
            w.submit(batch(4))
        gate.set()
        assert f1.result(10) == 40 and f2.result(10) == 40 and f3.result(10) == 40
        assert w.commits == 2  # batches 2 and 3 in one transaction
    assert len(store.trace(f"{3:032x}")) == 40 and len(spans) == 120
