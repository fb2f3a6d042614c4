"""Turning stack timelines into a Profile.

A *piece* is a stretch of time during which one thread had one stack (and, once spans are linked,
one innermost span). Its `wall` value is its duration; its `cpu` value is the thread's on-CPU time
within it, from a `CpuTimeline`. Pieces with the same stack and labels aggregate into one sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from agent.model import SAMPLE_TYPES, Labels, Profile, Stack, make_labels
from agent.timeline import CpuTimeline, ThreadTimeline


@dataclass(frozen=True, slots=True)
class Piece:
    pid: int
    tid: int
    thread_name: str
    start_ns: int
    end_ns: int
    stack: Stack
    extra_labels: Labels = ()


def thread_labels(pid: int, tid: int, thread_name: str, extra: Labels = ()) -> Labels:
    """The per-sample labels every spanflame sample carries (pid and thread_id are numeric)."""
    base = {"pid": pid, "thread_id": tid}
    if thread_name:
        base["thread_name"] = thread_name
    if extra:
        base.update(extra)
    return make_labels(base)


def timeline_pieces(threads: Iterable[ThreadTimeline], cpu: CpuTimeline | None = None,
                    from_ns: int | None = None) -> Iterable[Piece]:
    """One piece per slice (the stack py-spy saw, held until it saw another), clipped at the
    thread's exit when known. With `from_ns`, each thread's first stack also covers the time
    from `from_ns` to its first observation (for CPU: time before py-spy first saw the thread
    still counts, at the stack it first saw)."""
    for tl in threads:
        exit_ns = cpu.exit_ns(tl.tid) if cpu is not None else None
        first = True
        for s in tl.slices:
            start = s.start_ns
            if first and s.stack:
                first = False
                if from_ns is not None and from_ns < start:
                    start = from_ns
            end = s.end_ns if exit_ns is None else min(s.end_ns, exit_ns)
            if end > start and s.stack:
                yield Piece(tl.pid, tl.tid, tl.name, start, end, s.stack)


def new_profile(types: Sequence[str], rate_hz: int, start_ns: int, end_ns: int) -> Profile:
    """An empty profile with `samples/count` first, then `types`, period = 1/rate."""
    period_ns = round(1e9 / rate_hz)
    primary = types[0]
    return Profile([SAMPLE_TYPES["samples"]] + [SAMPLE_TYPES[t] for t in types],
                   period_type=SAMPLE_TYPES[primary], period=period_ns, time_ns=start_ns,
                   duration_ns=max(0, end_ns - start_ns), default_sample_type=primary)


def add_pieces(profile: Profile, pieces: Iterable[Piece], cpu: CpuTimeline | None,
               types: Sequence[str] = ("cpu", "wall")) -> None:
    """Aggregate pieces into `profile` as `cpu` (on-CPU time within each piece, from `cpu`)
    and/or `wall` (the piece's length) values, for those of `types` the profile has."""
    want_cpu = "cpu" in types and profile.has_type("cpu") and cpu is not None
    want_wall = "wall" in types and profile.has_type("wall")
    label_cache: dict[tuple, Labels] = {}
    for p in pieces:
        values = {}
        if want_cpu:
            c = cpu.oncpu_ns(p.tid, p.start_ns, p.end_ns)
            if c > 0:
                values["cpu"] = c
        if want_wall:
            values["wall"] = p.end_ns - p.start_ns
        if not values:
            continue
        lkey = (p.pid, p.tid, p.thread_name, p.extra_labels)
        labels = label_cache.get(lkey)
        if labels is None:
            labels = label_cache[lkey] = thread_labels(p.pid, p.tid, p.thread_name, p.extra_labels)
        profile.add(p.stack, labels, values)


def add_counts(profile: Profile, counts: dict[tuple[int, str, Stack], int], pid: int,
               type_name: str, count_samples: bool = True) -> None:
    """Aggregate py-spy sample counts: each sample is worth one period of `type_name` (counts
    may be fractional once scaled to a thread's measured CPU; values are rounded).

    With `count_samples`, the counts also go to `samples/count` (one run per profile does).
    """
    period = profile.period
    for (tid, thread_name, stack), n in counts.items():
        if stack and n:
            values = {type_name: round(n * period)}
            if count_samples:
                values["samples"] = round(n)
            profile.add(stack, thread_labels(pid, tid, thread_name), values)


def fill_sample_counts(profile: Profile) -> None:
    """Set `samples/count` to the sample's time value divided by the period, rounded.

    Timeline-derived samples carry time, not discrete samples; the count is the number of samples
    a sampler at the configured rate would have taken. The time value is the first non-zero
    nanosecond value in sample-type order (cpu before the wait types).
    """
    if not profile.has_type("samples") or not profile.period:
        return
    si = profile.index("samples")
    # Await time is not sampled (asyncio tasks awaiting, observed by polling): no samples.
    time_idx = [i for i, t in enumerate(profile.sample_types)
                if t.unit == "nanoseconds" and t.name != "await"]
    if not time_idx:
        return
    period = profile.period
    for vec in profile.samples.values():
        if vec[si]:
            continue
        for i in time_idx:
            if vec[i]:
                vec[si] = (vec[i] + period // 2) // period
                break
