"""The kernel stack walker as a user notices it: waits on the function that waited, at any
sampling rate; exact CPU per thread; idle workers apart from contention; and py-spy still there
when asked for or when the interpreter is one the walker does not read."""

from __future__ import annotations

import json
import os

import pytest

from agent import pprof
from tests.support import (assert_go_pprof_reads, hot_line, is_root, run_cli, target,
                           truth_between)

pytestmark = [pytest.mark.integration, pytest.mark.root,
              pytest.mark.skipif(not is_root(), reason="eBPF needs root")]

PY39 = os.path.expanduser("~/.pyenv/versions/3.9.18/bin/python3.9")


def innermost_python(stack):
    for f in stack:
        if f.filename and not f.filename.startswith("["):
            return f
    return None


def by_function(prof, type_name):
    out: dict[str, int] = {}
    for stack, _l, v in prof.iter_type(type_name):
        f = innermost_python(stack)
        if f is not None:
            out[f.name] = out.get(f.name, 0) + v
    return out


def attach(pid, out, *args, duration=4):
    res = run_cli("attach", pid, "--duration", duration, "-o", out, *args)
    assert res.returncode == 0, res.stderr
    assert_go_pprof_reads(out)
    return res, pprof.decode(out.read_bytes())


@pytest.mark.parametrize("rate", [19, 100])
def test_short_lock_waits_between_cpu_bursts_land_on_the_waiting_function(tmp_path, rate):
    report, out = tmp_path / "truth.json", tmp_path / "p.pb.gz"
    with target("burst_wait", "--duration", "6", "--report", report) as t:
        res, prof = attach(t.pid, out, "--probes", "cpu,lock", "--rate", rate)
        t.proc.wait(timeout=30)
    assert "stacks: kernel stack walker" in res.stdout, res.stdout
    got = by_function(prof, "lock_wait")
    total = sum(got.values())
    assert got.get("wait_for_lock", 0) >= 0.95 * total, got
    # ... on the acquire line, for as long as the worker measured itself waiting.
    lines = {f.line for s, _l, _v in prof.iter_type("lock_wait") for f in s
             if f.name == "wait_for_lock"}
    assert lines == {hot_line("burst_wait", "BW-LOCK")}, lines
    waits = json.loads(report.read_text())["waits"]
    lo, hi = prof.time_ns, prof.time_ns + prof.duration_ns
    measured = sum(max(0, min(b, hi) - max(a, lo)) for a, b in waits)
    assert 0.8 < got["wait_for_lock"] / measured < 1.1, (got, measured)
    # The CPU bursts stay with their own functions.
    cpu = by_function(prof, "cpu")
    assert cpu.get("burn", 0) > 0.8 * sum(cpu.values()), cpu


def test_per_thread_cpu_matches_each_threads_own_cpu_clock(tmp_path):
    report, out = tmp_path / "truth.json", tmp_path / "p.pb.gz"
    with target("four_threads", "--duration", "8", "--report", report) as t:
        res, prof = attach(t.pid, out, "--probes", "cpu", "--rate", "100", duration=5)
        t.proc.wait(timeout=30)
    timeline = json.loads(report.read_text())["timeline"]
    truth = truth_between(timeline, prof.time_ns, prof.time_ns + prof.duration_ns)
    got: dict[str, int] = {}
    for _s, labels, v in prof.iter_type("cpu"):
        tid = str(dict(labels)["thread_id"])
        got[tid] = got.get(tid, 0) + v
    assert len(truth) == 4
    for tid, ns in truth.items():
        assert ns > 1e9, truth  # each thread really ran
        assert abs(got.get(tid, 0) / ns - 1) <= 0.05, (tid, got.get(tid), ns)
    # The hashing line carries the CPU (the kernel walker reads where each thread runs).
    hot = sum(v for s, _l, v in prof.iter_type("cpu")
              if (f := innermost_python(s)) and f.line == hot_line("four_threads", "FT-HASH"))
    assert hot > 0.95 * sum(truth.values())


def test_threads_waiting_for_a_signal_are_not_lock_contention(tmp_path):
    out = tmp_path / "p.pb.gz"
    with target("idle_workers") as t:
        res, prof = attach(t.pid, out, "--probes", "all", duration=3)
        names = t.info["threads"]
    idle = {"idle_on_event", "idle_on_queue", "idle_on_condition", "join_forever", "_worker"}
    lock_fns = by_function(prof, "lock_wait")
    assert set(lock_fns) & idle == set(), lock_fns
    assert lock_fns.get("contend", 0) > 0.9 * sum(lock_fns.values()), lock_fns
    # Their time is there, as waiting for another thread, on each one's own function.
    sync: dict[str, int] = {}
    for stack, labels, v in prof.iter_type("off_cpu"):
        if dict(labels).get("reason") == "sync":
            for f in stack:
                if f.name in idle:
                    sync[f.name] = sync.get(f.name, 0) + v
                    break
    assert set(sync) == idle, sync
    assert all(v > 1e9 for v in sync.values()), sync  # each idled most of the 3 s
    # The contender's thread is the only one whose waits are lock waits.
    tids = {dict(l)["thread_id"] for _s, l, _v in prof.iter_type("lock_wait")}
    assert tids == {names["contender"]}, tids


def test_sampler_py_spy_still_gives_the_cpu_split(tmp_path):
    report, out = tmp_path / "truth.json", tmp_path / "p.pb.gz"
    with target("cpu_split", "--duration", "6", "--report", report) as t:
        res, prof = attach(t.pid, out, "--sampler", "py-spy", duration=4)
        t.proc.wait(timeout=30)
    assert "taken by py-spy" in res.stdout and "--sampler py-spy" in res.stdout, res.stdout
    truth = truth_between(json.loads(report.read_text())["timeline"], prof.time_ns,
                          prof.time_ns + prof.duration_ns)
    by = {}
    for stack, labels, v in prof.iter_type("cpu"):
        key = f"{dict(labels).get('thread_name')}/{stack[0].name}"
        by[key] = by.get(key, 0) + v
    total = sum(by.get(k, 0) for k in truth)
    for key, ns in truth.items():
        assert abs(by.get(key, 0) / total - ns / sum(truth.values())) < 0.05, (key, by, truth)


def test_an_interpreter_the_walker_does_not_read_falls_back_to_py_spy_and_says_why(tmp_path):
    if not os.path.exists(PY39):
        pytest.skip(f"{PY39} is not installed")
    out = tmp_path / "p.pb.gz"
    with target("idle", python=PY39) as t:
        res, prof = attach(t.pid, out, "--probes", "cpu,wall", duration=2)
        # Asked for explicitly, the kernel walker refuses, with the same reason.
        refused = run_cli("attach", t.pid, "--duration", "1", "--sampler", "bpf", "-o",
                          tmp_path / "x.pb.gz")
    assert "stacks from py-spy: CPython 3.9" in res.stderr, res.stderr
    assert "taken by py-spy" in res.stdout, res.stdout
    names = {f.name for s, _l, _v in prof.iter_type("wall") for f in s}
    assert {"sleeper", "wait_forever"} <= names, names
    assert refused.returncode != 0 and "CPython 3.9" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr


def test_a_stack_deeper_than_the_walker_keeps_its_innermost_frames_under_truncated(tmp_path):
    out = tmp_path / "p.pb.gz"
    with target("deep_stack") as t:
        res, prof = attach(t.pid, out, "--probes", "cpu", duration=2)
    deep = [(s, v) for s, l, v in prof.iter_type("cpu")
            if dict(l)["thread_id"] == t.info["threads"]["deep"]]
    assert deep and sum(v for _s, v in deep) > 1e9
    for stack, _v in deep:
        python = [f for f in stack if f.filename and not f.filename.startswith("[")]
        assert python[0].line in (hot_line("deep_stack", "DS-LOOP"),
                                  hot_line("deep_stack", "DS-BOTTOM"))
        assert len(python) == 128 and all(f.name == "down" for f in python), python[:3]
        assert stack[-1].name == "[truncated]"
    assert "lost or unreadable" not in res.stdout, res.stdout


def test_the_profilers_own_frames_never_appear(tmp_path):
    out = tmp_path / "p.pb.gz"
    with target("idle_workers") as t:
        _res, prof = attach(t.pid, out, "--probes", "all", duration=2)
    own = ("bpf_", "__bpf_", "__traceiter_", "trace_call_bpf", "perf_", "__perf_")
    names = {f.name for (s, _l) in prof.samples for f in s}
    assert names and not [n for n in names if n.startswith(own)], sorted(names)
