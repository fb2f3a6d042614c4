"""Ad hoc profiling of one process: `spanflame attach PID` as a library call.

Without eBPF probes, each sample type comes from py-spy's own sample counts: `cpu` counts only
threads running at the sample instant (py-spy checks each thread's kernel state), `wall` counts
every thread. py-spy's output formats carry no per-sample running flag, so cpu and wall together
take one py-spy run each.

With eBPF probes (offcpu, lock, io, net), one py-spy run records the timeline of every thread
(idle ones included), the sched probe gives exact on-CPU runs, and every wait is put on the
Python stack py-spy saw at that moment (see agent/waits.py). If the probes cannot run here, the
attach goes on with py-spy alone and says which probes are off and why.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from agent.aggregate import (add_counts, add_pieces, fill_sample_counts, new_profile,
                             timeline_pieces)
from agent.errors import UsageError
from agent.model import SAMPLE_TYPES, Profile
from agent.pyspy import PySpyRecorder, Recording, check_target
from agent.schedstat import SchedstatPoller
from agent.timeline import PiecewiseCpu

#: Probes `attach --probes` knows, and the sample types each gives.
PROBE_TYPES: dict[str, tuple[str, ...]] = {
    "cpu": ("cpu",),
    "wall": ("wall",),
    "offcpu": ("off_cpu",),
    "lock": ("lock_wait", "gil_wait"),
    "io": ("io_wait", "io"),
    "net": ("net_wait", "net_send", "net_recv", "tcp_retransmits"),
}
KNOWN_PROBES = tuple(PROBE_TYPES)
BPF_PROBES = ("offcpu", "lock", "io", "net")
#: What `all` means: every probe but wall (idle threads' time is what the wait probes explain).
ALL_PROBES = ("cpu", "offcpu", "lock", "io", "net")


def parse_probes(text: str) -> tuple[str, ...]:
    """'cpu,lock' -> ('cpu', 'lock'); 'all' -> cpu and every eBPF probe. Unknown names are a
    UsageError."""
    names = [p.strip().lower() for p in text.split(",") if p.strip()]
    if not names:
        raise UsageError("--probes is empty: use one or more of " + ",".join(KNOWN_PROBES))
    unknown = [n for n in names if n not in KNOWN_PROBES and n != "all"]
    if unknown:
        raise UsageError(f"unknown probe {unknown[0]!r}: use one or more of "
                         + ",".join(KNOWN_PROBES) + " or all")
    if "all" in names:
        names = list(ALL_PROBES) + names
    return tuple(p for p in KNOWN_PROBES if p in names)


@dataclass(frozen=True)
class AttachOptions:
    pid: int
    duration_s: float = 10.0
    rate_hz: int = 100
    probes: tuple[str, ...] = ("cpu",)
    offcpu_threshold_ns: int = 1_000_000

    def __post_init__(self) -> None:
        if self.duration_s <= 0:
            raise UsageError("--duration must be positive")
        if not 1 <= self.rate_hz <= 1000:
            raise UsageError("--rate must be between 1 and 1000 Hz")
        if not 10_000 <= self.offcpu_threshold_ns <= 10_000_000_000:
            raise UsageError("--offcpu-threshold must be between 0.01 and 10000 ms")


@dataclass
class AttachResult:
    profile: Profile
    recording: Recording
    elapsed_s: float
    source: str
    notes: list[str] = field(default_factory=list)
    threads: int = 0
    probes_on: list[str] = field(default_factory=list)
    probes_off: dict[str, str] = field(default_factory=dict)
    probe_load_s: float = 0.0
    kernel_headers: str = ""
    waits: object = None
    counters: dict[str, int] = field(default_factory=dict)


def attach(options: AttachOptions, *, progress: Callable[[float], None] | None = None,
           stop: threading.Event | None = None) -> AttachResult:
    """Profile `options.pid` for `options.duration_s` seconds (less if it exits or `stop` is set).

    `progress` is called with the elapsed fraction about ten times a second. Raises TargetError
    subclasses when the target cannot be profiled, SamplerError when py-spy fails.
    """
    check_target(options.pid)
    stop = stop or threading.Event()
    bpf = [p for p in options.probes if p in BPF_PROBES]
    if bpf:
        from probes.session import ProbeSession
        session = ProbeSession(bpf, offcpu_min_ns=options.offcpu_threshold_ns)
        session.start([options.pid])
        if session.active:
            return _attach_timeline(options, session, progress, stop)
        result = _attach_counts(options, progress, stop)
        result.probes_off = dict(session.off)
        result.notes += [f"probe {n} off: {why}" for n, why in session.off.items()]
        result.probe_load_s = session.load_seconds
        session.close()
        return result
    return _attach_counts(options, progress, stop)


def _attach_counts(options: AttachOptions, progress, stop) -> AttachResult:
    types = [p for p in options.probes if p in ("cpu", "wall")] or ["cpu"]
    recorders = {t: PySpyRecorder(options.pid, rate_hz=options.rate_hz, idle=(t == "wall"),
                                  output="speedscope") for t in types}
    recordings, elapsed, interrupted = _record(options, list(recorders.items()), progress, stop)
    notes = _exit_notes(recordings.values(), elapsed, interrupted)
    start_ns = min(r.start_ns for r in recordings.values())
    end_ns = max(r.end_ns for r in recordings.values())
    profile = new_profile(types, options.rate_hz, start_ns, end_ns)
    for i, t in enumerate(types):
        add_counts(profile, recordings[t].counts, options.pid, t, count_samples=(i == 0))
    source = ", ".join(
        f"{t}: py-spy samples" + (" of running threads" if t == "cpu" else " of all threads")
        for t in types)
    threads = {k[0] for r in recordings.values() for k in r.counts}
    return AttachResult(profile=profile, recording=recordings[types[0]], elapsed_s=elapsed,
                        source=source, notes=notes, threads=len(threads))


def _attach_timeline(options: AttachOptions, session, progress, stop) -> AttachResult:
    from agent.waits import RunsCpu, active_hold_pieces, add_probe_samples

    pid = options.pid
    schedstat = PiecewiseCpu()
    poller = SchedstatPoller(pid, cpu=schedstat)
    rec = PySpyRecorder(pid, rate_hz=options.rate_hz, idle=True, output="chrometrace")
    try:
        poller.poll_once()
        recordings, elapsed, interrupted = _record(options, [("timeline", rec)], progress, stop)
        poller.poll_once()
    finally:
        data = session.close()
    recording = recordings["timeline"]
    notes = _exit_notes([recording], elapsed, interrupted)
    notes += [f"probe {n} off: {why}" for n, why in session.off.items()]
    types = []
    for p in options.probes:
        if p in ("cpu", "wall") or p in session.active:
            types += [t for t in PROBE_TYPES[p] if t not in types]
    types.sort(key=list(SAMPLE_TYPES).index)
    profile = new_profile(types, options.rate_hz, recording.start_ns, recording.end_ns)
    timelines = recording.threads
    cpu = RunsCpu(data, pid, recording.start_ns, recording.end_ns, fallback=schedstat)
    if "cpu" in types:
        for tl in timelines.values():
            add_pieces(profile, active_hold_pieces(tl, cpu), cpu, types=("cpu",))
    if "wall" in types:
        add_pieces(profile, timeline_pieces(timelines.values(), cpu), None, types=("wall",))
    waits = add_probe_samples(profile, pid, timelines, data,
                              window=(recording.start_ns, recording.end_ns))
    fill_sample_counts(profile)
    kh = session.headers.detail if session.headers else ""
    return AttachResult(
        profile=profile, recording=recording, elapsed_s=elapsed,
        source="py-spy timeline (all threads) + eBPF " + ",".join(session.active),
        notes=notes, threads=len(timelines), probes_on=list(session.active),
        probes_off=dict(session.off), probe_load_s=session.load_seconds, kernel_headers=kh,
        waits=waits, counters=dict(data.counters))


def _record(options: AttachOptions, recorders: list[tuple[str, PySpyRecorder]], progress, stop
            ) -> tuple[dict[str, Recording], float, bool]:
    recordings: dict[str, Recording] = {}
    try:
        for _name, rec in recorders:
            rec.start()
        t0 = time.monotonic()
        recs = [r for _n, r in recorders]
        try:
            interrupted = _wait(recs, options.duration_s, t0, progress, stop)
        finally:
            for r in recs:
                r.stop()
            for name, r in recorders:
                recordings[name] = r.wait()
        elapsed = time.monotonic() - t0
    finally:
        for _name, r in recorders:
            r.close()
    return recordings, elapsed, interrupted


def _exit_notes(recordings, elapsed: float, interrupted: bool) -> list[str]:
    notes = []
    if interrupted:
        notes.append(f"stopped early after {elapsed:.1f} s; wrote what was recorded")
    if any(r.target_exited for r in recordings):
        notes.append(f"target exited after {elapsed:.1f} s; the profile is partial")
    return notes


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
