"""Loading, running and reading the eBPF probes for a set of target processes.

`ProbeSession.start()` compiles every selected probe as one bcc module, attaches it, and fills the
kernel-side target filter. A background thread drains the ring buffers (the kernel never wakes
us: records are written with BPF_RB_NO_WAKEUP) and the aggregation maps on a timer, and
symbolises stacks while the targets are alive. `close()` detaches everything and returns a
`ProbeData`. Nothing here raises for a machine that cannot run probes: the probes are then off,
each with a one-line reason in `off`.

Threading: `start`, `add_target`, `remove_target` and `close` are called from one owner thread;
the drain thread only appends to internal lists under a lock.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import struct
import tempfile
import threading
import time
from typing import Iterable, Sequence

from agent.model import Frame
from probes import kheaders, pyruntime, registry
from probes.records import Bucket, IoRequest, LockWait, NetEvent, ProbeData, Run

log = logging.getLogger(__name__)

_SCHED_FMT = struct.Struct("<IIQQQQQIi")
_LOCK_FMT = struct.Struct("<IIQQQIi")
_IO_FMT = struct.Struct("<IIQQII8s")
_NET_FMT = struct.Struct("<IIQQIHH16s")

COUNTER_NAMES = ("sched_ringbuf_drops", "lock_ringbuf_drops", "io_ringbuf_drops",
                 "net_ringbuf_drops", "kernel_stack_errors", "user_stack_errors",
                 "thread_map_full", "futex_map_full", "bucket_map_full", "io_map_full",
                 "socket_map_full", "lock_events", "lock_short_waits")
_LOCK_KINDS = {1: "futex", 2: "gil", 3: "klock"}
_NET_KINDS = {1: "send", 2: "recv", 3: "retransmit"}
_NET_EVENTS = {1: "connect", 2: "close"}
#: kernel frames that say nothing about why a thread waits
_SCHED_FRAMES = ("schedule", "__schedule", "schedule_idle", "preempt_schedule",
                 "preempt_schedule_common", "__cond_resched", "schedule_preempt_disabled")


class Clock:
    """bpf_ktime_get_ns() is CLOCK_MONOTONIC; everything else is CLOCK_REALTIME. One offset."""

    def __init__(self) -> None:
        best = None
        for _ in range(5):
            r0 = time.time_ns()
            m = time.monotonic_ns()
            r1 = time.time_ns()
            if best is None or r1 - r0 < best[0]:
                best = (r1 - r0, (r0 + r1) // 2 - m)
        self.offset_ns = best[1]

    def real(self, mono_ns: int) -> int:
        return mono_ns + self.offset_ns


class ProbeSession:
    def __init__(self, probes: Sequence[str], *, offcpu_min_ns: int = 1_000_000,
                 lock_event_min_ns: int = 200_000, bucket_ns: int = 10_000_000,
                 drain_interval_s: float = 0.25, max_records: int = 2_000_000,
                 max_threads: int = 16384, stack_entries: int = 16384,
                 ringbuf_pages: int = 256, per_process_only: bool = False) -> None:
        self.requested = [p for p in registry.BPF_PROBES if p in probes]
        self.offcpu_min_ns = offcpu_min_ns
        self.lock_event_min_ns = lock_event_min_ns
        self.bucket_ns = bucket_ns
        self.drain_interval_s = drain_interval_s
        self.max_records = max_records
        self.max_threads = max_threads
        self.stack_entries = stack_entries
        self.ringbuf_pages = ringbuf_pages
        #: continuous use: keep records per process only (read with window(), freed by prune())
        self.per_process_only = per_process_only
        self.active: list[str] = []
        self.off: dict[str, str] = {}
        self.headers: kheaders.Headers | None = None
        self.load_seconds = 0.0
        self.data = ProbeData()
        self._bpf = None
        self._clock = Clock()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._raw: dict[str, list] = {"sched": [], "lock": [], "io": [], "net": []}
        self._kstack_cache: dict[int, tuple[Frame, ...]] = {}
        self._ksym_cache: dict[int, Frame] = {}
        self._usym_cache: dict[tuple[int, int], Frame] = {}
        self._ustack_cache: dict[tuple[int, int], tuple[Frame, ...]] = {}
        #: the same records, per process (for per-window reads in continuous use)
        self._by_tgid: dict[int, ProbeData] = {}
        self._targets: set[int] = set()
        self._seed_stacks: dict[tuple[int, int], tuple[Frame, ...]] = {}
        self._dropped = {"records": 0}
        self._kept = {k: 0 for k in self._raw}
        self._closed = False

    # -- lifecycle --------------------------------------------------------------------------
    def __enter__(self) -> "ProbeSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, pids: Iterable[int]) -> None:
        """Compile and attach; on any failure the probes are off with a reason (no exception)."""
        if not self.requested:
            return
        t0 = time.monotonic()
        try:
            self._load()
        except _ProbesOff as exc:
            for name in self.requested:
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
        try:
            from bcc import BPF  # noqa: F401
        except Exception as exc:
            raise _ProbesOff(f"bcc is not importable ({type(exc).__name__}: {exc}); "
                             "apt-get install python3-bpfcc") from None
        plan = registry.plan(self.requested)
        self.off.update(plan.off)
        if not plan.probes:
            raise _ProbesOff(next(iter(plan.off.values()), "no probe can run here"))
        self.headers = kheaders.resolve(create=True)
        if not self.headers.found:
            raise _ProbesOff(f"no kernel headers: {self.headers.detail}; "
                             "apt-get install linux-headers-amd64")
        kheaders.apply(self.headers)
        cflags = [f"-D{d}" for d in plan.defines] + [
            f"-DOFFCPU_MIN_NS={self.offcpu_min_ns}ULL",
            f"-DLOCK_EVENT_MIN_NS={self.lock_event_min_ns}ULL",
            f"-DBUCKET_NS={self.bucket_ns}ULL",
            f"-DMAX_THREADS={self.max_threads}",
            f"-DSTACK_ENTRIES={self.stack_entries}",
            f"-DSCHED_RB_PAGES={self.ringbuf_pages}",
            f"-DLOCK_RB_PAGES={max(1, self.ringbuf_pages // 2)}",
            f"-DIO_RB_PAGES={max(1, self.ringbuf_pages // 2)}",
            f"-DNET_RB_PAGES={max(1, self.ringbuf_pages // 4)}",
            f"-DAGENT_TGID={os.getpid()}",
            "-w",
        ]
        text = registry.source_text(plan.sources)
        from bcc import BPF
        err = _StderrCapture()
        try:
            with err:
                self._bpf = BPF(text=text.encode(), cflags=cflags)
        except Exception as exc:
            detail = err.first_error() or str(exc).splitlines()[0]
            raise _ProbesOff(f"BPF load failed: {detail}") from None
        b = self._bpf
        # A thread's first run starts at the last switch on its CPU: from now, not from boot.
        now = ctypes.c_uint64(time.monotonic_ns())
        cpu_last = b[b"cpu_last"]
        for cpu in range(min(os.cpu_count() or 1, 1024)):
            cpu_last[ctypes.c_int(cpu)] = now
        b[b"sched_events"].open_ring_buffer(self._on_sched)
        if "lock" in plan.probes:
            b[b"lock_events"].open_ring_buffer(self._on_lock)
        if "io" in plan.probes:
            b[b"io_events"].open_ring_buffer(self._on_io)
        if "net" in plan.probes:
            b[b"net_events"].open_ring_buffer(self._on_net)
        self.active = list(plan.probes)
        self._plan = plan

    def add_target(self, pid: int) -> None:
        """Profile `pid` from now on (its threads, in the kernel filter)."""
        if self._bpf is None or pid == os.getpid():
            return
        with self._lock:
            self._add_target(pid)

    def _add_target(self, pid: int) -> None:
        b = self._bpf
        key = ctypes.c_uint32(pid)
        b[b"targets"][key] = ctypes.c_uint8(1)
        b[b"target_bits"][ctypes.c_uint32(pid & 0xFFFF)] = ctypes.c_uint8(1)
        self._targets.add(pid)
        self._seed_threads(pid)
        if "lock" in self.active:
            r = pyruntime.find(pid)
            if r is not None:
                rt = b[b"pyruntime"]
                leaf = rt.Leaf()
                leaf.start, leaf.end = r.start, r.end
                rt[key] = leaf
                self.data.gil_ranges[pid] = (r.start, r.end)

    def _seed_threads(self, pid: int) -> None:
        """Tell the sched probe what each existing thread is doing now, so that its first run
        or wait has a known start. A thread asleep now keeps its kernel stack (from /proc) as
        the reason for the wait in progress. Entries the probe already made are left alone."""
        from bcc.libbcc import lib

        table = self._bpf[b"tstates"]
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            return
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            now = time.monotonic_ns()
            leaf = table.Leaf()
            leaf.tgid = pid
            leaf.kstack = -1
            leaf.run_start = now
            if state != "R":
                leaf.off_start = now
                leaf.state = 2 if state == "D" else 1
                frames = _proc_kstack(pid, tid)
                if frames:
                    self._seed_stacks[(tid, now)] = frames
            key = table.Key(tid)
            lib.bpf_update_elem(table.map_fd, ctypes.byref(key), ctypes.byref(leaf), 1)  # NOEXIST

    def remove_target(self, pid: int) -> None:
        if self._bpf is None or pid not in self._targets:
            return
        with self._lock:
            self._remove_target(pid)

    def _remove_target(self, pid: int) -> None:
        self._targets.discard(pid)
        b = self._bpf
        try:
            del b[b"targets"][ctypes.c_uint32(pid)]
        except KeyError:
            pass
        if not any((t & 0xFFFF) == (pid & 0xFFFF) for t in self._targets):
            b[b"target_bits"][ctypes.c_uint32(pid & 0xFFFF)] = ctypes.c_uint8(0)

    def program_stats(self) -> dict[str, tuple[int, int]]:
        """(run count, total run time in ns) per loaded BPF program, from the kernel's own
        accounting; both stay 0 unless sysctl kernel.bpf_stats_enabled=1."""
        out = {}
        if self._bpf is None:
            return out
        for name, fn in self._bpf.funcs.items():
            cnt = ns = 0
            try:
                with open(f"/proc/self/fdinfo/{fn.fd}") as f:
                    for line in f:
                        if line.startswith("run_time_ns:"):
                            ns = int(line.split()[1])
                        elif line.startswith("run_cnt:"):
                            cnt = int(line.split()[1])
            except OSError:
                continue
            out[name.decode()] = (cnt, ns)
        return out

    def close(self) -> ProbeData:
        """Stop draining, read what is left, detach (idempotent)."""
        if self._closed:
            return self.data
        self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._bpf is not None:
            try:
                self._drain(final=True)
                self._read_open_runs()
                self._read_counters()
            except Exception:  # loop edge: keep what we have
                log.exception("final probe read failed")
            finally:
                self._bpf.cleanup()
                self._bpf = None
        self.data.end_ns = time.time_ns()
        self.data.counters["records_dropped"] = self._dropped["records"]
        return self.data

    # -- draining -----------------------------------------------------------------------------
    def _drain_loop(self) -> None:
        n = 0
        while not self._stop.wait(self.drain_interval_s):
            n += 1
            try:
                self._drain(final=False, buckets=(n % 4 == 0))
            except Exception:  # loop edge: log, count, keep going
                log.exception("probe drain failed")

    def _keep(self, kind: str, data, size: int) -> int:
        """Ring buffer callback body: copy the record's bytes, unless this session already holds
        `max_records` of its kind. Decoding happens in bulk in `_drain`."""
        if self._kept[kind] >= self.max_records:
            self._dropped["records"] += 1
        else:
            self._kept[kind] += 1
            self._raw[kind].append(ctypes.string_at(data, size))
        return 0

    def _on_sched(self, _ctx, data, size) -> int:
        return self._keep("sched", data, size)

    def _on_lock(self, _ctx, data, size) -> int:
        return self._keep("lock", data, size)

    def _on_io(self, _ctx, data, size) -> int:
        return self._keep("io", data, size)

    def _on_net(self, _ctx, data, size) -> int:
        return self._keep("net", data, size)

    def _drain(self, final: bool, buckets: bool = True) -> None:
        with self._lock:
            b = self._bpf
            b.ring_buffer_consume()
            off = self._clock.offset_ns
            raw, self._raw = self._raw, {k: [] for k in self._raw}
            keep_all = not self.per_process_only
            d = self.data if keep_all else ProbeData()
            kstack = self._kstack
            seeds = self._seed_stacks
            per = self._per
            for (tgid, tid, rs, re_, oe, so, fa, st, ks) in _SCHED_FMT.iter_unpack(b"".join(raw["sched"])):
                stack = kstack(ks) if ks >= 0 else (seeds.pop((tid, re_), ()) if seeds else ())
                r = Run(tgid, tid, rs + off if rs else None, re_ + off, oe + off if oe else None,
                        so, st, stack, fa)
                d.runs.append(r)
                per(tgid).runs.append(r)
            for (tgid, tid, s, e, addr, kind, us) in _LOCK_FMT.iter_unpack(b"".join(raw["lock"])):
                w = LockWait(tgid, tid, s + off, e + off, addr, _LOCK_KINDS.get(kind, "futex"),
                             self._ustack(us, tgid))
                d.lock_waits.append(w)
                per(tgid).lock_waits.append(w)
            for (tgid, tid, s, e, nbytes, dev, rwbs) in _IO_FMT.iter_unpack(b"".join(raw["io"])):
                flags = rwbs.split(b"\0", 1)[0].decode("ascii", "replace")
                op = ("discard" if "D" in flags else "write" if "W" in flags else
                      "read" if "R" in flags else "other")
                x = IoRequest(tgid, tid, s + off, e + off, nbytes, f"{dev >> 20}:{dev & 0xFFFFF}",
                              op, flags)
                d.io.append(x)
                per(tgid).io.append(x)
            for (tgid, tid, s, e, kind, dport, fam, addr) in _NET_FMT.iter_unpack(b"".join(raw["net"])):
                x = NetEvent(tgid, tid, s + off, e + off, _NET_EVENTS.get(kind, "?"), dport,
                             _addr(fam, addr))
                d.net.append(x)
                per(tgid).net.append(x)
            if buckets or final:
                self._drain_buckets()

    def _per(self, tgid: int) -> ProbeData:
        pd = self._by_tgid.get(tgid)
        if pd is None:
            pd = self._by_tgid[tgid] = ProbeData()
        return pd

    def _drain_buckets(self) -> None:
        b, real, width = self._bpf, self._clock.real, self.bucket_ns
        for probe, table, kinds in (("lock", "lock_buckets", _LOCK_KINDS),
                                    ("net", "net_buckets", _NET_KINDS)):
            if probe not in self.active:
                continue
            for k, v in b[table.encode()].items_lookup_and_delete_batch():
                bk = Bucket(probe, k.tgid, k.tid, real(k.bucket * width), width,
                            kinds.get(k.kind, "?"), v.value, v.count)
                if not self.per_process_only:
                    self.data.buckets.append(bk)
                self._per(k.tgid).buckets.append(bk)

    def _read_open_runs(self) -> None:
        self.data.open_runs = self._open_state()

    def _open_state(self) -> dict[int, tuple[int, int | None, int | None, int]]:
        out = {}
        for k, v in self._bpf[b"tstates"].items_lookup_batch():
            if v.tgid not in self._targets:
                continue
            start = self._clock.real(v.run_start) if v.run_start else None
            # A thread now off CPU ended its run at off_start; one on CPU is still running.
            end = self._clock.real(v.off_start) if v.off_start else None
            tid = k.value if hasattr(k, "value") else int(k)
            out[tid] = (v.tgid, start, end, v.short_off)
        return out

    # -- continuous use (spanflame run) --------------------------------------------------------
    def window(self, pid: int, start_ns: int, end_ns: int) -> ProbeData:
        """The records of `pid` that touch [start_ns, end_ns), plus the open runs as of now,
        for one profile window. Call it after the window has closed and a drain happened."""
        with self._lock:
            if self._bpf is None:
                return ProbeData()
            d = self._by_tgid.get(pid) or ProbeData()
            out = ProbeData(
                runs=[r for r in d.runs if (r.off_end_ns or r.run_end_ns) >= start_ns
                      and (r.run_start_ns or r.run_end_ns) < end_ns],
                lock_waits=[w for w in d.lock_waits if w.end_ns >= start_ns
                            and w.start_ns < end_ns],
                io=[x for x in d.io if start_ns <= x.start_ns < end_ns],
                net=[x for x in d.net if x.end_ns >= start_ns and x.start_ns < end_ns],
                buckets=[b for b in d.buckets
                         if b.start_ns + b.width_ns > start_ns and b.start_ns < end_ns],
                gil_ranges={pid: self.data.gil_ranges[pid]} if pid in self.data.gil_ranges else {},
                counters=dict(self.data.counters), start_ns=start_ns, end_ns=end_ns)
            try:
                out.open_runs = {t: v for t, v in self._open_state().items() if v[0] == pid}
            except Exception:  # a map read failing must not lose the window
                log.exception("reading open runs failed")
            return out

    def prune(self, before_ns: int) -> int:
        """Forget records that ended before `before_ns`; returns how many."""

        def cut(d: ProbeData) -> int:
            n0 = len(d.runs) + len(d.lock_waits) + len(d.io) + len(d.net) + len(d.buckets)
            d.runs = [r for r in d.runs if (r.off_end_ns or r.run_end_ns) >= before_ns]
            d.lock_waits = [w for w in d.lock_waits if w.end_ns >= before_ns]
            d.io = [x for x in d.io if x.end_ns >= before_ns]
            d.net = [x for x in d.net if x.end_ns >= before_ns]
            d.buckets = [b for b in d.buckets if b.start_ns + b.width_ns >= before_ns]
            return n0 - (len(d.runs) + len(d.lock_waits) + len(d.io) + len(d.net) + len(d.buckets))

        with self._lock:
            n = cut(self.data)
            kept = {"sched": 0, "lock": 0, "io": 0, "net": 0}
            for tgid in list(self._by_tgid):
                d = self._by_tgid[tgid]
                n += cut(d) if self.per_process_only else 0
                if tgid not in self._targets and not d.runs:
                    del self._by_tgid[tgid]
                    continue
                kept["sched"] += len(d.runs)
                kept["lock"] += len(d.lock_waits)
                kept["io"] += len(d.io)
                kept["net"] += len(d.net)
            self._kept = kept
            return n

    def read_counters(self) -> dict[str, int]:
        with self._lock:
            if self._bpf is not None:
                self._read_counters()
            self.data.counters["records_dropped"] = self._dropped["records"]
            return dict(self.data.counters)

    def _read_counters(self) -> None:
        table = self._bpf[b"counters"]
        for i, name in enumerate(COUNTER_NAMES):
            self.data.counters[name] = int(sum(table[ctypes.c_int(i)]))

    # -- stacks ---------------------------------------------------------------------------------
    def _kstack(self, stack_id: int) -> tuple[Frame, ...]:
        if stack_id < 0:
            return ()
        cached = self._kstack_cache.get(stack_id)
        if cached is not None:
            return cached
        frames = []
        try:
            for addr in self._bpf[b"kstacks"].walk(stack_id):
                f = self._ksym_cache.get(addr)
                if f is None:
                    name = self._bpf.ksym(addr).decode("utf-8", "replace")
                    f = self._ksym_cache[addr] = Frame(name, "[kernel]", 0)
                if not frames and f.name in _SCHED_FRAMES:
                    continue
                frames.append(f)
        except KeyError:
            return ()
        out = self._kstack_cache[stack_id] = tuple(frames[:32])
        return out

    def _ustack(self, stack_id: int, tgid: int) -> tuple[Frame, ...]:
        if stack_id < 0:
            return ()
        cached = self._ustack_cache.get((tgid, stack_id))
        if cached is not None:
            return cached
        frames = []
        try:
            for addr in self._bpf[b"ustacks"].walk(stack_id):
                key = (tgid, addr)
                f = self._usym_cache.get(key)
                if f is None:
                    raw = self._bpf.sym(addr, tgid, show_module=True).decode("utf-8", "replace")
                    name, _, module = raw.partition(" [")
                    f = self._usym_cache[key] = Frame(name, f"[{module}" if module else "[native]", 0)
                frames.append(f)
        except KeyError:
            return ()
        out = tuple(frames[:16])
        if len(self._ustack_cache) > 50_000:
            self._ustack_cache.clear()
        self._ustack_cache[(tgid, stack_id)] = out
        return out


class _ProbesOff(Exception):
    pass


def _proc_kstack(pid: int, tid: int) -> tuple[Frame, ...]:
    """A sleeping thread's kernel stack from /proc (root only), else its wchan."""
    frames = []
    try:
        with open(f"/proc/{pid}/task/{tid}/stack") as f:
            for line in f:
                name = line.split("] ", 1)[-1].split("+", 1)[0].strip()
                if name and name not in _SCHED_FRAMES:
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


def _addr(family: int, raw: bytes) -> str:
    try:
        if family == socket.AF_INET:
            return socket.inet_ntop(socket.AF_INET, raw[:4])
        return socket.inet_ntop(socket.AF_INET6, raw[:16])
    except (OSError, ValueError):
        return ""


class _StderrCapture:
    """libbcc prints compiler errors on fd 2; keep them off the user's terminal, keep the first."""

    def __init__(self) -> None:
        self.text = ""

    def __enter__(self) -> "_StderrCapture":
        self._tmp = tempfile.TemporaryFile()
        self._saved = os.dup(2)
        os.dup2(self._tmp.fileno(), 2)
        return self

    def __exit__(self, *exc: object) -> None:
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._tmp.seek(0)
        self.text = self._tmp.read(1 << 16).decode("utf-8", "replace")
        self._tmp.close()

    def first_error(self) -> str:
        for line in self.text.splitlines():
            if "error" in line.lower():
                return line.strip()[:300]
        return ""
