"""Driving py-spy against a live process and reading its per-sample timeline.

We run `py-spy record --format chrometrace --idle --threads --nonblocking`:

* chrometrace is py-spy's only format with timing: B/E events per frame, merged while a thread's
  stack is unchanged, `ts` in µs since py-spy created its recorder (its first action, so the
  zero is the moment py-spy starts: we take CLOCK_REALTIME just after spawning it);
* `--idle` makes every sample of every thread count, so stack changes are seen when they happen
  rather than when the thread next runs (CPU activity comes from a separate `CpuTimeline`);
* `--threads` puts a root frame `thread (<os tid>): <name>` on every stack, which is how we learn
  the OS thread id, the join key shared with eBPF events and spans;
* `--nonblocking` never pauses the target.

py-spy samples at exponentially distributed intervals (mean 1/rate), which avoids aliasing.
It is stopped with SIGINT at the deadline and then writes its output; it also stops by itself
when the target exits, and we keep what it wrote. py-spy dies with the process that started it
(parent-death signal), and its scratch directory is removed on every exit path
(agent/children.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from agent.children import scratch_dir, spawn
from agent.errors import NoSuchProcess, NotPython, SamplerError, TargetPermissionError
from agent.model import Frame, Stack
from agent.timeline import Slice, ThreadTimeline

_THREAD_FRAME = re.compile(r"^thread \((\d+|0x[0-9A-Fa-f]+)\)(?:: (.*))?$", re.S)
_PYTHON_NAME = re.compile(r"(^|/)(lib)?python\d*(\.\d+)*[dmu]*(\.so[.\d]*)?$")
#: Scratch directories: /tmp/spanflame-pyspy-<pidns>-<owner pid>-<owner start>-<random>
SCRATCH_PREFIX = "spanflame-pyspy-"

#: py-spy's output ends here; bound what we read back.
MAX_TRACE_BYTES = 512 * 1024 * 1024


def pyspy_path() -> str:
    """The py-spy binary: $SPANFLAME_PYSPY, the one beside this interpreter, or on PATH."""
    env = os.environ.get("SPANFLAME_PYSPY")
    if env:
        return env
    beside = Path(sys.executable).parent / "py-spy"
    if beside.exists():
        return str(beside)
    found = shutil.which("py-spy")
    if not found:
        raise SamplerError("py-spy not found: install it with `pip install py-spy` (make setup does)")
    return found


def pyspy_version() -> str:
    out = subprocess.run([pyspy_path(), "--version"], capture_output=True, text=True, timeout=10)
    return out.stdout.strip().removeprefix("py-spy ").strip()


def permission_hint() -> str:
    """What to do about a permission error: as root, asking to run as root is no help."""
    if os.geteuid() != 0:
        return "run as root or with CAP_SYS_PTRACE"
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            scope = f.read().strip()
    except OSError:
        scope = ""
    if scope == "3":
        return "denied even as root: kernel.yama.ptrace_scope is 3 (no attaching at all until reboot)"
    return ("denied even as root: the process may be in another user namespace or protected by "
            "an LSM (AppArmor/SELinux); run spanflame in the target's container or namespace")


def check_target(pid: int) -> psutil.Process:
    """Fail early, with a clear error, for a PID that does not exist or is not Python."""
    try:
        proc = psutil.Process(pid)
        name = proc.name()
    except psutil.NoSuchProcess:
        raise NoSuchProcess(f"no process with PID {pid}") from None
    except psutil.AccessDenied:
        raise TargetPermissionError(
            f"permission denied reading PID {pid}: {permission_hint()}") from None
    if proc.status() == psutil.STATUS_ZOMBIE:
        raise NoSuchProcess(f"PID {pid} has exited (zombie)")
    if not is_python(pid):
        raise NotPython(f"PID {pid} ({name}) is not a Python process")
    return proc


def is_python(pid: int) -> bool:
    """True when the executable or a mapped library looks like a CPython interpreter."""
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except PermissionError:
        raise TargetPermissionError(
            f"permission denied reading PID {pid}: {permission_hint()}") from None
    except OSError:
        exe = ""
    if _PYTHON_NAME.search(exe.removesuffix(" (deleted)")):
        return True
    try:
        with open(f"/proc/{pid}/maps", "rb") as f:
            for line in f:
                path = line.rsplit(b" ", 1)[-1].strip().decode("utf-8", "replace")
                if "libpython" in path and _PYTHON_NAME.search(path):
                    return True
    except PermissionError:
        raise TargetPermissionError(
            f"permission denied reading PID {pid}: {permission_hint()}") from None
    except OSError:
        raise NoSuchProcess(f"no process with PID {pid}") from None
    return False


@dataclass
class Recording:
    """What one py-spy run saw."""

    pid: int
    start_ns: int
    end_ns: int
    threads: dict[int, ThreadTimeline] = field(default_factory=dict)
    #: speedscope runs: number of samples per (os tid, thread name, leaf-first stack)
    counts: dict[tuple[int, str, Stack], int] = field(default_factory=dict)
    samples: int = 0
    errors: int = 0
    target_exited: bool = False


class PySpyRecorder:
    """One `py-spy record` run against `pid`.

    `start()` spawns py-spy (non-blocking); `stop()` asks it to finish early (SIGINT);
    `wait()` waits for it and returns the parsed `Recording`. `close()` kills it if still running
    and removes temporary files; it is idempotent. Not thread-safe.
    """

    def __init__(self, pid: int, *, rate_hz: int = 100, idle: bool = True,
                 nonblocking: bool = True, native: bool = False,
                 output: str = "chrometrace", gil_only: bool = False) -> None:
        if rate_hz < 1 or rate_hz > 10_000:
            raise ValueError("rate must be between 1 and 10000 Hz")
        if output not in ("chrometrace", "speedscope"):
            raise ValueError("output must be chrometrace or speedscope")
        self.output = output
        self.gil_only = gil_only
        self.pid = pid
        self.rate_hz = rate_hz
        self.idle = idle
        self.nonblocking = nonblocking
        self.native = native
        self._proc: subprocess.Popen | None = None
        self._dir: Path | None = None
        self.start_ns = 0
        self._stopped_ns = 0

    def __enter__(self) -> "PySpyRecorder":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def trace_path(self) -> Path:
        assert self._dir is not None
        return self._dir / "trace.json"

    def command(self) -> list[str]:
        cmd = [pyspy_path(), "record", "--pid", str(self.pid), "--rate", str(self.rate_hz),
               "--format", self.output, "--threads", "--output", str(self.trace_path)]
        if self.idle:
            cmd.append("--idle")
        if self.nonblocking:
            cmd.append("--nonblocking")
        if self.native:
            cmd.append("--native")
        if self.gil_only:
            cmd.append("--gil")
        return cmd

    def start(self) -> None:
        if self._proc is not None:
            return
        self._dir = scratch_dir(SCRATCH_PREFIX)
        try:
            with open(self._dir / "stdout", "wb") as out, open(self._dir / "stderr", "wb") as err:
                self._proc = spawn(self.command(), stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=err, start_new_session=True)
        except OSError as exc:
            self.close()
            raise SamplerError(f"cannot run py-spy: {exc.strerror or exc}") from None
        # py-spy creates its chrometrace recorder (ts = 0) as the first thing it does.
        self.start_ns = time.time_ns()
        if self.output == "chrometrace":
            _raise_priority(self._proc.pid)

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        """Ask py-spy to stop sampling and write what it has."""
        if self.running():
            assert self._proc is not None
            self._stopped_ns = time.time_ns()
            try:
                self._proc.send_signal(signal.SIGINT)
            except ProcessLookupError:
                pass

    def wait(self, timeout_s: float = 30.0) -> Recording:
        """Wait for py-spy to finish and return what it recorded; raises on attach failure."""
        assert self._proc is not None, "start() first"
        try:
            rc = self._proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
            raise SamplerError(f"py-spy did not finish within {timeout_s:.0f} s after stop") from None
        end_ns = time.time_ns()
        stdout = self._read("stdout")
        stderr = self._read("stderr")
        if not self.trace_path.exists():
            raise _translate_failure(self.pid, rc, stderr)
        rec = Recording(pid=self.pid, start_ns=self.start_ns, end_ns=end_ns)
        rec.target_exited = "because process exited" in stdout
        m = re.search(r"Samples: (\d+) Errors: (\d+)", stdout)
        if m:
            rec.samples, rec.errors = int(m.group(1)), int(m.group(2))
        size = self.trace_path.stat().st_size
        if size > MAX_TRACE_BYTES:
            raise SamplerError(f"py-spy trace of {size} bytes exceeds the {MAX_TRACE_BYTES} byte bound")
        with open(self.trace_path, "rb") as f:
            try:
                doc = json.load(f)
            except ValueError as exc:
                raise SamplerError(f"py-spy wrote an unreadable trace ({exc})") from None
        if self.output == "chrometrace":
            rec.threads = parse_chrometrace(doc, self.pid, self.start_ns)
        else:
            rec.counts = parse_speedscope(doc)
        return rec

    def _read(self, name: str) -> str:
        assert self._dir is not None
        try:
            return (self._dir / name).read_bytes()[-65536:].decode("utf-8", "replace")
        except OSError:
            return ""

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


def _raise_priority(pid: int) -> None:
    """Give py-spy a little scheduling priority (when allowed), before it starts its threads.

    Its timestamps are taken when its main thread processes a sample; on a busy machine a
    descheduled py-spy stamps samples late. It uses a few percent of a core at most.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, pid, -5)
    except OSError:
        pass


def _thread_of(root_name: str) -> tuple[int, str] | None:
    m = _THREAD_FRAME.match(root_name)
    if not m:
        return None
    raw = m.group(1)
    return (int(raw, 16) if raw.startswith("0x") else int(raw)), (m.group(2) or "")


def parse_speedscope(doc: dict) -> dict[tuple[int, str, Stack], int]:
    """py-spy speedscope output -> sample counts per (os tid, thread name, leaf-first stack).

    With `--threads` every sample's root frame is `thread (<os tid>): <name>`.
    """
    if not isinstance(doc, dict) or not isinstance(doc.get("profiles"), list):
        raise SamplerError("py-spy speedscope output has no profiles")
    raw_frames = (doc.get("shared") or {}).get("frames") or []
    frames = [Frame(str(f.get("name", "")), str(f.get("file") or ""), int(f.get("line") or 0))
              for f in raw_frames]
    counts: dict[tuple[int, str, Stack], int] = {}
    stacks: dict[tuple[int, ...], tuple[int, str, Stack]] = {}
    for prof in doc["profiles"]:
        for sample in prof.get("samples") or []:
            key = tuple(sample)
            k = stacks.get(key)
            if k is None:
                try:
                    root_first = [frames[i] for i in sample]
                except (IndexError, TypeError):
                    continue
                thread = _thread_of(root_first[0].name) if root_first else None
                if thread is None:
                    continue
                k = stacks[key] = (thread[0], thread[1], tuple(reversed(root_first[1:])))
            counts[k] = counts.get(k, 0) + 1
    return counts


def _translate_failure(pid: int, rc: int | None, stderr: str) -> Exception:
    first = next((l.strip() for l in stderr.splitlines() if l.strip().startswith("Error")), "")
    text = stderr.lower()
    if "permission denied" in text or "operation not permitted" in text:
        return TargetPermissionError(
            f"permission denied attaching to PID {pid}: {permission_hint()}")
    if "failed to find python version" in text or "failed to find a python interpreter" in text:
        return NotPython(f"PID {pid} is not a Python process py-spy can read")
    if not psutil.pid_exists(pid) or "no such file or directory" in text or "no such process" in text:
        return NoSuchProcess(f"PID {pid} exited before py-spy could attach")
    detail = first.removeprefix("Error:").strip() or f"exit code {rc}"
    return SamplerError(f"py-spy failed on PID {pid}: {detail}")


def parse_chrometrace(events: list, pid: int, start_ns: int) -> dict[int, ThreadTimeline]:
    """Turn py-spy chrometrace events into per-OS-thread stack timelines.

    Events of one thread (keyed by py-spy's `tid`, the pthread id) are in time order. The root
    frame `thread (<os tid>): <name>` is dropped from stacks and gives the OS tid and name.
    """
    if not isinstance(events, list):
        raise SamplerError("py-spy trace is not a JSON list of events")
    state: dict[int, tuple[list[Frame], int]] = {}  # pthread id -> (root-first frames, since_ts)
    out: dict[int, ThreadTimeline] = {}
    by_pthread: dict[int, ThreadTimeline] = {}
    frames_cache: dict[tuple[str, str, int], Frame] = {}
    stacks_cache: dict[tuple[Frame, ...], Stack] = {}

    def close_slice(ptid: int, frames: list[Frame], since: int, until: int) -> None:
        if until <= since or not frames:
            return
        thread = _thread_of(frames[0].name)
        if thread is not None:
            tid, name = thread
            py = frames[1:]
        else:
            tid, name, py = ptid, "", frames
        tl = by_pthread.get(ptid)
        if tl is None or tl.tid != tid:
            tl = out.get(tid)
            if tl is None:
                tl = out[tid] = ThreadTimeline(pid=pid, tid=tid, name=name)
            by_pthread[ptid] = tl
        if name:
            tl.name = name
        key = tuple(reversed(py))
        stack = stacks_cache.get(key)
        if stack is None:
            stack = stacks_cache[key] = key
        s0, s1 = start_ns + since * 1000, start_ns + until * 1000
        sl = tl.slices
        if sl and sl[-1].stack is stack and sl[-1].end_ns == s0:
            sl[-1] = Slice(sl[-1].start_ns, s1, stack)
        else:
            sl.append(Slice(s0, s1, stack))

    for ev in events:
        try:
            ph = ev["ph"]
            ptid = int(ev["tid"])
            ts = int(ev["ts"])
            name = str(ev["name"])
            args = ev.get("args") or {}
        except (KeyError, TypeError, ValueError):
            continue
        frames, since = state.get(ptid, ([], ts))
        if ts != since:
            close_slice(ptid, frames, since, ts)
            since = ts
        if ph == "B":
            fkey = (name, str(args.get("filename") or ""), int(args.get("line") or 0))
            fr = frames_cache.get(fkey)
            if fr is None:
                fr = frames_cache[fkey] = Frame(*fkey)
            frames.append(fr)
        elif ph == "E" and frames:
            frames.pop()
        state[ptid] = (frames, since)
    return out
