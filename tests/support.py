"""Helpers shared by the integration and browser tests: real programs, the real CLI, and
`go tool pprof` as an independent reader of every pprof we write."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = ROOT / "tests" / "programs"
SPANFLAME = Path(sys.executable).parent / "spanflame"
#: The venv running the tests (`make test` makes .venv; a worktree uses its main checkout's).
VENV = Path(sys.prefix)
ARTIFACTS = ROOT / "tests" / "artifacts"


def cli_env(extra: dict | None = None) -> dict:
    """The environment for a `spanflame` child: this checkout's code first on the path (the
    console script may belong to an editable install of another checkout, e.g. a worktree's
    tests run with the main checkout's venv)."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{path}" if path else str(ROOT),
            **(extra or {})}


def run_cli(*args: str, timeout: float = 120, user: str | None = None,
            env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [str(SPANFLAME), *map(str, args)]
    if user:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=cli_env(env))


class Target:
    def __init__(self, proc: subprocess.Popen, info: dict) -> None:
        self.proc = proc
        self.info = info
        self.pid = proc.pid

    def threads(self) -> dict[str, int]:
        return self.info.get("threads", {})


@contextmanager
def target(program: str, *args: str, python: str = sys.executable,
           ready_timeout: float = 20) -> Iterator[Target]:
    """Start tests/programs/<program>.py; yield once it printed its JSON ready line."""
    proc = subprocess.Popen([python, str(PROGRAMS / f"{program}.py"), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + ready_timeout
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{program} exited early: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{program} did not get ready in time")
        yield Target(proc, json.loads(line))
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def go_pprof(path: Path | str, *args: str) -> str:
    """`go tool pprof <args> <path>`; asserts it read the file (exit 0)."""
    go = shutil.which("go")
    assert go, "go is required (apt-get install golang-go; make test installs it)"
    out = subprocess.run([go, "tool", "pprof", *args, str(path)], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "HOME": os.environ.get("HOME", "/root"),
                                           "PPROF_TMPDIR": "/tmp"})
    assert out.returncode == 0, f"go tool pprof {args} failed: {out.stderr[-2000:]}"
    return out.stdout


def assert_go_pprof_reads(path: Path | str) -> str:
    """Every pprof the tests write goes through this: go tool pprof -raw must read it."""
    raw = go_pprof(path, "-raw")
    assert "Samples:" in raw or "samples/count" in raw or "PeriodType" in raw, raw[:500]
    return raw


def truth_between(timeline: list, start_ns: int, end_ns: int) -> dict[str, float]:
    """What a target's own CPU timeline ([[time_ns, {key: ns so far}], ...]) says each key used
    between start_ns and end_ns (linear between readings)."""
    def at(t: int) -> dict[str, float]:
        if t <= timeline[0][0]:
            return dict(timeline[0][1])
        for (t0, a), (t1, b) in zip(timeline, timeline[1:]):
            if t0 <= t <= t1:
                f = (t - t0) / (t1 - t0) if t1 > t0 else 1.0
                return {k: a.get(k, 0) + f * (b.get(k, 0) - a.get(k, 0)) for k in set(a) | set(b)}
        return dict(timeline[-1][1])
    lo, hi = at(start_ns), at(end_ns)
    return {k: hi.get(k, 0) - lo.get(k, 0) for k in set(lo) | set(hi)}


def hot_line(program: str, marker: str) -> int:
    """Line number of the `# <marker>` comment in a test program."""
    for i, line in enumerate((PROGRAMS / f"{program}.py").read_text().splitlines(), 1):
        if f"# {marker}" in line:
            return i
    raise AssertionError(f"marker {marker} not in {program}")


def is_root() -> bool:
    return os.geteuid() == 0


def no_traceback(text: str) -> bool:
    return "Traceback" not in text and not re.search(r'File ".*", line \d+', text)


FIXTURES = ROOT / "tests" / "fixtures"
#: Real client requests captured off the wire, with what the client sent as headers.
CAPTURED = {"pyroscope-1.4.0": ("pyroscope-1.4.0-push.json", "pyroscope-1.4.0-push.bin"),
            "pyroscope-0.8.16": ("pyroscope-0.8.16-ingest.json", "pyroscope-0.8.16-ingest.pb.gz")}


def captured_request(client: str, *, end_s: float | None = None) -> tuple[str, dict, bytes]:
    """A captured real-client request, (path, headers, body), replayed as if sent at `end_s`
    (default now): only its time fields move (the pprof `time_nanos`, the 0.8 client's
    `from`/`until` query), so no test depends on the day the capture was made."""
    import gzip
    from urllib.parse import parse_qsl, urlencode, urlsplit

    from agent.proto import profile_pb2, push_pb2

    meta_name, body_name = CAPTURED[client]
    meta = json.loads((FIXTURES / meta_name).read_text())
    body = (FIXTURES / body_name).read_bytes()
    headers = {k: v for k, v in meta["headers"].items() if k in ("content-type", "content-encoding")}
    end_ns = int((time.time() if end_s is None else end_s) * 1e9)

    def moved(raw: bytes) -> bytes:
        prof = profile_pb2.Profile.FromString(raw)
        prof.time_nanos = end_ns - (prof.duration_nanos or 10**10)
        return prof.SerializeToString()

    if client == "pyroscope-1.4.0":
        req = push_pb2.PushRequest.FromString(gzip.decompress(body))
        for series in req.series:
            for sample in series.samples:
                sample.raw_profile = moved(sample.raw_profile)
        return meta["path"], headers, gzip.compress(req.SerializeToString())
    parts = urlsplit(meta["path"])
    query = dict(parse_qsl(parts.query))
    span = int(query["until"]) - int(query["from"])
    query["until"] = str(end_ns // 10**9)
    query["from"] = str(end_ns // 10**9 - span)
    return (f"{parts.path}?{urlencode(query)}", headers,
            gzip.compress(moved(gzip.decompress(body))))
