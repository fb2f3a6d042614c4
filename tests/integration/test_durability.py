"""kill -9 of `spanflame run` under span and profile load, 10 times on one store: every span
batch and every profile that was answered 200 is there after the restart."""

from __future__ import annotations

import random
import threading
import time

import httpx
import pytest

from agent.store import Store
from tests.integration.test_run import AgentProc

pytestmark = [pytest.mark.integration]

ARGS = ("--sampler", "py-spy", "--probes", "cpu")
NOTHING = "^no-such-process$"  # no profiling: the load is the clients'


def _otlp_body(trace: int, n: int) -> tuple[bytes, list[str]]:
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

    req = trace_service_pb2.ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    kv = rs.resource.attributes.add()
    kv.key, kv.value.string_value = "service.name", "durable"
    ss = rs.scope_spans.add()
    t = time.time_ns() - 2_000_000_000
    ids = []
    for i in range(n):
        sid = (trace << 16 | i + 1).to_bytes(8, "big")
        ss.spans.add(trace_id=trace.to_bytes(16, "big"), span_id=sid, name=f"op{i}",
                     start_time_unix_nano=t + i, end_time_unix_nano=t + i + 1000)
        ids.append(sid.hex())
    return req.SerializeToString(), ids


class Load:
    """Two clients, each recording what was acknowledged: OTLP span batches and folded pushes."""

    def __init__(self, agent: AgentProc, round_: int) -> None:
        self.agent = agent
        self.round = round_
        self.spans: dict[str, list[str]] = {}   # trace id -> span ids acknowledged
        self.profiles: list[str] = []            # services acknowledged
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._spans), threading.Thread(target=self._pushes)]

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)

    def _spans(self) -> None:
        with httpx.Client(timeout=10, headers={"content-type": "application/x-protobuf"}) as c:
            k = 0
            while not self.stop.is_set():
                k += 1
                trace = (self.round + 1) << 40 | k
                body, ids = _otlp_body(trace, 50)
                try:
                    r = c.post(self.agent.otlp, content=body)
                except httpx.HTTPError:
                    continue
                if r.status_code == 200:
                    self.spans[f"{trace:032x}"] = ids

    def _pushes(self) -> None:
        rng = random.Random(self.round)
        # what the pyroscope-io clients send (a simple content type is refused: CSRF)
        with httpx.Client(timeout=10, headers={"content-type": "binary/octet-stream"}) as c:
            k = 0
            while not self.stop.is_set():
                k += 1
                service = f"dur-{self.round}-{k}"
                body = "\n".join(f"main;work;f{rng.randint(0, 50)} {rng.randint(1, 9)}"
                                 for _ in range(20))
                try:
                    r = c.post(f"{self.agent.url}/ingest", content=body.encode(),
                               params={"name": service, "format": "folded",
                                       "from": str(int(time.time()) - 10),
                                       "until": str(int(time.time()))})
                except httpx.HTTPError:
                    continue
                if r.status_code == 200:
                    self.profiles.append(service)


def test_kill_9_under_load_loses_nothing_acknowledged(tmp_path):
    store = tmp_path / "store"
    acked_spans: dict[str, list[str]] = {}
    acked_profiles: list[str] = []
    t_start = time.time()
    for round_ in range(10):
        a = AgentProc(store, *ARGS, include=NOTHING)
        with Load(a, round_) as load:
            deadline = time.monotonic() + 20
            while not (load.spans and load.profiles) and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(random.Random(round_).uniform(0.5, 1.5))
            a.kill9()  # while both clients are sending
        a.log.close()
        acked_spans.update(load.spans)
        acked_profiles += load.profiles
        assert load.spans and load.profiles, f"round {round_}: nothing was acknowledged"
    b = AgentProc(store, *ARGS, include=NOTHING)  # starts on what the kills left
    try:
        with httpx.Client(timeout=30) as c:
            rng = random.Random(0)
            for trace in rng.sample(sorted(acked_spans), 20):  # served by the API
                got = {s["span_id"] for s in c.get(f"{b.url}/api/trace/{trace}").json()}
                assert set(acked_spans[trace]) <= got, trace
            services = {s["service"] for s in c.get(
                f"{b.url}/api/services", params={"from": str(t_start - 60)}).json()}
        st = Store(store, read_only=True)  # and all of them in the store
        stored = {r[0] for r in st._con().execute("SELECT span_id FROM spans")}
        st.close()
    finally:
        b.stop()
    n_spans = sum(len(v) for v in acked_spans.values())
    missing_spans = [i for ids in acked_spans.values() for i in ids if i not in stored]
    missing_profiles = [s for s in acked_profiles if s not in services]
    assert not missing_spans, f"{len(missing_spans)} of {n_spans} acknowledged spans lost"
    assert not missing_profiles, \
        f"{len(missing_profiles)} of {len(acked_profiles)} acknowledged profiles lost"
    assert n_spans >= 1000 and len(acked_profiles) >= 20


def test_spans_stored_before_a_kill_are_held_again_after_the_restart(tmp_path):
    """After a crash the agent holds the recent spans again (a window waits for a process's
    spans as before): /api/trace serves them and /healthz comes up."""
    store = tmp_path / "store"
    a = AgentProc(store, *ARGS, include=NOTHING)
    body, ids = _otlp_body(77, 5)
    r = httpx.post(a.otlp, content=body, headers={"content-type": "application/x-protobuf"})
    assert r.status_code == 200
    a.kill9()
    a.log.close()
    b = AgentProc(store, *ARGS, include=NOTHING)
    try:
        got = {s["span_id"] for s in httpx.get(f"{b.url}/api/trace/{77:032x}").json()}
        assert set(ids) <= got
    finally:
        b.stop()
    assert "holding 5 spans stored" in open(b.log.name).read()
