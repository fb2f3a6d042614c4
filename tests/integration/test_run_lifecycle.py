"""`spanflame run` as a user at a terminal sees it: Ctrl-C says what it is doing and keeps the
last window; short-lived Python processes (a node is full of them) are no reason for warnings."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from agent.store import Store
from tests.integration.test_run import AgentProc, spawn
from tests.support import PROGRAMS, is_root

pytestmark = pytest.mark.integration


def _log(agent: AgentProc) -> str:
    return Path(agent.log.name).read_text()


def test_ctrl_c_says_it_is_writing_the_last_window_and_keeps_it(tmp_path):
    if not is_root():
        pytest.skip("the agent's stack sources need root")
    # One long window: what the store holds of the target after Ctrl-C is the window that
    # Ctrl-C cut short.
    agent = AgentProc(tmp_path / "store", "--window", "60")
    target, info = spawn(PROGRAMS / "cpu_split.py", "--duration", "60", "--report",
                         tmp_path / "r.json")
    try:
        agent.wait_watching(info["pid"])
        time.sleep(3)
        t0 = time.monotonic()
        agent.proc.send_signal(signal.SIGINT)
        rc = agent.proc.wait(timeout=120)
        print(f"Ctrl-C to exit: {time.monotonic() - t0:.1f} s")
    finally:
        target.kill()
        target.wait()
        agent.stop()
    log = _log(agent)
    assert rc == 0, log
    assert "spanflame: stopping: writing the last windows (Ctrl-C again to quit at once)" in log
    assert "spanflame: stopped in " in log, log
    assert "Traceback" not in log, log
    st = Store(tmp_path / "store", read_only=True)
    found = st.find(start_ns=0, end_ns=time.time_ns() + 10**9, type_name="cpu", pid=info["pid"])
    assert found, "the window Ctrl-C cut short was not stored"
    prof = st.merged(found)
    names = {f.name for stack, _labels, _v in prof.iter_type("cpu") for f in stack}
    assert {"heavy_a", "spin_b"} <= names, sorted(names)


def test_short_lived_python_processes_draw_no_warnings(tmp_path):
    """py-spy as the stack source (where the walker is not allowed): a process that exits
    before py-spy attaches is not a failure worth a warning."""
    if not is_root():
        pytest.skip("py-spy needs root to attach to other processes here")
    agent = AgentProc(tmp_path / "store", "--sampler", "py-spy", "--window", "2",
                      include="short_lived_")
    script = tmp_path / "short_lived_job.py"
    script.write_text("import time\ntime.sleep(__import__('random').uniform(1.5, 3.5))\n")
    try:
        deadline = time.monotonic() + 25
        jobs = []
        while time.monotonic() < deadline:  # a few at a time, each lasting one to two scans
            jobs = [j for j in jobs if j.poll() is None]
            while len(jobs) < 4:
                jobs.append(subprocess.Popen([sys.executable, str(script)]))
            time.sleep(0.3)
        for j in jobs:
            j.wait()
        time.sleep(3)
        metrics = httpx.get(f"{agent.url}/metrics", timeout=10).text
    finally:
        agent.stop()
    log = _log(agent)
    picked = len(set(re.findall(r"PID (\d+) \(python[\d.]*\): stacks from py-spy", log)))
    failures = re.search(r"^spanflame_sampler_failures_total (\S+)$", metrics, re.M)
    # The one warning that --sampler py-spy is not the kernel walker is what the user asked for
    # (said once); nothing else.
    warnings = [line for line in log.splitlines() if "WARNING" in line
                and "the kernel stack walker is off (--sampler py-spy)" not in line]
    print(f"{picked} jobs profiled, py-spy failures {failures and failures.group(1)}; "
          f"warnings: {warnings}")
    assert picked >= 8, log  # the jobs were picked up, and most ended while profiled
    assert not warnings, warnings
    assert "Traceback" not in log, log
