"""`spanflame attach` with the real py-spy against real Python programs written for the tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from agent import pprof
from tests.support import (assert_go_pprof_reads, go_pprof, hot_line, is_root, no_traceback,
                           run_cli, target, truth_between)

pytestmark = pytest.mark.integration


def cpu_by(profile, key_fn, type_name="cpu"):
    out: dict = {}
    for stack, labels, v in profile.iter_type(type_name):
        k = key_fn(stack, dict(labels))
        if k is not None:
            out[k] = out.get(k, 0) + v
    return out


@pytest.fixture(scope="module")
def cpu_split_run(tmp_path_factory):
    """One real attach to cpu_split.py that exits mid-recording (shared by several tests).

    At 400 Hz: the kernel samples a thread only while it is on a CPU, and the split between two
    functions a thread alternates between is a proportion of its samples; ~1,000 samples keep
    three standard deviations inside the tolerances below."""
    d = tmp_path_factory.mktemp("cpu_split")
    report = d / "truth.json"
    out = d / "profile.pb.gz"
    with target("cpu_split", "--duration", "8", "--report", report) as t:
        res = run_cli("attach", t.pid, "--duration", "30", "--rate", "400", "--output", out)
        t.proc.wait(timeout=30)
    report = json.loads(report.read_text())
    prof = pprof.decode(out.read_bytes())
    truth = truth_between(report["timeline"], prof.time_ns, prof.time_ns + prof.duration_ns)
    return {"res": res, "out": out, "truth": truth, "info": t.info, "profile": prof}


def test_attach_writes_pprof_with_known_cpu_split(cpu_split_run):
    res, prof, truth = cpu_split_run["res"], cpu_split_run["profile"], cpu_split_run["truth"]
    assert res.returncode == 0, res.stderr
    names = [t.name for t in prof.sample_types]
    assert names[:2] == ["samples", "cpu"]
    assert prof.period_type.name == "cpu" and prof.period == 2_500_000
    assert prof.time_ns > 0 and 4e9 < prof.duration_ns < 10e9

    by_fn = cpu_by(prof, lambda s, l: f"{l.get('thread_name')}/{s[0].name}" if s else None)
    measured_total = sum(truth.values())  # over exactly the stretch the profile covers
    profiled_total = sum(by_fn.get(k, 0) for k in truth)
    for key, ns in truth.items():
        want = ns / measured_total
        got = by_fn.get(key, 0) / profiled_total
        assert abs(got - want) < 0.05, f"{key}: profile {got:.3f} vs measured {want:.3f}"
    # heavy_a : light_a is 3:1 by work; their measured and profiled ratios agree.
    ratio = by_fn["alpha/heavy_a"] / by_fn["alpha/light_a"]
    want_ratio = truth["alpha/heavy_a"] / truth["alpha/light_a"]
    assert abs(ratio / want_ratio - 1) < 0.2
    # Absolute CPU: what the threads measured over the same stretch (kernel samples are taken
    # only while a thread is on a CPU, so a busy machine does not inflate them).
    assert 0.9 < profiled_total / measured_total < 1.1, (profiled_total, measured_total)
    # The sleeping main thread has (almost) no CPU.
    main_cpu = sum(v for s, l, v in prof.iter_type("cpu") if dict(l)["thread_name"] == "MainThread")
    assert main_cpu < 0.02 * profiled_total


def test_attach_labels_threads_and_lines(cpu_split_run):
    prof, info = cpu_split_run["profile"], cpu_split_run["info"]
    seen = {}
    for stack, labels, _v in prof.iter_type("cpu"):
        d = dict(labels)
        assert d["pid"] == info["pid"]
        seen[d["thread_name"]] = d["thread_id"]
    assert seen["alpha"] == info["threads"]["alpha"]
    assert seen["beta"] == info["threads"]["beta"]
    lines = {(f.name, f.line) for stack, _l, _v in prof.iter_type("cpu") for f in stack[:1]}
    file_of = {f.name: f.filename for stack, _l, _v in prof.iter_type("cpu") for f in stack}
    assert ("heavy_a", hot_line("cpu_split", "HOT-HEAVY-A")) in lines
    assert ("spin_b", hot_line("cpu_split", "HOT-SPIN-B")) in lines
    assert file_of["heavy_a"].endswith("tests/programs/cpu_split.py")


def test_attach_exit_mid_recording_is_partial_with_note(cpu_split_run):
    res = cpu_split_run["res"]
    assert res.returncode == 0
    assert "target exited" in res.stderr
    assert "partial" in res.stderr
    assert no_traceback(res.stderr)
    assert "top Python functions by cpu" in res.stdout


def test_go_pprof_reads_attach_output(cpu_split_run):
    out = cpu_split_run["out"]
    raw = assert_go_pprof_reads(out)
    assert "heavy_a" in raw and "spin_b" in raw
    tags = go_pprof(out, "-tags")
    assert "thread_name" in tags and "alpha" in tags and "beta" in tags
    top = go_pprof(out, "-top", "-sample_index=cpu")
    assert "heavy_a" in top
    # The thread tag filter works in an independent reader too.
    beta_only = go_pprof(out, "-top", "-tagfocus=thread_name=beta")
    assert "spin_b" in beta_only and "heavy_a" not in beta_only


def test_attach_wall_includes_idle_threads(tmp_path):
    out = tmp_path / "wall.pb.gz"
    with target("idle") as t:
        res = run_cli("attach", t.pid, "--duration", "2", "--probes", "wall", "-o", out)
    assert res.returncode == 0, res.stderr
    prof = pprof.decode(out.read_bytes())
    assert [x.name for x in prof.sample_types] == ["samples", "wall"]
    # The waiter blocks inside threading (Event.wait -> Condition.wait): find its own frame.
    def own_frame(s, l):
        for f in s:
            if f.name in ("wait_forever", "sleeper"):
                return (l["thread_name"], f.name, f.line)
        return None
    wall = cpu_by(prof, own_frame, "wall")
    waiter = wall.get(("waiter", "wait_forever", hot_line("idle", "HOT-WAIT")), 0)
    sleeper = wall.get(("MainThread", "sleeper", hot_line("idle", "HOT-SLEEP")), 0)
    # Both idle threads are there for (nearly) the whole recording.
    assert waiter > 1.5e9, wall
    assert sleeper > 1.5e9, wall
    assert_go_pprof_reads(out)


def test_attach_cpu_and_wall_in_one_profile(tmp_path):
    out = tmp_path / "both.pb"
    with target("idle") as t:
        res = run_cli("attach", t.pid, "--duration", "1.5", "--probes", "cpu,wall", "-o", out)
    assert res.returncode == 0, res.stderr
    data = out.read_bytes()
    assert data[:2] != b"\x1f\x8b", ".pb is written uncompressed"
    prof = pprof.decode(data)
    assert [x.name for x in prof.sample_types] == ["samples", "cpu", "wall"]
    # An idle program: wall time is large, CPU time tiny.
    assert prof.total("wall") > 10 * max(1, prof.total("cpu"))
    assert_go_pprof_reads(out)


@pytest.mark.parametrize("ext,check", [
    (".html", lambda b: b.startswith(b"<!doctype html>") and b"wait_forever" in b),
    (".json", lambda b: json.loads(b)["$schema"].startswith("https://www.speedscope.app")),
    (".txt", lambda b: b"wait_forever" in b and b.strip().split(b"\n")[0].rsplit(b" ", 1)[1].isdigit()),
    (".folded", lambda b: b";" in b),
])
def test_attach_output_format_follows_extension(tmp_path, ext, check):
    out = tmp_path / f"p{ext}"
    with target("idle") as t:
        res = run_cli("attach", t.pid, "--duration", "1", "--probes", "wall", "-o", out)
    assert res.returncode == 0, res.stderr
    assert check(out.read_bytes())


def test_attach_default_output_name(tmp_path):
    with target("idle") as t:
        res = subprocess.run([str(Path(sys.executable).parent / "spanflame"), "attach",
                              str(t.pid), "--duration", "1"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    files = list(tmp_path.glob(f"spanflame-{t.pid}-*.pb.gz"))
    assert len(files) == 1, list(tmp_path.iterdir())
    assert_go_pprof_reads(files[0])


# -- bad input: one line, non-zero exit, no traceback ---------------------------------------

def _assert_one_line_error(res, *needles):
    assert res.returncode != 0
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("spanflame: error: ")
    for n in needles:
        assert n in lines[0], lines[0]
    assert no_traceback(res.stderr + res.stdout)


def test_attach_no_such_pid():
    pid = 4_000_000  # above pid_max's default ceiling: never a live process
    _assert_one_line_error(run_cli("attach", pid, "--duration", "1"), "no process", str(pid))


def test_attach_not_python(tmp_path):
    proc = subprocess.Popen(["sleep", "60"])
    try:
        res = run_cli("attach", proc.pid, "--duration", "1", "-o", tmp_path / "x.pb.gz")
    finally:
        proc.kill()
        proc.wait()
    _assert_one_line_error(res, "not a Python process")
    assert not (tmp_path / "x.pb.gz").exists()


@pytest.mark.skipif(not is_root(), reason="needs root to run the CLI as another user")
def test_attach_permission_denied():
    # An unprivileged user (nobody) may not read a root-owned process.
    out_dir = Path(tempfile.mkdtemp(prefix="spanflame-nobody-"))
    os.chmod(out_dir, 0o777)
    try:
        with target("idle") as t:
            res = run_cli("attach", t.pid, "--duration", "1", "-o", out_dir / "x.pb.gz",
                          user="65534", env={"HOME": str(out_dir)})
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    _assert_one_line_error(res, "permission denied", "CAP_SYS_PTRACE")


def test_attach_unwritable_output_fails_before_recording(tmp_path):
    with target("idle") as t:
        t0 = time.monotonic()
        res = run_cli("attach", t.pid, "--duration", "30", "-o", "/proc/spanflame-test.pb.gz")
        elapsed = time.monotonic() - t0
    _assert_one_line_error(res, "cannot write")
    assert elapsed < 10, "the output check must happen before the 30 s recording"
    res = run_cli("attach", "1", "--duration", "1", "-o", tmp_path / "missing-dir" / "x.pb.gz")
    _assert_one_line_error(res, "does not exist")


def test_attach_unknown_output_extension_and_probe():
    _assert_one_line_error(run_cli("attach", "1", "-o", "x.svg"), "unknown output format")
    _assert_one_line_error(run_cli("attach", "1", "--probes", "cpu,bogus"), "unknown probe", "bogus")
    _assert_one_line_error(run_cli("attach", "1", "--rate", "0"), "--rate")
