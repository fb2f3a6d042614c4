"""`spanflame run`: the continuous agent, with real programs, the real OTel SDK and the real
pyroscope-io clients (1.x and 0.8), queried over its HTTP API and read by go tool pprof."""

from __future__ import annotations

import gzip
import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from agent import pprof
from tests.support import (PROGRAMS, ROOT, SPANFLAME, assert_go_pprof_reads, captured_request, cli_env,
                           VENV, go_pprof, is_root)

pytestmark = [pytest.mark.integration]

PYRO08 = VENV / "pyroscope08" / "bin" / "python"
FIXTURES = ROOT / "tests" / "fixtures"
#: Ingest without the token needs a type no web page can send cross-site (agent/httpguard.py).
OCTETS = {"content-type": "application/octet-stream"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AgentProc:
    def __init__(self, store: Path, *extra: str, env: dict | None = None,
                 include: str = "tests/programs/") -> None:
        self.store = store
        self.port, self.otlp_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.otlp = f"http://127.0.0.1:{self.otlp_port}/v1/traces"
        self.log = open(store.parent / f"agent-{self.port}.log", "w")
        self.proc = subprocess.Popen(
            [str(SPANFLAME), "-v", "run", "--store", str(store), "--listen", f"127.0.0.1:{self.port}",
             "--otlp-listen", f"127.0.0.1:{self.otlp_port}", "--include", include,
             # A few processes at full rate: the tests check what is recorded, not the budget
             # (bench/agent_budget.py measures that).
             "--cpu-budget", "50", *extra], stdout=self.log, stderr=subprocess.STDOUT,
            env=cli_env(env))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert self.proc.poll() is None, Path(self.log.name).read_text()
            time.sleep(0.2)
        raise AssertionError("agent did not come up: " + Path(self.log.name).read_text())

    def wait_watching(self, pid: int, timeout: float = 60) -> int:
        """Wait until the agent profiles `pid` (its /healthz lists a stack source for it); the
        wall-clock time (ns) it was first seen so. Spans that began before are partly unobserved."""
        deadline = time.time() + timeout
        while True:
            src = httpx.get(f"{self.url}/healthz", timeout=10).json()["sources"].get(str(pid))
            if src and src["sampler"] != "none":
                return time.time_ns()
            assert time.time() < deadline, f"the agent did not pick up PID {pid}"
            time.sleep(0.1)

    def profile(self, **params) -> tuple[httpx.Response, object]:
        r = httpx.get(f"{self.url}/api/profile", params=params, timeout=60)
        return r, (pprof.decode(r.content) if r.status_code == 200 else None)

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def spawn(*args, python=sys.executable, stdin=False):
    p = subprocess.Popen([str(python), *map(str, args)], stdout=subprocess.PIPE,
                         stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, text=True)
    info = json.loads(p.stdout.readline())
    return p, info


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One agent, then a plain program, an OTel-instrumented one and two pyroscope-io apps."""
    d = tmp_path_factory.mktemp("run")
    agent = AgentProc(d / "store")
    procs = []
    try:
        t0 = time.time()
        plain, pinfo = spawn(PROGRAMS / "cpu_split.py", "--duration", "120", "--report", d / "p.json")
        otel, oinfo = spawn(PROGRAMS / "otel_app.py", agent.otlp, d / "o.json", "--seconds", "120",
                            stdin=True)
        otel.stdin.write("go\n")
        otel.stdin.flush()
        pyro, yinfo = spawn(PROGRAMS / "pyroscope_app.py", agent.url, "pyro-new", "120")
        procs = [plain, otel, pyro]
        pyro08 = None
        if PYRO08.exists():
            pyro08, _ = spawn(PROGRAMS / "pyroscope_app.py", agent.url, "pyro-old", "120",
                              python=PYRO08)
            procs.append(pyro08)
        yield {"agent": agent, "t0": t0, "plain": pinfo, "otel": oinfo, "pyro": yinfo, "dir": d,
               "procs": procs}
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        agent.stop()


def wait_profile(agent, deadline, **params):
    while True:
        r, prof = agent.profile(**params)
        if r.status_code == 200 and prof is not None and len(prof):
            return r, prof
        assert time.time() < deadline, f"no profile for {params} in time"
        time.sleep(1)


def fn_names(prof):
    return {f.name for (stack, _l) in prof.samples for f in stack}


def test_each_program_has_a_profile_within_30_s(world, tmp_path):
    agent, t0 = world["agent"], world["t0"]
    deadline = t0 + 30
    since = str(int(t0) - 5)
    r, plain = wait_profile(agent, deadline, type="cpu", pid=world["plain"]["pid"], **{"from": since})
    assert {"heavy_a", "spin_b"} <= fn_names(plain)
    labels = {k for (_s, l) in plain.samples for k, _ in l}
    assert {"pid", "thread_id", "thread_name"} <= labels
    r, otel = wait_profile(agent, deadline, type="cpu", service="span-test", **{"from": since})
    assert "crunch_numbers" in fn_names(otel)
    r, pyro = wait_profile(agent, deadline, type="cpu", service="pyro-new", **{"from": since})
    assert "pyroscope_hot_loop" in fn_names(pyro)
    spans = {v for (_s, l) in pyro.samples for k, v in l if k == "span_id"}
    assert spans == {"00f067aa0ba902b7"}, spans
    for name, prof in (("plain", plain), ("otel", otel), ("pyro", pyro)):
        path = tmp_path / f"{name}.pb.gz"
        path.write_bytes(pprof.encode(prof))
        assert_go_pprof_reads(path)
    assert time.time() < deadline + 1


def test_otel_samples_carry_their_spans_and_the_span_api_lists_them(world):
    agent = world["agent"]
    since = str(int(world["t0"]) - 5)
    deadline = time.time() + 30
    while True:
        spans = httpx.get(f"{agent.url}/api/spans", params={"from": since, "service": "span-test",
                                                             "name": "cpu_span"}).json()
        if spans and spans[0].get("breakdown") and sum(1 for x in spans if x.get("breakdown")) >= 5:
            break
        assert time.time() < deadline, spans[:2]
        time.sleep(1)
    assert spans[0]["duration_ms"] >= spans[-1]["duration_ms"]  # slowest first
    # Typical spans (the slowest can be one that ran before py-spy first saw the process, or
    # during a py-spy stall at 19 Hz, and carry the stack seen before it).
    done = [x for x in spans if x.get("breakdown")]
    mid = done[len(done) // 2 - 2: len(done) // 2 + 3]
    good = 0
    for s in mid:
        b = s["breakdown"]
        assert b["cpu_ns"] > 0 and b["cause"], b
        r, prof = agent.profile(type="cpu", span_id=s["span_id"], **{"from": since})
        assert r.status_code == 200
        assert {v for (_s, l) in prof.samples for k, v in l if k == "span_id"} == {s["span_id"]}
        good += "crunch_numbers" in fn_names(prof)
    assert good >= len(mid) - 1, (good, len(mid))
    path = world["dir"] / "span.pb.gz"
    path.write_bytes(r.content)
    top = go_pprof(path, "-top")
    assert "crunch_numbers" in top or "burn" in top


def test_pyroscope_08_client_is_accepted(world):
    if not PYRO08.exists():
        pytest.fail(f"{PYRO08} missing: make test creates it (pyroscope-io 0.8.16)")
    agent = world["agent"]
    r, prof = wait_profile(agent, time.time() + 40, type="cpu", service="pyro-old",
                           **{"from": str(int(world["t0"]) - 5)})
    assert "pyroscope_hot_loop" in fn_names(prof)
    assert {v for (_s, l) in prof.samples for k, v in l if k == "span_id"} == {"00f067aa0ba902b7"}


@pytest.mark.parametrize("path,headers,body,status,reason", [
    ("/push.v1.PusherService/Push", {"content-type": "application/proto"}, b"\xff\x01garbage",
     400, "malformed"),
    ("/push.v1.PusherService/Push", {"content-type": "text/plain"}, b"x", 415, "Content-Type"),
    ("/push.v1.PusherService/Push", {"content-type": "application/proto"}, b"x" * (17 << 20),
     413, "limit"),
    ("/push.v1.PusherService/Push", {"content-type": "application/proto",
                                     "content-encoding": "gzip"}, b"not gzip", 400, "gzip"),
    ("/ingest?name=app&format=pprof", OCTETS, b"not a profile", 400, "pprof"),
    ("/ingest?format=pprof", OCTETS, b"", 400, "name"),
    ("/ingest?name=app&format=jfr", OCTETS, b"x", 400, "format"),
    ("/ingest?name=app&from=abc", OCTETS, b"a;b 1", 400, "numbers"),
    ("/ingest?name=app&format=folded", {}, b"a;b 1", 415, "cross-site"),  # what a web page sends
    ("/ingest?name=app&format=folded", {"content-type": "text/plain"}, b"a;b 1", 415,
     "cross-site"),
])
def test_bad_ingest_gets_a_4xx_with_a_reason_and_the_agent_keeps_serving(
        world, path, headers, body, status, reason):
    agent = world["agent"]
    r = httpx.post(agent.url + path, content=body, headers=headers, timeout=60)
    assert r.status_code == status, r.text
    assert reason in r.text
    assert httpx.get(f"{agent.url}/healthz").status_code == 200


def test_captured_real_client_requests_are_accepted(world):
    """Real pyroscope-io 1.4.0 and 0.8.16 requests, replayed with their time fields moved to
    now (tests/support.py: captured_request), are stored and served."""
    agent = world["agent"]
    t0 = time.time()
    path, headers, body = captured_request("pyroscope-1.4.0")
    r = httpx.post(agent.url + path, content=body, timeout=30, headers=headers)
    assert r.status_code == 200, r.text
    path, headers, body = captured_request("pyroscope-0.8.16")
    path = path.replace("cap-old", "captured-old")
    r = httpx.post(agent.url + path, content=body, timeout=30, headers=headers)
    assert r.status_code == 200, r.text
    window = {"from": str(int(t0) - 20), "until": str(int(time.time()) + 1)}
    r, prof = agent.profile(type="cpu", service="captured-old", **window)
    assert "work" in fn_names(prof)
    r, prof = agent.profile(type="cpu", service="cap-app", **window)
    assert prof.total("cpu") > 0


def test_a_push_older_than_retention_is_refused_not_acknowledged_and_dropped(world):
    agent = world["agent"]
    path, headers, body = captured_request("pyroscope-1.4.0", end_s=time.time() - 80 * 3600)
    r = httpx.post(agent.url + path, content=body, timeout=30, headers=headers)
    assert r.status_code == 400 and "retention" in r.json()["message"], r.text
    text = httpx.get(f"{agent.url}/metrics").text
    assert 'spanflame_ingest_requests_total{endpoint="push",result="rejected_too_old"} 1.0' in text


def test_bad_api_parameters_are_400(world):
    agent = world["agent"]
    for params in ({"from": "yesterday"}, {"from": "10", "until": "5"}, {"pid": "x"},
                   {"span_id": "nothex"}, {"trace_id": "abc"}):
        r = httpx.get(f"{agent.url}/api/profile", params=params)
        assert r.status_code == 400, params
    assert httpx.get(f"{agent.url}/api/spans", params={"min_duration_ms": "slow"}).status_code == 400


def test_new_process_is_picked_up_within_one_window_and_exit_mid_window_is_kept(world, tmp_path):
    agent = world["agent"]
    t_start = time.time()
    p = subprocess.Popen([sys.executable, str(PROGRAMS / "cpu_split.py"), "--duration", "4",
                          "--report", str(tmp_path / "r.json")], stdout=subprocess.PIPE, text=True)
    pid = json.loads(p.stdout.readline())["pid"]
    p.wait(timeout=30)  # it exits 4 s in: mid-window
    t_end = time.time()
    r, prof = wait_profile(agent, time.time() + 30, type="cpu", pid=pid,
                           **{"from": str(int(t_start) - 1)})
    assert "heavy_a" in fn_names(prof)
    assert prof.time_ns <= (t_start + 10.5) * 1e9, "picked up within one window (10 s)"
    # The CPU of the part of its life the profile covers, as the program measured it.
    truth = sum(json.loads((tmp_path / "r.json").read_text())["cpu_ns"].values())
    covered = min(t_end * 1e9, prof.time_ns + prof.duration_ns) - max(t_start * 1e9, prof.time_ns)
    expected = truth * covered / ((t_end - t_start) * 1e9)
    assert 0.6 < prof.total("cpu") / expected < 1.4, (prof.total("cpu"), expected)


def test_metrics_and_health(world):
    agent = world["agent"]
    h = httpx.get(f"{agent.url}/healthz").json()
    assert h["status"] == "ok" and h["processes"] >= 3
    text = httpx.get(f"{agent.url}/metrics").text
    for name in ("spanflame_processes", "spanflame_windows_total", "spanflame_sampling_rate_hz",
                 "spanflame_ingest_requests_total", "spanflame_otlp_spans_total",
                 "spanflame_agent_cpu_ratio"):
        assert name in text, name
    assert 'spanflame_ingest_requests_total{endpoint="push",result="ok"}' in text
    # The store's size is what `du` says of its directory (it once counted profile bytes only:
    # 7.8 MB reported for a 58 MB directory).
    m = re.search(r"^spanflame_store_bytes (\S+)$", text, re.M)
    du = int(subprocess.run(["du", "-sb", str(agent.store)], capture_output=True, text=True,
                            check=True).stdout.split()[0])
    assert m and abs(float(m.group(1)) - du) <= 0.05 * du + 64 * 1024, (m and m.group(1), du)
    assert re.search(r"^spanflame_store_profile_bytes \S+$", text, re.M)


def test_kill_9_and_restart_serves_everything_stored_before(tmp_path):
    store = tmp_path / "store"
    a = AgentProc(store, "--window", "3")
    p = subprocess.Popen([sys.executable, str(PROGRAMS / "cpu_split.py"), "--duration", "60",
                          "--report", str(tmp_path / "r.json")], stdout=subprocess.PIPE, text=True)
    pid = json.loads(p.stdout.readline())["pid"]
    try:
        r, before = wait_profile(a, time.time() + 30, type="cpu", pid=pid, **{"from": str(int(time.time()) - 86400)})
        time.sleep(4)
        r, before = a.profile(type="cpu", pid=pid, **{"from": str(int(time.time()) - 86400)})
        n_before = int(r.headers["x-spanflame-profiles"])
        total_before = before.total("cpu")
        a.kill9()
        b = AgentProc(store, "--window", "3")
        try:
            r, after = b.profile(type="cpu", pid=pid, **{"from": str(int(time.time()) - 86400), "until": str(time.time())})
            assert int(r.headers["x-spanflame-profiles"]) >= n_before
            assert after.total("cpu") >= total_before
        finally:
            b.stop()
    finally:
        p.kill()
        p.wait()
        a.stop()
