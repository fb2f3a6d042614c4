"""Per-process record storage, column by column: no Python object per record.

The agent keeps every record of every target for a minute or two and cuts windows out of them;
at thousands of records a second, a NamedTuple per record (and list comprehensions over all of
them to cut a window or prune) was most of the agent's CPU. Here each kind of hot record
(CPU samples, waits and exits, short waits) is a set of `array` columns kept in time order, so a
window is two bisections and a slice, pruning is one slice, and a record's stacks are one small
integer: an index into the process's table of distinct (kernel stack, Python stack) pairs.

Records become NamedTuples (probes/records.py) only when something asks for them as such
(`WindowData.runs` and friends, the attach session's ProbeData).

Not thread-safe: the probe session uses it under its lock.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from operator import itemgetter
from struct import pack

from agent.model import Stack
from probes.records import ProbeData, Run, Sample, ShortWaits

NR_FUTEX = 202
_first = itemgetter(0)
_EMPTY = ((), ())


#: rows a Columns collects before it turns them into columns (or when it is read)
FLUSH_ROWS = 4096


class Columns:
    """Rows of one record kind as columns (arrays of signed 64-bit integers), sorted by the
    first column. 0 stands for None in optional time columns (no real time is 0).

    New rows wait in a list until there are FLUSH_ROWS of them or the columns are read: turning
    rows into columns costs a few microseconds per call whatever their number, and a drain
    brings each process only a few dozen."""

    __slots__ = ("_cols", "pending")
    FIELDS: tuple[str, ...] = ()
    KIND = ""

    def __init__(self, cols: list | None = None) -> None:
        self._cols = cols if cols is not None else [array("q") for _ in self.FIELDS]
        self.pending: list[tuple] = []

    @property
    def cols(self) -> list:
        if self.pending:
            self.flush()
        return self._cols

    def __len__(self) -> int:
        return len(self.cols[0])

    def add_rows(self, rows: list[tuple]) -> None:
        """Rows in FIELDS order (extra trailing fields are ignored)."""
        self.pending += rows
        if len(self.pending) >= FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        rows, self.pending = self.pending, []
        rows.sort(key=_first)
        key = self._cols[0]
        if key and rows[0][0] < key[-1]:
            # Records came a little out of order (two CPUs writing at once): re-sort the tail.
            i = bisect_left(key, rows[0][0])
            rows = sorted([*zip(*(c[i:] for c in self._cols)), *rows], key=_first)
            for c in self._cols:
                del c[i:]
        fmt = f"{len(rows)}q"
        for c, vals in zip(self._cols, zip(*rows)):
            c.frombytes(pack(fmt, *vals))  # (a third faster than array("q", vals))

    @classmethod
    def records(cls, tgid: int, rows: list[tuple], stacks) -> list:
        """Rows as NamedTuple records."""
        return _MAKE[cls.KIND](tgid, cls(list(zip(*rows))[:len(cls.FIELDS)]), stacks)

    def drop_before(self, t: int) -> int:
        """Forget the rows whose key is < t; returns how many."""
        i = bisect_left(self.cols[0], t)
        if i:
            for c in self.cols:
                del c[:i]
        return i

    def cut(self, i: int, j: int, extra: list[int] = ()) -> "Columns":
        """Rows i..j-1, plus the rows at `extra` (indexes >= j)."""
        cols = [c[i:j] for c in self.cols]
        if extra:
            for c, src in zip(cols, self.cols):
                c.extend([src[k] for k in extra])
        return type(self)(cols)

    def rows(self):
        return zip(*self.cols)

    def remap(self, field: int, new: dict[int, int]) -> None:
        cols = self.cols
        cols[field] = array("q", map(new.__getitem__, cols[field]))


class SampleCols(Columns):
    KIND = "samples"
    FIELDS = ("t_ns", "tid", "period_ns", "sid", "task")


class RunCols(Columns):
    """Waits and exits. `end` is off_end, or run_end for an exit (off_end 0); `start` is
    run_start, or run_end when the run start is unknown (run_start 0)."""
    KIND = "runs"
    FIELDS = ("end", "start", "tid", "run_start_ns", "run_end_ns", "off_end_ns", "short_off_ns",
              "state", "sid", "syscall", "aux", "task")


class ShortCols(Columns):
    KIND = "short_waits"
    FIELDS = ("end_ns", "start_ns", "tid", "total_ns", "count", "state", "sid", "syscall", "aux",
              "task")


SID = {"samples": 3, "runs": 8, "short_waits": 6}


class StackTable:
    """A process's distinct (kernel stack, Python stack) pairs; a record holds an index."""

    __slots__ = ("pairs", "by_key")

    def __init__(self) -> None:
        self.pairs: list[tuple[Stack, Stack]] = []
        self.by_key: dict[object, int] = {}

    def add(self, key, kstack: Stack, pystack: Stack) -> int:
        """A new pair; found again by `key` in `by_key` unless key is None."""
        sid = len(self.pairs)
        self.pairs.append((kstack, pystack))
        if key is not None:
            self.by_key[key] = sid
        return sid


class ProcessRecords:
    """Everything kept of one process: hot records in columns, rare ones as NamedTuples."""

    def __init__(self, tgid: int) -> None:
        self.tgid = tgid
        self.samples = SampleCols()
        self.runs = RunCols()
        self.short_waits = ShortCols()
        self.stacks = StackTable()
        self.rare = ProbeData()   # io, net, net_bytes, buckets, new_threads

    def empty_sid(self) -> int:
        """The index of the empty pair (exits)."""
        sid = self.stacks.by_key.get(_EMPTY)
        return sid if sid is not None else self.stacks.add(_EMPTY, (), ())

    def count(self) -> int:
        r = self.rare
        return (len(self.samples) + len(self.runs) + len(self.short_waits) + len(r.io)
                + len(r.net) + len(r.net_bytes) + len(r.buckets))

    def window(self, start_ns: int, end_ns: int) -> "WindowData":
        s = self.samples
        samples = s.cut(bisect_left(s.cols[0], start_ns), bisect_left(s.cols[0], end_ns))
        # A wait or a short wait touches the window when it ends at or after its start and
        # begins before its end: sorted by end, those ending inside it are one slice; of those
        # ending after it (only what came in since it closed), the ones that began before.
        runs = _touching(self.runs, start_ns, end_ns)
        shorts = _touching(self.short_waits, start_ns, end_ns)
        d = self.rare
        return WindowData(
            columns=WindowColumns(self.tgid, samples, runs, shorts, self.stacks.pairs),
            io=[x for x in d.io if start_ns <= x.start_ns < end_ns],
            net=[x for x in d.net if x.end_ns >= start_ns and x.start_ns < end_ns],
            net_bytes=[x for x in d.net_bytes if x.end_ns >= start_ns and x.start_ns < end_ns],
            buckets=[b for b in d.buckets if b.start_ns + b.width_ns > start_ns
                     and b.start_ns < end_ns],
            new_threads={t: ns for t, ns in d.new_threads.items() if ns < end_ns},
            start_ns=start_ns, end_ns=end_ns)

    def prune(self, before_ns: int) -> int:
        n = (self.samples.drop_before(before_ns) + self.runs.drop_before(before_ns)
             + self.short_waits.drop_before(before_ns))
        d = self.rare
        n0 = len(d.io) + len(d.net) + len(d.net_bytes) + len(d.buckets)
        if n0:
            d.io = [x for x in d.io if x.end_ns >= before_ns]
            d.net = [x for x in d.net if x.end_ns >= before_ns]
            d.net_bytes = [x for x in d.net_bytes if x.end_ns >= before_ns]
            d.buckets = [b for b in d.buckets if b.start_ns + b.width_ns >= before_ns]
            n += n0 - (len(d.io) + len(d.net) + len(d.net_bytes) + len(d.buckets))
        if d.new_threads:
            d.new_threads = {t: ns for t, ns in d.new_threads.items() if ns >= before_ns}
        return n

    def compact(self, limit: int) -> dict[int, int] | None:
        """Drop the stack pairs no kept record uses, once there are more than `limit`; returns
        the new index of each kept one (None: nothing done)."""
        st = self.stacks
        if len(st.pairs) <= limit:
            return None
        used = sorted(set(self.samples.cols[SID["samples"]]) | set(self.runs.cols[SID["runs"]])
                      | set(self.short_waits.cols[SID["short_waits"]]))
        new = {old: i for i, old in enumerate(used)}
        for cols, f in ((self.samples, SID["samples"]), (self.runs, SID["runs"]),
                        (self.short_waits, SID["short_waits"])):
            cols.remap(f, new)
        st.pairs = [st.pairs[i] for i in used]
        st.by_key = {k: new[v] for k, v in st.by_key.items() if v in new}
        return new

    def empty(self) -> bool:
        return not self.runs and not self.samples


def _touching(cols: Columns, start_ns: int, end_ns: int) -> Columns:
    key, begin = cols.cols[0], cols.cols[1]
    i, j = bisect_left(key, start_ns), bisect_left(key, end_ns)
    return cols.cut(i, j, [k for k in range(j, len(key)) if begin[k] < end_ns])


class WindowColumns:
    """One window's hot records of one process, with the stack table their `sid`s index."""

    __slots__ = ("tgid", "samples", "runs", "short_waits", "stacks")

    def __init__(self, tgid: int, samples: SampleCols, runs: RunCols, short_waits: ShortCols,
                 stacks: list[tuple[Stack, Stack]]) -> None:
        self.tgid, self.samples, self.runs, self.short_waits = tgid, samples, runs, short_waits
        self.stacks = stacks


# -- records as NamedTuples ------------------------------------------------------------------------
def sample_records(tgid: int, cols: SampleCols, stacks) -> list[Sample]:
    out = []
    for t, tid, period, sid, task in cols.rows():
        k, py = stacks[sid]
        out.append(Sample(tgid, tid, t, period, k, py, task))
    return out


def run_records(tgid: int, cols: RunCols, stacks) -> list[Run]:
    out = []
    for (_e, _s, tid, rs, re, oe, so, state, sid, nr, aux, task) in cols.rows():
        k, py = stacks[sid]
        if oe:
            out.append(Run(tgid, tid, rs or None, re, oe, so, state, k,
                           aux if nr == NR_FUTEX else 0, py, nr, aux, task))
        else:  # the thread exited
            out.append(Run(tgid, tid, rs or None, re, None, so, 0, (), 0, ()))
    return out


def short_records(tgid: int, cols: ShortCols, stacks) -> list[ShortWaits]:
    out = []
    for (e, s, tid, total, count, state, sid, nr, aux, task) in cols.rows():
        k, py = stacks[sid]
        out.append(ShortWaits(tgid, tid, s, e, total, count, state, k,
                              aux if nr == NR_FUTEX else 0, py, nr, aux, task))
    return out


_MAKE = {"samples": sample_records, "runs": run_records, "short_waits": short_records}


def _lazy(name: str) -> property:
    attr = "_" + name

    def get(self):
        v = self.__dict__.get(attr)
        if v is None:
            c = self.columns
            v = _MAKE[name](c.tgid, getattr(c, name), c.stacks) if c is not None else []
            self.__dict__[attr] = v
        return v

    def set_(self, v) -> None:
        self.__dict__[attr] = v
        if self.__dict__.get("columns") is not None:
            self.__dict__.setdefault("_replaced", set()).add(name)

    return property(get, set_)


class WindowData(ProbeData):
    """A ProbeData cut from columns: `runs`, `samples` and `short_waits` become NamedTuple lists
    only when read. Code that can work on columns asks `hot(kind)` first."""

    runs = _lazy("runs")
    samples = _lazy("samples")
    short_waits = _lazy("short_waits")

    def __init__(self, *args, columns: WindowColumns | None = None, **kw) -> None:
        self.__dict__["columns"] = None
        super().__init__(*args, **kw)
        if columns is not None:
            self.__dict__["columns"] = columns
            for name in _MAKE:
                self.__dict__["_" + name] = None

    def hot(self, kind: str) -> Columns | None:
        """The columns of `kind` ("samples", "runs", "short_waits"), unless the list of records
        was replaced since."""
        c = self.__dict__.get("columns")
        if c is None or kind in self.__dict__.get("_replaced", ()):
            return None
        return getattr(c, kind)


def hot(data, kind: str, pid: int) -> Columns | None:
    """`data`'s columns of `kind` if it has them (a WindowData of `pid`), else None."""
    if not isinstance(data, WindowData) or data.columns is None or data.columns.tgid != pid:
        return None
    return data.hot(kind)
