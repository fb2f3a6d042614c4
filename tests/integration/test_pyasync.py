"""probes.pyasync against real CPython 3.10-3.13 processes (and Debian's 3.11), and garbage.

The target (tests/programs/async_tasks.py) runs 50 asyncio tasks suspended in every kind of await
(asyncio.sleep, a held Lock, a stream read that never gets data, another task, a generator-based
coroutine, a plain-generator awaitable, a 10-deep chain), registers their coroutines in
`__main__._active_tasks`, and reports each task's await chain as it sees it from inside. What
we read from outside must be the same: the registered coroutines, and per task every frame's
code object, qualname, file and line, and the type of what the innermost coroutine awaits.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from agent.errors import NoSuchProcess
from probes import pyasync
from probes.pyasync import MAX_TYPE_NAME, AwaitChain, active_tasks, await_chain
from probes.pyprocess import OFFSETS, ProcessMemory, PyProcess, inspect
from probes.pysymbols import Symbolizer
from tests.integration.test_pythreads import (INTERPRETERS, CorruptingMemory, RandomMemory, heap,
                                              live)
from tests.support import PROGRAMS

KINDS = {"hold", "nap", "lock", "fetch", "task", "legacy", "custom", "deep"}


@contextmanager
def running(python: Path):
    """The target process and its JSON report."""
    if not python.exists():
        pytest.skip(f"{python} is not installed")
    proc = subprocess.Popen([str(python), str(PROGRAMS / "async_tasks.py")],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        yield proc, json.loads(line)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


@pytest.fixture(scope="module", params=list(INTERPRETERS))
def target(request):
    with running(INTERPRETERS[request.param]) as (proc, info):
        pp = inspect(proc.pid)
        with ProcessMemory(proc.pid) as mem, Symbolizer(pp) as sym:
            yield pp, info, mem, sym


def symbolized(sym: Symbolizer, chain: AwaitChain) -> list[list]:
    return [[*sym.frame(code, check, instr), code] for code, instr, check in chain.frames]


@live
def test_active_tasks_are_the_registered_coroutines(target):
    pp, info, mem, _ = target
    found = active_tasks(pp, mem, module="__main__", name="_active_tasks")
    assert found.errors == 0, found.error
    assert found == [task["coro"] for task in info["tasks"]]  # dict order: registration order
    assert len(found) == 50


@live
@pytest.mark.parametrize("module, name", [("agent.otel", "_active_tasks"),  # never imported
                                          ("__main__", "_no_such_name")])
def test_a_missing_module_or_name_gives_nothing_and_no_error(target, module, name):
    pp, _, mem, _ = target
    found = active_tasks(pp, mem, module=module, name=name)
    assert found == [] and found.errors == 0, found.error


@live
def test_a_name_bound_to_something_else_than_a_dict_is_an_error(target):
    pp, _, mem, _ = target
    found = active_tasks(pp, mem, module="__main__", name="_not_a_dict")
    assert found == [] and found.errors == 1 and "not a dict" in found.error


@live
def test_each_chain_is_what_the_task_sees_from_inside(target):
    pp, info, mem, sym = target
    kinds, leaves = set(), set()
    for task in info["tasks"]:
        chain = await_chain(pp, mem, task["coro"])
        assert chain.error == "" and not chain.running, task
        assert symbolized(sym, chain) == task["chain"], task["kind"]
        assert chain.leaf.rpartition(".")[2] == task["leaf"], task["kind"]
        kinds.add(task["kind"])
        leaves.add(chain.leaf)
    assert kinds == KINDS
    assert leaves == {"_asyncio.Future", "_asyncio.Task", "generator"}
    # job, deep(6)..deep(0), nap, sleep; and job, deep(1), deep(0), nap, sleep
    assert [len(t["chain"]) for t in info["tasks"] if t["kind"] == "deep"] == [10, 5]
    by_kind = {t["kind"]: t for t in info["tasks"]}
    assert [name for name, *_ in by_kind["fetch"]["chain"][:2]] == [
        "_wait_for_data" if pp.version < (3, 11) else "StreamReader._wait_for_data",
        "read" if pp.version < (3, 11) else "StreamReader.read"]


@live
def test_a_chain_longer_than_max_depth_keeps_its_outermost_frames(target):
    pp, info, mem, _ = target
    coro = max(info["tasks"], key=lambda t: len(t["chain"]))["coro"]
    full = await_chain(pp, mem, coro)
    cut = await_chain(pp, mem, coro, max_depth=3)
    assert cut == AwaitChain(full.frames[-3:], "coroutine")
    assert await_chain(pp, mem, coro, max_depth=0) == AwaitChain((), "coroutine")


@live
def test_a_coroutine_not_started_finished_or_executing_has_no_chain(target):
    pp, info, mem, _ = target
    for key, what in (("not_started", "not started"), ("finished", "finished")):
        chain = await_chain(pp, mem, info[key])
        assert chain.frames == () and not chain.running and chain.leaf == ""
        assert chain.error == f"coroutine at {info[key]:#x} {what}"
    assert await_chain(pp, mem, info["running"]) == AwaitChain((), "", running=True)


@live
def test_garbage_addresses_give_errors_and_never_raise(target):
    pp, info, mem, _ = target
    coro = info["tasks"][0]["coro"]
    for addr in (0, 1, 8, 0xFFFF_FFFF_FFFF_FFF8, coro + 3, coro + 8, coro - 16, info["registry"]):
        chain = await_chain(pp, mem, addr)
        assert chain.error and chain.frames == () and not chain.running, hex(addr)
    start, end = heap(pp.pid)
    rng = random.Random(11)
    for _ in range(300):
        chain = await_chain(pp, mem, rng.randrange(start, end) & ~7)
        assert chain.error and chain.frames == ()


@live
def test_corrupted_reads_of_a_live_process_never_raise(target):
    pp, info, mem, _ = target
    truth = {t["coro"]: await_chain(pp, mem, t["coro"]) for t in info["tasks"]}
    registered, wrong = list(truth), 0
    for seed in range(100):
        corrupt = CorruptingMemory(mem, seed, heap(pp.pid), every=8)
        found = active_tasks(pp, corrupt, module="__main__", name="_active_tasks")
        assert len(found) <= 50 and all(type(c) is int for c in found)
        if not corrupt.corrupted:
            assert found == registered
        for coro in random.Random(seed).sample(registered, 5):
            corrupt.corrupted = 0
            chain = await_chain(pp, corrupt, coro, max_depth=16)
            assert len(chain.frames) <= 16 and len(chain.leaf) <= MAX_TYPE_NAME
            assert all(type(v) is int for frame in chain.frames for v in frame)
            if not corrupt.corrupted:
                assert chain == truth[coro]
            wrong += chain != truth[coro]
    assert wrong > 0  # the corruption was seen


@live
def test_a_process_that_exited_or_is_a_zombie_raises_no_such_process():
    with running(INTERPRETERS["3.12"]) as (proc, info):
        pp = inspect(proc.pid)
        with ProcessMemory(proc.pid) as mem:
            assert active_tasks(pp, mem, "__main__")
            proc.kill()
            # a zombie until we wait for it; but the leader shows "Z" while its other threads
            # still exit and keep the memory readable (seen on a loaded machine): wait for them
            for _ in range(500):
                state = Path(f"/proc/{proc.pid}/stat").read_text().split(")")[-1].split()[0]
                if state == "Z" and os.listdir(f"/proc/{proc.pid}/task") == [str(proc.pid)]:
                    break
                time.sleep(0.01)
            for reaped in (False, True):
                if reaped:
                    proc.wait()
                with pytest.raises(NoSuchProcess):
                    active_tasks(pp, mem, "__main__")
                with pytest.raises(NoSuchProcess):
                    await_chain(pp, mem, info["tasks"][0]["coro"])


@pytest.mark.parametrize("minor", [10, 11, 12, 13])
def test_random_memory_gives_errors_and_never_raises(minor, monkeypatch):
    for seed in range(150):
        mem, rng = RandomMemory(seed), random.Random(-seed)
        at = lambda: mem.base + rng.randrange(0, 1 << 15, 8)  # noqa: E731
        types = (at(), at())  # &PyCoro_Type, &PyGen_Type somewhere in the fake memory
        monkeypatch.setattr(pyasync, "_gen_types", lambda proc: types)
        proc = PyProcess(pid=os.getpid(), version=(3, minor), path="python", load_bias=0,
                         runtime_addr=at(), interp=at(), code_type=at(), unicode_type=at(),
                         bytes_type=at(), tss_key=0, tss_off=0, threads_seen=1,
                         threads_matched=1, offsets=OFFSETS[minor])
        found = active_tasks(proc, mem)
        assert found == [] and found.errors == 1, (seed, found.error)
        for _ in range(20):
            chain = await_chain(proc, mem, at(), max_depth=8)
            assert chain.error or chain.running, (seed, chain)
            assert len(chain.frames) <= 8
