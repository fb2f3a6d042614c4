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
from itertools import compress, groupby
from operator import itemgetter

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
TRUNCATED = Frame("[truncated]")
_EMPTY = ((), ())
_TGID_BYTES = itemgetter(slice(4, 8))
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

    # -- processes ------------------------------------------------------------------------------
    def add_process(self, proc) -> None:
        from probes.pysymbols import Symbolizer

        old = self._symbolizers.pop(proc.pid, None)
        if old is not None:
            old.close()
        self._symbolizers[proc.pid] = Symbolizer(proc)
        self._stacks[proc.pid] = {}
        self._forget_stack_keys(proc.pid)

    def remove_process(self, pid: int) -> None:
        sym = self._symbolizers.pop(pid, None)
        if sym is not None:
            sym.close()
        self._stacks.pop(pid, None)
        self._forget_stack_keys(pid)

    def _forget_stack_keys(self, pid: int) -> None:
        """Raw stacks of `pid` mean other code from now on (a new process, or none): symbolise
        them again when next seen."""
        pr = self.by_tgid.get(pid)
        if pr is not None:
            pr.stacks.by_key.clear()

    def close(self) -> None:
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

        In bulk: the records are grouped by process, their fixed headers joined and read column
        by column through memoryview casts; the hot records (CPU samples, waits, short waits)
        become rows of integers, their stacks one index into the process's stack table (a stack
        is symbolised the first time its raw bytes are seen)."""
        hs = HDR.size
        if raw and min(map(len, raw)) < hs:
            n = len(raw)
            raw = [r for r in raw if len(r) >= hs]
            self.dropped += n - len(raw)
        if raw:
            raw.sort(key=_TGID_BYTES)  # stable: arrival order within a process
            i = 0
            for tg, group in groupby(map(_TGID_BYTES, raw)):
                n = len(list(group))
                self._decode_process(int.from_bytes(tg, "little"), raw[i:i + n], also)
                i += n
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

    def _decode_process(self, tgid: int, recs: list[bytes], also: ProbeData | None) -> None:
        pr = self.per(tgid)
        off = self.clock.offset_ns
        hs = HDR.size
        mv = memoryview(b"".join([r[:hs] for r in recs]))
        # The header as 16-, 32- and 64-bit words (its fields are aligned): column k of a
        # W-word header is the slice [k::W].
        h16, h32, h32s, h64 = mv.cast("H"), mv.cast("I"), mv.cast("i"), mv.cast("Q")
        kinds = h16[0::44].tolist()
        errs = mv[75::88]
        if max(errs) > 1:
            for e, depth in zip(errs, h16[36::44]):
                if e > 1 and not depth:  # (a partial stack's error: once per distinct stack)
                    self.py_errors[PY_ERRORS.get(e, str(e))] += 1
        present = set(kinds)
        for kind in sorted(present):
            mask = None if len(present) == 1 else list(map(kind.__eq__, kinds))

            def col(c, mask=mask):
                return c.tolist() if mask is None else list(compress(c, mask))

            krecs = recs if mask is None else list(compress(recs, mask))
            if kind > EV_EXIT:
                self._decode_rare(pr, kind, krecs, also)
                continue
            tid = col(h32[2::22])
            t0 = col(h64[2::11])
            t0r = list(map(off.__add__, t0))
            if kind == EV_EXIT:
                sid = pr.stacks.by_key.get(_EMPTY)
                if sid is None:
                    sid = pr.stacks.add(_EMPTY, (), ())
                rs = [x + off if x else 0 for x in col(h64[6::11])]
                n = len(t0r)
                pr.runs.extend_columns([t0r, [a or b for a, b in zip(rs, t0r)], tid, rs, t0r,
                                        [0] * n, col(h64[7::11]), [0] * n, [sid] * n, [-1] * n,
                                        [0] * n, [0] * n], also, pr)
                continue
            ks = col(h32s[3::22])
            sids = self._sids(pr, tgid, krecs, ks, col(h32[18::22]))
            task = col(h64[10::11])
            if kind == EV_SAMPLE:
                pr.samples.extend_columns([t0r, tid, col(h64[4::11]), sids, task], also, pr)
                continue
            t1r = list(map(off.__add__, col(h64[3::11])))
            nr = [-1 if x == NO_SYSCALL else x for x in col(h16[1::44])]
            if kind == EV_WAIT:
                if min(ks) < 0:  # stacks read from /proc when we attached
                    for i, k in enumerate(ks):
                        seed = self._seeds.pop((tid[i], t0[i]), None) if k < 0 else None
                        if seed is not None:
                            sids[i] = self._sid(pr, tgid, krecs[i], seed=seed)
                rs = [x + off if x else 0 for x in col(h64[6::11])]
                pr.runs.extend_columns([t1r, [a or b for a, b in zip(rs, t0r)], tid, rs, t0r, t1r,
                                        col(h64[7::11]), col(h32[16::22]), sids, nr,
                                        col(h64[5::11]), task], also, pr)
            else:
                pr.short_waits.extend_columns([t1r, t0r, tid, col(h64[4::11]), col(h32[17::22]),
                                               col(h32[16::22]), sids, nr, col(h64[5::11]),
                                               task], also, pr)

    def _sids(self, pr: ProcessRecords, tgid: int, recs: list[bytes], ks, walk) -> list[int]:
        """The stack index of each record: the kernel stack id, the walk's depth, truncation
        and error, and the frames are the key."""
        by_key = pr.stacks.by_key
        hs = HDR.size
        keys = list(zip(ks, walk, [r[hs:] for r in recs]))
        sids = list(map(by_key.get, keys))
        if None in sids:
            for i in [i for i, s in enumerate(sids) if s is None]:
                sid = by_key.get(keys[i])  # (an earlier miss of this batch added it)
                sids[i] = sid if sid is not None else self._sid(pr, tgid, recs[i], key=keys[i])
        return sids

    def _decode_rare(self, pr: ProcessRecords, kind: int, recs: list[bytes],
                     also: ProbeData | None) -> None:
        off = self.clock.offset_ns
        for rec in recs:
            (kind, nr, tgid, tid, ks, t0, t1, value, aux, rs, so, state, count, depth, trunc,
             err, _h, task) = HDR.unpack_from(rec)
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

    def _sid(self, pr: ProcessRecords, tgid: int, rec: bytes, seed: Stack | None = None,
             key: bytes | None = None) -> int:
        """Intern the stacks of a record seen for the first time (or with a seeded kernel
        stack): symbolise them and give them an index in the process's stack table."""
        (_kind, _nr, _tgid, _tid, ks, _t0, _t1, _v, _aux, _rs, _so, _st, _c, depth, trunc, err,
         _h, _task) = HDR.unpack_from(rec)
        k = self._kstack(ks) if seed is None else seed
        py = self._pystack(tgid, rec, depth, trunc, err, count=bool(depth))
        st = pr.stacks
        if key is None:
            key = (k, py)
            sid = st.by_key.get(key)
            if sid is not None:
                return sid
        elif len(st.by_key) >= MAX_STACKS_PER_PROCESS:
            # Forget the keys, not the pairs: kept records still point at them (prune compacts).
            st.by_key.clear()
        return st.add(key, k, py)

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
        pr = self.by_tgid.get(pid)
        if pr is None:
            return WindowData(start_ns=start_ns, end_ns=end_ns)
        return pr.window(start_ns, end_ns)

    def prune(self, before_ns: int, targets: set[int]) -> int:
        n = 0
        for tgid in list(self.by_tgid):
            pr = self.by_tgid[tgid]
            n += pr.prune(before_ns)
            if tgid not in targets and pr.empty():
                del self.by_tgid[tgid]
            else:
                pr.compact(2 * MAX_STACKS_PER_PROCESS)
        return n

    def counters(self) -> dict[str, int]:
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
