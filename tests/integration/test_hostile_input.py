"""Each reproduction of issue 12 against a real agent, and what it must leave behind: a 4xx
with a reason (never a 5xx), nothing stored from a refused push, flame graphs over stacks of
any depth, /healthz unaffected by a max-size push or 300 slow connections, and a full ingest
queue answered 429 with Retry-After and counted."""

from __future__ import annotations

import asyncio
import gzip
import random
import socket
import threading
import time

import httpx
import pytest

from agent.proto import profile_pb2
from tests import hostile

pytestmark = [pytest.mark.integration]

#: What a max-size push may add to the agent's peak RSS (docs/deployment.md states the bound).
PUSH_RSS_BOUND = 192 * 1024 * 1024


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    a = hostile.Agent(tmp_path_factory.mktemp("hostile"))
    yield a
    a.stop()


def send(agent, case: hostile.Case) -> httpx.Response:
    base = agent.otlp_url if case.server == "otlp" else agent.url
    return httpx.request(case.method, base + case.path, headers=case.headers,
                         content=case.body or None, timeout=30)


def stored(agent, service: str) -> int:
    now = int(time.time())
    r = httpx.get(f"{agent.url}/api/profile", params={
        "service": service, "from": str(now - 3600), "until": str(now + 60)}, timeout=30)
    assert r.status_code == 200, r.text
    return int(r.headers["x-spanflame-profiles"])


REPRO = hostile.reproductions()


@pytest.mark.parametrize("case", [c for c in REPRO if not c.owned_elsewhere],
                         ids=[c.name for c in REPRO if not c.owned_elsewhere])
def test_reproduction_gets_its_answer_with_a_reason(agent, case):
    r = send(agent, case)
    assert case.expect[0] <= r.status_code <= case.expect[1], (r.status_code, r.text[:300])
    if r.status_code >= 400:
        assert len(r.text.strip()) > 10, "a reason comes with the refusal"
    assert httpx.get(agent.url + "/healthz", timeout=5).status_code == 200


def test_otlp_json_nested_100000_deep_is_a_400(agent):
    """Fixed by the OTLP decoding part of issue 12 (merged from main)."""
    case = next(c for c in REPRO if c.owned_elsewhere)
    assert 400 <= send(agent, case).status_code < 500


def test_a_push_of_a_valid_and_an_overflowing_profile_stores_nothing(agent):
    case = next(c for c in REPRO if c.name == "[valid, overflowing] push")
    for _ in range(2):  # a retry neither duplicates nor half-stores
        r = send(agent, case)
        assert 400 <= r.status_code < 500 and "fuzz-half" in r.text, r.text
    assert stored(agent, "fuzz-half") == 0


def test_two_overflowing_pushes_leave_every_range_queryable(agent):
    for _ in range(2):
        r = httpx.post(agent.url + "/ingest?name=ovf&format=folded",
                       content=b"ovf;leaf 500000000000\n", headers=hostile.OCTET,
                       timeout=30)
        assert r.status_code == 400 and "count" in r.text
    # the largest counts that are accepted, many times over, still sum inside int64
    for _ in range(3):
        r = httpx.post(agent.url + "/ingest?name=ovf&format=folded&sampleRate=1000000",
                       content=b"ovf;leaf 9007199254740\n", headers=hostile.OCTET,
                       timeout=30)
        assert r.status_code == 200, r.text
    now = int(time.time())
    for ep in hostile.RANGE_ENDPOINTS:
        r = httpx.get(agent.url + ep, params={"from": str(now - 86400 * 30),
                                              "until": str(now + 60)}, timeout=60)
        assert r.status_code == 200, (ep, r.text[:300])


def test_a_stack_deeper_than_the_limit_is_truncated_under_a_marker_and_counted(agent):
    before = agent.metrics()
    r = httpx.post(agent.url + "/ingest?name=deep-app&format=folded",
                   content=hostile.folded([([f"f{i}" for i in range(3000)], 5),
                                           ([f"g{i}" for i in range(600)], 5)]),
                   headers=hostile.OCTET, timeout=30)
    assert r.status_code == 200, r.text
    now = int(time.time())
    r = httpx.get(agent.url + "/api/flamegraph", params={
        "service": "deep-app", "from": str(now - 600), "until": str(now + 60)}, timeout=60)
    assert r.status_code == 200, r.text[:300]
    text = r.text
    assert "[truncated]" in text and "g599" in text and "f2999" in text  # leaf side kept
    assert "f0\"" not in text  # the root side went under the marker
    after = agent.metrics()
    assert _metric(after, "spanflame_ingest_stacks_truncated_total") == \
        _metric(before, "spanflame_ingest_stacks_truncated_total") + 1


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def max_size_push(seed: int = 7, samples: int = 50_000) -> bytes:
    """The largest push the ingest accepts: 50,000 samples (the per-request limit) over
    30,000 locations and functions, each stack 16 frames: just under the 4 MiB a pprof may
    decompress to, gzipped."""
    rnd = random.Random(seed)
    pb = profile_pb2.Profile()
    pb.string_table.extend(["", "cpu", "nanoseconds", "python"])
    st = pb.sample_type.add()
    st.type, st.unit = 1, 2
    pb.period_type.type, pb.period_type.unit, pb.period = 1, 2, 10**7
    pb.time_nanos, pb.duration_nanos = time.time_ns() - 10**10, 10**10
    n_loc = 30_000
    for i in range(1, n_loc + 1):
        pb.string_table.append(f"module{i % 997}.function_{i}")
        f = pb.function.add()
        f.id, f.name, f.filename = i, len(pb.string_table) - 1, 3
        loc = pb.location.add()
        loc.id = i
        loc.line.add(function_id=i, line=i % 1000)
    for _ in range(samples):
        s = pb.sample.add()
        s.location_id.extend(rnd.randint(1, n_loc) for _ in range(16))
        s.value.append(10**7)
    req = hostile.push_body([(gzip.compress(pb.SerializeToString(), 1),
                              {"service_name": "max-push"})])
    return req


def healthz_once(port: int, timeout_s: float = 5.0) -> bool:
    """One GET /healthz on a new connection, as a kubelet liveness probe makes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as c:
        c.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := c.recv(65536):
            data += chunk
    return data.startswith(b"HTTP/1.1 200")


class HealthProbe(threading.Thread):
    """Probes /healthz every 10 ms (healthz_once); keeps each latency."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.latencies: list[float] = []
        self.failures = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            t0 = time.perf_counter()
            try:
                ok = healthz_once(self.port)
            except OSError:
                ok = False
            self.latencies.append(time.perf_counter() - t0)
            self.failures += not ok
            time.sleep(0.01)

    def summary(self) -> str:
        lat = sorted(self.latencies)
        pick = lambda q: lat[min(len(lat) - 1, int(len(lat) * q))] * 1000  # noqa: E731
        return (f"{len(lat)} checks, median {pick(0.5):.1f} ms, p99 {pick(0.99):.1f} ms, "
                f"max {lat[-1] * 1000:.1f} ms, {self.failures} failed")


def test_a_max_size_push_neither_delays_healthz_nor_grows_rss_past_the_bound(agent):
    """The goal is 100 ms at most added to /healthz. Measured as the 90th percentile during
    the push against the median when idle, so that a loaded CI machine's scheduling noise does
    not decide; the worst single probe is bounded generously (the issue saw a 36 s freeze)."""
    body = max_size_push()
    idle = HealthProbe(agent.port)
    idle.start()
    time.sleep(2.0)
    idle.stop.set()
    idle.join()
    rss0 = agent.rss_bytes()
    probe = HealthProbe(agent.port)
    probe.start()
    t0 = time.monotonic()
    r = httpx.post(agent.url + "/push.v1.PusherService/Push", content=body,
                   headers={"content-type": "application/proto"}, timeout=120)
    took = time.monotonic() - t0
    probe.stop.set()
    probe.join()
    assert r.status_code == 200, r.text
    assert stored(agent, "max-push") == 1
    peak = agent.peak_rss_bytes()
    print(f"max-size push: {len(body)} bytes, {took:.2f} s; /healthz idle: {idle.summary()}; "
          f"during the push: {probe.summary()}; RSS {rss0 / 2**20:.0f} MiB before, "
          f"peak {peak / 2**20:.0f} MiB")
    assert probe.failures == 0 and len(probe.latencies) > 10
    lat = sorted(probe.latencies)
    base = sorted(idle.latencies)[len(idle.latencies) // 2]
    assert lat[int(len(lat) * 0.9)] - base < 0.1, probe.summary()
    assert lat[-1] < 3.0, probe.summary()
    assert peak - rss0 < PUSH_RSS_BOUND


def test_300_slow_connections_do_not_make_healthz_fail(agent):
    slow = []
    try:
        for i in range(300):
            c = socket.create_connection(("127.0.0.1", agent.port), timeout=5)
            c.sendall(b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\n" if i % 2 else
                      b"POST /ingest?name=s HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      b"Content-Type: binary/octet-stream\r\nContent-Length: 100000\r\n\r\nab")
            slow.append(c)
        probe = HealthProbe(agent.port)
        probe.start()
        time.sleep(3)
        probe.stop.set()
        probe.join()
        assert probe.failures == 0 and len(probe.latencies) > 20
        assert httpx.get(agent.url + "/readyz", timeout=5).status_code in (200, 503)
    finally:
        for c in slow:
            c.close()


def test_a_full_ingest_queue_answers_429_with_retry_after_and_counts_it(agent):
    """16 pushes sending their body slowly hold every ingest slot: the next push is answered
    429 with Retry-After at once, /readyz says why, /healthz stays 200."""
    from agent.pyroscope_ingest import ADMITTED
    before = _metric(agent.metrics(),
                     'spanflame_ingest_requests_total{endpoint="push",result="rejected_429"}')
    holders = []
    try:
        for _ in range(ADMITTED):
            c = socket.create_connection(("127.0.0.1", agent.port), timeout=5)
            c.sendall(b"POST /push.v1.PusherService/Push HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      b"Content-Type: application/proto\r\nContent-Length: 1000\r\n\r\nab")
            holders.append(c)
        time.sleep(0.5)
        body = hostile.push_body([(hostile.pprof_bytes(hostile.cpu_profile(["a"], 10**7)),
                                   {"service_name": "queued"})])
        t0 = time.monotonic()
        r = httpx.post(agent.url + "/push.v1.PusherService/Push", content=body,
                       headers={"content-type": "application/proto"}, timeout=30)
        assert r.status_code == 429, r.text
        assert time.monotonic() - t0 < 2
        assert int(r.headers["retry-after"]) >= 1 and "busy" in r.json()["message"]
        ready = httpx.get(agent.url + "/readyz", timeout=5)
        assert ready.status_code == 503 and "ingest queue full" in ready.text
        assert ready.headers["retry-after"]
        assert httpx.get(agent.url + "/healthz", timeout=5).status_code == 200
    finally:
        for c in holders:
            c.close()
    assert _metric(agent.metrics(), 'spanflame_ingest_requests_total{endpoint="push",'
                   'result="rejected_429"}') == before + 1
    deadline = time.monotonic() + 15  # the slots are given back when the bodies are cut off
    while httpx.get(agent.url + "/readyz", timeout=5).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    r = httpx.post(agent.url + "/push.v1.PusherService/Push", content=body,
                   headers={"content-type": "application/proto"}, timeout=30)
    assert r.status_code == 200, r.text


def test_an_unknown_sample_type_is_a_400_naming_the_known_ones(agent):
    """Issue 13: `type=bogus` used to answer 200 with an empty pprof."""
    now = int(time.time())
    r = httpx.get(f"{agent.url}/api/profile", params={"type": "bogus", "from": str(now - 600),
                                                      "until": str(now)}, timeout=30)
    assert r.status_code == 400, r.text
    assert "unknown sample type 'bogus'" in r.text and "cpu" in r.text
    r = httpx.get(f"{agent.url}/api/profile", params={"type": "lock_wait", "from": str(now - 600),
                                                      "until": str(now)}, timeout=30)
    assert r.status_code == 200  # a known type with no data is an empty profile, not an error
