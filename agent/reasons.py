"""Why a thread was off CPU: one reason per wait, from what the kernel saw when it blocked.

Reasons: `lock`, `gil`, `sync` (waiting for another thread to signal: a condition, event, queue,
future, join or barrier; idle workers, not contention), `io`, `net`, `sleep`, `runqueue`
(runnable but not running) and `other`. Shared by every stack source: the kernel gives the
futex address (a futex inside the interpreter's `_PyRuntime` is the GIL), the kernel stack and
the task state; the Python stack the thread blocked in tells a signal wait from a lock.
"""

from __future__ import annotations

from agent.model import Frame, Stack

REASONS = ("lock", "gil", "sync", "io", "net", "sleep", "runqueue", "other")

MARKERS = {
    "lock": "[lock wait]", "gil": "[GIL wait]", "sync": "[waiting for another thread]",
    "io": "[io wait]", "net": "[net wait]", "sleep": "[sleep]", "runqueue": "[runqueue wait]",
    "other": "[off-cpu]",
}
MARKER_FRAMES = {k: (Frame(v),) for k, v in MARKERS.items()}
#: Which wait sample type each reason adds to (besides off_cpu).
WAIT_TYPE = {"lock": "lock_wait", "gil": "gil_wait", "io": "io_wait", "net": "net_wait"}

_IO_HINTS = ("io_schedule", "blk_", "folio_wait", "wait_on_page", "bit_wait_io", "jbd2",
             "ext4_sync", "ext4_fsync", "xfs_", "btrfs_", "__wait_on_buffer", "submit_bio_wait",
             "filemap_fdatawait", "file_write_and_wait", "wait_for_completion_io",
             "blkdev_", "iomap_dio", "nfs_")
_NET_HINTS = ("sk_wait_data", "inet_csk_accept", "tcp_recvmsg", "sk_stream_wait",
              "inet_wait_for_connect", "__inet_stream_connect", "unix_stream_", "tcp_sendmsg",
              "sock_", "__sys_recv", "__sys_accept", "udp_recvmsg", "do_epoll_wait", "ep_poll",
              "do_sys_poll", "do_select", "core_sys_select")
_SLEEP_HINTS = ("do_nanosleep", "hrtimer_nanosleep", "clock_nanosleep")
_LOCK_HINTS = ("futex_", "rwsem_down", "mutex_lock", "__mutex_lock", "rt_mutex")

#: Innermost Python frames (function, file name) of a thread waiting to be signalled by another:
#: threading's condition waits (Event.wait, Queue.get, Future.result and Barrier.wait all end in
#: Condition.wait), joins, and the pools' idle workers.
_SYNC_FRAMES = {
    ("Condition.wait", "threading.py"), ("Condition.wait_for", "threading.py"),
    ("Event.wait", "threading.py"), ("Barrier.wait", "threading.py"),
    ("Barrier._wait", "threading.py"), ("Thread.join", "threading.py"),
    ("Thread._wait_for_tstate_lock", "threading.py"), ("_shutdown", "threading.py"),
    ("Queue.get", "queue.py"), ("Future.result", "_base.py"), ("Future.exception", "_base.py"),
    ("wait", "_base.py"), ("as_completed", "_base.py"), ("_worker", "thread.py"),
    ("SimpleQueue.get", "queue.py"), ("ApplyResult.wait", "pool.py"),
    ("ApplyResult.get", "pool.py"),
}


# x86-64 system call numbers a thread can block in, where the call says why.
_SLEEP_SYSCALLS = {35, 230}                  # nanosleep, clock_nanosleep
_SELECT_SYSCALLS = {23, 270}                 # select, pselect6: with no descriptors, a sleep
_IO_SYSCALLS = {74, 75, 162, 277, 306}       # fsync, fdatasync, sync, sync_file_range, syncfs


def is_sync_wait(pystack: Stack) -> bool:
    """Whether the innermost Python frame is a wait for another thread's signal."""
    for f in pystack:
        if f.filename.startswith("["):
            continue
        base = f.filename.rsplit("/", 1)[-1]
        return (f.name, base) in _SYNC_FRAMES
    return False


def classify(wait, gil_range: tuple[int, int] | None) -> str:
    """The reason of one wait: anything with `blocked`, `futex_addr`, `kstack`, `state` and
    (optionally) `pystack`, such as probes.records.Run and ShortWaits.

    Waiting in poll/select/epoll counts as net: in Python services that is almost always a
    socket (asyncio, selectors, socket timeouts).
    """
    if not wait.blocked:
        return "runqueue"
    pystack = getattr(wait, "pystack", ())
    nr = getattr(wait, "syscall", -1)
    if nr in _SLEEP_SYSCALLS or (nr in _SELECT_SYSCALLS and getattr(wait, "arg0", 1) == 0):
        return "sleep"  # CPython 3.10's time.sleep is an empty select()
    if nr in _IO_SYSCALLS:
        return "io"
    if wait.futex_addr:
        if gil_range and gil_range[0] <= wait.futex_addr < gil_range[1]:
            return "gil"
        return "sync" if pystack and is_sync_wait(pystack) else "lock"
    for f in wait.kstack:
        n = f.name
        if n.startswith(_LOCK_HINTS):
            return "sync" if pystack and is_sync_wait(pystack) else "lock"
        if n.startswith(_IO_HINTS):
            return "io"
        if n.startswith(_NET_HINTS):
            return "net"
        if n.startswith(_SLEEP_HINTS):
            return "sleep"
    if wait.state == 2:  # uninterruptible sleep: almost always IO
        return "io"
    return "other"
