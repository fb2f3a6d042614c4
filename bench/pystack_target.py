"""A Python target whose threads run at a known stack depth, for the kernel walker benchmarks.

    python pystack_target.py MODE DEPTH [THREADS]

Every worker thread recurses until its Python stack is DEPTH frames deep (counting the thread's
own bootstrap frames and the leaf), then, in the leaf frame:

  spin    THREADS threads (default 1) loop on CPU: CPU samples at DEPTH frames;
  lock    two threads hand a turn to each other through two locks, each blocking on the lock
          the other one holds (THREADS ignored): tens of thousands of short lock (and GIL)
          waits a second, all at DEPTH frames;
  sleep   THREADS threads (default 4) each sleep 1.1 ms in a loop: waits over the 1 ms off-CPU
          threshold, one record each;
  idle    THREADS threads (default 4) block on an Event for ever: no events at all.

When every worker is at its depth it prints one JSON line {"pid", "depth", "tids"} (depth as
the leaf frame counts it) and runs until its stdin closes. Standard library only: it runs under
every interpreter the walker supports.
"""

import json
import os
import sys
import threading
import time

MODE = sys.argv[1]
DEPTH = int(sys.argv[2])
NTHREADS = int(sys.argv[3]) if len(sys.argv) > 3 else {"spin": 1, "sleep": 4, "idle": 4}.get(MODE, 2)

ready = []
ready_lock = threading.Lock()
all_ready = threading.Event()
nworkers = 2 if MODE == "lock" else NTHREADS


def frames_here(up=1):
    """How deep the frame `up` levels above this one is (1: the caller)."""
    f, n = sys._getframe(up), 0
    while f is not None:
        n += 1
        f = f.f_back
    return n


def at_depth(leaf, *args):
    # this frame is frames_here() deep; the leaf called from it is one deeper
    if frames_here() + 1 >= DEPTH:
        return leaf(*args)
    return at_depth(leaf, *args)


def report():
    with ready_lock:
        ready.append((threading.get_native_id(), frames_here(2)))  # the leaf's depth
        if len(ready) == nworkers:
            all_ready.set()


def spin():
    report()
    x = 0
    while True:
        x += 1


def sleep():
    report()
    while True:
        time.sleep(0.0011)


def idle():
    report()
    threading.Event().wait()


a, b = threading.Lock(), threading.Lock()
a.acquire()
b.acquire()


def ping():
    report()
    all_ready.wait()
    while True:
        b.release()
        a.acquire()


def pong():
    report()
    all_ready.wait()
    while True:
        b.acquire()
        a.release()


leaves = {"spin": [spin] * NTHREADS, "sleep": [sleep] * NTHREADS, "idle": [idle] * NTHREADS,
          "lock": [ping, pong]}[MODE]
for i, leaf in enumerate(leaves):
    threading.Thread(target=at_depth, args=(leaf,), name=f"{MODE}{i}", daemon=True).start()
all_ready.wait()
print(json.dumps({"pid": os.getpid(), "mode": MODE, "depth": max(d for _t, d in ready),
                  "tids": [t for t, _d in ready]}), flush=True)
sys.stdin.read()
os._exit(0)
