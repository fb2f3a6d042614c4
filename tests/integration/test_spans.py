"""Linking samples to spans: a real OTel SDK app with the real OTLP/HTTP exporter, sending to
`spanflame attach --otlp-listen`. Every assertion is against the app's own measurements."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time

import pytest

from agent import pprof
from tests.support import (PROGRAMS, SPANFLAME, assert_go_pprof_reads, cli_env, go_pprof, hot_line,
                           is_root, target)

pytestmark = [pytest.mark.integration]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_linked(tmp_path, probes="cpu,lock", seconds=6.0, extra=(), wrap=()):
    port = free_port()
    report, out, spans_json = tmp_path / "truth.json", tmp_path / "p.pb.gz", tmp_path / "spans.json"
    app = subprocess.Popen([*wrap, sys.executable, str(PROGRAMS / "otel_app.py"),
                            f"http://127.0.0.1:{port}/v1/traces", str(report), "--seconds",
                            str(seconds), *extra],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        pid = json.loads(app.stdout.readline())["pid"]
        if wrap:  # the app reported its pid in its own namespace: find it on the host
            import psutil
            pid = next(c.pid for c in psutil.Process(app.pid).children(recursive=True)
                       if "otel_app.py" in " ".join(c.cmdline()))
        cli = subprocess.Popen([str(SPANFLAME), "attach", str(pid), "--probes", probes,
                                "--duration", "120", "--otlp-listen", f"127.0.0.1:{port}",
                                "--span-wait", "3", "-o", str(out), "--spans-output",
                                str(spans_json)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=cli_env())
        err_lines = []
        while True:  # wait until samples are being recorded
            line = cli.stderr.readline()
            assert line, f"attach ended early: {''.join(err_lines)}"
            err_lines.append(line)
            if "recording PID" in line:
                break
        app.stdin.write("go\n")
        app.stdin.flush()
        app.wait(timeout=120)
        stdout, stderr = cli.communicate(timeout=120)
        assert cli.returncode == 0, "".join(err_lines) + stderr
    finally:
        if app.poll() is None:
            app.kill()
    prof = pprof.decode(out.read_bytes())
    truth = json.loads(report.read_text())["spans"]
    spans = json.loads(spans_json.read_text())["spans"] if spans_json.exists() else []
    return prof, truth, spans, out, stdout


@pytest.fixture(scope="module")
def linked(tmp_path_factory):
    if not is_root():
        pytest.skip("the lock probe needs root")
    return run_linked(tmp_path_factory.mktemp("spans"))


def test_an_app_in_its_own_pid_namespace_is_linked_by_host_ids(tmp_path):
    """A container's view: the app's spans carry its namespace's pid and thread ids, the kernel
    sees host ids; samples still land on the right spans."""
    if not is_root():
        pytest.skip("a PID namespace and the probes need root")
    prof, truth, _spans, _out, stdout = run_linked(
        tmp_path, wrap=("unshare", "--pid", "--fork", "--mount-proc"))
    assert "stacks: kernel stack walker" in stdout, stdout
    for type_name, function, span_name in (("cpu", "crunch_numbers", "cpu_span"),
                                           ("lock_wait", "wait_on_lock", "locked_op")):
        good, total = share_with_span(prof, type_name, function, span_name, truth)
        assert total > 0 and good / total >= 0.95, (type_name, good, total)
    assert not re.search(r"\d+ without thread ids", stdout), stdout


def labels_of(labels):
    return dict(labels)


def in_window(prof, t):
    return prof.time_ns <= t["start"] and t["end"] <= prof.time_ns + prof.duration_ns


def share_with_span(prof, type_name, function, span_name, truth):
    ids = {sid for sid, t in truth.items() if t["name"] == span_name}
    good = total = 0
    for stack, labels, v in prof.iter_type(type_name):
        if not any(f.name == function for f in stack):
            continue
        total += v
        l = labels_of(labels)
        if l.get("span_name") == span_name and l.get("span_id") in ids:
            good += v
    return good, total


@pytest.mark.parametrize("span_name,function", [
    ("cpu_span", "crunch_numbers"), ("short_span", "short_burst"),
    ("child_op", "child_work"), ("parent_op", "parent_own_work")])
def test_cpu_in_each_spans_function_carries_that_span(linked, span_name, function):
    prof, truth, _spans, _out, _ = linked
    good, total = share_with_span(prof, "cpu", function, span_name, truth)
    assert total > 50_000_000, f"too little CPU in {function} to judge: {total}"
    assert good / total >= 0.95, f"{function}: {good / total:.3f} of its CPU carries {span_name}"


def test_lock_waits_carry_the_waiting_span(linked):
    prof, truth, _spans, _out, _ = linked
    good, total = share_with_span(prof, "lock_wait", "wait_on_lock", "locked_op", truth)
    assert total > 300_000_000
    assert good / total >= 0.95, good / total
    lines = {f.line for s, l, v in prof.iter_type("lock_wait") for f in s if f.name == "wait_on_lock"}
    assert hot_line("otel_app", "WAIT-LOCK") in lines


def test_per_span_cpu_matches_the_thread_cpu_the_app_measured(linked):
    prof, truth, _spans, _out, _ = linked
    cpu_by_span: dict[str, int] = {}
    for stack, labels, v in prof.iter_type("cpu"):
        sid = labels_of(labels).get("span_id")
        if sid:
            cpu_by_span[sid] = cpu_by_span.get(sid, 0) + v
    checked = 0
    for sid, t in truth.items():
        if t["name"] == "cpu_span" and in_window(prof, t):
            assert abs(cpu_by_span.get(sid, 0) / t["cpu_ns"] - 1) <= 0.10, (sid, cpu_by_span.get(sid), t)
            checked += 1
    assert checked >= 3


def test_child_samples_carry_the_local_root(linked):
    prof, truth, _spans, _out, _ = linked
    roots = {labels_of(l).get("root_span_name") for s, l, v in prof.iter_type("cpu")
             if any(f.name == "child_work" for f in s)}
    assert roots == {"parent_op"}


def test_tagfocus_on_one_span_shows_only_its_work(linked):
    prof, truth, _spans, out, _ = linked
    sid = next(sid for sid, t in truth.items() if t["name"] == "cpu_span" and in_window(prof, t))
    top = go_pprof(out, "-top", "-sample_index=cpu", f"-tagfocus=span_id={sid}")
    assert "crunch_numbers" in top
    for other in ("short_burst", "child_work", "parent_own_work", "wait_on_lock"):
        assert other not in top, top
    assert_go_pprof_reads(out)


def test_span_breakdown_names_the_dominant_cause(linked):
    prof, truth, spans, _out, stdout = linked
    by_id = {s["span_id"]: s for s in spans}
    locked = [by_id[sid] for sid, t in truth.items()
              if t["name"] == "locked_op" and sid in by_id and in_window(prof, t)]
    assert locked
    long = [s for s in locked if s["duration_ns"] > 50_000_000]
    assert len(long) >= 10
    # Every long one waited, on the lock or (with three busy threads) for the GIL after it.
    for s in long:
        assert re.match(r"\d+% waiting (on a lock|for the GIL) in ", s["cause"]), s
    # The Python stack of a wait is py-spy's; on a loaded machine py-spy sometimes sees
    # nothing of a thread during a whole wait, and the wait keeps the stack seen before it.
    named = [s for s in long
             if re.match(r"\d+% waiting on a lock in wait_on_lock \(otel_app.py:\d+\)$", s["cause"])]
    assert len(named) >= 0.8 * len(long), [s["cause"] for s in long]
    cpu = [by_id[sid] for sid, t in truth.items()
           if t["name"] == "cpu_span" and sid in by_id and in_window(prof, t)]
    for s in cpu:
        parts = sum(s[k] for k in ("cpu_ns", "lock_ns", "gil_ns", "io_ns", "net_ns", "other_ns",
                                   "children_ns", "unaccounted_ns"))
        assert abs(parts - s["duration_ns"]) <= 0.02 * s["duration_ns"] + 1_000_000, s
        # CPU-bound, and the three busy threads share one GIL: on CPU in crunch_numbers' burn(),
        # or waiting for the GIL.
        assert "on CPU in burn" in s["cause"] or "GIL" in s["cause"], s
    assert "spans:" in stdout


def test_app_that_never_sends_spans_gets_a_full_untagged_profile(tmp_path):
    port = free_port()
    out = tmp_path / "p.pb.gz"
    with target("cpu_split", "--duration", "6", "--report", tmp_path / "t.json") as t:
        res = subprocess.run([str(SPANFLAME), "attach", str(t.pid), "--duration", "30",
                              "--otlp-listen", f"127.0.0.1:{port}", "--span-wait", "1",
                              "-o", str(out)], capture_output=True, text=True, timeout=120,
                             env=cli_env())
    assert res.returncode == 0, res.stderr
    prof = pprof.decode(out.read_bytes())
    fns = {s[0].name for s, l, v in prof.iter_type("cpu")}
    assert {"heavy_a", "light_a", "spin_b"} <= fns
    assert not any(k == "span_id" for s, l, v in prof.iter_type("cpu") for k, _ in l)
    assert "0 received" in res.stdout
    assert_go_pprof_reads(out)


def test_spans_without_thread_ids_are_received_but_unlinked(tmp_path):
    if not is_root():
        pytest.skip("the lock probe needs root")
    prof, truth, spans, out, stdout = run_linked(tmp_path, probes="cpu", seconds=3,
                                                  extra=("--no-processor",))
    assert not any(k == "span_id" for s, l, v in prof.iter_type("cpu") for k, _ in l)
    assert "without thread ids" in stdout
    assert_go_pprof_reads(out)
