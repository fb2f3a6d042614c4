"""Turning the kernel's records (probes/events.h) into typed records with symbolised stacks.

Python frames arrive as (code object address, instruction, check) and are symbolised on first
sight, while the process is alive (probes/pysymbols.py), per process; a whole stack is cached by
its raw bytes, so a stack seen again costs one dictionary lookup. Kernel stacks come from the
`kstacks` map, without the profiler's own frames (bpf_prog_*, bpf_trace_run*, __traceiter_*) and
without the scheduler's frames at their top, which say nothing about why a thread waits.

Not thread-safe: the probe session calls it under its lock.
"""

from __future__ import annotations

import socket
import struct
import time
from collections import Counter

from agent.model import Frame, Stack
from probes.columns import ProcessRecords, WindowData
from probes.records import PY_ERRORS, Bucket, IoRequest, NetBytes, NetEvent, ProbeData, Run

HDR = struct.Struct("<HHIIiQQQQQQIIHBBIQ")
FRAME = struct.Struct("<QII")
_NET_FMT = struct.Struct("<IIQQIHH16s")
EV_SAMPLE, EV_WAIT, EV_WAIT_AGG, EV_EXIT, EV_IO, EV_NET, EV_THREAD = range(1, 8)
NR_FUTEX = 202
NO_SYSCALL = 0xFFFF


def _nr(nr: int) -> int:
    return -1 if nr == NO_SYSCALL else nr
_NET_EVENTS = {1: "connect", 2: "close"}
_NET_KINDS = {3: "retransmit"}
#: kernel frames that say nothing about why a thread waits
SCHED_FRAMES = frozenset(("schedule", "__schedule", "schedule_idle", "preempt_schedule",
                          "preempt_schedule_common", "__cond_resched", "schedule_preempt_disabled",
                          "schedule_hrtimeout_range", "schedule_hrtimeout_range_clock",
                          "schedule_timeout"))
#: the profiler's own frames: never shown
_OWN_PREFIXES = ("bpf_", "__bpf_", "__traceiter_", "trace_call_bpf", "perf_trace_",
                 "__perf_event_overflow", "perf_event_overflow", "perf_swevent_",
                 "__perf_sw_event", "___perf_sw_event")
MAX_STACKS_PER_PROCESS = 50_000
#: records decoded together at most this far apart (seconds), or once there are this many
FLUSH_S = 1.0
FLUSH_RECORDS = 8192
TRUNCATED = Frame("[truncated]")
UNKNOWN_CODE = Frame("[unknown code object]")


class Clock:
    """bpf_ktime_get_ns() is CLOCK_MONOTONIC; everything else is CLOCK_REALTIME. One offset,
    measured once: the one clock conversion of the pipeline."""

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


class Decoder:
    def __init__(self, bpf, clock: Clock) -> None:
        self.bpf = bpf
        self.clock = clock
        self.by_tgid: dict[int, ProcessRecords] = {}
        self.gil_ranges: dict[int, tuple[int, int]] = {}
        self.dropped = 0
        self.py_errors: Counter[str] = Counter()
        self.unknown_code = 0
        self._symbolizers: dict[int, object] = {}
        self._stacks: dict[int, dict[bytes, Stack]] = {}
        self._kstacks: dict[int, Stack] = {}
        self._ksyms: dict[int, Frame] = {}
        self._seeds: dict[tuple[int, int], Stack] = {}
        #: tgid, kernel stack id, walk header and raw frames (bytes) -> index in that process's
        #: stacks
        self._sid_keys: dict[bytes, int] = {}
        self._raw: list[bytes] = []
        self._raw_since = 0.0

    # -- processes ------------------------------------------------------------------------------
    def add_process(self, proc) -> None:
        from probes.pysymbols import Symbolizer

        self.flush()
        old = self._symbolizers.pop(proc.pid, None)
        if old is not None:
            old.close()
        self._symbolizers[proc.pid] = Symbolizer(proc)
        self._stacks[proc.pid] = {}
        self._forget_stack_keys(proc.pid)

    def remove_process(self, pid: int) -> None:
        self.flush()  # while its symbols can still be read
        sym = self._symbolizers.pop(pid, None)
        if sym is not None:
            sym.close()
        self._stacks.pop(pid, None)
        self._forget_stack_keys(pid)

    def _forget_keys(self, pid: int) -> None:
        tg = pid.to_bytes(4, "little")
        self._sid_keys = {k: v for k, v in self._sid_keys.items() if k[:4] != tg}

    def _forget_stack_keys(self, pid: int) -> None:
        """Raw stacks of `pid` mean other code from now on (a new process, or none): symbolise
        them again when next seen."""
        pr = self.by_tgid.get(pid)
        if pr is not None:
            pr.stacks.by_key.clear()
        self._forget_keys(pid)

    def close(self) -> None:
        self.flush()
        for sym in self._symbolizers.values():
            sym.close()
        self._symbolizers.clear()

    def seed_kstack(self, tid: int, mono_ns: int, frames: Stack) -> None:
        """The kernel stack of a thread that was already waiting when we began to watch it."""
        if frames:
            self._seeds[(tid, mono_ns)] = frames

    def per(self, tgid: int) -> ProcessRecords:
        pr = self.by_tgid.get(tgid)
        if pr is None:
            pr = self.by_tgid[tgid] = ProcessRecords(tgid)
        return pr

    # -- records --------------------------------------------------------------------------------
    def decode(self, raw: list[bytes], raw_net: list[bytes], also: ProbeData | None) -> None:
        """Decode ring buffer records into per-process columns (and into `also`, if given, as
        NamedTuple records).

        In bulk: the records' fixed headers are joined and read column by column through
        memoryview casts, for the whole batch at once; the hot records (CPU samples, waits,
        short waits) become rows of integers, their stacks one index into their process's stack
        table (a stack is symbolised the first time its raw bytes are seen), and go to their
        process's columns, which take them in bulk (probes/columns.py)."""
        hs = HDR.size
        if raw and min(map(len, raw)) < hs:
            n = len(raw)
            raw = [r for r in raw if len(r) >= hs]
            self.dropped += n - len(raw)
        if raw:
            if also is not None:
                self.flush()
                self._decode_batch(raw, also)
            else:
                # Decoding has a cost per call whatever the number of records: records wait
                # (as the bytes they came in) for up to a second or FLUSH_RECORDS, or until
                # something reads the records, a process is added or removed.
                if not self._raw:
                    self._raw_since = time.monotonic()
                self._raw += raw
                if (len(self._raw) >= FLUSH_RECORDS
                        or time.monotonic() - self._raw_since >= FLUSH_S):
                    self.flush()
        off = self.clock.offset_ns
        for rec in raw_net:
            if len(rec) < _NET_FMT.size:
                continue
            (tgid, tid, s, e, kind, dport, fam, addr) = _NET_FMT.unpack_from(rec)
            x = NetEvent(tgid, tid, s + off, e + off, _NET_EVENTS.get(kind, "?"), dport,
                         _addr(fam, addr))
            self.per(tgid).rare.net.append(x)
            if also is not None:
                also.net.append(x)

    def flush(self) -> None:
        """Decode the records still waiting."""
        if self._raw:
            raw, self._raw = self._raw, []
            self._decode_batch(raw, None)

    def _decode_batch(self, recs: list[bytes], also: ProbeData | None) -> None:
        """One row of integers per hot record, handed to its process's columns in bulk."""
        off = self.clock.offset_ns
        unpack, hs = HDR.unpack_from, HDR.size
        errors = self.py_errors
        keys = self._sid_keys
        batches: dict[int, tuple[list, list, list]] = {}
        rare = []
        last_tgid, rows = -1, None
        for rec in recs:
            (kind, nr, tgid, tid, ks, t0, t1, value, aux, rs, so, state, count, depth, trunc,
             err, _h, task) = unpack(rec)
            if tgid != last_tgid:
                rows = batches.get(tgid)
                if rows is None:
                    rows = batches[tgid] = ([], [], [])
                last_tgid = tgid
            if err > 1 and not depth:  # (a partial stack's error: once per distinct stack)
                errors[PY_ERRORS.get(err, str(err))] += 1
            if kind == EV_WAIT:
                # the process, the kernel stack id, the walk's depth, truncation and error, and
                # the frames
                key = rec[4:8] + rec[12:16] + rec[72:76] + rec[hs:]
                sid = keys.get(key)
                if ks < 0:  # a kernel stack read from /proc when we attached
                    seed = self._seeds.pop((tid, t0), None)
                    if seed is not None:
                        sid = self._sid(self.per(tgid), tgid, rec, seed=seed)
                if sid is None:
                    sid = keys[key] = self._sid(self.per(tgid), tgid, rec)
                rows[1].append((t1 + off, rs + off if rs else t0 + off, tid,
                                rs + off if rs else 0, t0 + off, t1 + off, so, state, sid,
                                -1 if nr == NO_SYSCALL else nr, aux, task))
            elif kind == EV_SAMPLE or kind == EV_WAIT_AGG:
                key = rec[4:8] + rec[12:16] + rec[72:76] + rec[hs:]
                sid = keys.get(key)
                if sid is None:
                    sid = keys[key] = self._sid(self.per(tgid), tgid, rec)
                if kind == EV_SAMPLE:
                    rows[0].append((t0 + off, tid, value, sid, task))
                else:
                    rows[2].append((t1 + off, t0 + off, tid, value, count, state, sid,
                                    -1 if nr == NO_SYSCALL else nr, aux, task))
            elif kind == EV_EXIT:
                rows[1].append((t0 + off, rs + off if rs else t0 + off, tid,
                                rs + off if rs else 0, t0 + off, 0, so, 0,
                                self.per(tgid).empty_sid(), -1, 0, 0))
            else:
                rare.append(rec)
        if len(keys) >= 2 * MAX_STACKS_PER_PROCESS:
            keys.clear()  # forget the keys, not the stacks: kept records still point at them
        for tgid, kinds in batches.items():
            pr = self.per(tgid)
            for cols, rows in zip((pr.samples, pr.runs, pr.short_waits), kinds):
                if rows:
                    if also is not None:
                        getattr(also, cols.KIND).extend(cols.records(tgid, rows,
                                                                     pr.stacks.pairs))
                    cols.add_rows(rows)
        if rare:
            self._decode_rare(rare, also)

    def _decode_rare(self, recs: list[bytes], also: ProbeData | None) -> None:
        off = self.clock.offset_ns
        for rec in recs:
            (kind, nr, tgid, tid, ks, t0, t1, value, aux, rs, so, state, count, depth, trunc,
             err, _h, task) = HDR.unpack_from(rec)
            pr = self.per(tgid)
            if kind == EV_IO:
                py = self._pystack(tgid, rec, depth, trunc, err, count=bool(depth))
                rwbs = aux.to_bytes(8, "little").split(b"\0", 1)[0].decode("ascii", "replace")
                op = ("discard" if "D" in rwbs else "write" if "W" in rwbs else
                      "read" if "R" in rwbs else "other")
                x = IoRequest(tgid, tid, t0 + off, t0 + off, value,
                              f"{state >> 20}:{state & 0xFFFFF}", op, rwbs, py, task)
                pr.rare.io.append(x)
                if also is not None:
                    also.io.append(x)
            elif kind == EV_NET:
                py = self._pystack(tgid, rec, depth, trunc, err, count=bool(depth))
                x = NetBytes(tgid, tid, t0 + off, t1 + off, "send" if state == 1 else "recv",
                             value, py, task)
                pr.rare.net_bytes.append(x)
                if also is not None:
                    also.net_bytes.append(x)
            elif kind == EV_THREAD:
                pr.rare.new_threads[tid] = t0 + off
                if also is not None:
                    also.new_threads[tid] = t0 + off

    def _sid(self, pr: ProcessRecords, tgid: int, rec: bytes, seed: Stack | None = None) -> int:
        """Symbolise the stacks of a record seen for the first time (or with a seeded kernel
        stack) and give them an index in the process's stack table."""
        (_kind, _nr, _tgid, _tid, ks, _t0, _t1, _v, _aux, _rs, _so, _st, _c, depth, trunc, err,
         _h, _task) = HDR.unpack_from(rec)
        k = self._kstack(ks) if seed is None else seed
        py = self._pystack(tgid, rec, depth, trunc, err, count=bool(depth))
        if seed is None:
            return pr.stacks.add(None, k, py)
        sid = pr.stacks.by_key.get((k, py))
        return sid if sid is not None else pr.stacks.add((k, py), k, py)

    def drain_buckets(self, table, also: ProbeData | None) -> None:
        real, width = self.clock.real, 10_000_000
        for k, v in table.items_lookup_and_delete_batch():
            bk = Bucket("net", k.tgid, k.tid, real(k.bucket * width), width,
                        _NET_KINDS.get(k.kind, "?"), v.value, v.count)
            self.per(k.tgid).rare.buckets.append(bk)
            if also is not None:
                also.buckets.append(bk)

    def open_wait(self, tgid: int, tid: int, state, slot: bytes, now_real: int) -> Run | None:
        """A wait still going on (the thread is off CPU since state.off_start), with the stack
        in its slot, as a Run ending at `now_real`."""
        if not state.off_start or len(slot) < HDR.size:
            return None
        (_kind, _cpu, _tgid, _tid, ks, _t0, _t1, _v, _aux, _rs, _so, _st, _c, depth, trunc, err,
         _h, task) = HDR.unpack_from(slot)
        off = self.clock.offset_ns
        k = self._kstack(state.kstack) if state.kstack >= 0 else self._seeds.get(
            (tid, state.off_start), ())
        nr = state.syscall
        return Run(tgid, tid, state.run_start + off if state.run_start else None,
                   state.off_start + off, now_real, state.short_off, state.state, k,
                   state.futex_uaddr if nr == NR_FUTEX else 0,
                   self._pystack(tgid, slot, depth, trunc, err), _nr(nr), state.futex_uaddr,
                   task)

    # -- stacks ---------------------------------------------------------------------------------
    def _pystack(self, tgid: int, rec: bytes, depth: int, trunc: int, err: int,
                 count: bool = True) -> Stack:
        """The Python stack of a record; `count`: add its walk error to the counters (decode
        counts them itself, once per record)."""
        if not depth:
            if err == 0 or err == 1:  # no Python frame, or a process py-spy does
                return ()
            if count:
                self.py_errors[PY_ERRORS.get(err, str(err))] += 1
            if err == 3:
                return (Frame("[no Python thread state]"),)
            return (Frame(f"[Python stack unreadable: {PY_ERRORS.get(err, err)}]"),)
        cache = self._stacks.get(tgid)
        if cache is None:
            return ()
        key = rec[HDR.size:HDR.size + FRAME.size * depth] + bytes((trunc, err))
        got = cache.get(key)
        if got is not None:
            return got
        sym = self._symbolizers.get(tgid)
        if sym is None:
            return ()
        frames = []
        raw_frames = key[:-2]
        # (whole frames only: a record cut short must not cost the batch it came in)
        for code, instr, check in FRAME.iter_unpack(raw_frames[:len(raw_frames) - len(raw_frames)
                                                               % FRAME.size]):
            f = sym.frame(code, check, instr)
            if f is None:
                self.unknown_code += 1
                f = UNKNOWN_CODE
            frames.append(f)
        if trunc:
            frames.append(TRUNCATED)
        if err:
            if count:
                self.py_errors[PY_ERRORS.get(err, str(err))] += 1
            frames.append(Frame(f"[partial stack: {PY_ERRORS.get(err, err)}]"))
        out = tuple(frames)
        if len(cache) >= MAX_STACKS_PER_PROCESS:
            cache.clear()
        cache[key] = out
        return out

    def _kstack(self, stack_id: int) -> Stack:
        if stack_id < 0:
            return ()
        cached = self._kstacks.get(stack_id)
        if cached is not None:
            return cached
        frames = []
        try:
            for addr in self.bpf[b"kstacks"].walk(stack_id):
                f = self._ksyms.get(addr)
                if f is None:
                    name = self.bpf.ksym(addr).decode("utf-8", "replace")
                    f = self._ksyms[addr] = Frame(name, "[kernel]", 0)
                if f.name.startswith(_OWN_PREFIXES) or (not frames and f.name in SCHED_FRAMES):
                    continue
                frames.append(f)
        except KeyError:
            return ()
        out = self._kstacks[stack_id] = tuple(frames[:32])
        if len(self._kstacks) > 100_000:
            self._kstacks.clear()
        return out

    # -- windows --------------------------------------------------------------------------------
    def window(self, pid: int, start_ns: int, end_ns: int) -> ProbeData:
        """The records of `pid` that touch [start_ns, end_ns) (a WindowData: columns, with
        NamedTuple lists made on first use)."""
        self.flush()
        pr = self.by_tgid.get(pid)
        if pr is None:
            return WindowData(start_ns=start_ns, end_ns=end_ns)
        return pr.window(start_ns, end_ns)

    def prune(self, before_ns: int, targets: set[int]) -> int:
        self.flush()
        n = 0
        for tgid in list(self.by_tgid):
            pr = self.by_tgid[tgid]
            n += pr.prune(before_ns)
            if tgid not in targets and pr.empty():
                del self.by_tgid[tgid]
                self._forget_keys(tgid)
            else:
                new = pr.compact(2 * MAX_STACKS_PER_PROCESS)
                if new is not None:
                    tg = tgid.to_bytes(4, "little")
                    self._sid_keys = {k: new[v] if k[:4] == tg else v
                                      for k, v in self._sid_keys.items()
                                      if k[:4] != tg or v in new}
        return n

    def counters(self) -> dict[str, int]:
        self.flush()
        out = {"records_dropped": self.dropped, "unknown_code_objects": self.unknown_code}
        for name, n in self.py_errors.items():
            out[f"python_stack_error_{name}"] = n
        for pid, sym in self._symbolizers.items():
            for k in ("errors", "reused"):
                out[f"symbolizer_{k}"] = out.get(f"symbolizer_{k}", 0) + getattr(sym, k, 0)
        return out


def _addr(family: int, raw: bytes) -> str:
    try:
        if family == socket.AF_INET:
            return socket.inet_ntop(socket.AF_INET, raw[:4])
        return socket.inet_ntop(socket.AF_INET6, raw[:16])
    except (OSError, ValueError):
        return ""
