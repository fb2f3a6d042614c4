"""Every thread's CPython stack, walked from user space through /proc/PID/mem.

The kernel walker (probes/pystack.h) sees a thread's stack only when the thread runs or blocks.
Two things need it at other moments: threads already blocked when we start watching a process
(their wait began before the probes were attached, so their stack is read here and written into
the kernel's per-thread slot) and a one-off dump of every thread without py-spy.

`thread_stacks()` records frames exactly as the kernel does: (code address, instr, check), where
`instr` is 3.10's f_lasti (as a u32) or, for 3.11+, the byte distance from the code object to the
frame's instruction pointer, and `check` is `pyprocess.code_check` of the code object; innermost
first, 3.12+ C-stack shim frames (owner 3) skipped, at most `max_frames` (the innermost) kept.

The target keeps running while we read it: a running thread's stack can be torn. Everything read
is validated (pointers, code object type, frame owner, instruction bounds) and a stack that fails
keeps the frames read so far, with the reason in `ThreadStack.error`. All loops are bounded.
"""

from __future__ import annotations

import os
import struct
from array import array
from dataclasses import dataclass

from agent.errors import NoSuchProcess
from probes.pyprocess import (MAX_THREADS, MemoryReadError, ProcessMemory, PyProcess, Unsupported,
                              _readable_prefix, code_check, plausible)

MAX_STACK_FRAMES = 128  # PY_MAX_FRAMES in probes/pystack.h
MAX_INSTR_DELTA = 1 << 24  # 3.11+: the kernel's bound on instr_ptr - code
PTHREAD_SCAN_BYTES = 0x1000  # where in glibc's struct pthread (at fsbase) to look for `tid`
_OWNER_CSTACK = 3  # 3.12+: a shim/entry frame owned by the C stack
_CODE_BYTES = 80  # ob_type (8), ob_size (16) and the check's fields lie in the first 80 bytes
_LIST_TRIES = 3  # re-reads of the interpreter's thread list when it changes under us

Frame = tuple[int, int, int]  # (code address, instr, check), as the kernel's struct py_frame


@dataclass(frozen=True)
class ThreadStack:
    """One thread's Python stack. `frames` innermost first; `truncated`: outer frames were cut;
    `tstate`: its PyThreadState*; `error`: why the walk stopped early ("" if it did not)."""

    frames: tuple[Frame, ...]
    truncated: bool
    tstate: int
    error: str = ""


def thread_stacks(proc: PyProcess, mem: ProcessMemory,
                  max_frames: int = MAX_STACK_FRAMES) -> dict[int, ThreadStack]:
    """The Python stack of every thread of the main interpreter, by host thread id (as
    /proc/PID/task lists it). Thread states that map to no live thread (exited, or 3.12+ not yet
    bound) are left out. Raises NoSuchProcess if the process is gone and MemoryReadError if its
    thread list cannot be read consistently, Unsupported (3.10) if glibc's struct pthread holds
    no recognisable thread id; a stack that cannot be read has `error` set.
    Cost: a few preads per thread, one per frame and one per distinct code object; about
    0.5 ms for 10 threads of 20 frames (Python overhead dominates the preads).
    """
    o = proc.offsets
    for _ in range(_LIST_TRIES):  # threads starting or exiting meanwhile: read again
        tstates = _tstates(proc, mem)
        ns_pid, ns_to_host = task_ids(proc.pid)
        if o.ts_native_thread_id is not None:
            ns_tids = [_u64(head, o.ts_native_thread_id) for _, head in tstates]
            break
        # 3.10: thread_id is pthread_self(), i.e. glibc's struct pthread, which holds the tid
        fsbases = [_u64(head, o.ts_thread_id) for _, head in tstates]
        off, by_fsbase = pthread_tids(mem, fsbases, set(ns_to_host), ns_pid)
        if off is not None:
            ns_tids = [by_fsbase.get(fs, 0) for fs in fsbases]
            break
    else:
        raise Unsupported("cannot find the thread id in glibc's struct pthread of the threads")
    walker = _Walker(proc, mem, max(0, max_frames))
    out: dict[int, ThreadStack] = {}
    for (tstate, head), ns_tid in zip(tstates, ns_tids):
        tid = ns_to_host.get(ns_tid)
        if tid is None:
            continue
        if tid in out and not _owns_tss(proc, mem, head, tstate):
            continue  # two thread states of one thread: the kernel follows the TSD slot
        out[tid] = walker.walk(tstate, head)
    return out


def task_ids(pid: int) -> tuple[int, dict[int, int]]:
    """(the process's pid in its own PID namespace, {namespace tid: host tid}) of its threads.

    /proc/PID/status `NStgid:` and each task's `NSpid:` list the ids from our namespace down to
    the process's own; the last one is what the process sees (native_thread_id, gettid()).
    """
    try:
        host = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        nstgid = _status_ids(f"/proc/{pid}/status", "NStgid:")
    except (FileNotFoundError, ProcessLookupError):
        raise NoSuchProcess(f"no process {pid}") from None
    if len(nstgid) < 2:  # our own namespace: ids are the host's
        return pid, {t: t for t in host}
    mapping = {}
    for tid in host:
        try:
            mapping[_status_ids(f"/proc/{pid}/task/{tid}/status", "NSpid:")[-1]] = tid
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue  # the thread exited meanwhile
    return nstgid[-1], mapping


def _status_ids(path: str, field: str) -> list[int]:
    with open(path) as f:
        for line in f:
            if line.startswith(field):
                return [int(v) for v in line.split()[1:]]
    return []


def pthread_tids(mem: ProcessMemory, fsbases: list[int], tids: set[int],
                 pid: int) -> tuple[int | None, dict[int, int]]:
    """3.10: (offset of `tid` in glibc's struct pthread, {fsbase: tid}), or (None, {}).

    Calibrated, never assumed: the offset (4-aligned, below PTHREAD_SCAN_BYTES) where every
    readable struct pthread (at a thread's fsbase) holds a distinct id of the process's threads
    (`tids`, namespace ids) and one of them, the main thread's, the process's own `pid`.
    Offsets still ambiguous but mapping every thread alike are equivalent: the lowest is taken.
    """
    windows: dict[int, array] = {}
    for fs in dict.fromkeys(fsbases):  # a new thread's state briefly holds its parent's
        if fs & 7 or not plausible(fs):
            continue
        raw = _readable_prefix(mem, fs, PTHREAD_SCAN_BYTES)
        if len(raw) >= 4:
            windows[fs] = array("I", raw[:len(raw) & ~3])
    span = min((len(w) for w in windows.values()), default=0)
    needle, at = struct.pack("<I", pid), set()  # where some thread holds the pid: few places
    for w in windows.values():
        raw = w.tobytes()
        pos = raw.find(needle)
        while pos >= 0:  # at most len(raw) steps
            if pos % 4 == 0 and pos // 4 < span:
                at.add(pos // 4)
            pos = raw.find(needle, pos + 1)
    candidates = []
    for i in sorted(at):
        values = [w[i] for w in windows.values()]
        if len(set(values)) == len(values) and tids.issuperset(values):
            candidates.append(i)
    if not candidates or len({tuple(w[i] for w in windows.values()) for i in candidates}) > 1:
        return None, {}
    return candidates[0] * 4, {fs: w[candidates[0]] for fs, w in windows.items()}


class _Walker:
    """Walks frame chains of one process for one thread_stacks() call (code checks cached)."""

    def __init__(self, proc: PyProcess, mem: ProcessMemory, max_frames: int) -> None:
        o = proc.offsets
        self.proc, self.mem, self.max_frames, self.o = proc, mem, max_frames, o
        self.legacy = proc.version < (3, 11)
        self.frame_bytes = max(o.f_instr + (4 if self.legacy else 8), (o.f_owner or 0) + 1,
                               o.f_code + 8, o.f_previous + 8)
        self.max_owner = 2 if proc.version < (3, 12) else _OWNER_CSTACK
        self.codes: dict[int, tuple[int, int]] = {}  # code address -> (check, code units)
        # frames skipped (shims) do not count toward max_frames; a chain is never that long
        self.max_steps = 4 * max_frames + 64

    def walk(self, tstate: int, head: bytes) -> ThreadStack:
        frames: list[Frame] = []
        try:
            frame = self._first_frame(head)
        except MemoryReadError as exc:
            return ThreadStack((), False, tstate, f"thread state: {exc}")
        seen: set[int] = set()
        error, steps = "", 0
        while frame:
            if len(frames) >= self.max_frames or steps >= self.max_steps:
                return ThreadStack(tuple(frames), True, tstate, "")
            steps += 1
            if frame in seen:
                error = f"frame chain loops at {frame:#x}"
                break
            seen.add(frame)
            try:
                entry, frame = self._frame(frame)
            except MemoryReadError as exc:
                error = str(exc)
                break
            if entry is not None:
                frames.append(entry)
        return ThreadStack(tuple(frames), False, tstate, error)

    def _first_frame(self, head: bytes) -> int:
        o = self.o
        frame = _u64(head, o.ts_frame)
        if o.cf_current is not None and frame:  # 3.11/3.12: tstate->cframe->current_frame
            _check_ptr(frame, "cframe")
            frame = self.mem.u64(frame + o.cf_current)
        if frame:
            _check_ptr(frame, "innermost frame")
        return frame

    def _frame(self, addr: int) -> tuple[Frame | None, int]:
        """(the frame's entry, or None for a skipped shim; the next frame out, or 0)."""
        o = self.o
        raw = self.mem.read(addr, self.frame_bytes)
        code, prev = _u64(raw, o.f_code), _u64(raw, o.f_previous)
        if prev:
            _check_ptr(prev, f"frame {addr:#x}: previous frame")
        if self.legacy:
            lasti = struct.unpack_from("<i", raw, o.f_instr)[0]
            if not -1 <= lasti < MAX_INSTR_DELTA:
                raise MemoryReadError(f"frame {addr:#x}: f_lasti {lasti} out of range")
            check, _ = self._code(code, addr)
            return (code, lasti & 0xFFFFFFFF, check), prev
        owner = raw[o.f_owner]
        if owner > self.max_owner:
            raise MemoryReadError(f"frame {addr:#x}: owner {owner} out of range")
        if owner == _OWNER_CSTACK:
            return None, prev
        delta = _u64(raw, o.f_instr) - code
        if not 0 < delta <= MAX_INSTR_DELTA:
            raise MemoryReadError(f"frame {addr:#x}: instruction pointer outside its code")
        check, units = self._code(code, addr)
        # 3.11/3.12 prev_instr starts one unit before the first instruction
        if not o.co_code_adaptive - 2 <= delta <= o.co_code_adaptive + 2 * units:
            raise MemoryReadError(f"frame {addr:#x}: instruction pointer outside its code")
        return (code, delta, check), prev

    def _code(self, code: int, frame: int) -> tuple[int, int]:
        """(check, size in code units) of the code object at `code`, validated."""
        if (known := self.codes.get(code)) is not None:
            return known
        if code & 7 or not plausible(code):
            raise MemoryReadError(f"frame {frame:#x}: bad code object pointer {code:#x}")
        raw = self.mem.read(code, _CODE_BYTES)
        if _u64(raw, 8) != self.proc.code_type:
            raise MemoryReadError(f"frame {frame:#x}: {code:#x} is not a code object")
        o = self.o

        def i32(off: int) -> int:
            return struct.unpack_from("<i", raw, off)[0]

        check = code_check(i32(o.co_firstlineno), i32(o.co_argcount),
                           i32(o.co_kwonlyargcount), i32(o.co_flags))
        units = _u64(raw, 16) if not self.legacy else 0  # 3.11+: ob_size, in code units
        if units > MAX_INSTR_DELTA:
            raise MemoryReadError(f"frame {frame:#x}: code object {code:#x} is implausibly big")
        self.codes[code] = (check, units)
        return check, units


def _tstates(proc: PyProcess, mem: ProcessMemory) -> list[tuple[int, bytes]]:
    """(tstate, its first bytes) for the main interpreter's thread list, read consistently."""
    o = proc.offsets
    size = max(o.ts_next, o.ts_interp, o.ts_frame, o.ts_thread_id,
               o.ts_native_thread_id or 0) + 8
    problem = ""
    for _ in range(_LIST_TRIES):  # a thread starting or exiting can tear the list: read again
        out: list[tuple[int, bytes]] = []
        seen: set[int] = set()
        try:
            addr = mem.u64(proc.interp + o.interp_threads)
            while addr and len(out) < MAX_THREADS:
                _check_ptr(addr, "thread state")
                if addr in seen:
                    raise MemoryReadError(f"the thread list loops at {addr:#x}")
                head = mem.read(addr, size)
                if _u64(head, o.ts_interp) != proc.interp:
                    raise MemoryReadError(f"thread state {addr:#x} belongs to no interpreter")
                seen.add(addr)
                out.append((addr, head))
                addr = _u64(head, o.ts_next)
            return out
        except MemoryReadError as exc:
            problem = str(exc)
            if not os.path.exists(f"/proc/{proc.pid}"):
                raise NoSuchProcess(f"process {proc.pid} exited") from None
    raise MemoryReadError(f"cannot read the thread list of process {proc.pid}: {problem}")


def _owns_tss(proc: PyProcess, mem: ProcessMemory, head: bytes, tstate: int) -> bool:
    """Whether the thread's TSD slot of autoTSSkey (what the kernel reads) holds `tstate`."""
    fsbase = _u64(head, proc.offsets.ts_thread_id)
    try:
        return plausible(fsbase) and mem.u64(fsbase + proc.tss_off) == tstate
    except MemoryReadError:
        return False


def _u64(raw: bytes, off: int) -> int:
    return int.from_bytes(raw[off:off + 8], "little")


def _check_ptr(addr: int, what: str) -> None:
    if addr & 7 or not plausible(addr):
        raise MemoryReadError(f"{what} is not a valid pointer ({addr:#x})")
