"""Hostile input for the agent's HTTP servers, shared by tests/integration/test_fuzz.py,
tests/integration/test_hostile_input.py and bench/fuzz.py.

`Agent` runs a real `spanflame run` (py-spy sampler, profiling nothing) on free ports;
`cases(seed)` yields seeded requests over every route (the API, the UI, Pyroscope ingest and
push, OTLP), starting with the reproductions of issue 12; `fuzz()` sends them with a few
concurrent clients while another polls /healthz, and reports what came back.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import itertools
import gzip
import json
import random
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import httpx

from agent import pprof
from agent.model import SAMPLE_TYPES, Frame, Profile
from agent.proto import push_pb2
from tests.support import SPANFLAME, cli_env

#: The service the fuzzer never writes: its stored profile must come out of a run unchanged.
BASELINE = "baseline-app"
#: A request answered after this long is a hang.
HANG_S = 5.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Agent:
    """`spanflame run` on free loopback ports with a store in `tmp`, profiling no process."""

    def __init__(self, tmp: Path, *extra: str) -> None:
        self.port, self.otlp_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.otlp_url = f"http://127.0.0.1:{self.otlp_port}"
        self.log_path = tmp / f"agent-{self.port}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [str(SPANFLAME), "-v", "run", "--store", str(tmp / "store"),
             "--listen", f"127.0.0.1:{self.port}", "--otlp-listen", f"127.0.0.1:{self.otlp_port}",
             "--sampler", "py-spy", "--probes", "cpu", "--include", "^no-such-process-1f3a$",
             *extra], stdout=self.log, stderr=subprocess.STDOUT, env=cli_env())
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert self.proc.poll() is None, self.log_path.read_text()
            time.sleep(0.1)
        raise AssertionError("agent did not come up: " + self.log_path.read_text())

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def peak_rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=10).text

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# -- building blocks ------------------------------------------------------------------------------

def folded(lines: list[tuple[list[str], int]]) -> bytes:
    return "".join(";".join(stack) + f" {n}\n" for stack, n in lines).encode()


def cpu_profile(stack: list[str], value_ns: int, *, time_ns: int | None = None,
                duration_ns: int = 10**10, depth: int | None = None) -> Profile:
    """A one-sample cpu profile (stack root first, like folded)."""
    if depth:
        stack = [f"f{i}" for i in range(depth)]
    p = Profile([SAMPLE_TYPES["cpu"]], period_type=SAMPLE_TYPES["cpu"], period=10**7,
                time_ns=time.time_ns() - duration_ns if time_ns is None else time_ns,
                duration_ns=duration_ns, default_sample_type="cpu")
    p.add(tuple(Frame(f) for f in reversed(stack)), (), {"cpu": value_ns})
    return p


def pprof_bytes(prof: Profile, **raw_fields) -> bytes:
    """`prof` encoded, with fields of the pprof message overwritten as given (any int64)."""
    from agent.proto import profile_pb2
    pb = profile_pb2.Profile.FromString(pprof.encode(prof, compress=False))
    for k, v in raw_fields.items():
        if k == "values":
            for s in pb.sample:
                del s.value[:]
                s.value.extend(v)
        elif k == "drop_locations":
            del pb.location[:]
        else:
            setattr(pb, k, v)
    return gzip.compress(pb.SerializeToString())


def push_body(profiles: list[tuple[bytes, dict]], *, json_form: bool = False) -> bytes:
    if json_form:
        return json.dumps({"series": [
            {"labels": [{"name": k, "value": v} for k, v in labels.items()],
             "samples": [{"rawProfile": base64.b64encode(raw).decode()}]}
            for raw, labels in profiles]}).encode()
    req = push_pb2.PushRequest()
    for raw, labels in profiles:
        series = req.series.add()
        for k, v in labels.items():
            lp = series.labels.add()
            lp.name, lp.value = k, v
        series.samples.add().raw_profile = raw
    return req.SerializeToString()


def deep_json(depth: int) -> bytes:
    return b'{"resourceSpans":' + b"[" * depth + b"]" * depth + b"}"


@dataclass
class Case:
    """One request. `server` is "main" or "otlp"; `expect` what a reproduction must answer
    (a status or a range of statuses), None for fuzzed cases (anything under 500)."""

    name: str
    method: str
    path: str
    headers: dict = field(default_factory=dict)
    body: bytes = b""
    server: str = "main"
    expect: tuple[int, int] | None = None
    #: set on cases another part of issue 12 fixes (OTLP decoding): reported apart
    owned_elsewhere: str | None = None


#: OTLP JSON nesting is the span-store work's part of issue 12 (agent/otlp_receiver.py).
OTLP_DEPTH = "OTLP JSON depth: the OTLP decoding part of issue 12"


PROTO = {"content-type": "application/proto"}
#: What pyroscope-io 0.8 sends to /ingest (a CORS-safelisted type would need the token)
OCTET = {"content-type": "binary/octet-stream"}
RANGE_ENDPOINTS = ["/api/profile", "/api/spans", "/api/services", "/api/timeline",
                   "/api/flamegraph"]


def reproductions(now_s: float | None = None) -> list[Case]:
    """The inputs issue 12 found answering 5xx, each with the answer it must get now."""
    now_s = time.time() if now_s is None else now_s
    out = []
    for ep in RANGE_ENDPOINTS:
        for k, v in (("from", "nan"), ("until", "nan"), ("until", "1e18"), ("from", "inf"),
                     ("from", "-1e300"), ("until", str(2**63))):
            out.append(Case(f"{ep} {k}={v}", "GET", f"{ep}?{k}={v}", expect=(400, 400)))
    out.append(Case("spans min_duration_ms=inf", "GET", "/api/spans?min_duration_ms=inf",
                    expect=(400, 400)))
    out.append(Case("spans min_duration_ms=nan", "GET", "/api/spans?min_duration_ms=nan",
                    expect=(400, 400)))
    for k in ("from", "until"):
        out.append(Case(f"ingest {k}=nan", "POST", f"/ingest?name=fuzz-x&format=folded&{k}=nan",
                        OCTET, body=b"a;b 1\n", expect=(400, 400)))
    out.append(Case("ingest until=1e18", "POST", "/ingest?name=fuzz-x&until=1e18", OCTET,
                    body=b"a;b 1\n", expect=(400, 400)))
    out.append(Case("huge folded count", "POST", "/ingest?name=fuzz-x&format=folded", OCTET,
                    body=b"a;b " + b"9" * 40 + b"\n", expect=(400, 400)))
    out.append(Case("ovf;leaf 500000000000", "POST", "/ingest?name=fuzz-ovf&format=folded", OCTET,
                    body=b"ovf;leaf 500000000000\n", expect=(400, 400)))
    late = pprof_bytes(cpu_profile(["a", "b"], 10**7), time_nanos=2**62 + 2**61,
                       duration_nanos=2**62)
    out.append(Case("pprof time+duration >= 2^63 (ingest)", "POST",
                    "/ingest?name=fuzz-t&format=pprof", OCTET, body=late, expect=(400, 400)))
    out.append(Case("pprof time+duration >= 2^63 (push)", "POST", "/push.v1.PusherService/Push",
                    PROTO, push_body([(late, {"service_name": "fuzz-t"})]), expect=(400, 400)))
    now_ns = int(now_s * 1e9)
    ends_past = pprof_bytes(cpu_profile(["a", "b"], 10**7), time_nanos=now_ns - 10**10,
                            duration_nanos=2**63 - now_ns + 10**10)
    out.append(Case("pprof now + duration to 2^63 (ingest)", "POST",
                    "/ingest?name=fuzz-t&format=pprof", OCTET, body=ends_past, expect=(400, 400)))
    out.append(Case("pprof now + duration to 2^63 (push)", "POST", "/push.v1.PusherService/Push",
                    PROTO, push_body([(ends_past, {"service_name": "fuzz-t"})]),
                    expect=(400, 400)))
    huge = pprof_bytes(cpu_profile(["a", "b"], 1), values=[2**63 - 1])
    out.append(Case("pprof value 2^63-1 (push)", "POST", "/push.v1.PusherService/Push", PROTO,
                    push_body([(huge, {"service_name": "fuzz-v"})]), expect=(400, 400)))
    valid = pprof_bytes(cpu_profile(["ok", "leaf"], 10**7))
    out.append(Case("[valid, overflowing] push", "POST", "/push.v1.PusherService/Push", PROTO,
                    push_body([(valid, {"service_name": "fuzz-half"}),
                               (huge, {"service_name": "fuzz-half"})]), expect=(400, 499)))
    out.append(Case("600-deep folded stack", "POST", "/ingest?name=fuzz-deep&format=folded", OCTET,
                    body=folded([([f"f{i}" for i in range(600)], 3)]), expect=(200, 200)))
    out.append(Case("5000-deep folded stack", "POST", "/ingest?name=fuzz-deeper&format=folded", OCTET,
                    body=folded([([f"f{i}" for i in range(5000)], 3)]), expect=(200, 200)))
    out.append(Case("flamegraph over deep stacks", "GET",
                    f"/api/flamegraph?service=fuzz-deep&from={int(now_s) - 3600}",
                    expect=(200, 200)))
    out.append(Case("OTLP JSON nested 100,000 deep", "POST", "/v1/traces",
                    {"content-type": "application/json"}, deep_json(100_000), server="otlp",
                    expect=(400, 499), owned_elsewhere=OTLP_DEPTH))
    out.append(Case("OTLP span ending at 2^63", "POST", "/v1/traces",
                    {"content-type": "application/json"}, json.dumps({"resourceSpans": [{
                        "scopeSpans": [{"spans": [{
                            "traceId": "a" * 32, "spanId": "b" * 16, "name": "s",
                            "startTimeUnixNano": str(int(now_s * 1e9)),
                            "endTimeUnixNano": str(2**63)}]}]}]}).encode(),
                    server="otlp", expect=(200, 499)))
    out.append(Case("push JSON nested 100,000 deep", "POST", "/push.v1.PusherService/Push",
                    {"content-type": "application/json"}, deep_json(100_000), expect=(400, 499)))
    return out


# -- fuzzing --------------------------------------------------------------------------------------

_NUMBERS = ["nan", "NaN", "inf", "-inf", "+inf", "1e18", "1e308", "1e309", "-1", "0", "-0",
            "1e-320", str(2**63), str(2**63 - 1), str(-2**63), str(2**64), "9" * 300, "0x10",
            " 5", "5 ", "1_000", "\u0661\u0662", "", "abc", "1.5", "3600", "1e6", "12e", "--1"]
_TEXT = ["", "a", "x" * 300, "x" * 5000, "<script>alert(1)</script>", "\u202e\u0000", "é" * 40,
         "cpu", "wall", "baseline-app\u0000", "../../etc/passwd", "%00", "a;b", "{}", "[]"]
_PARAMS = ["from", "until", "type", "service", "pid", "span_id", "trace_id", "limit", "format",
           "descendants", "compare", "name", "min_duration_ms", "buckets", "min_fraction",
           "token", "env", "k" * 200]
_GET_PATHS = RANGE_ENDPOINTS + ["/api/span/{hex16}", "/api/trace/{hex32}", "/api/info",
                                "/api/trace/zz", "/api/span/123", "/", "/explore", "/spans",
                                "/flamegraph", "/trace/{hex32}", "/static/app.js",
                                "/static/../x", "/metrics", "/readyz", "/healthz", "/nope"]


def _value(rnd: random.Random, now_s: float) -> str:
    r = rnd.random()
    if r < 0.45:
        return rnd.choice(_NUMBERS)
    if r < 0.65:
        return str(int(now_s) - rnd.randint(-4000, 100_000))
    if r < 0.8:
        return rnd.choice(_TEXT)
    return "".join(rnd.choice("0123456789abcdef") for _ in range(rnd.choice([8, 16, 32, 33])))


def _query(rnd: random.Random, now_s: float, keys: list[str], n: int) -> str:
    from urllib.parse import quote
    parts = [f"{quote(k)}={quote(_value(rnd, now_s))}" for k in rnd.sample(keys, min(n, len(keys)))]
    return "&".join(parts)


_DEPTHS = [1, 3, 10, 100, 599, 600, 1023, 1024, 1025, 3000]
_NAMES = ["f", "g", "é", "<b>", "x" * 300, "", "a b"]


def _random_stack(rnd: random.Random) -> list[str]:
    depth = rnd.choice(_DEPTHS)
    return [rnd.choice(_NAMES) + str(i) for i in range(depth)]


@functools.lru_cache(maxsize=None)
def _base_pprof(depth: int, name: str, value: int):
    """An uncompressed one-sample pprof message (cached: encoding deep stacks is slow)."""
    from agent.proto import profile_pb2
    prof = cpu_profile([name + str(i) for i in range(depth)], value, time_ns=0)
    return profile_pb2.Profile.FromString(pprof.encode(prof, compress=False))


def _pprof_mutant(rnd: random.Random, now_ns: int) -> bytes:
    from agent.proto import profile_pb2
    pb = profile_pb2.Profile()
    pb.CopyFrom(_base_pprof(rnd.choice(_DEPTHS), rnd.choice(_NAMES),
                            rnd.choice([1, 10**7, 2**53, 2**62])))
    pb.time_nanos, pb.duration_nanos = now_ns - 10**10, 10**10
    ints = [0, 1, -1, 2**62, 2**63 - 1, -2**63, now_ns, now_ns + 3600 * 10**9, now_ns - 10**18]
    for k in rnd.sample(["time_nanos", "duration_nanos", "period", "values", "drop_locations"],
                        rnd.randint(0, 3)):
        if k == "values":
            for smp in pb.sample:
                del smp.value[:]
                smp.value.extend([rnd.choice(ints)] * rnd.choice([1, 1, 2]))
        elif k == "drop_locations":
            del pb.location[:]
        else:
            setattr(pb, k, rnd.choice(ints))
    raw = pb.SerializeToString()
    r = rnd.random()
    if r < 0.15:  # truncated
        return gzip.compress(raw, compresslevel=1)[:rnd.randint(0, 200)]
    if r < 0.3:  # flipped bytes, not compressed
        b = bytearray(raw)
        for _ in range(rnd.randint(1, 8)):
            b[rnd.randrange(len(b))] = rnd.randrange(256)
        return bytes(b)
    return gzip.compress(raw, compresslevel=1) if r < 0.8 else raw


@functools.lru_cache(maxsize=None)
def _bomb(n: int) -> bytes:
    return gzip.compress(b"\0" * n, compresslevel=9)


def _folded_body(rnd: random.Random) -> bytes:
    r = rnd.random()
    if r < 0.6:
        return folded([(_random_stack(rnd), rnd.choice([0, 1, 5, 2**31, 2**53, 2**63, 10**30]))
                       for _ in range(rnd.randint(1, 5))])
    if r < 0.7:
        return rnd.randbytes(rnd.randint(0, 2000))
    if r < 0.8:
        return b"a;b -5\n"
    if r < 0.9:
        return b"a;b\n;;; 1\n 3\n\n" + "é;ü 2\n".encode("latin-1")
    return b"x;y 1\n" * rnd.randint(1000, 60_000)


def fuzz_case(rnd: random.Random, i: int, now_s: float) -> Case:
    now_ns = int(now_s * 1e9)
    kind = rnd.random()
    hexes = {"{hex16}": "".join(rnd.choice("0123456789abcdef") for _ in range(16)),
             "{hex32}": "".join(rnd.choice("0123456789abcdef") for _ in range(32))}
    if kind < 0.45:
        path = rnd.choice(_GET_PATHS)
        for k, v in hexes.items():
            path = path.replace(k, v)
        q = _query(rnd, now_s, _PARAMS, rnd.randint(0, 6))
        return Case(f"fuzz {i} GET", rnd.choice(["GET"] * 9 + ["POST", "DELETE"]),
                    path + ("?" + q if q else ""))
    if kind < 0.65:
        q = _query(rnd, now_s, ["from", "until", "sampleRate", "spyName", "format"],
                   rnd.randint(0, 4))
        name = rnd.choice(["fuzz-a", "fuzz-b{env=x}", "fuzz-c.cpu{pid=12}", "fuzz{pid=abc}",
                           "{}", "fuzz{" + ",".join(f"k{j}=v" for j in range(40)) + "}",
                           "fuzz-d{a}", "x" * 400])
        fmt = rnd.choice(["folded", "pprof", "lines", "jfr", ""])
        body = _pprof_mutant(rnd, now_ns) if fmt == "pprof" else _folded_body(rnd)
        headers = dict(OCTET) if rnd.random() < 0.9 else {"content-type": "text/plain"}
        if rnd.random() < 0.15:
            headers["content-encoding"] = "gzip"
            r = rnd.random()
            body = gzip.compress(body) if r < 0.4 else body if r < 0.7 else _bomb(40 << 20)
        from urllib.parse import quote
        return Case(f"fuzz {i} ingest", "POST",
                    f"/ingest?name={quote(name)}&format={fmt}" + ("&" + q if q else ""),
                    headers, body)
    if kind < 0.85:
        profiles = [(_pprof_mutant(rnd, now_ns),
                     {"service_name": rnd.choice(["fuzz-p", "fuzz-q", "", "x" * 400]),
                      rnd.choice(["pid", "env", "__name__"]): rnd.choice(["1", "x", "-3", "99999999999"])})
                    for _ in range(rnd.choice([0, 1, 1, 2, 3, 20]))]
        json_form = rnd.random() < 0.3
        body = push_body(profiles, json_form=json_form)
        r = rnd.random()
        if r < 0.1:
            body = deep_json(rnd.choice([100, 1000, 100_000]))
            json_form = True
        elif r < 0.2:
            body = body[:rnd.randint(0, len(body))]
        elif r < 0.25:
            body = gzip.compress(body)
        ctype = "application/json" if json_form else rnd.choice(
            ["application/proto", "application/x-protobuf", "text/plain"])
        headers = {"content-type": ctype}
        if r >= 0.2 and r < 0.25:
            headers["content-encoding"] = "gzip"
        return Case(f"fuzz {i} push", "POST", "/push.v1.PusherService/Push", headers, body)
    # OTLP
    r = rnd.random()
    if r < 0.3:
        body = json.dumps({"resourceSpans": [{"resource": {"attributes": [
            {"key": "service.name", "value": {"stringValue": "fuzz-otlp"}}]},
            "scopeSpans": [{"spans": [{
                "traceId": rnd.choice(["", "zz", "0" * 32, "a" * 32]),
                "spanId": rnd.choice(["", "b" * 16, "1"]),
                "name": rnd.choice(_TEXT),
                "startTimeUnixNano": rnd.choice([str(now_ns), "-1", str(2**64), "nan", 0]),
                "endTimeUnixNano": rnd.choice([str(now_ns + 10**6), str(2**63), "x", None]),
                "attributes": [{"key": "spanflame.pid",
                                "value": {"intValue": rnd.choice(["1", "-1", str(2**70)])}}],
            }]}]}]}).encode()
        ctype = "application/json"
    elif r < 0.4:
        depth = rnd.choice([50, 200, 5000])
        return Case(f"fuzz {i} otlp deep", "POST", "/v1/traces",
                    {"content-type": "application/json"}, deep_json(depth), server="otlp",
                    owned_elsewhere=OTLP_DEPTH if depth > 900 else None)
    else:
        body = rnd.randbytes(rnd.randint(0, 3000))
        ctype = rnd.choice(["application/x-protobuf", "application/json", "text/plain"])
    return Case(f"fuzz {i} otlp", "POST", "/v1/traces", {"content-type": ctype}, body,
                server="otlp")


def cases(seed: int, n: int, *, now_s: float | None = None) -> Iterator[Case]:
    """The reproductions, then fuzzed requests up to `n` in all; the same for the same seed.
    Lazy: a long run never holds every body at once."""
    now_s = time.time() if now_s is None else now_s
    rnd = random.Random(seed)
    first = reproductions(now_s)
    yield from first
    for i in range(max(0, n - len(first))):
        yield fuzz_case(rnd, i, now_s)


@dataclass
class Report:
    sent: int = 0
    statuses: dict = field(default_factory=dict)
    server_errors: list = field(default_factory=list)
    #: server errors of cases owned elsewhere (Case.owned_elsewhere)
    elsewhere: list = field(default_factory=list)
    hangs: list = field(default_factory=list)
    wrong: list = field(default_factory=list)
    health_checks: int = 0
    health_failures: list = field(default_factory=list)
    health_worst_s: float = 0.0
    elapsed_s: float = 0.0

    def summary(self) -> str:
        return (f"{self.sent} requests in {self.elapsed_s:.1f} s: statuses "
                f"{dict(sorted(self.statuses.items()))}; {len(self.server_errors)} >= 500 "
                f"(and {len(self.elsewhere)} owned elsewhere), "
                f"{len(self.hangs)} over {HANG_S:g} s, {len(self.wrong)} reproductions answered "
                f"wrongly; /healthz {self.health_checks} checks, "
                f"{len(self.health_failures)} failed, slowest {self.health_worst_s * 1000:.0f} ms")


async def _run(agent: Agent, todo: Iterable[Case], concurrency: int) -> Report:
    rep = Report()
    base = {"main": agent.url, "otlp": agent.otlp_url}
    done = asyncio.Event()

    async def worker(client: httpx.AsyncClient, queue: Iterator[Case]) -> None:
        for c in queue:  # one iterator shared by the workers (one thread: no lock needed)
            t0 = time.monotonic()
            try:
                r = await client.request(c.method, base[c.server] + c.path, headers=c.headers,
                                         content=c.body or None, timeout=HANG_S)
            except httpx.TimeoutException:
                rep.hangs.append(c.name)
                continue
            except httpx.HTTPError as exc:
                rep.server_errors.append((c.name, f"connection error {exc!r}"))
                continue
            finally:
                rep.sent += 1
            took = time.monotonic() - t0
            rep.statuses[r.status_code] = rep.statuses.get(r.status_code, 0) + 1
            if r.status_code >= 500:
                (rep.elsewhere if c.owned_elsewhere else rep.server_errors).append(
                    (c.name, r.status_code, r.text[:200]))
            if took > HANG_S:
                rep.hangs.append(c.name)
            if c.expect and not c.expect[0] <= r.status_code <= c.expect[1] \
                    and not (c.owned_elsewhere and r.status_code >= 500):
                rep.wrong.append((c.name, r.status_code, r.text[:200]))

    async def health(client: httpx.AsyncClient) -> None:
        while not done.is_set():
            t0 = time.monotonic()
            try:
                r = await client.get(agent.url + "/healthz", timeout=HANG_S)
                ok = r.status_code == 200
            except httpx.HTTPError as exc:
                ok, r = False, exc
            took = time.monotonic() - t0
            rep.health_checks += 1
            rep.health_worst_s = max(rep.health_worst_s, took)
            if not ok:
                rep.health_failures.append(repr(r)[:200])
            await asyncio.sleep(0.1)

    t0 = time.monotonic()
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency + 2)) as client, \
            httpx.AsyncClient() as hclient:
        h = asyncio.create_task(health(hclient))
        # reproductions first and in order (the flame graph case reads what the deep push wrote)
        todo = iter(todo)
        first: list[Case] = []
        c = None
        for c in todo:  # the reproductions lead, in order
            if c.expect is None:
                break
            first.append(c)
        await worker(client, iter(first))
        rest = itertools.chain([c] if c is not None and c.expect is None else [], todo)
        await asyncio.gather(*(worker(client, rest) for _ in range(concurrency)))
        done.set()
        await h
    rep.elapsed_s = time.monotonic() - t0
    return rep


def fuzz(agent: Agent, todo: Iterable[Case], concurrency: int = 6) -> Report:
    return asyncio.run(_run(agent, todo, concurrency))


def seed_baseline(agent: Agent, now_s: float) -> None:
    """Store the baseline profile the fuzzer must leave unchanged."""
    body = folded([(["main", "work", "leaf"], 50), (["main", "idle"], 7)])
    r = httpx.post(f"{agent.url}/ingest?name={BASELINE}&format=folded&from={int(now_s) - 20}"
                   f"&until={int(now_s) - 10}", content=body, headers=OCTET, timeout=30)
    assert r.status_code == 200, r.text


def baseline_snapshot(agent: Agent, now_s: float) -> dict:
    """What the store serves for the baseline service: samples, totals and profile count."""
    r = httpx.get(f"{agent.url}/api/profile", params={
        "service": BASELINE, "from": str(int(now_s) - 3600), "until": str(int(now_s) + 3600)},
        timeout=30)
    assert r.status_code == 200, r.text
    prof = pprof.decode(r.content)
    return {"profiles": r.headers["x-spanflame-profiles"], "total": prof.total("cpu"),
            "samples": sorted((tuple(f.name for f in s), tuple(l), tuple(v))
                              for (s, l), v in prof.samples.items())}
