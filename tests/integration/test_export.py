"""The Pyroscope exporter: against a second agent's push endpoint, against what the real
pyroscope-io client sends, and against an upstream that fails, refuses or wants credentials."""

from __future__ import annotations

import base64
import gzip
import json
import time

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

from agent import pprof
from agent.httpserver import ServerThread
from agent.model import Frame, Profile, make_labels
from agent.proto import push_pb2
from agent.pyroscope_export import PyroscopeExporter, push_request
from tests.integration.test_run import FIXTURES, PROGRAMS, AgentProc, fn_names, wait_profile

pytestmark = pytest.mark.integration


def sample_profile() -> Profile:
    p = Profile([("samples", "count"), ("cpu", "nanoseconds")], period=10_000_000,
                period_type=("cpu", "nanoseconds"), time_ns=time.time_ns() - 10**10,
                duration_ns=10**10, default_sample_type="cpu")
    p.add((Frame("handler", "/srv/app.py", 7),),
          make_labels({"thread_id": 5, "span_id": "00f067aa0ba902b7",
                       "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736"}),
          {"samples": 3, "cpu": 30_000_000})
    return p


def test_our_push_matches_what_the_real_client_sends():
    real = push_pb2.PushRequest.FromString(
        gzip.decompress((FIXTURES / "pyroscope-1.4.0-push.bin").read_bytes()))
    meta = json.loads((FIXTURES / "pyroscope-1.4.0-push.json").read_text())
    ours = push_pb2.PushRequest.FromString(
        gzip.decompress(push_request(sample_profile(), "cpu", {"service_name": "svc", "pid": 5})))
    exp = PyroscopeExporter("http://x")
    assert exp.url.endswith(meta["path"])
    assert exp.headers["content-type"] == meta["headers"]["content-type"]
    assert exp.headers["content-encoding"] == meta["headers"]["content-encoding"]
    for req in (real, ours):
        assert len(req.series) == 1 and len(req.series[0].samples) == 1
        labels = {l.name: l.value for l in req.series[0].labels}
        assert labels["__name__"] == "process_cpu" and labels["service_name"]
        prof = pprof.decode(req.series[0].samples[0].raw_profile)
        assert [(t.name, t.unit) for t in prof.sample_types if t.name != "samples"] == [
            ("cpu", "nanoseconds")]
        assert {k for (_s, l) in prof.samples for k, _ in l} >= {"span_id"}


@pytest.fixture()
def upstream():
    got: list = []
    behaviour = {"fail": 0, "status": 200}

    async def push(request):
        got.append((dict(request.headers), await request.body()))
        if behaviour["fail"] > 0:
            behaviour["fail"] -= 1
            return Response(b"busy", status_code=503)
        return Response(b"", status_code=behaviour["status"])

    with ServerThread(Starlette(routes=[Route("/push.v1.PusherService/Push", push,
                                              methods=["POST"])]), "127.0.0.1", 0) as srv:
        yield srv, got, behaviour


def test_credentials_tenant_and_retries(upstream):
    srv, got, behaviour = upstream
    behaviour["fail"] = 2
    exp = PyroscopeExporter(srv.url, tenant="team-a", user="u", password="p", backoff_s=0.05).start()
    exp.submit(sample_profile(), "cpu", {"service_name": "svc"})
    exp.close(drain_s=10)
    assert exp.sent == 1 and len(got) == 3  # two 503s, then accepted
    h = got[-1][0]
    assert h["x-scope-orgid"] == "team-a"
    assert h["authorization"] == "Basic " + base64.b64encode(b"u:p").decode()
    exp2 = PyroscopeExporter(srv.url, token="s3cret").start()
    exp2.submit(sample_profile(), "cpu", {"service_name": "svc"})
    exp2.close(drain_s=10)
    assert got[-1][0]["authorization"] == "Bearer s3cret"


def test_refusals_and_overflow_are_counted(upstream):
    srv, got, behaviour = upstream
    behaviour["status"] = 400
    exp = PyroscopeExporter(srv.url).start()
    exp.submit(sample_profile(), "cpu", {"service_name": "svc"})
    exp.close(drain_s=10)
    assert exp.dropped["rejected"] == 1 and exp.sent == 0
    full = PyroscopeExporter(srv.url, max_queue=2)  # not started: nothing drains the queue
    for _ in range(5):
        full.submit(sample_profile(), "cpu", {"service_name": "svc"})
    assert full.dropped["queue_full"] == 3
    unreachable = PyroscopeExporter("http://127.0.0.1:9", max_attempts=2, backoff_s=0.01).start()
    unreachable.submit(sample_profile(), "cpu", {"service_name": "svc"})
    unreachable.close(drain_s=10)
    assert unreachable.dropped["failed"] == 1


def test_export_to_a_second_agent(tmp_path):
    import subprocess
    import sys
    central = AgentProc(tmp_path / "central", "--include", "nothing-matches-this")
    node = AgentProc(tmp_path / "node", "--export-pyroscope", central.url, "--window", "4")
    p = subprocess.Popen([sys.executable, str(PROGRAMS / "cpu_split.py"), "--duration", "60",
                          "--report", str(tmp_path / "r.json")], stdout=subprocess.PIPE, text=True)
    pid = json.loads(p.stdout.readline())["pid"]
    try:
        since = str(int(time.time()) - 5)
        r, prof = wait_profile(central, time.time() + 40, type="cpu", pid=pid, **{"from": since})
        assert {"heavy_a", "spin_b"} <= fn_names(prof)
        assert {k for (_s, l) in prof.samples for k, _ in l} >= {"thread_id", "thread_name"}
        services = httpx.get(f"{central.url}/api/services").json()
        assert any(s["service"] == "python" or str(pid) in str(s["pids"]) for s in services)
    finally:
        p.kill()
        p.wait()
        node.stop()
        central.stop()
