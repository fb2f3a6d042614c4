"""probes.pywalk against real CPython 3.10-3.13 processes, plain and inside a PID namespace.

The target (tests/programs/pyintrospect_target.py) reports from inside, per thread, its native
thread id, PyThreadState* and frames from sys._current_frames(). Every blocked thread's stack
read from outside must be the same: code objects, the kernel's instr and check, and after
symbolization qualname, file and line of every frame.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from contextlib import contextmanager

import pytest

from probes.pyprocess import OFFSETS, ProcessMemory, inspect
from probes.pysymbols import MAX_NAME_CHARS, Symbolizer
from probes.pywalk import MAX_STACK_FRAMES, pthread_tids, task_ids, thread_stacks
from tests.integration.test_pyprocess import INTERPRETERS, kernel_check, kernel_instr
from tests.support import PROGRAMS, is_root

pytestmark = [pytest.mark.integration, pytest.mark.root,
              pytest.mark.skipif(not is_root(), reason="reading /proc/PID/mem needs root")]

BLOCKED = ("lock", "sleep", "recv", "event", "unicode", "deep", "stack0", "stack1")
DEEP = 300


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


@contextmanager
def running(python, *args, namespace=False):
    """(host pid, the target's report) of the target started with `args`, maybe in a new PID
    namespace (unshare forks: the target is unshare's child, pid 1 inside)."""
    if not python.exists():
        pytest.skip(f"{python} is not installed")
    cmd = [str(python), str(PROGRAMS / "pyintrospect_target.py"), *args]
    if namespace:
        cmd = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", *cmd]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        yield (_children(proc.pid)[0] if namespace else proc.pid), json.loads(line)
    finally:
        proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()


def host_tids(pid):
    return {int(t) for t in os.listdir(f"/proc/{pid}/task")}


def assert_same_stack(pp, mem, sym, stack, reported, role):
    """`stack` (from thread_stacks) holds the innermost frames the target reported, as the
    kernel records them, and symbolizes to the same qualname, file and line."""
    assert stack.error == "", role
    expected = reported[:MAX_STACK_FRAMES]
    assert [code for code, _, _ in stack.frames] == [f[0] for f in expected], role
    for (code, instr, check), (_, f_lasti, f_lineno, name, filename, _) in zip(stack.frames,
                                                                               expected):
        assert instr == kernel_instr(pp, f_lasti), role
        assert check == kernel_check(mem, pp, code), role
        assert tuple(sym.frame(code, check, instr)) == (name[:MAX_NAME_CHARS], filename,
                                                        f_lineno or 0), role


@pytest.fixture(scope="module", params=list(INTERPRETERS))
def target(request):
    with running(INTERPRETERS[request.param], f"--deep={DEEP}", "--stacks=2") as (pid, info):
        with ProcessMemory(pid) as mem:
            yield inspect(pid), info, mem


def test_blocked_threads_match_sys_current_frames(target):
    pp, info, mem = target
    stacks = thread_stacks(pp, mem)
    assert set(stacks) == host_tids(pp.pid)  # every thread is a Python thread here
    by_role = {t["role"]: t for t in info["threads"]}
    assert {t["native_thread_id"]: t["tstate"] for t in info["threads"]} == \
        {tid: s.tstate for tid, s in stacks.items()}
    with Symbolizer(pp) as sym:
        for role in BLOCKED:
            thread = by_role[role]
            stack = stacks[thread["native_thread_id"]]
            assert_same_stack(pp, mem, sym, stack, thread["frames"], role)
            assert stack.truncated == (role == "deep"), role
        assert sym.errors == sym.reused == 0
    main = stacks[pp.pid]  # blocked reading stdin in main(), called from <module>
    assert main.error == "" and len(main.frames) == 2 and not main.truncated


def test_deep_recursion_keeps_the_innermost_frames(target):
    pp, info, mem = target
    deep = next(t for t in info["threads"] if t["role"] == "deep")
    assert len(deep["frames"]) == DEEP + 4  # recurse x 301, run, _bootstrap_inner, _bootstrap
    stack = thread_stacks(pp, mem)[deep["native_thread_id"]]
    assert len(stack.frames) == MAX_STACK_FRAMES and stack.truncated and stack.error == ""
    assert [f[0] for f in stack.frames] == [f[0] for f in deep["frames"][:MAX_STACK_FRAMES]]
    whole = thread_stacks(pp, mem, max_frames=1000)[deep["native_thread_id"]]
    assert [f[0] for f in whole.frames] == [f[0] for f in deep["frames"]]
    assert not whole.truncated and whole.error == ""
    few = thread_stacks(pp, mem, max_frames=3)[deep["native_thread_id"]]
    assert few.frames == stack.frames[:3] and few.truncated


def test_a_running_thread_never_raises_and_is_valid_or_flagged(target):
    """The busy thread moves while we read it: each read is a plausible stack or an error."""
    pp, info, mem = target
    cpu = next(t for t in info["threads"] if t["role"] == "cpu")["native_thread_id"]
    names = {"spin_inner", "cpu_bound", "Thread.run", "run", "Thread._bootstrap_inner",
             "_bootstrap_inner", "Thread._bootstrap", "_bootstrap"}
    good = 0
    with Symbolizer(pp) as sym:
        for _ in range(200):
            stack = thread_stacks(pp, mem)[cpu]
            if stack.error:
                continue
            assert {sym.frame(c, k, i).name for c, i, k in stack.frames} <= names
            assert 4 <= len(stack.frames) <= 5
            good += 1
    assert good >= 100


class Corrupting:
    """A ProcessMemory that answers reads of one address range with other bytes: a torn read."""

    def __init__(self, mem, addr, patch):
        self.mem, self.addr, self.patch = mem, addr, patch

    def read(self, addr, size):
        data = bytearray(self.mem.read(addr, size))
        for off, value in self.patch.items():
            if addr <= self.addr + off < addr + size:
                data[self.addr + off - addr:self.addr + off - addr + len(value)] = value
        return bytes(data)

    def u64(self, addr):
        return int.from_bytes(self.read(addr, 8), "little")


def test_torn_reads_are_reported_not_raised(target):
    pp, info, mem = target
    o = pp.offsets
    thread = next(t for t in info["threads"] if t["role"] == "stack0")
    tid = thread["native_thread_id"]
    good = thread_stacks(pp, mem)[tid]
    code = good.frames[-1][0]  # threading's _bootstrap, the outermost
    # a code object whose type is wrong: the walk stops there, keeping the inner frames
    torn = thread_stacks(pp, Corrupting(mem, code, {8: (12345).to_bytes(8, "little")}))[tid]
    assert torn.frames == good.frames[:-1] and "not a code object" in torn.error
    # a frame chain that loops back: bounded, reported
    first = _innermost_frame(pp, mem, thread["tstate"])
    loop = thread_stacks(pp, Corrupting(mem, first, {o.f_previous: first.to_bytes(8, "little")}))
    assert loop[tid].frames == good.frames[:1] and "loops" in loop[tid].error
    if pp.version >= (3, 11):  # an owner byte and an instruction pointer out of range
        bad_owner = Corrupting(mem, first, {o.f_owner: b"\x09"})
        assert "owner" in thread_stacks(pp, bad_owner)[tid].error
        bad_ip = Corrupting(mem, first, {o.f_instr: (code + (1 << 25)).to_bytes(8, "little")})
        assert "outside its code" in thread_stacks(pp, bad_ip)[tid].error
    else:
        bad_lasti = Corrupting(mem, first, {o.f_instr: (1 << 30).to_bytes(4, "little")})
        assert "f_lasti" in thread_stacks(pp, bad_lasti)[tid].error
    # a frame pointer outside user space
    bad = Corrupting(mem, first, {o.f_previous: (1 << 63).to_bytes(8, "little")})
    assert thread_stacks(pp, bad)[tid].frames == () and "previous frame" in \
        thread_stacks(pp, bad)[tid].error


def _innermost_frame(pp, mem, tstate):
    o = pp.offsets
    frame = mem.u64(tstate + o.ts_frame)
    return mem.u64(frame + o.cf_current) if o.cf_current is not None else frame


@pytest.mark.parametrize("name", list(INTERPRETERS))
def test_pid_namespace_threads_are_keyed_by_host_tid(name):
    with running(INTERPRETERS[name], "--stacks=2", namespace=True) as (pid, info):
        assert info["pid"] == 1 != pid  # the target sees itself as pid 1
        ns_pid, ns_to_host = task_ids(pid)
        assert ns_pid == 1 and set(ns_to_host.values()) == host_tids(pid)
        pp = inspect(pid)
        with ProcessMemory(pid) as mem, Symbolizer(pp) as sym:
            stacks = thread_stacks(pp, mem)
            assert set(stacks) == host_tids(pid)
            assert pid in stacks and stacks[pid].error == ""
            for thread in info["threads"]:
                assert thread["native_thread_id"] not in host_tids(pid)  # namespace ids
                stack = stacks[ns_to_host[thread["native_thread_id"]]]
                assert stack.tstate == thread["tstate"]
                if thread["role"] in BLOCKED:
                    assert_same_stack(pp, mem, sym, stack, thread["frames"], thread["role"])


def test_310_tid_offset_is_calibrated_from_the_process():
    """3.10 has no native_thread_id: the tid comes from glibc's struct pthread at fsbase."""
    with running(INTERPRETERS["3.10"], "--stacks=3") as (pid, info):
        pp = inspect(pid)
        o = OFFSETS[10]
        with ProcessMemory(pid) as mem:
            fsbases = [mem.u64(t["tstate"] + o.ts_thread_id) for t in info["threads"]]
            tids = {t["native_thread_id"] for t in info["threads"]}
            off, by_fsbase = pthread_tids(mem, fsbases, tids, pid)
            assert off is not None and off % 4 == 0
            assert sorted(by_fsbase.values()) == sorted(tids)
            for t, fs in zip(info["threads"], fsbases):
                assert by_fsbase[fs] == t["native_thread_id"]
            # without the main thread's pid among the ids, nothing is guessed
            assert pthread_tids(mem, fsbases, tids, 999999) == (None, {})
            assert pthread_tids(mem, fsbases, tids - {pid}, pid) == (None, {})
        print(f"\n3.10 glibc struct pthread tid offset calibrated: {off:#x}")


@pytest.mark.parametrize("name", list(INTERPRETERS))
def test_cost_of_one_call_for_ten_threads(name, capsys):
    """Prints the time of one thread_stacks() call (10 threads of 20 frames, plus main)."""
    with running(INTERPRETERS[name], "--only-extra", "--stacks=10") as (pid, info):
        pp = inspect(pid)
        with ProcessMemory(pid) as mem:
            stacks = thread_stacks(pp, mem)
            assert sorted(len(s.frames) for s in stacks.values())[1:] == [20] * 10
            times = []
            for _ in range(200):
                start = time.perf_counter_ns()
                thread_stacks(pp, mem)
                times.append(time.perf_counter_ns() - start)
    with capsys.disabled():
        print(f"\n{name}: thread_stacks() for 10 threads x 20 frames: median "
              f"{statistics.median(times) / 1e3:.0f} us, min {min(times) / 1e3:.0f} us")

