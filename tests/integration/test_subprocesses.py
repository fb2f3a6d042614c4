"""`--subprocesses` on record and attach: a multiprocessing pool's workers are profiled with the
parent, each sample labelled with its process, in the share each worker measured itself."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from agent import pprof
from tests.support import PROGRAMS, SPANFLAME, assert_go_pprof_reads, cli_env, is_root

pytestmark = pytest.mark.integration


def work_by_pid(path) -> dict[int, int]:
    prof = pprof.decode(path.read_bytes())
    out: dict[int, int] = {}
    for stack, labels, v in prof.iter_type("cpu"):
        if any(f.name == "work" for f in stack):
            pid = int(dict(labels)["pid"])
            out[pid] = out.get(pid, 0) + v
    return out


def check_shares(seen: dict[int, int], truth: dict[int, int], parent: int) -> None:
    assert set(truth) <= set(seen), (seen, truth)  # every worker, by its own pid
    assert parent not in seen, seen                # work() runs in the workers only
    total, want = sum(seen.values()), sum(truth.values())
    for pid, ns in truth.items():
        share, true_share = seen[pid] / total, ns / want
        print(f"worker {pid}: {100 * share:.1f}% of work() CPU (measured {100 * true_share:.1f}%)")
        assert abs(share - true_share) <= 0.1, (pid, share, true_share)


def test_record_with_subprocesses_profiles_each_pool_worker(tmp_path):
    if not is_root():
        pytest.skip("the kernel stack walker needs root")
    out, report = tmp_path / "r.pb.gz", tmp_path / "truth.json"
    res = subprocess.run([str(SPANFLAME), "record", "-s", "-o", str(out), "--",
                          sys.executable, str(PROGRAMS / "pool_workers.py"), str(report)],
                         capture_output=True, text=True, timeout=180, env=cli_env())
    assert res.returncode == 0, res.stderr
    assert "subprocesses: 3 profiled" in res.stdout + res.stderr, res.stdout + res.stderr
    assert_go_pprof_reads(out)
    parent = json.loads(res.stdout.splitlines()[0])["pid"]
    truth = {int(k): v for k, v in json.loads(report.read_text())["workers"].items()}
    check_shares(work_by_pid(out), truth, parent)


def test_record_without_subprocesses_leaves_the_workers_out(tmp_path):
    if not is_root():
        pytest.skip("the kernel stack walker needs root")
    out, report = tmp_path / "r.pb.gz", tmp_path / "truth.json"
    res = subprocess.run([str(SPANFLAME), "record", "-o", str(out), "--", sys.executable,
                          str(PROGRAMS / "pool_workers.py"), str(report), "--tasks", "3"],
                         capture_output=True, text=True, timeout=180, env=cli_env())
    assert res.returncode == 0, res.stderr
    assert work_by_pid(out) == {}


def test_attach_with_subprocesses_follows_workers_started_after_it(tmp_path):
    if not is_root():
        pytest.skip("the kernel stack walker needs root")
    out, report = tmp_path / "a.pb.gz", tmp_path / "truth.json"
    app = subprocess.Popen([sys.executable, str(PROGRAMS / "pool_workers.py"), str(report),
                            "--delay", "2"], stdout=subprocess.PIPE, text=True)
    try:
        parent = json.loads(app.stdout.readline())["pid"]
        res = subprocess.run([str(SPANFLAME), "attach", str(parent), "--subprocesses", "-d", "30",
                              "-o", str(out)], capture_output=True, text=True, timeout=180,
                             env=cli_env())
        app.wait(timeout=60)
    finally:
        if app.poll() is None:
            app.kill()
    assert res.returncode == 0, res.stderr
    truth = {int(k): v for k, v in json.loads(report.read_text())["workers"].items()}
    check_shares(work_by_pid(out), truth, parent)


def test_subprocesses_with_py_spy_is_a_clear_usage_error():
    res = subprocess.run([str(SPANFLAME), "attach", "1", "-s", "--sampler", "py-spy"],
                         capture_output=True, text=True, timeout=60, env=cli_env())
    assert res.returncode == 2, res.stderr
    assert "--subprocesses needs the kernel stack walker" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
