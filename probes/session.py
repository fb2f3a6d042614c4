"""Loading, running and reading the eBPF probes for a set of target processes.

`ProbeSession.start()` compiles every selected probe as one bcc module and attaches it, in a
short-lived child process that hands the map, program and attachment fds over (probes/loader.py;
this process never maps LLVM or libbcc and reads the maps with probes/bpfsys.py), and fills the
kernel-side target filter. For each target whose interpreter the kernel walker supports
(probes/pyprocess.py), the walker's per-process configuration goes into `py_procs`, and every
record of that process carries the Python stack of its moment; other targets (py-spy does their
stacks) still get their waits, IO and network records. A background thread drains the ring
buffer (the kernel never wakes us: records are written with BPF_RB_NO_WAKEUP) on a timer, reading
its mmapped pages directly (every record available, as bytes, in one call), and symbolises stacks
while the targets are alive. `close()` detaches everything and returns a
`ProbeData`. Nothing here raises for a machine that cannot run probes: the probes are then off,
each with a one-line reason in `off`.

Threading: `start`, `add_target`, `remove_target` and `close` are called from one owner thread;
the drain thread reads the ring buffers and decodes under the session's lock (one consumer).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from typing import Iterable, Sequence

from probes import kheaders, pyruntime, registry
from probes.decode import Decoder, Clock
from probes.records import ProbeData

log = logging.getLogger(__name__)

#: kernel-side counters, in the order of `enum sf_counter` (common.h)
COUNTER_NAMES = ("events_ringbuf_drops", "net_ringbuf_drops", "kernel_stack_errors",
                 "threads_untracked", "thread_map_full", "futex_map_full", "bucket_map_full",
                 "socket_map_full", "waits", "short_waits", "samples", "syscall_unknown")
#: counters that only count what happened (the rest count something lost or unreadable)
_INFO_COUNTERS = frozenset(("waits", "short_waits", "samples", "symbolizer_reused"))


def is_loss(counter: str) -> bool:
    """Whether a counter counts records lost, stacks unreadable or state not kept."""
    return counter not in _INFO_COUNTERS


class ProbeSession:
    def __init__(self, probes: Sequence[str], *, rate_hz: int = 100,
                 offcpu_min_ns: int = 1_000_000, drain_interval_s: float = 0.25,
                 max_records: int = 2_000_000, max_threads: int = 16384,
                 stack_entries: int = 16384, ringbuf_pages: int = 512,
                 per_process_only: bool = False, python_stacks: bool = True) -> None:
        self.requested = [p for p in registry.BPF_PROBES if p in probes]
        self.sample_cpu = "cpu" in probes and python_stacks
        self.rate_hz = rate_hz
        self.offcpu_min_ns = offcpu_min_ns
        self.drain_interval_s = drain_interval_s
        self.max_records = max_records
        self.max_threads = max_threads
        self.stack_entries = stack_entries
        self.ringbuf_pages = ringbuf_pages
        #: read the Python stack in the kernel (False: waits only, py-spy does the stacks)
        self.python_stacks = python_stacks
        #: continuous use: keep records per process only (read with window(), freed by prune())
        self.per_process_only = per_process_only
        self.active: list[str] = []
        self.off: dict[str, str] = {}
        #: pid -> None when the kernel walker reads its Python stacks, else the reason it cannot
        self.walker: dict[int, str | None] = {}
        #: pid -> its probes.pyprocess.PyProcess, for the processes the walker reads
        self.procs: dict = {}
        self.headers: kheaders.Headers | None = None
        self.load_seconds = 0.0
        self.data = ProbeData()
        self._bpf = None
        self._clock = Clock()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rb_events = None
        self._rb_net = None
        self._kept = 0
        self._decoder: Decoder | None = None
        self._targets: set[int] = set()
        self._closed = False

    # -- lifecycle --------------------------------------------------------------------------
    def __enter__(self) -> "ProbeSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def loaded(self) -> bool:
        return self._bpf is not None

    def start(self, pids: Iterable[int]) -> None:
        """Compile and attach; on any failure the probes are off with a reason (no exception)."""
        if not self.requested and not self.sample_cpu:
            return
        t0 = time.monotonic()
        try:
            self._load()
        except _ProbesOff as exc:
            for name in self.requested + (["cpu"] if self.sample_cpu else []):
                self.off.setdefault(name, str(exc))
            self.active = []
            return
        finally:
            self.load_seconds = time.monotonic() - t0
        for pid in pids:
            self.add_target(pid)
        self.data.start_ns = time.time_ns()
        self._thread = threading.Thread(target=self._drain_loop, name="spanflame-probes",
                                        daemon=True)
        self._thread.start()

    def _load(self) -> None:
        if os.geteuid() != 0 and not _has_bpf_caps():
            raise _ProbesOff("no BPF permission: run as root or grant CAP_BPF and CAP_PERFMON")
        plan = registry.plan(self.requested + (["cpu"] if self.sample_cpu else []))
        self.off.update(plan.off)
        if not plan.probes:
            raise _ProbesOff(next(iter(plan.off.values()), "no probe can run here"))
        from probes import btf, loader
        try:
            offs = btf.offsets("task_struct", ["thread.fsbase", "stack"])
        except btf.BtfError as exc:
            offs = {"thread.fsbase": 0, "stack": 0}
            if self.python_stacks:
                self.python_stacks = False
                self.off["python-stacks"] = f"kernel BTF unreadable ({exc}): no stacks in the kernel"
        self.headers = kheaders.resolve(create=True)
        if not self.headers.found:
            raise _ProbesOff(f"no kernel headers: {self.headers.detail}; "
                             "apt-get install linux-headers-amd64")
        kheaders.apply(self.headers)
        cflags = [f"-D{d}" for d in plan.defines] + [
            f"-DOFFCPU_MIN_NS={self.offcpu_min_ns}ULL",
            f"-DSAMPLE_PERIOD_NS={round(1e9 / self.rate_hz)}ULL",
            f"-DMAX_THREADS={self.max_threads}",
            f"-DSTACK_ENTRIES={self.stack_entries}",
            f"-DEVENTS_RB_PAGES={self.ringbuf_pages}",
            f"-DNET_RB_PAGES={max(1, self.ringbuf_pages // 8)}",
            f"-DFSBASE_OFF={offs['thread.fsbase']}",
            f"-DTASK_STACK_OFF={offs['stack']}",
            f"-DAGENT_TGID={os.getpid()}",
            "-w",
        ]
        # Compiled, loaded and attached in a child process (probes/loader.py): LLVM and libbcc
        # never enter this one, which keeps only the fds.
        req = loader.Request(tuple(plan.sources), tuple(cflags),
                             "on_cpu_sample" if "cpu" in plan.probes else None,
                             round(1e9 / self.rate_hz))
        try:
            b = loader.load(req)
        except loader.LoadError as exc:
            if exc.kind == "import":
                raise _ProbesOff(f"bcc is not importable ({exc.detail}); "
                                 "apt-get install python3-bpfcc") from None
            raise _ProbesOff(f"BPF load failed: {exc.detail}") from None
        try:
            # A thread's first run starts at the last switch on its CPU: from now, not from boot.
            now = ctypes.c_uint64(time.monotonic_ns())
            cpu_last = b["cpu_last"]
            for cpu in range(min(os.cpu_count() or 1, cpu_last.max_entries)):
                cpu_last[ctypes.c_int(cpu)] = now
            self._rb_events = b.ring_buffer("events")
            self._rb_net = b.ring_buffer("net_events") if "net" in plan.probes else None
        except (OSError, KeyError, ValueError) as exc:
            b.close()
            raise _ProbesOff(f"BPF load failed: cannot use the loaded maps ({exc})") from None
        self._bpf = b
        self._decoder = Decoder(b, self._clock)
        self.active = list(plan.probes)
        self._plan = plan

    def add_target(self, pid: int) -> str | None:
        """Profile `pid` from now on (its threads, in the kernel filter). Returns None when the
        kernel walker reads its Python stacks, else the one-line reason it cannot (the process
        still gets its waits, IO and network records)."""
        if self._bpf is None or pid == os.getpid():
            return "eBPF probes are off"
        with self._lock:
            return self._add_target(pid)

    def _add_target(self, pid: int) -> str | None:
        b = self._bpf
        key = ctypes.c_uint32(pid)
        why = "the kernel stack walker is off" if not self.python_stacks else None
        if why is None:
            from probes import pyprocess
            try:
                proc = pyprocess.inspect(pid)
            except pyprocess.Unsupported as exc:
                why = exc.reason
            except Exception as exc:  # a process that vanished or cannot be read
                why = f"cannot inspect the interpreter ({exc})"
            else:
                table = b[b"py_procs"]
                table[key] = table.Leaf.from_buffer_copy(proc.bpf_config())
                self._decoder.add_process(proc)
                self.procs[pid] = proc
        self.walker[pid] = why
        # Threads' state first, then the filter: a switch in between would find no state.
        self._targets.add(pid)
        self._seed_threads(pid, proc if why is None else None)
        b[b"targets"][key] = ctypes.c_uint8(1)
        b[b"target_bits"][ctypes.c_uint32(pid & 0xFFFF)] = ctypes.c_uint8(1)
        r = pyruntime.find(pid)
        if r is not None:
            self.data.gil_ranges[pid] = (r.start, r.end)
            self._decoder.gil_ranges[pid] = (r.start, r.end)
        return why

    def _seed_threads(self, pid: int, proc=None) -> None:
        """Per-thread state for the threads that exist now (new ones get theirs in the kernel,
        at task_newtask), with what each is doing: a thread asleep now keeps its kernel stack
        (from /proc) as the reason for the wait in progress and, for a process the walker reads,
        the Python stack it is blocked in (read from user space: probes/pywalk.py). Entries the
        kernel already made are left alone."""
        from probes.bpfsys import NOEXIST

        b = self._bpf
        states, stacks = b[b"tstates"], b[b"tstacks"]
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            return
        pystacks = _user_space_stacks(proc) if proc is not None else {}
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            now = time.monotonic_ns()
            leaf = states.Leaf()
            leaf.tgid = pid
            leaf.kstack = -1
            leaf.run_start = now
            if state != "R":
                leaf.off_start = now
                leaf.state = 2 if state == "D" else 1
                self._decoder.seed_kstack(tid, now, _proc_kstack(pid, tid))
            try:
                states.update(states.Key(tid), leaf, NOEXIST)
            except OSError as exc:  # the map is full: the kernel counts what it then misses
                log.debug("no state for thread %d: %s", tid, exc)
                continue
            slot = stacks.Leaf()
            slot.ev.kstack = -1
            slot.ev.py.hash = 0x5F5F5F5F  # no stack yet: matches nothing the walker reports
            seen = pystacks.get(tid)
            if seen is not None and state != "R":
                _fill_slot(slot, seen)
            try:
                stacks.update(stacks.Key(tid), slot, NOEXIST)
            except OSError as exc:
                log.debug("no stack slot for thread %d: %s", tid, exc)

    def remove_target(self, pid: int) -> None:
        if self._bpf is None or pid not in self._targets:
            return
        with self._lock:
            self._targets.discard(pid)
            b = self._bpf
            for name in (b"targets", b"py_procs"):
                try:
                    del b[name][ctypes.c_uint32(pid)]
                except KeyError:
                    pass
            if not any((t & 0xFFFF) == (pid & 0xFFFF) for t in self._targets):
                b[b"target_bits"][ctypes.c_uint32(pid & 0xFFFF)] = ctypes.c_uint8(0)
            # Threads of a process we stop watching keep no state in the kernel.
            for k, v in b[b"tstates"].items_lookup_batch():
                if v.tgid == pid:
                    for name in (b"tstates", b"tstacks"):
                        b[name].delete(k)
            self._decoder.remove_process(pid)
            self.procs.pop(pid, None)

    def program_stats(self) -> dict[str, tuple[int, int]]:
        """(run count, total run time in ns) per loaded BPF program, from the kernel's own
        accounting; both stay 0 unless sysctl kernel.bpf_stats_enabled=1."""
        out = {}
        if self._bpf is None:
            return out
        from probes.bpfsys import prog_info
        for name, fd in self._bpf.progs.items():
            try:
                info = prog_info(fd)
            except OSError:
                continue
            out[name] = (info["run_cnt"], info["run_time_ns"])
        return out

    def close(self) -> ProbeData:
        """Stop draining, read what is left, detach (idempotent)."""
        if self._closed:
            return self.data
        self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        end_ns = time.time_ns()
        if self._bpf is not None:
            try:
                # Stop recording first (the programs stay, but nothing is a target any more),
                # so that what the records cover ends where the profile says it ends.
                bits = self._bpf[b"target_bits"]
                for pid in self._targets:
                    bits[ctypes.c_uint32(pid & 0xFFFF)] = ctypes.c_uint8(0)
                end_ns = time.time_ns()
                self._drain(final=True)
                self.data.open_runs = self._open_state()
                self.data.open_waits = self._open_waits(None, end_ns)
                self._read_counters()
            except Exception:  # loop edge: keep what we have
                log.exception("final probe read failed")
            finally:
                self._bpf.close()
                self._bpf = None
        if self._decoder is not None:
            self._decoder.close()
        self.data.end_ns = end_ns
        return self.data

    # -- draining -----------------------------------------------------------------------------
    def _drain_loop(self) -> None:
        n = 0
        while not self._stop.wait(self.drain_interval_s):
            n += 1
            try:
                with self._lock:  # one consumer of the ring buffers; the decoder is not shared
                    if self._bpf is not None:
                        self._drain(final=False, buckets=(n % 4 == 0))
            except Exception:  # loop edge: log, count, keep going
                log.exception("probe drain failed")

    def drain(self) -> None:
        """Read what the kernel has written so far (the drain thread does this on its own)."""
        with self._lock:
            if self._bpf is not None:
                self._drain(final=False)

    def _drain(self, final: bool, buckets: bool = True) -> None:
        b = self._bpf
        # Records past max_records are consumed and counted as dropped (prune() makes room).
        raw, dropped = self._rb_events.drain(max(0, self.max_records - self._kept))
        self._kept += len(raw)
        raw_net = self._rb_net.drain()[0] if self._rb_net is not None else []
        d = self._decoder
        d.dropped += dropped
        d.decode(raw, raw_net, self.data if not self.per_process_only else None)
        if (buckets or final) and "net" in self.active:
            d.drain_buckets(b[b"net_buckets"], self.data if not self.per_process_only else None)

    def _open_state(self) -> dict[int, tuple[int, int | None, int | None, int]]:
        out = {}
        real = self._clock.real
        for k, v in self._bpf[b"tstates"].items_lookup_batch():
            if v.tgid not in self._targets:
                continue
            start = real(v.run_start) if v.run_start else None
            # A thread now off CPU ended its run at off_start; one on CPU is still running.
            end = real(v.off_start) if v.off_start else None
            tid = k.value if hasattr(k, "value") else int(k)
            out[tid] = (v.tgid, start, end, v.short_off)
        return out

    def _open_waits(self, pid: int | None, now: int | None = None) -> list:
        """Waits still going on now (of `pid`, or of every target), each with its stack."""
        b, d = self._bpf, self._decoder
        now = now or time.time_ns()
        stacks = b[b"tstacks"]
        out = []
        for k, v in b[b"tstates"].items_lookup_batch():
            if not v.off_start or v.tgid not in self._targets or (pid is not None and
                                                                  v.tgid != pid):
                continue
            tid = k.value if hasattr(k, "value") else int(k)
            slot = stacks.lookup_bytes(stacks.Key(tid)) or b""
            w = d.open_wait(v.tgid, tid, v, slot, now)
            if w is not None:
                out.append(w)
        return out

    # -- continuous use (spanflame run) --------------------------------------------------------
    def window(self, pid: int, start_ns: int, end_ns: int) -> ProbeData:
        """The records of `pid` that touch [start_ns, end_ns), plus the open runs as of now,
        for one profile window. Call it after the window has closed and a drain happened."""
        with self._lock:
            if self._bpf is None:
                return ProbeData()
            out = self._decoder.window(pid, start_ns, end_ns)
            out.gil_ranges = {pid: self.data.gil_ranges[pid]} if pid in self.data.gil_ranges else {}
            out.counters = dict(self.data.counters)
            try:
                out.open_runs = {t: v for t, v in self._open_state().items() if v[0] == pid}
                out.open_waits = [w for w in self._open_waits(pid) if w.run_end_ns < end_ns]
            except Exception:  # a map read failing must not lose the window
                log.exception("reading open runs failed")
            return out

    def prune(self, before_ns: int) -> int:
        """Forget records that ended before `before_ns`; returns how many."""
        with self._lock:
            if self._decoder is None:
                return 0
            n = self._decoder.prune(before_ns, self._targets)
            self._kept = max(0, self._kept - n)
            return n

    def read_counters(self) -> dict[str, int]:
        with self._lock:
            if self._bpf is not None:
                self._read_counters()
            return dict(self.data.counters)

    def _read_counters(self) -> None:
        table = self._bpf[b"counters"]
        for i, name in enumerate(COUNTER_NAMES):
            self.data.counters[name] = int(sum(table[ctypes.c_int(i)]))
        if self._decoder is not None:
            self.data.counters.update(self._decoder.counters())


class _ProbesOff(Exception):
    pass


def _user_space_stacks(proc) -> dict:
    """tid -> ThreadStack of every thread, read now from user space ({} if it cannot be)."""
    from probes import pywalk
    from probes.pyprocess import ProcessMemory

    try:
        with ProcessMemory(proc.pid) as mem:
            return pywalk.thread_stacks(proc, mem)
    except Exception as exc:  # a thread list changing under us, a process gone: no seed stacks
        log.debug("no user-space stacks for PID %d: %s", proc.pid, exc)
        return {}


def _fill_slot(slot, stack) -> None:
    """Write a stack read from user space into a kernel slot, as the walker would have."""
    frames = stack.frames[:len(slot.frames)]
    h = 0xCBF29CE484222325
    for i, (code, instr, check) in enumerate(frames):
        slot.frames[i].code, slot.frames[i].instr, slot.frames[i].check = code, instr, check
        h = ((h ^ code ^ (instr << 40)) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    slot.ev.py.depth = len(frames)
    slot.ev.py.truncated = 1 if stack.truncated else 0
    slot.ev.py.hash = (h ^ (h >> 32)) & 0xFFFFFFFF


def _proc_kstack(pid: int, tid: int):
    """A sleeping thread's kernel stack from /proc (root only), else its wchan."""
    from agent.model import Frame
    from probes.decode import SCHED_FRAMES

    frames = []
    try:
        with open(f"/proc/{pid}/task/{tid}/stack") as f:
            for line in f:
                name = line.split("] ", 1)[-1].split("+", 1)[0].strip()
                if name and name not in SCHED_FRAMES:
                    frames.append(Frame(name, "[kernel]", 0))
    except OSError:
        try:
            with open(f"/proc/{pid}/task/{tid}/wchan") as f:
                w = f.read().strip()
            if w and w != "0":
                frames.append(Frame(w, "[kernel]", 0))
        except OSError:
            pass
    return tuple(frames[:32])


def _has_bpf_caps() -> bool:
    from agent.doctor import has_cap
    return (has_cap(39) and has_cap(38)) or has_cap(21)  # BPF+PERFMON, or SYS_ADMIN
