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
from agent.awaits import WHAT_WORDS, user_frame
from agent.waits import classify

#: how far inside a span's edges a sample must be to say something about the span (the app's
#: clock and the kernel's are converted into each other to a few microseconds)
EDGE_NS = 200_000
CATEGORIES = ("cpu", "lock", "gil", "sync", "await", "io", "net", "other")
#: Which sample type shows the functions behind each category.
CATEGORY_TYPE = {"cpu": "cpu", "lock": "lock_wait", "gil": "gil_wait", "sync": "off_cpu",
                 "await": "await",
                 "io": "io_wait", "net": "net_wait", "other": "off_cpu"}
_REASON_CATEGORY = {"lock": "lock", "gil": "gil", "sync": "sync", "io": "io", "net": "net",
                    "sleep": "other", "runqueue": "other", "other": "other"}
_WORDS = {"cpu": "on CPU", "lock": "waiting on a lock", "gil": "waiting for the GIL",
          "sync": "waiting for another thread", "await": "awaiting",
          "io": "waiting on disk IO",
          "net": "waiting on the network", "other": "off CPU",
          "children": "in child spans", "unaccounted": "unaccounted for",
          "unobserved": "not observed"}


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
    await_ns: int = 0       # an asyncio task's span, suspended (awaiting), not on any thread
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
        d = asdict(self)
        d["unobserved_ns"] = unobserved_ns(d)
        return d


_PART_KEYS = tuple(f"{c}_ns" for c in CATEGORIES) + ("children_ns", "unaccounted_ns")


def unobserved_ns(bd: dict) -> int:
    """The part of a span no window covered (it began before the agent watched its process, or
    a window with its rest is still to come): its duration less the parts windows gave it."""
    return max(0, bd.get("duration_ns", 0) - sum(bd.get(k, 0) for k in _PART_KEYS))


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
    waits_by_tid: dict[int, list[tuple[int, int, str, int]]] = {}
    runs_by_tid: dict[int, list[tuple[int, int]]] = {}
    shorts_by_tid: dict[int, list[tuple[int, int, int, str, int]]] = {}
    if data is not None:
        for r in data.runs:
            if r.run_start_ns is not None:
                runs_by_tid.setdefault(r.tid, []).append((r.run_start_ns, r.run_end_ns))
            if r.off_end_ns is not None:
                reason = classify(r, data.gil_ranges.get(r.tgid))
                waits_by_tid.setdefault(r.tid, []).append((r.run_end_ns, r.off_end_ns, reason,
                                                           r.task))
        for w in data.open_waits:  # still waiting when read: its run is in open_runs
            reason = classify(w, data.gil_ranges.get(w.tgid))
            waits_by_tid.setdefault(w.tid, []).append((w.run_end_ns, w.off_end_ns, reason,
                                                       w.task))
        for tid, (_tgid, a, b, _so) in data.open_runs.items():
            if a is not None:
                runs_by_tid.setdefault(tid, []).append((a, b if b is not None else a))
        for w in data.short_waits:
            reason = classify(w, data.gil_ranges.get(w.tgid))
            shorts_by_tid.setdefault(w.tid, []).append((w.start_ns, w.end_ns, w.total_ns, reason,
                                                        w.task))
    top = _top_functions(profile) if profile is not None else {}
    samples_by_tid: dict[int, list[tuple[int, int]]] = {}
    for smp in (data.samples if data is not None else ()):
        samples_by_tid.setdefault(smp.tid, []).append((smp.t_ns, smp.task))
    for v in samples_by_tid.values():
        v.sort()
    out = []
    for s in spans:
        lo, hi = s.start_ns, s.end_ns
        if window is not None:
            lo, hi = max(lo, window[0]), min(hi, window[1])
        if hi <= lo:
            continue
        kids = (store.trace(s.trace_id) if s.task else
                store.thread_spans(s.pid, s.tid, lo, hi))
        children = [(c.start_ns, c.end_ns) for c in kids if c.parent_span_id == s.span_id]
        own = _minus([(lo, hi)], children)
        b = SpanBreakdown(s.trace_id, s.span_id, s.parent_span_id, s.name, s.service, s.pid,
                          s.tid, s.start_ns, s.duration_ns, s.status)
        b.children_ns = (hi - lo) - sum(y - x for x, y in own)
        # A task span whose task kept its thread throughout is like a thread's span; one that
        # let other tasks run (it awaited) has its own samples' CPU, its own waits, and the
        # rest of its time it was suspended: awaiting.
        in_task = bool(s.task) and (cpu is None or not _held_thread(
            samples_by_tid.get(s.tid, ()), s.task, lo, hi,
            sum(cpu.oncpu_ns(s.tid, x, y) for x, y in own), sum(y - x for x, y in own)))
        if in_task:
            b.cpu_ns = top.get(s.span_id, {}).get("_cpu", [0])[0]
        elif cpu is not None:
            b.cpu_ns = sum(cpu.oncpu_ns(s.tid, x, y) for x, y in own)
        observed = b.cpu_ns
        for a, e, reason, task in waits_by_tid.get(s.tid, ()):
            if in_task and task != s.task:
                continue
            ns = _overlap(own, a, e)
            if ns:
                cat = _REASON_CATEGORY[reason]
                setattr(b, f"{cat}_ns", getattr(b, f"{cat}_ns") + ns)
                observed += ns
        short_known = 0
        for a, e, total, reason, task in shorts_by_tid.get(s.tid, ()):
            if in_task and task != s.task:
                continue
            ns = _overlap(own, a, e)
            if ns:  # spread evenly over the stretch the short waits were added up in
                ns = total if ns >= e - a else round(total * ns / max(1, e - a))
                cat = _REASON_CATEGORY[reason]
                setattr(b, f"{cat}_ns", getattr(b, f"{cat}_ns") + ns)
                short_known += ns
        runs = runs_by_tid.get(s.tid) if not in_task else None
        if runs:  # absences inside runs, shorter than the off-CPU threshold
            in_runs = sum(_overlap(own, a, e) for a, e in runs)
            short = max(0, in_runs - b.cpu_ns - short_known)
            b.other_ns += short
            observed += short
        observed += short_known
        own_ns = sum(y - x for x, y in own)
        if in_task:
            b.await_ns = max(0, own_ns - observed)
            observed += b.await_ns
        b.unaccounted_ns = max(0, own_ns - observed)
        b.samples = sum(top.get(s.span_id, {}).get("_samples", [0]))
        b.top = {k: v for k, v in top.get(s.span_id, {}).items() if not k.startswith("_")}
        b.cause = cause(b)
        out.append(b)
    roll_up(out)
    return out


def roll_up(out: list[SpanBreakdown]) -> None:
    """A span whose time is mostly in its child spans says what those children did: the
    category that dominates its descendants' own time, the function behind it and the span it
    was in ('96% in child spans: mostly waiting on a lock in Repo.save (repo.py:54), in
    save_order'). Only descendants in `out` are known (children end before their parent, so
    they are linked in the same window or an earlier one)."""
    by_id = {b.span_id: b for b in out}
    kids: dict[str, list[SpanBreakdown]] = {}
    for b in out:
        if b.parent_span_id in by_id and b.parent_span_id != b.span_id:
            kids.setdefault(b.parent_span_id, []).append(b)
    for b in out:
        if not b.cause.endswith(_WORDS["children"]) or b.span_id not in kids:
            continue
        acc = dict.fromkeys(CATEGORIES, 0)
        best: dict[str, tuple[int, SpanBreakdown]] = {}
        todo, seen = list(kids[b.span_id]), {b.span_id}
        while todo:  # iterative: a trace may be deep
            k = todo.pop()
            if k.span_id in seen:
                continue
            seen.add(k.span_id)
            for c in CATEGORIES:
                ns = getattr(k, f"{c}_ns")
                acc[c] += ns
                if ns > best.get(c, (0, None))[0]:
                    best[c] = (ns, k)
            todo.extend(kids.get(k.span_id, ()))
        cat = max(CATEGORIES, key=lambda c: acc[c])
        if not acc[cat]:
            continue
        text = f"{b.cause}: mostly {_WORDS[cat]}"
        k = best[cat][1]
        fn = k.top.get(cat)
        if fn:
            short = fn[1].rsplit("/", 1)[-1]
            text += f" in {fn[0]} ({short}:{fn[2]})" if fn[2] else f" in {fn[0]} ({short})"
        b.cause = f"{text}, in {k.name}"[:500]


def _held_thread(samples: list[tuple[int, int]], task: int, lo: int, hi: int,
                 thread_cpu_ns: int, own_ns: int) -> bool:
    """Whether the task seems to have held its thread throughout [lo, hi): no CPU sample of the
    thread in it (a little inside its edges, for the two clocks) is of another task, and either
    one is of this task or the thread was busy most of the time (an idle thread means the task
    was suspended, awaiting)."""
    import bisect
    lo, hi = lo + EDGE_NS, hi - EDGE_NS
    i = bisect.bisect_left(samples, (lo, -1))
    seen = False
    while i < len(samples) and samples[i][0] < hi:
        if samples[i][1] != task:
            return False
        seen = True
        i += 1
    return seen or thread_cpu_ns >= 0.5 * own_ns


def _python_frame(stack):
    for f in stack:
        if f.filename and not f.filename.startswith("["):
            return f
    return None


def _top_functions(profile: Profile) -> dict[str, dict[str, list]]:
    """span_id -> {category: [function, file, line, ns]} from the linked profile."""
    acc: dict[str, dict[str, dict[tuple, int]]] = {}
    samples: dict[str, int] = {}
    cpu_ns: dict[str, int] = {}
    have = {t.name for t in profile.sample_types}
    ci = profile.index("cpu") if "cpu" in have else None
    si = profile.index("samples") if "samples" in have else None
    for (stack, labels), vec in profile.samples.items():
        span = next((v for k, v in labels if k == "span_id"), None)
        if span is None:
            continue
        if si is not None:
            samples[span] = samples.get(span, 0) + vec[si]
        if ci is not None and vec[ci]:
            cpu_ns[span] = cpu_ns.get(span, 0) + vec[ci]
        f = _python_frame(stack)
        if f is None:
            continue
        reason_cat = None
        awaiting = ""
        for k, v in labels:
            if k == "reason":
                reason_cat = _REASON_CATEGORY.get(str(v))
            elif k == "awaiting":
                awaiting = str(v)
        if awaiting and "await" in have and vec[profile.index("await")]:
            uf = user_frame(stack) or f
            d = acc.setdefault(span, {}).setdefault("await", {})
            key = (uf.name, uf.filename, uf.line, awaiting)
            d[key] = d.get(key, 0) + vec[profile.index("await")]
        for cat, t in CATEGORY_TYPE.items():
            if t in have and cat != "await":
                if t == "off_cpu" and reason_cat != cat:
                    continue
                v = vec[profile.index(t)]
                if v:
                    d = acc.setdefault(span, {}).setdefault(cat, {})
                    key = (f.name, f.filename, f.line)
                    d[key] = d.get(key, 0) + v
    out: dict[str, dict[str, list]] = {}
    for span, cats in acc.items():
        out[span] = {}
        for cat, d in cats.items():
            key, ns = max(d.items(), key=lambda kv: kv[1])
            # [function, file, line, ns] (await: and what it awaited, fifth)
            out[span][cat] = list(key[:3]) + [ns] + list(key[3:])
    for span, n in samples.items():
        out.setdefault(span, {})["_samples"] = [n]
    for span, ns in cpu_ns.items():
        out.setdefault(span, {})["_cpu"] = [ns]
    return out


def cause(b: SpanBreakdown) -> str:
    """'62% waiting on a lock in Repo.save (repo.py:88)'."""
    parts = {c: getattr(b, f"{c}_ns") for c in CATEGORIES}
    parts["children"] = b.children_ns
    parts["unaccounted"] = b.unaccounted_ns
    parts["unobserved"] = max(0, b.duration_ns - sum(parts.values()))
    total = sum(parts.values())
    if not total:
        return ""
    cat, ns = max(parts.items(), key=lambda kv: kv[1])
    text = f"{round(100 * ns / total)}% {_WORDS[cat]}"
    fn = b.top.get(cat)
    if cat == "await" and fn and len(fn) > 4 and WHAT_WORDS.get(fn[4]):
        text += " " + WHAT_WORDS[fn[4]]
    if fn:
        name, filename, line = fn[0], fn[1], fn[2]
        short = filename.rsplit("/", 1)[-1]
        text += f" in {name} ({short}:{line})" if line else f" in {name} ({short})"
    return text
