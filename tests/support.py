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
ARTIFACTS = ROOT / "tests" / "artifacts"


def run_cli(*args: str, timeout: float = 120, user: str | None = None,
            env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [str(SPANFLAME), *map(str, args)]
    if user:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


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
