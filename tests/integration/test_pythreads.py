"""probes.pythreads against real CPython processes of every supported version, and garbage.

The target (tests/programs/named_threads.py) reports {native_id: name} of its own threads from
inside; what we read from outside must be exactly that, names cut at MAX_NAME_CHARS. The last
tests feed the reader random memory, in a fake and in a live process, and a process that exited.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from agent.errors import NoSuchProcess
from probes.pyprocess import (OFFSETS, MemoryReadError, ProcessMemory, PyProcess, inspect,
                              plausible)
from probes.pythreads import MAX_NAME_CHARS, thread_names
from tests.support import PROGRAMS, is_root


def live(test):
    """The marks of a test that reads a real process's memory."""
    for mark in (pytest.mark.integration, pytest.mark.root,
                 pytest.mark.skipif(not is_root(), reason="reading /proc/PID/mem needs root")):
        test = mark(test)
    return test


PYENV = Path.home() / ".pyenv" / "versions"
INTERPRETERS = {
    "3.10": PYENV / "3.10.13" / "bin" / "python3.10",
    "3.11": PYENV / "3.11.7" / "bin" / "python3.11",
    "3.12": PYENV / "3.12.1" / "bin" / "python3.12",
    "3.13": PYENV / "3.13.0" / "bin" / "python3.13",
    "debian-3.11": Path("/usr/bin/python3"),
}


@contextmanager
def running(python: Path, *args: str):
    """named_threads.py (or `python *args` if args start with -c) and its JSON line."""
    if not python.exists():
        pytest.skip(f"{python} is not installed")
    argv = list(args) if args[:1] == ("-c",) else [str(PROGRAMS / "named_threads.py"), *args]
    proc = subprocess.Popen([str(python), *argv],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, encoding="utf-8")
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        info = json.loads(line)
        info["threads"] = {int(k): v for k, v in info["threads"].items()}
        yield proc, info
    finally:
        proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()


@pytest.fixture(scope="module", params=list(INTERPRETERS))
def target(request):
    with running(INTERPRETERS[request.param]) as (proc, info):
        with ProcessMemory(proc.pid) as mem:
            yield inspect(proc.pid), info, mem


def expected(pp, info) -> dict[int, str]:
    names = {native: name[:MAX_NAME_CHARS] for native, name in info["threads"].items()}
    if pp.version < (3, 11):  # 3.10 thread states hold no native id to fall back to
        del names[info["cleared"]]
    return names


@pytest.mark.parametrize("call", ["first", "repeat"])
@live
def test_names_are_what_the_threads_report_about_themselves(target, call):
    pp, info, mem = target
    names = thread_names(pp, mem)
    assert names == expected(pp, info)
    assert names.errors == (1 if pp.version < (3, 11) else 0), names.error
    values = set(names.values())
    assert {"MainThread", "café-worker", "работник", "𠀋", "renamed", "subclass-ö",
            "dict-materialized", "many-attrs"} <= values
    assert "to-rename" not in values
    assert sum(name.startswith("pool_") for name in values) == 50
    assert "long-" + "x" * (MAX_NAME_CHARS - 5) in values
    exited_name, exited_native = info["exited"]
    assert exited_name not in values and exited_native not in names


@live
def test_a_thread_without_native_id_is_found_through_its_thread_state(target):
    pp, info, mem = target
    names = thread_names(pp, mem)
    if pp.version < (3, 11):
        assert info["cleared"] not in names and "3.10" in names.error
    else:
        assert names[info["cleared"]] == "no-native-id"


def heap(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            if line.rstrip().endswith("[heap]"):
                start, end = line.split()[0].split("-")
                return int(start, 16), int(end, 16)
    pytest.skip("the target has no [heap] mapping")


@live
def test_an_interpreter_pointer_into_random_heap_gives_nothing_and_never_raises(target):
    pp, _, mem = target
    start, end = heap(pp.pid)
    rng = random.Random(7)
    for _ in range(200):
        bogus = dataclasses.replace(pp, interp=rng.randrange(start, end - 8192) & ~7)
        names = thread_names(bogus, mem)
        assert names == {} and names.errors == 1 and names.error


class CorruptingMemory:
    """A live process's memory where one read in `every` (at random) comes back wrong: random
    bytes, or the right bytes with one word replaced by a pointer into the heap."""

    def __init__(self, mem: ProcessMemory, seed: int, heap: tuple[int, int], every: int = 20):
        self.mem, self.rng, self.heap, self.every = mem, random.Random(seed), heap, every
        self.corrupted = 0

    def read(self, addr: int, size: int) -> bytes:
        data = self.mem.read(addr, size)
        if self.rng.randrange(self.every):
            return data
        self.corrupted += 1
        if size < 8 or self.rng.random() < 0.3:
            return self.rng.randbytes(size)
        at = self.rng.randrange(0, size - 7) & ~7
        word = self.rng.randrange(*self.heap) & ~7
        return data[:at] + word.to_bytes(8, "little") + data[at + 8:]

    def u64(self, addr: int) -> int:
        return int.from_bytes(self.read(addr, 8), "little")

    def ptr(self, addr: int, what: str) -> int:
        if (value := self.u64(addr)) & 7 or not plausible(value):
            raise MemoryReadError(f"{what} is not a valid pointer ({value:#x})")
        return value


@live
def test_corrupted_reads_of_a_live_process_never_raise(target):
    pp, info, mem = target
    truth, calls_with_errors = expected(pp, info), 0
    usual_errors = 1 if pp.version < (3, 11) else 0  # the thread without _native_id on 3.10
    for seed in range(150):
        corrupt = CorruptingMemory(mem, seed, heap(pp.pid))
        names = thread_names(pp, corrupt)
        assert all(type(k) is int and k > 0 and type(v) is str and len(v) <= MAX_NAME_CHARS
                   for k, v in names.items())
        calls_with_errors += names.errors > usual_errors
        if not corrupt.corrupted:
            assert names == truth
    assert calls_with_errors > 0
    assert thread_names(pp, mem) == truth  # hints left by corrupted reads are checked


@live
@pytest.mark.parametrize("version", list(INTERPRETERS))
def test_a_process_that_never_imported_threading_has_no_names_and_no_errors(version):
    program = ("import json, sys; print(json.dumps({'threads': {}, 'imported': 'threading' in "
               "sys.modules}), flush=True); sys.stdin.read()")
    with running(INTERPRETERS[version], "-c", program) as (proc, info):
        if info["imported"]:
            pytest.skip(f"python {version} imports threading at startup")
        with ProcessMemory(proc.pid) as mem:
            names = thread_names(inspect(proc.pid), mem)
    assert names == {} and names.errors == 0, names.error


@live
def test_a_process_that_exited_or_is_a_zombie_raises_no_such_process():
    with running(INTERPRETERS["3.12"], "0") as (proc, _):
        pp = inspect(proc.pid)
        with ProcessMemory(proc.pid) as mem:
            assert thread_names(pp, mem)
            proc.kill()
            for _ in range(500):  # a zombie until we wait for it, once its threads are gone
                zombie = Path(f"/proc/{proc.pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
                if zombie and os.listdir(f"/proc/{proc.pid}/task") == [str(proc.pid)]:
                    break
                time.sleep(0.01)
            with pytest.raises(NoSuchProcess):
                thread_names(pp, mem)
            proc.wait()
            with pytest.raises(NoSuchProcess):
                thread_names(pp, mem)


class RandomMemory:
    """A fake ProcessMemory: `size` bytes at `base`, u64s that are mostly pointers back into
    itself (so that a reader follows them deep), the rest random; anything else unmapped."""

    def __init__(self, seed: int, base: int = 0x5555_0000_0000, size: int = 1 << 16) -> None:
        rng = random.Random(seed)
        words = [base + rng.randrange(0, size, 8) if rng.random() < 0.7 else
                 rng.getrandbits(rng.choice((8, 32, 64))) for _ in range(size // 8)]
        self.base, self.data = base, b"".join(w.to_bytes(8, "little") for w in words)

    def read(self, addr: int, size: int) -> bytes:
        at = addr - self.base
        if at < 0 or at + size > len(self.data) or size <= 0:
            raise MemoryReadError(f"unmapped {addr:#x}")
        return self.data[at:at + size]

    def u64(self, addr: int) -> int:
        return int.from_bytes(self.read(addr, 8), "little")

    def ptr(self, addr: int, what: str) -> int:
        if (value := self.u64(addr)) & 7 or not self.base <= value < self.base + len(self.data):
            raise MemoryReadError(f"{what} is not a valid pointer ({value:#x})")
        return value


@pytest.mark.parametrize("minor", [10, 11, 12, 13])
def test_random_memory_gives_nothing_and_never_raises(minor):
    for seed in range(150):
        mem, rng = RandomMemory(seed), random.Random(-seed)
        at = lambda: mem.base + rng.randrange(0, 1 << 15, 8)  # noqa: E731
        proc = PyProcess(pid=os.getpid(), version=(3, minor), path="python", load_bias=0,
                         runtime_addr=at(), interp=at(), code_type=at(), unicode_type=at(),
                         bytes_type=at(), tss_key=0, tss_off=0, threads_seen=1,
                         threads_matched=1, offsets=OFFSETS[minor])
        names = thread_names(proc, mem)
        assert names == {} and names.errors == 1, (seed, names.error)
