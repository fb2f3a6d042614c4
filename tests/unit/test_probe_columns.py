"""Records kept in columns (probes/columns.py) give the same windows and the same profiles as
the records themselves: decoded from synthetic ring-buffer records a little out of order."""

import random

from agent.model import SAMPLE_TYPES, Frame, Profile
from agent.recordprofile import add_records, kernel_python_stack
from agent.spans import SpanRecord, SpanStore
from agent.tracelink import TraceLinker
from agent.waits import RunsCpu
from probes.decode import FRAME, HDR, Decoder
from probes.records import ProbeData

OFF = 1_000_000_000_000
TYPES = ["cpu", "wall", "off_cpu", "lock_wait", "gil_wait", "io_wait", "net_wait", "io"]


class _Sym:
    def frame(self, code, _check, instr):
        return Frame(f"f{code}", "app.py", instr)


class _Clock:
    offset_ns = OFF


class _Bpf:
    def __getitem__(self, _name):
        return self

    def walk(self, stack_id):
        return [100 + stack_id, 200]

    def ksym(self, addr):
        return f"k{addr}".encode()


def _record(rng, t):
    kind = rng.choice([1, 1, 1, 2, 2, 3, 4, 5, 7])
    tgid = rng.choice([10, 11])
    depth, err = rng.randrange(0, 4), rng.choice([0, 0, 0, 2])
    if kind in (4, 7):
        depth, err = 0, 0
    frames = b"".join(FRAME.pack(rng.randrange(3), 0, rng.randrange(2)) for _ in range(depth))
    rs = rng.choice([0, max(1, t - rng.randrange(1, 3_000_000))])
    return HDR.pack(kind, rng.choice([202, 0xFFFF, 35]), tgid, tgid * 10 + rng.randrange(3),
                    rng.choice([-1, 1, 2]), t, t + rng.randrange(0, 5_000_000),
                    rng.randrange(1, 10**7), rng.randrange(0, 3) * 0x10, rs,
                    rng.randrange(0, 1000), rng.choice([1, 2, 0x100]), rng.randrange(1, 9), depth,
                    rng.randrange(2), err, 0, rng.choice([0, 0, 77])) + frames


def _decoder():
    d = Decoder(_Bpf(), _Clock())
    for pid in (10, 11):
        d._symbolizers[pid] = _Sym()
        d._stacks[pid] = {}
    return d


def _batches(seed=1, n=8, per=400):
    rng, t, out = random.Random(seed), 1_000_000, []
    for _ in range(n):
        b = []
        for _ in range(per):
            t += rng.randrange(0, 60_000)
            b.append(_record(rng, t - rng.randrange(0, 200_000)))  # a little out of order
        out.append(b)
    return out, t


def _key(r):
    return tuple(map(repr, r))


def test_windows_and_pruning_match_the_records():
    d, everything = _decoder(), ProbeData()
    batches, t_end = _batches()
    for i, b in enumerate(batches):
        d.decode(b, [], everything)  # `also` gets every record as a NamedTuple
        for pid in (10, 11, 12):
            lo, hi = OFF + i * 2_000_000, OFF + i * 2_000_000 + 10_000_000
            w = d.window(pid, lo, hi)
            want_runs = [r for r in everything.runs if r.tgid == pid
                         and (r.off_end_ns or r.run_end_ns) >= lo
                         and (r.run_start_ns or r.run_end_ns) < hi]
            assert sorted(w.runs, key=_key) == sorted(want_runs, key=_key)
            want_samples = [s for s in everything.samples if s.tgid == pid and lo <= s.t_ns < hi]
            assert sorted(w.samples, key=_key) == sorted(want_samples, key=_key)
            want_short = [x for x in everything.short_waits if x.tgid == pid
                          and x.end_ns >= lo and x.start_ns < hi]
            assert sorted(w.short_waits, key=_key) == sorted(want_short, key=_key)
    before = OFF + t_end // 2
    kept = sum(len(pr.runs) + len(pr.samples) + len(pr.short_waits) + len(pr.rare.io)
               for pr in d.by_tgid.values())
    n = d.prune(before, {10})
    left = [r for r in everything.runs if (r.off_end_ns or r.run_end_ns) >= before]
    assert sorted(d.window(10, 0, 1 << 62).runs + d.window(11, 0, 1 << 62).runs,
                  key=_key) == sorted(left, key=_key)
    assert n == kept - sum(len(pr.runs) + len(pr.samples) + len(pr.short_waits)
                           + len(pr.rare.io) for pr in d.by_tgid.values())
    # A process forgotten by pruning that sends records again gets its stacks anew.
    d.prune(OFF + t_end + 10**9, set())
    assert not d.by_tgid
    again, _t = _batches(seed=2, n=1)
    d.decode(again[0], [], None)
    fresh = _decoder()
    fresh.decode(again[0], [], None)
    for pid in (10, 11):
        got, want = d.window(pid, 0, 1 << 62), fresh.window(pid, 0, 1 << 62)
        assert got.samples and got.runs
        assert (got.samples, got.runs, got.short_waits) == (want.samples, want.runs,
                                                             want.short_waits)


def test_profiles_from_columns_match_profiles_from_records():
    d = _decoder()
    batches, t_end = _batches(seed=7, n=6, per=1500)
    for b in batches:
        d.decode(b, [], None)
    rng = random.Random(3)
    store = SpanStore()
    spans = []
    for k in range(40):
        tid = rng.choice([100, 101, 110, 111])
        a = OFF + rng.randrange(1_000_000, t_end)
        spans.append(SpanRecord(f"{k:032x}", f"{k:016x}", "", f"s{k % 3}", "svc", tid // 10, tid,
                                a, a + rng.randrange(1, 20_000_000), task=rng.choice([0, 0, 77])))
    store.add(spans)
    lo, hi = OFF + 20_000_000, OFF + t_end - 50_000_000
    for pid in (10, 11):
        for with_cpu in (False, True):
            out = []
            for columns in (False, True):
                w = d.window(pid, lo, hi)
                w.gil_ranges = {pid: (0x10, 0x20)}
                data = w if columns else ProbeData(
                    runs=list(w.runs), samples=list(w.samples), short_waits=list(w.short_waits),
                    io=w.io, gil_ranges=w.gil_ranges)
                prof = Profile([SAMPLE_TYPES[n] for n in TYPES])
                cpu = RunsCpu(data, pid, lo, hi) if with_cpu else None
                s = add_records(prof, pid, data, python_stack=kernel_python_stack,
                                window=(lo, hi), cpu=cpu,
                                linker=TraceLinker(store, 19, window=(lo - 1, hi + 1), tasks=True))
                threads = cpu and [(t, cpu.runs(t), cpu.exit_ns(t), cpu.oncpu_ns(t, lo, hi))
                                   for t in sorted(cpu.tids())]
                out.append((prof.samples, s, threads))
            assert out[0] == out[1]
            assert len(out[0][0]) > 100
