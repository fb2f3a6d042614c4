"""asyncio: requests interleaving on one event-loop thread, each sample and wait on its own
request's span. A real aiohttp app with the real OTel SDK and exporter (tests/programs/
async_shop.py), under every CPython the kernel walker reads, serving 60 requests at once of
three kinds; the kinds' own functions are the ground truth of which span a sample belongs to."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import pytest

from agent import pprof
from tests.load import Load
from tests.support import PROGRAMS, SPANFLAME, VENV, assert_go_pprof_reads, cli_env, is_root

pytestmark = [pytest.mark.integration, pytest.mark.root,
              pytest.mark.skipif(not is_root(), reason="eBPF needs root")]

APPS = VENV / "apps"
VERSIONS = ["3.10.13", "3.11.7", "3.12.1", "3.13.0"]
#: a kind's own work (CPU it spends inside its span) -> the span it must carry
KINDS = {"cpu_work": "cpu_request", "parse_reply": "upstream_request",
         "locked_work": "lock_request"}
CLIENTS = {"/cpu": 10, "/upstream": 30, "/lock": 20}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_app(tmp_path: Path, version: str, seconds: float = 5, extra=()) -> dict:
    python = APPS / version / "bin" / "python"
    if not python.exists():
        pytest.skip(f"{python} missing (make test creates it when pyenv has {version})")
    port = free_port()
    truth, out, spans = tmp_path / "truth.json", tmp_path / "p.pb.gz", tmp_path / "spans.json"
    app = subprocess.Popen([str(python), str(PROGRAMS / "async_shop.py"),
                            f"http://127.0.0.1:{port}/v1/traces", str(truth), "--seconds",
                            str(seconds + 12)], stdout=subprocess.PIPE, text=True)
    try:
        info = json.loads(app.stdout.readline())
        load = Load(f"http://127.0.0.1:{info['port']}", CLIENTS)
        time.sleep(1)
        res = subprocess.run([str(SPANFLAME), "attach", str(info["pid"]), "--probes", "all",
                              "--rate", "200", "--duration", str(seconds), "--otlp-listen",
                              f"127.0.0.1:{port}", "--span-wait", "3", "-o", str(out),
                              "--spans-output", str(spans), *extra],
                             capture_output=True, text=True, timeout=120, env=cli_env())
        done = load.stop()
    finally:
        app.kill()
        app.wait()
    assert res.returncode == 0, res.stderr
    assert min(done.values()) >= 20, done
    assert_go_pprof_reads(out)
    prof = pprof.decode(out.read_bytes())
    return {"prof": prof, "spans": json.loads(spans.read_text())["spans"], "stdout": res.stdout,
            "stderr": res.stderr, "window": (prof.time_ns, prof.time_ns + prof.duration_ns)}


@pytest.mark.parametrize("version", VERSIONS)
def test_each_kinds_cpu_carries_a_span_of_that_kind(tmp_path, version):
    run = run_app(tmp_path, version)
    assert "stacks: kernel stack walker" in run["stdout"], run["stdout"]
    for fn, kind in KINDS.items():
        by_span: dict = {}
        for stack, labels, v in run["prof"].iter_type("cpu"):
            if any(f.name == fn for f in stack):
                name = dict(labels).get("span_name")
                by_span[name] = by_span.get(name, 0) + v
        total = sum(by_span.values())
        assert total > 0, (fn, "no CPU samples")
        print(f"{version} {fn}: {100 * by_span.get(kind, 0) / total:.1f}% of its CPU on "
              f"{kind} spans")
        assert by_span.get(kind, 0) >= 0.95 * total, (fn, by_span)


@pytest.mark.parametrize("version", ["3.12.1"])
def test_awaiting_spans_name_what_they_awaited_in_their_own_function(tmp_path, version):
    run = run_app(tmp_path, version)
    lo, hi = run["window"]
    checked = 0
    for s in run["spans"]:
        inside = lo + 0.5e9 <= s["start_ns"] and s["start_ns"] + s["duration_ns"] <= hi
        if not inside or s["duration_ns"] < 300e6:  # long enough to be seen awaiting
            continue
        want = {"upstream_request": "awaiting the network in fetch_upstream",
                "lock_request": "awaiting a lock in take_lock"}.get(s["name"])
        if want:
            assert want in s["cause"], s
            checked += 1
    assert checked >= 20


def test_py_spy_says_it_cannot_tell_tasks_apart(tmp_path):
    run = run_app(tmp_path, "3.12.1", extra=("--sampler", "py-spy"))
    assert "py-spy cannot tell tasks apart" in run["stderr"], run["stderr"]
