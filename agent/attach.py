"""Ad hoc profiling of one process: `spanflame attach PID` as a library call.

py-spy samples the Python stacks of every thread; the samples become one Profile with per-sample
labels pid, thread_id and thread_name.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from agent.aggregate import add_counts, new_profile
from agent.errors import UsageError
from agent.model import Profile
from agent.pyspy import PySpyRecorder, Recording, check_target

#: Probes `attach --probes` knows, in the order their sample types appear.
KNOWN_PROBES = ("cpu", "wall")


def parse_probes(text: str) -> tuple[str, ...]:
    """'cpu,wall' -> ('cpu', 'wall'); 'all' -> every probe. Unknown names are a UsageError."""
    names = [p.strip().lower() for p in text.split(",") if p.strip()]
    if not names:
        raise UsageError("--probes is empty: use one or more of " + ",".join(KNOWN_PROBES))
    if "all" in names:
        return KNOWN_PROBES
    unknown = [n for n in names if n not in KNOWN_PROBES]
    if unknown:
        raise UsageError(f"unknown probe {unknown[0]!r}: use one or more of "
                         + ",".join(KNOWN_PROBES) + " or all")
    return tuple(p for p in KNOWN_PROBES if p in names)


@dataclass(frozen=True)
class AttachOptions:
    pid: int
    duration_s: float = 10.0
    rate_hz: int = 100
    probes: tuple[str, ...] = ("cpu",)

    def __post_init__(self) -> None:
        if self.duration_s <= 0:
            raise UsageError("--duration must be positive")
        if not 1 <= self.rate_hz <= 1000:
            raise UsageError("--rate must be between 1 and 1000 Hz")


@dataclass
class AttachResult:
    profile: Profile
    recording: Recording
    elapsed_s: float
    source: str
    notes: list[str] = field(default_factory=list)
    threads: int = 0


def attach(options: AttachOptions, *, progress: Callable[[float], None] | None = None,
           stop: threading.Event | None = None) -> AttachResult:
    """Profile `options.pid` for `options.duration_s` seconds (less if it exits or `stop` is set).

    `progress` is called with the elapsed fraction about ten times a second. Raises TargetError
    subclasses when the target cannot be profiled, SamplerError when py-spy fails.

    Each sample type comes from py-spy's own sample counts: `cpu` counts only threads running
    at the sample instant (py-spy checks each thread's kernel state), `wall` counts every thread.
    py-spy's output formats carry no per-sample running flag, so cpu and wall together take one
    py-spy run each.
    """
    check_target(options.pid)
    stop = stop or threading.Event()
    notes: list[str] = []
    types = [p for p in options.probes if p in ("cpu", "wall")]
    recorders = {t: PySpyRecorder(options.pid, rate_hz=options.rate_hz, idle=(t == "wall"),
                                  output="speedscope") for t in types}
    recordings: dict[str, Recording] = {}
    try:
        for rec in recorders.values():
            rec.start()
        t0 = time.monotonic()
        try:
            interrupted = _wait(list(recorders.values()), options.duration_s, t0, progress, stop)
        finally:
            for rec in recorders.values():
                rec.stop()
            for t, rec in recorders.items():
                recordings[t] = rec.wait()
        elapsed = time.monotonic() - t0
    finally:
        for rec in recorders.values():
            rec.close()
    primary = recordings[types[0]]
    if interrupted:
        notes.append(f"stopped early after {elapsed:.1f} s; wrote what was recorded")
    if any(r.target_exited for r in recordings.values()):
        notes.append(f"target exited after {elapsed:.1f} s; the profile is partial")
    start_ns = min(r.start_ns for r in recordings.values())
    end_ns = max(r.end_ns for r in recordings.values())
    profile = new_profile(types, options.rate_hz, start_ns, end_ns)
    for i, t in enumerate(types):
        add_counts(profile, recordings[t].counts, options.pid, t, count_samples=(i == 0))
    source = ", ".join(
        f"{t}: py-spy samples" + (" of running threads" if t == "cpu" else " of all threads")
        for t in types)
    threads = {k[0] for r in recordings.values() for k in r.counts}
    return AttachResult(profile=profile, recording=primary, elapsed_s=elapsed,
                        source=source, notes=notes, threads=len(threads))


def _wait(recs: list[PySpyRecorder], duration_s: float, t0: float,
          progress: Callable[[float], None] | None, stop: threading.Event) -> bool:
    """Wait for the deadline, py-spy exiting, or `stop`; True when stopped early by the user."""
    try:
        while True:
            elapsed = time.monotonic() - t0
            if progress is not None:
                progress(min(1.0, elapsed / duration_s))
            if elapsed >= duration_s or not all(r.running() for r in recs):
                return False
            if stop.wait(min(0.1, duration_s - elapsed)):
                return True
    except KeyboardInterrupt:
        return True
