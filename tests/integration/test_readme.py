"""The README walked through: every command in its ```sh blocks is run, as written, against real
programs, in order (later commands read what earlier ones wrote).

What is put in for the README's placeholders, and nothing else:
- `1234` is a real Python process (an OTel app sending its spans where the command says);
- `python app.py --port 8000` is a small real program of that name in the working directory;
- the span id in `-tagfocus=span_id=...` is one of the spans the attach before it wrote, and a
  thread name in `thread_name=...` one of the target's threads;
- fixed ports (4318, and `run`'s 4040 through SPANFLAME_LISTEN) are free ones, so that the test
  does not depend on what else listens on this machine; `run` keeps its store in the test's
  directory (SPANFLAME_STORE) and is stopped with Ctrl-C once its UI answers.
`make run` and `make test` are the suite's own entry points (`make test` is running this); the
test checks that the Makefile has both.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support import PROGRAMS, ROOT, cli_env, is_root

pytestmark = pytest.mark.integration

README = ROOT / "README.md"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sh_commands(text: str) -> list[str]:
    """The commands of every ```sh block: comments dropped, continuation lines joined."""
    out = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", "", block)
        for line in joined.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


APP = '''import argparse, time
ap = argparse.ArgumentParser(); ap.add_argument("--port", type=int)
ap.parse_args()
def handle(n):
    return sum(i * i for i in range(n))
end = time.time() + 3
while time.time() < end:
    handle(20000); time.sleep(0.005)
'''


def test_every_command_in_the_readme_runs_as_written(tmp_path):
    if not is_root():
        pytest.skip("the README's commands attach to other processes (root here)")
    commands = sh_commands(README.read_text())
    assert {"make run", "make test"} <= set(commands), commands
    make = (ROOT / "Makefile").read_text()
    assert re.search(r"^run:", make, re.M) and re.search(r"^test:", make, re.M)
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    (tmp_path / "app.py").write_text(APP)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "python").symlink_to(sys.executable)
    otlp = free_port()
    env = cli_env({"PATH": f"{bindir}:{os.environ.get('PATH', '')}",
                   "SPANFLAME_LISTEN": f"127.0.0.1:{free_port()}",
                   "SPANFLAME_OTLP_LISTEN": f"127.0.0.1:{free_port()}",
                   "SPANFLAME_STORE": str(tmp_path / "store")})
    target = subprocess.Popen([sys.executable, str(PROGRAMS / "otel_app.py"),
                               f"http://127.0.0.1:{otlp}/v1/traces", str(tmp_path / "truth.json"),
                               "--seconds", "600"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    pid = json.loads(target.stdout.readline())["pid"]
    target.stdin.write("go\n")
    target.stdin.flush()
    ran = []
    try:
        for cmd in commands:
            if cmd.startswith("make "):
                continue
            cmd = re.sub(r"\b1234\b", str(pid), cmd).replace("127.0.0.1:4318",
                                                              f"127.0.0.1:{otlp}")
            if "span_id=" in cmd:
                spans = json.loads((tmp_path / "spans.json").read_text())["spans"]
                sid = next(s["span_id"] for s in spans if s["name"] == "cpu_span")
                cmd = re.sub(r"span_id=[0-9a-f]{16}", f"span_id={sid}", cmd)
            cmd = re.sub(r"thread_name=[\w-]+", "thread_name=cruncher", cmd)
            argv = shlex.split(cmd)
            if argv[:2] == [".venv/bin/spanflame", "run"]:
                out = _run_agent(argv, tmp_path, env)
            else:
                res = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                                     timeout=240)
                out = res.stdout + res.stderr
                assert res.returncode == 0, (cmd, out)
            assert "Traceback" not in out, (cmd, out)
            _check(argv, out, tmp_path, pid)
            ran.append(cmd)
            print(f"ok: {cmd}")
    finally:
        target.kill()
        target.wait()
    assert len(ran) >= 15, ran


def _run_agent(argv, cwd: Path, env: dict) -> str:
    log = cwd / "run.log"
    with open(log, "w") as f:
        agent = subprocess.Popen(argv, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            url = f"http://{env['SPANFLAME_LISTEN']}"
            deadline = time.monotonic() + 90
            while True:
                try:
                    if httpx.get(f"{url}/healthz", timeout=2).json()["processes"] >= 1:
                        break
                except httpx.HTTPError:
                    pass
                assert agent.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.5)
            page = httpx.get(f"{url}/", timeout=10)
            assert page.status_code == 200 and "spanflame" in page.text
            agent.send_signal(signal.SIGINT)
            assert agent.wait(timeout=120) == 0, log.read_text()
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
    return log.read_text()


def _check(argv: list[str], out: str, cwd: Path, pid: int) -> None:
    """What a reader of that README line expects to see."""
    if argv[0] == "go":  # go tool pprof -top ...: a table with at least one row
        assert re.search(r"^\s*[\d.]+\w*\s+[\d.]+%\s+[\d.]+%", out, re.M), (argv, out)
        return
    sub = argv[1]
    if sub in ("attach", "record"):
        if "-o" in argv:
            assert (cwd / argv[argv.index("-o") + 1]).stat().st_size > 0
        else:  # the default name, and how to open it
            assert list(cwd.glob(f"spanflame-{pid}-*.pb.gz")), out
            assert "go tool pprof" in out, out
    elif sub == "render":
        assert (cwd / argv[argv.index("-o") + 1]).stat().st_size > 0
    elif sub == "dump":
        if "--json" in argv:
            assert json.loads(out)
        else:
            assert "Thread" in out or "thread" in out, out
    elif sub == "doctor":
        if "--json" in argv:
            assert json.loads(out)
        else:
            assert "kernel" in out.lower(), out
