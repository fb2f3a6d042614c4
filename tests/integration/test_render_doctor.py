"""`spanflame render` and `spanflame doctor` through the real CLI."""

from __future__ import annotations

import gzip
import json
import os
import random

import pytest

from agent import pprof
from agent.model import Frame, Profile, make_labels
from tests.support import assert_go_pprof_reads, go_pprof, is_root, no_traceback, run_cli

pytestmark = pytest.mark.integration


@pytest.fixture()
def two_thread_pprof(tmp_path):
    p = Profile([("samples", "count"), ("cpu", "nanoseconds"), ("wall", "nanoseconds")],
                period_type=("cpu", "nanoseconds"), period=10_000_000, default_sample_type="cpu")
    main = Frame("main", "/app/main.py", 3)
    p.add((Frame("crunch", "/app/work.py", 12), main),
          make_labels({"pid": 1, "thread_id": 11, "thread_name": "alpha"}),
          {"samples": 5, "cpu": 50_000_000, "wall": 60_000_000})
    p.add((Frame("nap", "/app/work.py", 20), main),
          make_labels({"pid": 1, "thread_id": 12, "thread_name": "beta"}),
          {"samples": 1, "cpu": 1_000_000, "wall": 90_000_000})
    path = tmp_path / "in.pb.gz"
    path.write_bytes(pprof.encode(p))
    return path


def test_render_html_json_folded_and_pprof(two_thread_pprof, tmp_path):
    for name in ("out.html", "out.json", "out.txt", "out.folded", "out.pb.gz", "out.pb"):
        res = run_cli("render", two_thread_pprof, "--output", tmp_path / name)
        assert res.returncode == 0, res.stderr
        assert (tmp_path / name).stat().st_size > 0
    assert b"crunch" in (tmp_path / "out.html").read_bytes()
    assert json.loads((tmp_path / "out.json").read_text())["profiles"]
    assert "crunch (/app/work.py:12) 50000000" in (tmp_path / "out.txt").read_text()
    assert_go_pprof_reads(tmp_path / "out.pb.gz")
    assert_go_pprof_reads(tmp_path / "out.pb")


def test_render_type_and_tag_filters(two_thread_pprof, tmp_path):
    res = run_cli("render", two_thread_pprof, "-o", tmp_path / "w.txt", "--type", "wall",
                  "--tag", "thread_name=beta")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "w.txt").read_text() == "main (/app/main.py:3);nap (/app/work.py:20) 90000000\n"
    res = run_cli("render", two_thread_pprof, "-o", tmp_path / "a.pb.gz", "--tag", "thread_id=11",
                  "--type", "wall")
    assert res.returncode == 0, res.stderr
    p = pprof.decode((tmp_path / "a.pb.gz").read_bytes())
    assert [t.name for t in p.sample_types] == ["samples", "wall"]
    assert p.total("wall") == 60_000_000
    top = go_pprof(tmp_path / "a.pb.gz", "-top")
    assert "crunch" in top and "nap" not in top
    html = run_cli("render", two_thread_pprof, "-o", tmp_path / "w.html", "--type", "wall")
    assert html.returncode == 0
    assert '"default":"wall"' in (tmp_path / "w.html").read_text()


def _one_line_error(res, needle):
    assert res.returncode != 0
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("spanflame: error:"), res.stderr
    assert needle in lines[0], lines[0]
    assert no_traceback(res.stderr + res.stdout)


@pytest.mark.parametrize("content,needle", [
    (b"", "not a pprof"),
    (b"this is a text file, not a profile\n" * 10, "not a pprof"),
    (b'{"$schema": "https://www.speedscope.app/file-format-schema.json"}', "not a pprof"),
    (bytes(random.Random(7).randrange(256) for _ in range(5000)), "not a pprof"),
    (gzip.compress(b"garbage that is not protobuf" * 3), "not a pprof"),
    (gzip.compress(bytes(range(256)) * 40)[:200], "gzip"),
])
def test_render_rejects_corrupt_or_non_pprof(tmp_path, content, needle):
    bad = tmp_path / "bad.pb.gz"
    bad.write_bytes(content)
    res = run_cli("render", bad, "-o", tmp_path / "o.html")
    _one_line_error(res, needle)
    assert not (tmp_path / "o.html").exists()


def test_render_bad_arguments(two_thread_pprof, tmp_path):
    _one_line_error(run_cli("render", tmp_path / "missing.pb.gz", "-o", tmp_path / "o.html"),
                    "cannot read")
    _one_line_error(run_cli("render", two_thread_pprof, "-o", tmp_path / "o.html", "--type",
                            "lock_wait"), "no sample type 'lock_wait'")
    _one_line_error(run_cli("render", two_thread_pprof, "-o", tmp_path / "o.html", "--tag", "nokv"),
                    "KEY=VALUE")
    _one_line_error(run_cli("render", two_thread_pprof, "-o", "/proc/o.html"), "cannot write")
    _one_line_error(run_cli("render", two_thread_pprof, "-o", tmp_path / "o.png"),
                    "unknown output format")


def test_doctor_json_reports_every_check():
    res = run_cli("doctor", "--json")
    checks = {c["name"]: c for c in json.loads(res.stdout)}
    assert set(checks) >= {"python", "py-spy", "ptrace", "bpf syscall", "btf", "tracefs",
                           "perf events", "bcc", "kernel headers"}
    assert checks["py-spy"]["status"] == "ok" and "0.4" in checks["py-spy"]["detail"]
    for c in checks.values():
        assert c["status"] in ("ok", "warn", "fail")
        if c["status"] != "ok":
            assert c["hint"], f"{c['name']} fails without a hint"
    assert res.returncode == (1 if any(c["status"] == "fail" for c in checks.values()) else 0)


@pytest.mark.skipif(not is_root(), reason="root is needed to compare with an unprivileged run")
def test_doctor_as_root_and_as_nobody():
    root = {c["name"]: c for c in json.loads(run_cli("doctor", "--json").stdout)}
    assert root["ptrace"]["status"] == "ok"
    assert root["bpf syscall"]["status"] == "ok"
    assert root["kernel headers"]["status"] == "ok"
    res = run_cli("doctor", user="65534", env={"HOME": "/tmp"})
    assert res.returncode == 1
    lines = res.stdout.splitlines()
    bpf = next(i for i, l in enumerate(lines) if "bpf syscall" in l)
    assert lines[bpf].startswith("FAIL") and "hint:" in lines[bpf + 1]
    assert no_traceback(res.stdout + res.stderr)


@pytest.mark.skipif(not is_root(), reason="root is needed to run doctor as another user")
def test_doctor_as_nobody_without_a_home_explains_instead_of_crashing():
    res = run_cli("doctor", user="65534", env={"HOME": "/nonexistent"})
    out = res.stdout
    assert "check crashed" not in out
    tracefs = next(l for l in out.splitlines() if " tracefs " in l)
    assert tracefs.startswith("FAIL") and "permission denied" in tracefs
    headers = next(l for l in out.splitlines() if "kernel headers" in l)
    assert not headers.startswith("ok"), headers  # it cannot merge into a home that is not there
    # A summary of what will work, after the checks.
    assert "CPU profiles: yes, from py-spy only (your own processes only)" in out
    assert "waits (off-CPU, lock, GIL, IO, network), each on its Python line: no, needs" in out


def test_doctor_as_root_summarises_what_works():
    if not is_root():
        pytest.skip("root")
    out = run_cli("doctor").stdout
    assert "CPU profiles: yes, stacks read in the kernel" in out
    assert "each on its Python line: yes" in out
