"""Typed records shared by every part of spanflame.

A *Stack* is a tuple of `Frame`, leaf first (as in py-spy and pprof). A *Profile* is a set of
aggregated samples: each distinct (stack, labels) key carries one integer per sample type.
Labels are a sorted tuple of (key, value) pairs; an `int` value is a pprof numeric label, a `str`
value a string label.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, NamedTuple, Sequence, Union

LabelValue = Union[str, int]
Labels = tuple[tuple[str, LabelValue], ...]


class Frame(NamedTuple):
    """One Python (or native/kernel) frame. `line` is 0 when unknown.

    A NamedTuple rather than a dataclass: stacks are dictionary keys everywhere, and tuple
    hashing runs in C.
    """

    name: str
    filename: str = ""
    line: int = 0

    def display(self) -> str:
        if self.filename:
            return f"{self.name} ({self.filename}:{self.line})" if self.line else f"{self.name} ({self.filename})"
        return self.name


Stack = tuple[Frame, ...]

#: Deepest stack kept (frames): a deeper one keeps its innermost MAX_STACK_DEPTH - 1 frames
#: under a TRUNCATED root frame, as the kernel walker does. Pyroscope's own limit is 1000.
MAX_STACK_DEPTH = 1024
TRUNCATED = Frame("[truncated]")
#: Sample values saturate here: pprof and SQLite hold int64.
MAX_VALUE = (1 << 63) - 1
MIN_VALUE = -MAX_VALUE - 1


def clip_stack(stack: Stack, max_depth: int = MAX_STACK_DEPTH) -> Stack:
    """`stack` (leaf first), or its innermost `max_depth - 1` frames and TRUNCATED when deeper."""
    if len(stack) <= max_depth:
        return stack
    return stack[:max_depth - 1] + (TRUNCATED,)


def saturate(v: int) -> int:
    """`v` clamped to int64."""
    return MAX_VALUE if v > MAX_VALUE else MIN_VALUE if v < MIN_VALUE else v


@dataclass(frozen=True, slots=True)
class SampleType:
    """What one value of a sample means, as in pprof's ValueType (plus a description)."""

    name: str
    unit: str
    description: str = ""


def _types(*items: tuple[str, str, str]) -> dict[str, SampleType]:
    return {name: SampleType(name, unit, desc) for name, unit, desc in items}


#: Every sample type spanflame writes. The names are a contract (pprof `-sample_index=NAME`).
SAMPLE_TYPES: dict[str, SampleType] = _types(
    ("samples", "count", "estimated number of samples at the sampling rate"),
    ("cpu", "nanoseconds", "time on CPU"),
    ("wall", "nanoseconds", "wall-clock time, idle threads included"),
    ("off_cpu", "nanoseconds", "time off CPU (blocked or runnable but not running)"),
    ("lock_wait", "nanoseconds", "time waiting on a lock (futex or kernel lock)"),
    ("gil_wait", "nanoseconds", "time waiting for the GIL"),
    ("io_wait", "nanoseconds", "time waiting for block IO"),
    ("io", "bytes", "block IO bytes submitted"),
    ("net_wait", "nanoseconds", "time blocked waiting on the network"),
    ("await", "nanoseconds", "time an asyncio task was suspended, on the stack it awaited in"),
    ("net_send", "bytes", "TCP bytes sent"),
    ("net_recv", "bytes", "TCP bytes received"),
    ("tcp_retransmits", "count", "TCP retransmitted segments"),
)


def make_labels(items: Mapping[str, LabelValue] | Iterable[tuple[str, LabelValue]]) -> Labels:
    """Normalise labels to the sorted-tuple form used as a dictionary key."""
    pairs = items.items() if isinstance(items, Mapping) else items
    return tuple(sorted(dict(pairs).items()))


class Profile:
    """Aggregated samples of one or more sample types.

    Not thread-safe: one owner builds it, then it is read. Values are integers in the unit of
    their sample type.
    """

    __slots__ = ("sample_types", "_index", "samples", "period_type", "period", "time_ns",
                 "duration_ns", "comments", "default_sample_type")

    def __init__(
        self,
        sample_types: Sequence[SampleType | tuple[str, str]],
        *,
        period_type: SampleType | tuple[str, str] | None = None,
        period: int = 0,
        time_ns: int = 0,
        duration_ns: int = 0,
        comments: Sequence[str] = (),
        default_sample_type: str | None = None,
    ) -> None:
        self.sample_types: tuple[SampleType, ...] = tuple(_as_type(t) for t in sample_types)
        self._index = {t.name: i for i, t in enumerate(self.sample_types)}
        self.samples: dict[tuple[Stack, Labels], list[int]] = {}
        self.period_type = _as_type(period_type) if period_type else None
        self.period = period
        self.time_ns = time_ns
        self.duration_ns = duration_ns
        self.comments = list(comments)
        self.default_sample_type = default_sample_type

    # -- building ---------------------------------------------------------------------------
    def index(self, type_name: str) -> int:
        return self._index[type_name]

    def has_type(self, type_name: str) -> bool:
        return type_name in self._index

    def add(self, stack: Stack, labels: Labels, values: Mapping[str, int]) -> None:
        """Add values (by sample type name) to the sample keyed by (stack, labels)."""
        key = (stack, labels)
        vec = self.samples.get(key)
        if vec is None:
            vec = self.samples[key] = [0] * len(self.sample_types)
        idx = self._index
        for name, v in values.items():
            vec[idx[name]] += v

    def add_vector(self, stack: Stack, labels: Labels, vec: Sequence[int]) -> None:
        key = (stack, labels)
        cur = self.samples.get(key)
        if cur is None:
            self.samples[key] = list(vec)
        else:
            for i, v in enumerate(vec):
                cur[i] += v

    def merge(self, other: "Profile") -> None:
        """Add every sample of `other`; sample types missing here are appended. Sums saturate
        at int64 (MAX_VALUE), so merging any number of profiles stays encodable."""
        for t in other.sample_types:
            if t.name not in self._index:
                self._index[t.name] = len(self.sample_types)
                self.sample_types = self.sample_types + (t,)
                for vec in self.samples.values():
                    vec.append(0)
        mapping = [self._index[t.name] for t in other.sample_types]
        n = len(self.sample_types)
        for key, ovec in other.samples.items():
            vec = self.samples.get(key)
            if vec is None:
                vec = self.samples[key] = [0] * n
            for j, v in zip(mapping, ovec):
                x = vec[j] + v
                vec[j] = x if MIN_VALUE <= x <= MAX_VALUE else saturate(x)
        if other.time_ns and (not self.time_ns or other.time_ns < self.time_ns):
            end = max(self.time_ns + self.duration_ns, other.time_ns + other.duration_ns)
            self.time_ns = other.time_ns
            self.duration_ns = end - self.time_ns
        elif other.time_ns:
            self.duration_ns = max(self.time_ns + self.duration_ns,
                                   other.time_ns + other.duration_ns) - self.time_ns
        if not self.period and other.period:
            self.period, self.period_type = other.period, other.period_type

    # -- reading ----------------------------------------------------------------------------
    def total(self, type_name: str) -> int:
        i = self._index[type_name]
        return sum(vec[i] for vec in self.samples.values())

    def iter_type(self, type_name: str) -> Iterator[tuple[Stack, Labels, int]]:
        """(stack, labels, value) for every sample with a non-zero value of this type."""
        i = self._index[type_name]
        for (stack, labels), vec in self.samples.items():
            if vec[i]:
                yield stack, labels, vec[i]

    def filtered(self, tags: Mapping[str, object]) -> "Profile":
        """A copy holding only samples whose labels match every key=value in `tags`; a value may
        also be a set of accepted values.

        Numeric labels match their decimal text.
        """
        want = {k: ({str(x) for x in v} if isinstance(v, (set, frozenset)) else {str(v)})
                for k, v in tags.items()}
        out = self.empty_like()
        for (stack, labels), vec in self.samples.items():
            d = dict(labels)
            if all(k in d and str(d[k]) in vals for k, vals in want.items()):
                out.samples[(stack, labels)] = list(vec)
        return out

    def empty_like(self) -> "Profile":
        return Profile(self.sample_types, period_type=self.period_type, period=self.period,
                       time_ns=self.time_ns, duration_ns=self.duration_ns, comments=self.comments,
                       default_sample_type=self.default_sample_type)

    def primary_type(self) -> str:
        """The sample type a viewer should show first."""
        if self.default_sample_type and self.default_sample_type in self._index:
            return self.default_sample_type
        for t in self.sample_types:
            if t.name != "samples":
                return t.name
        return self.sample_types[0].name if self.sample_types else ""

    def __len__(self) -> int:
        return len(self.samples)


def _as_type(t: SampleType | tuple[str, str]) -> SampleType:
    if isinstance(t, SampleType):
        return t
    name, unit = t
    known = SAMPLE_TYPES.get(name)
    if known is not None and known.unit == unit:
        return known
    return SampleType(name, unit)
