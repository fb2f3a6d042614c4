"""Why was this span slow: its time split into CPU, lock, GIL, waiting for another thread
(sync), IO, network, other off-CPU, child spans and unaccounted, and its dominant cause in words.

The split covers the span's *own* time on its thread: its duration minus the time its child
spans (on the same thread) took, which their own breakdowns explain. CPU comes from a
CpuTimeline (exact with the sched probe); off-CPU time by reason from the sched probe's waits,
and from its added-up short blocked waits; `other` includes the rest of the absences shorter
than the off-CPU threshold (preemptions). Whatever nothing observed is `unaccounted` (without
eBPF, all of the off-CPU time).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable

from agent.model import Profile
from agent.spans import SpanRecord, SpanStore
from agent.timeline import CpuTimeline
from agent.waits import classify

CATEGORIES = ("cpu", "lock", "gil", "sync", "io", "net", "other")
#: Which sample type shows the functions behind each category.
CATEGORY_TYPE = {"cpu": "cpu", "lock": "lock_wait", "gil": "gil_wait", "sync": "off_cpu",
                 "io": "io_wait", "net": "net_wait", "other": "off_cpu"}
_REASON_CATEGORY = {"lock": "lock", "gil": "gil", "sync": "sync", "io": "io", "net": "net",
                    "sleep": "other", "runqueue": "other", "other": "other"}
_WORDS = {"cpu": "on CPU", "lock": "waiting on a lock", "gil": "waiting for the GIL",
          "sync": "waiting for another thread", "io": "waiting on disk IO",
          "net": "waiting on the network", "other": "off CPU",
          "children": "in child spans", "unaccounted": "unaccounted for"}


@dataclass
class SpanBreakdown:
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    service: str
    pid: int
    tid: int
    start_ns: int
    duration_ns: int
    status: str
    cpu_ns: int = 0
    lock_ns: int = 0
    gil_ns: int = 0
    sync_ns: int = 0
    io_ns: int = 0
    net_ns: int = 0
    other_ns: int = 0
    children_ns: int = 0
    unaccounted_ns: int = 0
    samples: int = 0
    #: category -> [function, file, line, ns] of the top Python function in it
    top: dict[str, list] = field(default_factory=dict)
    cause: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _minus(intervals: list[tuple[int, int]], holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    for a, b in intervals:
        cur = a
        for h0, h1 in sorted(holes):
            if h1 <= cur or h0 >= b:
                continue
            if h0 > cur:
                out.append((cur, h0))
            cur = max(cur, h1)
        if cur < b:
            out.append((cur, b))
    return out


def _overlap(intervals: list[tuple[int, int]], a: int, b: int) -> int:
    return sum(max(0, min(b, y) - max(a, x)) for x, y in intervals)


def breakdowns(spans: Iterable[SpanRecord], store: SpanStore, cpu: CpuTimeline | None,
               data=None, profile: Profile | None = None,
               window: tuple[int, int] | None = None) -> list[SpanBreakdown]:
    """One SpanBreakdown per span with a known thread (clipped to `window` when given)."""
    spans = [s for s in spans if s.pid and s.tid]
    waits_by_tid: dict[int, list[tuple[int, int, str]]] = {}
    runs_by_tid: dict[int, list[tuple[int, int]]] = {}
    shorts_by_tid: dict[int, list[tuple[int, int, int, str]]] = {}
    if data is not None:
        for r in data.runs:
            if r.run_start_ns is not None:
                runs_by_tid.setdefault(r.tid, []).append((r.run_start_ns, r.run_end_ns))
            if r.off_end_ns is not None:
                reason = classify(r, data.gil_ranges.get(r.tgid))
                waits_by_tid.setdefault(r.tid, []).append((r.run_end_ns, r.off_end_ns, reason))
        for w in data.open_waits:  # still waiting when read: its run is in open_runs
            reason = classify(w, data.gil_ranges.get(w.tgid))
            waits_by_tid.setdefault(w.tid, []).append((w.run_end_ns, w.off_end_ns, reason))
        for tid, (_tgid, a, b, _so) in data.open_runs.items():
            if a is not None:
                runs_by_tid.setdefault(tid, []).append((a, b if b is not None else a))
        for w in data.short_waits:
            reason = classify(w, data.gil_ranges.get(w.tgid))
            shorts_by_tid.setdefault(w.tid, []).append((w.start_ns, w.end_ns, w.total_ns, reason))
    top = _top_functions(profile) if profile is not None else {}
    out = []
    for s in spans:
        lo, hi = s.start_ns, s.end_ns
        if window is not None:
            lo, hi = max(lo, window[0]), min(hi, window[1])
        if hi <= lo:
            continue
        children = [(c.start_ns, c.end_ns) for c in
                    store.thread_spans(s.pid, s.tid, lo, hi)
                    if c.parent_span_id == s.span_id]
        own = _minus([(lo, hi)], children)
        b = SpanBreakdown(s.trace_id, s.span_id, s.parent_span_id, s.name, s.service, s.pid,
                          s.tid, s.start_ns, s.duration_ns, s.status)
        b.children_ns = (hi - lo) - sum(y - x for x, y in own)
        if cpu is not None:
            b.cpu_ns = sum(cpu.oncpu_ns(s.tid, x, y) for x, y in own)
        observed = b.cpu_ns
        for a, e, reason in waits_by_tid.get(s.tid, ()):
            ns = _overlap(own, a, e)
            if ns:
                cat = _REASON_CATEGORY[reason]
                setattr(b, f"{cat}_ns", getattr(b, f"{cat}_ns") + ns)
                observed += ns
        short_known = 0
        for a, e, total, reason in shorts_by_tid.get(s.tid, ()):
            ns = _overlap(own, a, e)
            if ns:  # spread evenly over the stretch the short waits were added up in
                ns = total if ns >= e - a else round(total * ns / max(1, e - a))
                cat = _REASON_CATEGORY[reason]
                setattr(b, f"{cat}_ns", getattr(b, f"{cat}_ns") + ns)
                short_known += ns
        runs = runs_by_tid.get(s.tid)
        if runs:  # absences inside runs, shorter than the off-CPU threshold
            in_runs = sum(_overlap(own, a, e) for a, e in runs)
            short = max(0, in_runs - b.cpu_ns - short_known)
            b.other_ns += short
            observed += short
        observed += short_known
        own_ns = sum(y - x for x, y in own)
        b.unaccounted_ns = max(0, own_ns - observed)
        b.samples = sum(top.get(s.span_id, {}).get("_samples", [0]))
        b.top = {k: v for k, v in top.get(s.span_id, {}).items() if not k.startswith("_")}
        b.cause = cause(b)
        out.append(b)
    return out


def _python_frame(stack):
    for f in stack:
        if f.filename and not f.filename.startswith("["):
            return f
    return None


def _top_functions(profile: Profile) -> dict[str, dict[str, list]]:
    """span_id -> {category: [function, file, line, ns]} from the linked profile."""
    acc: dict[str, dict[str, dict[tuple, int]]] = {}
    samples: dict[str, int] = {}
    have = {t.name for t in profile.sample_types}
    si = profile.index("samples") if "samples" in have else None
    for (stack, labels), vec in profile.samples.items():
        span = next((v for k, v in labels if k == "span_id"), None)
        if span is None:
            continue
        if si is not None:
            samples[span] = samples.get(span, 0) + vec[si]
        f = _python_frame(stack)
        if f is None:
            continue
        reason_cat = None
        for k, v in labels:
            if k == "reason":
                reason_cat = _REASON_CATEGORY.get(str(v))
        for cat, t in CATEGORY_TYPE.items():
            if t in have:
                if t == "off_cpu" and reason_cat != cat:
                    continue
                v = vec[profile.index(t)]
                if v:
                    d = acc.setdefault(span, {}).setdefault(cat, {})
                    key = (f.name, f.filename, f.line)
                    d[key] = d.get(key, 0) + v
    out: dict[str, dict[str, list]] = {}
    for span, cats in acc.items():
        out[span] = {cat: list(max(d.items(), key=lambda kv: kv[1])[0]) + [max(d.values())]
                     for cat, d in cats.items()}
    for span, n in samples.items():
        out.setdefault(span, {})["_samples"] = [n]
    return out


def cause(b: SpanBreakdown) -> str:
    """'62% waiting on a lock in Repo.save (repo.py:88)'."""
    parts = {c: getattr(b, f"{c}_ns") for c in CATEGORIES}
    parts["children"] = b.children_ns
    parts["unaccounted"] = b.unaccounted_ns
    total = sum(parts.values())
    if not total:
        return ""
    cat, ns = max(parts.items(), key=lambda kv: kv[1])
    text = f"{round(100 * ns / total)}% {_WORDS[cat]}"
    fn = b.top.get(cat)
    if fn:
        name, filename, line = fn[0], fn[1], fn[2]
        short = filename.rsplit("/", 1)[-1]
        text += f" in {name} ({short}:{line})" if line else f" in {name} ({short})"
    return text
