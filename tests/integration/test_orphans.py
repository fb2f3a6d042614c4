"""kill -9 of `spanflame attach` or `spanflame run` leaves no py-spy sampling the target and no
scratch directory behind (agent/children.py: parent-death signal, cleaner, stale sweep)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from agent.children import remove_stale, scratch_dir
from tests.support import PROGRAMS, SPANFLAME

pytestmark = [pytest.mark.integration]

PREFIX = "spanflame-pyspy-"


def pyspy_of(pid: int, parent: int) -> list[psutil.Process]:
    """The py-spy processes started by `parent` that sample `pid` (other agents on this machine
    may sample it too)."""
    out = []
    for p in psutil.process_iter(["name", "cmdline", "ppid"]):
        cmd = p.info["cmdline"] or []
        if "py-spy" in (p.info["name"] or "") and p.info["ppid"] == parent and "--pid" in cmd \
                and cmd[cmd.index("--pid") + 1:][:1] == [str(pid)]:
            out.append(p)
    return out


def pyspy_writing_to(tmp: Path) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["name", "cmdline"])
            if "py-spy" in (p.info["name"] or "") and str(tmp) in " ".join(p.info["cmdline"] or [])]


def running(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def wait_for(what, timeout_s: float, step_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while True:
        v = what()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(step_s)


def scratch(tmp: Path) -> list[Path]:
    return sorted(tmp.glob(PREFIX + "*"))


def kill9_leaves_nothing(cmd: list[str], pid: int, tmp: Path, log: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp)}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        # Both at once (`run` starts a new recorder, with a new directory, every window).
        assert wait_for(lambda: pyspy_of(pid, proc.pid) and scratch(tmp), 60), \
            log.read_text()[-3000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # Ours write under our TMPDIR (their --output), whoever their parent is now.
        gone = wait_for(lambda: not running(pyspy_writing_to(tmp)), 5)
        assert gone, f"py-spy still sampling {pid} 5 s after kill -9 of its parent"
        assert wait_for(lambda: not scratch(tmp), 5), scratch(tmp)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in running(pyspy_writing_to(tmp)):
            p.kill()


@contextmanager
def private_target(tmp_path: Path):
    """tests/programs/idle.py under another name: other agents running on this machine (they
    profile tests/programs/) leave it alone."""
    prog = tmp_path / "orphan_target.py"
    shutil.copy(PROGRAMS / "idle.py", prog)
    proc = subprocess.Popen([sys.executable, str(prog)], stdout=subprocess.PIPE, text=True)
    try:
        json.loads(proc.stdout.readline())
        yield proc
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_kill_9_of_attach_with_py_spy_leaves_no_py_spy_and_no_scratch_dir(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    with private_target(tmp_path) as t:
        kill9_leaves_nothing(
            [str(SPANFLAME), "attach", str(t.pid), "--sampler", "py-spy", "--duration", "120",
             "-o", str(tmp_path / "out.pb.gz")], t.pid, tmp, tmp_path / "attach.log")
        assert t.poll() is None, "the target itself lives on"


def test_kill_9_of_run_with_py_spy_leaves_no_py_spy_and_no_scratch_dir(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    with private_target(tmp_path) as t:
        kill9_leaves_nothing(
            [str(SPANFLAME), "run", "--store", str(tmp_path / "store"), "--listen",
             "127.0.0.1:0", "--otlp-listen", "127.0.0.1:0", "--sampler", "py-spy",
             "--probes", "cpu", "--include", "orphan_target", "--cpu-budget", "50",
             "--window", "5"], t.pid, tmp, tmp_path / "run.log")
        assert t.poll() is None


def test_a_dead_owners_scratch_dir_is_swept_and_a_live_ones_kept(tmp_path):
    """The last resort: a directory whose owner and cleaner both died is removed by the next
    process that makes one; a live owner's directory (another process's) is kept."""
    child = subprocess.run(
        [sys.executable, "-c", "import sys; from agent.children import scratch_dir, _cleaners;"
         "d = scratch_dir(sys.argv[1], sys.argv[2]); [c.kill() for c in _cleaners];"
         "print(d)", PREFIX, str(tmp_path)],
        capture_output=True, text=True, check=True, cwd=Path(__file__).parents[2])
    dead = Path(child.stdout.strip())
    assert dead.is_dir()  # its cleaner was killed first: nothing removed it
    live = subprocess.Popen(
        [sys.executable, "-c", "import sys; from agent.children import scratch_dir;"
         "print(scratch_dir(sys.argv[1], sys.argv[2]), flush=True); sys.stdin.read()",
         PREFIX, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        cwd=Path(__file__).parents[2])
    try:
        alive = Path(live.stdout.readline().strip())
        assert not dead.exists(), "swept by the next process that made one"
        assert remove_stale(PREFIX, str(tmp_path)) == []
        assert alive.is_dir()
        mine = scratch_dir(PREFIX, str(tmp_path))
        assert mine.is_dir() and alive.is_dir()
        mine.rmdir()
    finally:
        live.stdin.close()
        live.wait()
    # Its owner exited (orderly, without removing it): its cleaner removes it.
    assert wait_for(lambda: not alive.exists(), 5)
