"""A target for probes.pyasync: ~50 asyncio tasks, each suspended in a different kind of await.

Stdlib only. Like the app-side hookup, it keeps `_active_tasks` {id(task coroutine): count} (here
in __main__). Once every task is suspended it prints one JSON line: per task its coroutine id,
kind and its own view of the await chain (walking cr_await / gi_yieldfrom: qualname, file, line
of each coroutine, innermost first, and the type name of what the innermost one awaits), plus
the ids of a coroutine never started, of a finished one and of one executing in another thread
(blocked inside it), then it waits forever.
"""

import asyncio
import gc
import json
import socket
import sys
import threading
import types

_active_tasks: dict[int, int] = {}
_not_a_dict = 12345


async def nap():
    await asyncio.sleep(3600)


async def take_lock(lock):
    async with lock:
        pass


async def fetch(reader):
    return await reader.read(100)


async def wait_for_other(other):
    await other


@types.coroutine
def legacy_wait(fut):  # a generator-based coroutine in the middle of a chain
    return (yield from fut)


class Custom:
    """An awaitable whose __await__ is a plain generator: a leaf, not followed."""

    def __init__(self, fut):
        self.fut = fut

    def __await__(self):
        return (yield from self.fut)


async def busy(entered, blocker):
    entered.set()
    blocker.wait()  # blocks the thread that drives this coroutine: it stays executing


async def deep(n):
    if n:
        await deep(n - 1)
    else:
        await nap()


async def hold(lock, locked):
    async with lock:
        locked.set()
        await nap()


async def job(kind, arg):
    """Every task runs this: the chain's outermost frame."""
    if kind == "nap":
        await nap()
    elif kind == "lock":
        await take_lock(arg)
    elif kind == "fetch":
        await fetch(arg)
    elif kind == "task":
        await wait_for_other(arg)
    elif kind == "legacy":
        await legacy_wait(arg)
    elif kind == "deep":
        await deep(arg)
    elif kind == "custom":
        await Custom(arg)


def qualname(code):
    return getattr(code, "co_qualname", code.co_name)  # 3.10: the kernel only has co_name


def own_view(coro):
    """([(qualname, file, line)] innermost first, type name of the awaited object or None)."""
    chain, obj = [], coro
    while isinstance(obj, types.CoroutineType) or (
            isinstance(obj, types.GeneratorType) and obj.gi_code.co_flags & 0x100):
        frame = obj.cr_frame if isinstance(obj, types.CoroutineType) else obj.gi_frame
        code = frame.f_code
        chain.append([qualname(code), code.co_filename, frame.f_lineno, id(code)])
        obj = obj.cr_await if isinstance(obj, types.CoroutineType) else obj.gi_yieldfrom
    if type(obj).__name__ == "FutureIter":  # look through to its future, as pyasync does
        obj = next(r for r in gc.get_referents(obj) if not isinstance(r, type))
    return chain[::-1], (None if obj is None else type(obj).__name__)


async def main():
    loop = asyncio.get_running_loop()
    lock, locked = asyncio.Lock(), asyncio.Event()
    holder = loop.create_task(hold(lock, locked))
    await locked.wait()
    keep = []  # sockets and streams must outlive the tasks reading them
    plan = [("nap", None)] * 13 + [("lock", lock)] * 10 + [("legacy", None)] * 3
    plan += [("custom", None)]
    plan += [("deep", 6), ("deep", 1)]
    for _ in range(10):
        mine, theirs = socket.socketpair()
        reader, writer = await asyncio.open_connection(sock=mine)
        keep += [mine, theirs, writer]
        plan.append(("fetch", reader))
    tasks = [holder]
    for kind, arg in plan:
        if kind in ("legacy", "custom"):
            arg = loop.create_future()
            keep.append(arg)
        tasks.append(loop.create_task(job(kind, arg)))
    for i in range(10):
        tasks.append(loop.create_task(job("task", tasks[1 + i])))
    kinds = ["hold"] + [k for k, _ in plan] + ["task"] * 10
    for task in tasks:
        _active_tasks[id(task.get_coro())] = _active_tasks.get(id(task.get_coro()), 0) + 1
    for _ in range(200):  # until every task is suspended where it will stay
        await asyncio.sleep(0.01)
        views = [own_view(task.get_coro()) for task in tasks]
        if all(leaf in ("Future", "Task", "generator") for _, leaf in views):
            break
    not_started = job("nap", None)
    finished = job("none", None)
    try:
        finished.send(None)
    except StopIteration:
        pass
    entered, blocker = threading.Event(), threading.Event()
    running = busy(entered, blocker)
    threading.Thread(target=running.send, args=(None,), daemon=True).start()
    while not entered.is_set():
        await asyncio.sleep(0.01)
    report = {
        "pid": __import__("os").getpid(),
        "tasks": [{"coro": id(task.get_coro()), "kind": kind, "chain": chain, "leaf": leaf}
                  for task, kind, (chain, leaf) in zip(tasks, kinds, views)],
        "not_started": id(not_started), "finished": id(finished), "running": id(running),
        "registry": id(_active_tasks), "version": list(sys.version_info[:2]),
    }
    print(json.dumps(report), flush=True)
    keep += [not_started, finished, running]
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
