"""The in-app hookup: one line with the SDK, or none with opentelemetry-instrument."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from starlette.applications import Starlette

from agent.httpserver import ServerThread
from agent.otlp_receiver import OtlpReceiver
from agent.spans import SpanStore

pytestmark = pytest.mark.integration

APP = r'''
import threading, time
from opentelemetry import trace
tracer = trace.get_tracer("hookup-test")
def work():
    with tracer.start_as_current_span("outer"):
        with tracer.start_as_current_span("inner"):
            time.sleep(0.01)
t = threading.Thread(target=work, name="worker-7")
t.start(); t.join()
print(t.native_id, flush=True)
'''


@pytest.fixture()
def receiver():
    store = SpanStore()
    with ServerThread(Starlette(routes=OtlpReceiver(store).routes()), "127.0.0.1", 0) as srv:
        yield srv, store


def wait_spans(store, n, timeout=20):
    deadline = time.monotonic() + timeout
    while store.received < n and time.monotonic() < deadline:
        time.sleep(0.05)


def test_opentelemetry_instrument_picks_up_the_processor_with_no_code_change(receiver, tmp_path):
    srv, store = receiver
    app = tmp_path / "app.py"
    app.write_text(APP)
    instrument = Path(sys.executable).parent / "opentelemetry-instrument"
    env = {**os.environ, "OTEL_TRACES_EXPORTER": "otlp", "OTEL_METRICS_EXPORTER": "none",
           "OTEL_LOGS_EXPORTER": "none", "OTEL_SERVICE_NAME": "instrumented",
           "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
           "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{srv.url}/v1/traces"}
    res = subprocess.run([str(instrument), sys.executable, str(app)], capture_output=True,
                         text=True, env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    tid = int(res.stdout.split()[-1])
    wait_spans(store, 2)
    spans = {s.name: s for s in store.all()}
    assert set(spans) == {"outer", "inner"}
    assert spans["inner"].tid == tid and spans["outer"].tid == tid
    assert spans["inner"].pid > 0 and spans["inner"].service == "instrumented"
    attrs = dict(spans["outer"].attributes)
    assert attrs["thread.name"] == "worker-7"
    assert attrs["pyroscope.profile.id"] == spans["outer"].span_id   # local root only
    assert "pyroscope.profile.id" not in dict(spans["inner"].attributes)
    for s in spans.values():  # what Jaeger link patterns template deep links from
        assert dict(s.attributes)["spanflame.span_id"] == s.span_id
    assert store.local_root(spans["inner"]).span_id == spans["outer"].span_id
