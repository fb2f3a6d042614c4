"""Ad hoc profiling of one process: `spanflame attach PID` as a library call.

Two stack sources (`--sampler`):

- **bpf**, the kernel stack walker: CPU samples from a perf_event program on every CPU, and every
  wait (off-CPU, lock, GIL, IO, network) with the Python stack read in the kernel at the moment
  the thread blocked. One kind of record, each on its exact stack (agent/recordprofile.py).
- **py-spy**, where BPF is not allowed or the interpreter is not one the walker reads. Without
  eBPF probes, each sample type comes from py-spy's own sample counts: `cpu` counts only threads
  running at the sample instant, scaled per thread to its CPU time from schedstat; `wall` counts
  every thread. With eBPF probes, one py-spy run records the timeline of every thread, the sched
  probe gives exact on-CPU runs, and every wait is put on the Python stack py-spy saw near that
  moment (agent/waits.py: the compensation a sampler outside the kernel needs).

`auto` (the default) takes the kernel walker where it can run and says why when it cannot.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace, dataclass, field
from typing import Callable

from agent.aggregate import (add_counts, add_pieces, fill_sample_counts, new_profile,
                             timeline_pieces)
from agent.errors import SamplerError, UsageError
from agent.model import SAMPLE_TYPES, Profile
from agent.pyspy import PySpyRecorder, Recording, check_target
from agent.schedstat import SchedstatPoller
from agent.timeline import PiecewiseCpu

log = logging.getLogger(__name__)

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
SAMPLERS = ("auto", "bpf", "py-spy")
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
    #: receive spans over OTLP/HTTP on this HOST:PORT during the attach and link samples to them
    otlp_listen: str | None = None
    #: after recording, wait for spans until none arrived for this long (bounded by 30 s)
    span_wait_s: float = 6.0
    #: sample only the thread holding the GIL (py-spy --gil): far cheaper with many threads
    gil_only: bool = False
    #: where stacks come from: auto (the kernel walker where it can run, else py-spy), bpf, py-spy
    sampler: str = "auto"
    #: also profile the target's Python descendants, as they start (kernel walker only)
    subprocesses: bool = False

    def __post_init__(self) -> None:
        if self.duration_s <= 0:
            raise UsageError("--duration must be positive")
        if not 1 <= self.rate_hz <= 1000:
            raise UsageError("--rate must be between 1 and 1000 Hz")
        if not 10_000 <= self.offcpu_threshold_ns <= 10_000_000_000:
            raise UsageError("--offcpu-threshold must be between 0.01 and 10000 ms")
        if self.sampler not in SAMPLERS:
            raise UsageError(f"unknown sampler {self.sampler!r}: use " + ", ".join(SAMPLERS))
        if self.subprocesses and self.sampler == "py-spy":
            raise UsageError("--subprocesses needs the kernel stack walker (--sampler auto or "
                             "bpf)")


@dataclass
class AttachResult:
    profile: Profile
    recording: Recording | None
    elapsed_s: float
    source: str
    #: "bpf" (the kernel stack walker) or "py-spy", and why when not the kernel walker
    sampler: str = "py-spy"
    sampler_reason: str = ""
    notes: list[str] = field(default_factory=list)
    threads: int = 0
    probes_on: list[str] = field(default_factory=list)
    probes_off: dict[str, str] = field(default_factory=dict)
    probe_load_s: float = 0.0
    kernel_headers: str = ""
    waits: object = None
    counters: dict[str, int] = field(default_factory=dict)
    #: with --otlp-listen: spans received, and the breakdown of this process's spans
    spans_received: int = 0
    spans_unlinkable: int = 0
    span_breakdowns: list = field(default_factory=list)
    otlp_url: str = ""
    #: samples the stack source took (py-spy's, or the kernel's CPU samples), and its errors
    samples_taken: int = 0
    sample_errors: int = 0


def attach(options: AttachOptions, *, progress: Callable[[float], None] | None = None,
           stop: threading.Event | None = None,
           on_listen: Callable[[str], None] | None = None,
           on_wait: Callable[[str], None] | None = None,
           spawn: Callable[[], int] | None = None) -> AttachResult:
    """Profile `options.pid` for `options.duration_s` seconds (less if it exits or `stop` is set).

    `progress` is called with the elapsed fraction about ten times a second; `on_listen` with the
    OTLP receiver's URL once it accepts spans. Raises TargetError subclasses when the target
    cannot be profiled, SamplerError when py-spy fails, SpanflameError when the OTLP address
    cannot be bound.
    """
    if spawn is None:
        check_target(options.pid)
    elif options.sampler == "py-spy":  # nothing to load first: start it now
        options = replace(options, pid=spawn())
        _wait_interpreter(options.pid)
    stop = stop or threading.Event()
    receiver = None
    if options.otlp_listen:
        receiver = _SpanReceiver(options.otlp_listen)
        receiver.on_wait = on_wait
        if on_listen is not None:
            on_listen(receiver.url)
    session = None
    try:
        bpf = [p for p in options.probes if p in BPF_PROBES]
        why = ""
        if options.sampler != "py-spy":
            from probes.session import ProbeSession
            # Drained often: a frame is named from the process's memory when first seen, and
            # a target that exits takes its memory with it.
            session = ProbeSession(bpf + ["cpu"], rate_hz=options.rate_hz,
                                   offcpu_min_ns=options.offcpu_threshold_ns,
                                   drain_interval_s=0.05)
            if spawn is not None:  # `record`: the probes are ready before the command starts
                session.start([])
                options = replace(options, pid=spawn())
                _wait_interpreter(options.pid)
                if session.loaded:
                    session.add_target(options.pid)
                check_target(options.pid)
            else:
                session.start([options.pid])
            if session.loaded and session.walker.get(options.pid) is None:
                result = _attach_kernel(options, session, receiver, progress, stop)
                result.sampler = "bpf"
                return result
            why = (session.walker.get(options.pid) if session.loaded
                   else session.off.get("cpu") or next(iter(session.off.values()), "BPF is off"))
            if options.sampler == "bpf" or options.subprocesses:
                flag = "--sampler bpf" if options.sampler == "bpf" else "--subprocesses"
                raise SamplerError(f"{flag}: the kernel stack walker cannot profile PID "
                                   f"{options.pid}: {why}")
            if not bpf or not session.loaded:
                session.close()
                session = None
        elif bpf:
            from probes.session import ProbeSession
            session = ProbeSession(bpf, offcpu_min_ns=options.offcpu_threshold_ns,
                                   python_stacks=False)
            session.start([options.pid])
        if (session is not None and session.active) or receiver is not None:
            result = _attach_timeline(options, session, receiver, progress, stop)
        else:
            result = _attach_counts(options, progress, stop)
        result.sampler = "py-spy"
        result.sampler_reason = why or "--sampler py-spy"
        if result.recording is not None:
            result.samples_taken = result.recording.samples
            result.sample_errors = result.recording.errors
        if why:
            result.notes.insert(0, f"stacks from py-spy: {why}")
        if session is not None:
            session.close()
            result.probes_off = {k: v for k, v in session.off.items() if k != "cpu"}
            result.probe_load_s = session.load_seconds
            result.notes += [f"probe {n} off: {w}" for n, w in result.probes_off.items()]
        elif bpf and options.sampler != "py-spy" and why:
            result.probes_off = {p: why for p in bpf}
            result.notes += [f"probe {n} off: {why}" for n in bpf]
        return result
    finally:
        if session is not None:
            session.close()
        if receiver is not None:
            receiver.close()


def _attach_kernel(options: AttachOptions, session, receiver, progress, stop) -> AttachResult:
    """Everything from the kernel: CPU samples and waits, each with the Python stack of its
    moment, then linked to spans by thread and time."""
    from agent.recordprofile import add_records, kernel_python_stack
    from agent.threadnames import ThreadNameCache
    from agent.waits import RunsCpu

    pid = options.pid
    names = ThreadNameCache(pid, session.procs.get(pid))
    follower = _Descendants(session, pid).start() if options.subprocesses else None
    poller = None
    if receiver is not None and pid in session.procs:  # what suspended asyncio tasks await
        from agent.awaits import AwaitPoller
        poller = AwaitPoller().start()
        poller.watch(session.procs[pid])
        receiver.store.on_add(poller.want)
    start_ns = session.data.start_ns
    t0 = time.monotonic()
    try:
        interrupted = _wait_alive(pid, options.duration_s, t0, progress, stop)
    finally:
        if poller is not None:
            poller.close()
        if follower is not None:
            follower.close()
    elapsed = time.monotonic() - t0
    names.refresh()
    data = session.close()
    children = follower.children if follower is not None else {}
    end_ns = data.end_ns
    exited = not _alive(pid)
    if receiver is not None:
        receiver.linger(options.span_wait_s, pid=pid, end_ns=end_ns)
    types = []
    for p in options.probes:
        if p in ("cpu", "wall") or p in session.active:
            types += [t for t in PROBE_TYPES[p] if t not in types]
    awaits = poller.window(pid, start_ns, end_ns) if poller is not None else []
    if awaits and "offcpu" in session.active:
        types.append("await")
    types.sort(key=list(SAMPLE_TYPES).index)
    profile = new_profile(types, options.rate_hz, start_ns, end_ns)
    linker = None
    if receiver is not None:
        from agent.tracelink import TraceLinker
        linker = TraceLinker(receiver.store, options.rate_hz, window=(start_ns - 1, end_ns + 1),
                             tasks=True)
        names.from_spans(receiver.store.all())
    cpu = RunsCpu(data, pid, start_ns, end_ns)
    waits = add_records(profile, pid, data, python_stack=kernel_python_stack,
                        window=(start_ns, end_ns), linker=linker, thread_names=names.get(),
                        cpu=cpu)
    for child, child_names in children.items():  # --subprocesses: each labelled by its pid
        waits.add(add_records(profile, child, data, python_stack=kernel_python_stack,
                              window=(start_ns, end_ns), linker=linker,
                              thread_names=child_names.get(),
                              cpu=RunsCpu(data, child, start_ns, end_ns)))
    if awaits:
        from agent.recordprofile import add_awaits
        waits.await_ns = add_awaits(profile, pid, awaits, window=(start_ns, end_ns),
                                    linker=linker, thread_names=names.get())
    fill_sample_counts(profile)
    notes = []
    if interrupted:
        notes.append(f"stopped early after {elapsed:.1f} s; wrote what was recorded")
    if exited:
        notes.append(f"target exited after {elapsed:.1f} s; the profile is partial")
    if follower is not None:
        notes.append(f"subprocesses: {len(children)} profiled"
                     + (f" (PIDs {', '.join(map(str, sorted(children)[:20]))}"
                        + (", ..." if len(children) > 20 else "") + ")" if children else "")
                     + (f"; {len(follower.skipped)} not (" + "; ".join(
                         f"PID {p}: {w}" for p, w in sorted(follower.skipped.items())[:5])
                        + ")" if follower.skipped else ""))
    threads = ({s.tid for s in data.samples} | {r.tid for r in data.runs}
               | {w.tid for w in data.open_waits})
    result = AttachResult(
        profile=profile, recording=None, elapsed_s=elapsed,
        source="kernel stack walker (eBPF): CPU samples at "
               f"{options.rate_hz} Hz and waits, each with its Python stack",
        notes=notes, threads=len(threads),
        probes_on=[p for p in session.active if p != "cpu"],
        probes_off={k: v for k, v in session.off.items() if k != "cpu"},
        probe_load_s=session.load_seconds,
        kernel_headers=session.headers.detail if session.headers else "",
        waits=waits, counters=dict(data.counters))
    result.samples_taken = len(data.samples)
    result.notes += [f"probe {n} off: {w}" for n, w in result.probes_off.items()]
    if receiver is not None:
        from agent.spansummary import breakdowns
        store = receiver.store
        result.spans_received = store.received
        result.spans_unlinkable = store.unlinkable
        result.otlp_url = receiver.url
        mine = [s for s in store.all() if s.pid == pid]
        result.span_breakdowns = breakdowns(mine, store, cpu, data, profile,
                                            window=(start_ns, end_ns))
    return result


class _Descendants:
    """--subprocesses: every `interval_s`, the target's descendants that run Python are added
    to the probe session (a forked worker at once; an exec'd interpreter once it has set itself
    up). Bounded: at most MAX processes; a descendant the walker cannot read is named in the
    summary, not retried forever."""

    MAX = 256
    TRIES = 20  # looks at a descendant whose interpreter is not set up yet

    def __init__(self, session, pid: int, interval_s: float = 0.2) -> None:
        self.session = session
        self.root = pid
        self.interval_s = interval_s
        self.children: dict[int, object] = {}   # pid -> ThreadNameCache
        self.skipped: dict[int, str] = {}       # pid -> why not
        self._tries: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spanflame-children",
                                        daemon=True)

    def start(self) -> "_Descendants":
        self._look()
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for names in self.children.values():
            names.refresh()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._look()
            except Exception:  # loop edge: the recording goes on without more children
                log.debug("looking for subprocesses failed", exc_info=True)

    def _look(self) -> None:
        import psutil

        from agent.threadnames import ThreadNameCache
        try:
            kids = psutil.Process(self.root).children(recursive=True)
        except psutil.Error:
            return
        for k in kids:
            pid = k.pid
            if pid in self.children or pid in self.skipped:
                continue
            if len(self.children) >= self.MAX:
                self.skipped[pid] = f"more than {self.MAX} subprocesses"
                continue
            why = self.session.add_target(pid)
            if why is None:
                self.children[pid] = ThreadNameCache(pid, self.session.procs.get(pid))
                continue
            self.session.remove_target(pid)  # until its interpreter is readable
            n = self._tries[pid] = self._tries.get(pid, 0) + 1
            if n >= self.TRIES:
                self.skipped[pid] = why


def _wait_interpreter(pid: int, timeout_s: float = 5.0) -> None:
    """A command just started: wait until its interpreter can be read (its runtime and first
    thread state exist), at most `timeout_s`; readers that start earlier see no Python."""
    from probes import pyprocess
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _alive(pid):
        try:
            pyprocess.inspect(pid)
            return
        except pyprocess.Unsupported as exc:
            if not any(k in exc.reason for k in ("not a CPython", "unexpected memory",
                                                 "cannot find where")):  # (not yet)
                return  # an interpreter the walker does not read: py-spy takes it
        except Exception:  # not initialised yet (or not Python yet: before exec)
            pass
        time.sleep(0.005)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _wait_alive(pid: int, duration_s: float, t0: float,
                progress: Callable[[float], None] | None, stop: threading.Event) -> bool:
    """Wait for the deadline, the target's exit, or `stop`; True when stopped early by the
    user."""
    try:
        while True:
            elapsed = time.monotonic() - t0
            if progress is not None:
                progress(min(1.0, elapsed / duration_s))
            if elapsed >= duration_s or not _alive(pid):
                return False
            if stop.wait(min(0.1, duration_s - elapsed)):
                return True
    except KeyboardInterrupt:
        return True


class _SpanReceiver:
    """An OTLP receiver for the length of one attach."""

    def __init__(self, listen: str) -> None:
        from starlette.applications import Starlette
        from starlette.middleware import Middleware

        from agent.httpguard import Policy, RequestGuard
        from agent.httpserver import ServerThread, parse_listen
        from agent.otlp_receiver import OtlpReceiver
        from agent.senders import SenderCheck
        from agent.spans import SpanStore

        self.store = SpanStore()
        # The same rules as the agent's (agent/httpguard.py, agent/senders.py): Host checked,
        # no simple-type posts, spans name only processes their sender can be tied to.
        receiver = OtlpReceiver(self.store, sender_check=SenderCheck().check)
        app = Starlette(routes=receiver.routes(),
                        middleware=[Middleware(RequestGuard, policy=Policy())])
        host, port = parse_listen(listen)
        self.server = ServerThread(app, host, port, name="otlp").start()
        self.url = self.server.url
        #: pid -> the latest end time of its spans received so far
        self.latest_end: dict[int, int] = {}
        self.store.on_add(self._on_add)
        #: called with a message when lingering for spans takes a while
        self.on_wait: Callable[[str], None] | None = None

    def _on_add(self, spans) -> None:
        for sp in spans:
            if sp.end_ns > self.latest_end.get(sp.pid, 0):
                self.latest_end[sp.pid] = sp.end_ns

    def linger(self, quiet_s: float, max_s: float = 30.0, *, pid: int = 0,
               end_ns: int = 0) -> float:
        """Spans arrive after their samples (batch exporters send every few seconds). An SDK
        exporter sends spans in the order they ended, so once a span of `pid` that ended after
        `end_ns` (the end of the recording) has arrived, every span that ended within the
        recording has too: stop then. Otherwise wait until none arrived for `quiet_s` (an app
        that sends no spans, or has exited), at most `max_s`. Returns the seconds waited."""
        t0 = last_change = time.monotonic()
        seen = self.store.received
        said = False
        while time.monotonic() - t0 < max_s:
            if pid and end_ns and self.latest_end.get(pid, 0) >= end_ns:
                time.sleep(0.2)  # the rest of that export request's batch
                break
            time.sleep(0.1)
            now = time.monotonic()
            if self.store.received != seen:
                seen, last_change = self.store.received, now
            elif now - last_change >= quiet_s:
                break
            if not said and self.on_wait is not None and now - t0 >= 1.0:
                said = True
                self.on_wait(f"waiting for the app's spans that ended while recording "
                        f"(up to {max_s - (now - t0):.0f} s more)")
        return time.monotonic() - t0

    def close(self) -> None:
        self.server.close()


def _attach_counts(options: AttachOptions, progress, stop) -> AttachResult:
    types = [p for p in options.probes if p in ("cpu", "wall")] or ["cpu"]
    recorders = {t: PySpyRecorder(options.pid, rate_hz=options.rate_hz, idle=(t == "wall"),
                                  output="speedscope", gil_only=options.gil_only and t == "cpu")
                 for t in types}
    schedstat = PiecewiseCpu()
    poller = SchedstatPoller(options.pid, rate_hz=2, cpu=schedstat)
    poller.start()
    try:
        recordings, elapsed, interrupted = _record(options, list(recorders.items()), progress,
                                                   stop)
    finally:
        poller.close()
    notes = _exit_notes(recordings.values(), elapsed, interrupted)
    start_ns = min(r.start_ns for r in recordings.values())
    end_ns = max(r.end_ns for r in recordings.values())
    profile = new_profile(types, options.rate_hz, start_ns, end_ns)
    for i, t in enumerate(types):
        counts = recordings[t].counts
        if t == "cpu":
            counts = _scaled_to_schedstat(counts, schedstat, profile.period, start_ns, end_ns)
        add_counts(profile, counts, options.pid, t, count_samples=(i == 0))
    source = ", ".join(
        f"{t}: py-spy samples" + (" of running threads, scaled to schedstat CPU" if t == "cpu"
                                  else " of all threads")
        for t in types)
    threads = {k[0] for r in recordings.values() for k in r.counts}
    return AttachResult(profile=profile, recording=recordings[types[0]], elapsed_s=elapsed,
                        source=source, notes=notes, threads=len(threads))


def _scaled_to_schedstat(counts: dict, cpu: PiecewiseCpu, period_ns: int, start_ns: int,
                         end_ns: int) -> dict:
    """py-spy counts a thread as running when the kernel says R, which includes runnable but
    waiting for a CPU (or the GIL, on a busy machine): each thread's counts are scaled so that
    they add up to the CPU time schedstat measured for it over the recording (fractional counts
    are fine: values are count x period, rounded)."""
    per_thread: dict[int, int] = {}
    for (tid, _name, stack), n in counts.items():
        if stack:
            per_thread[tid] = per_thread.get(tid, 0) + n
    out = {}
    for (tid, name, stack), n in counts.items():
        sampled = per_thread.get(tid, 0) * period_ns
        measured = cpu.oncpu_ns(tid, start_ns, end_ns) if cpu.seen(tid) else None
        if measured is None or not sampled:
            out[(tid, name, stack)] = n
        else:
            out[(tid, name, stack)] = n * measured / sampled
    return out


def _attach_timeline(options: AttachOptions, session, receiver, progress, stop) -> AttachResult:
    """Per-sample timelines: with the sched probe, one py-spy run (all threads) split into CPU by
    exact on-CPU runs; without it, a run of running threads only, timed by schedstat, and one of
    all threads for wall. Samples are linked to spans when a receiver is on."""
    from agent.waits import RunsCpu, add_probe_samples, run_pieces

    pid = options.pid
    bpf_on = session is not None and bool(session.active)
    want = set(options.probes)
    schedstat = PiecewiseCpu()
    poller = SchedstatPoller(pid, rate_hz=min(options.rate_hz, 100), cpu=schedstat)
    recorders = []
    if bpf_on:
        recorders.append(("timeline", PySpyRecorder(pid, rate_hz=options.rate_hz,
                                                     idle=not options.gil_only,
                                                     gil_only=options.gil_only)))
    else:
        if "cpu" in want:
            recorders.append(("cpu", PySpyRecorder(pid, rate_hz=options.rate_hz, idle=False)))
        if "wall" in want:
            recorders.append(("wall", PySpyRecorder(pid, rate_hz=options.rate_hz, idle=True)))
    data = None
    try:
        if bpf_on:
            poller.poll_once()
        else:
            poller.start()
        recordings, elapsed, interrupted = _record(options, recorders, progress, stop)
    finally:
        poller.close()
        if bpf_on:
            data = session.close()
    if receiver is not None:
        receiver.linger(options.span_wait_s, pid=options.pid, end_ns=time.time_ns())
    clock_errors = _calibrate(recordings, pid, options.rate_hz, data,
                              receiver.store if receiver is not None else None)
    first = next(iter(recordings.values()))
    notes = _exit_notes(recordings.values(), elapsed, interrupted)
    types = []
    for p in options.probes:
        if p in ("cpu", "wall") or (session is not None and p in session.active):
            types += [t for t in PROBE_TYPES[p] if t not in types]
    types.sort(key=list(SAMPLE_TYPES).index)
    start_ns = min(r.start_ns for r in recordings.values())
    end_ns = max(r.end_ns for r in recordings.values())
    profile = new_profile(types, options.rate_hz, start_ns, end_ns)

    linker = None
    if receiver is not None:
        from agent.tracelink import TraceLinker
        linker = TraceLinker(receiver.store, options.rate_hz)

    def timelines(name: str):
        tls = recordings[name].threads.values()
        return [linker.snap(tl) for tl in tls] if linker is not None else list(tls)

    def linked(pieces):
        return linker.link_pieces(pieces) if linker is not None else pieces

    if bpf_on:
        cpu = RunsCpu(data, pid, start_ns, end_ns, fallback=schedstat)
        tls = timelines("timeline")
        if "cpu" in types:
            for tl in tls:
                exact = linker.exact_changes.get((tl.pid, tl.tid), set()) if linker else set()
                add_pieces(profile, linked(run_pieces(tl, cpu, exact, (start_ns, end_ns))), cpu,
                           types=("cpu",))
        if "wall" in types:
            add_pieces(profile, linked(timeline_pieces(tls, cpu)), None, types=("wall",))
        all_threads = recordings["timeline"].threads
        waits = add_probe_samples(profile, pid, all_threads, data, window=(start_ns, end_ns),
                                  linker=linker)
    else:
        cpu = schedstat
        all_threads = {}
        if "cpu" in recordings:
            add_pieces(profile, linked(timeline_pieces(timelines("cpu"), cpu, from_ns=start_ns)),
                       cpu, types=("cpu",))
            all_threads.update(recordings["cpu"].threads)
        if "wall" in recordings:
            add_pieces(profile, linked(timeline_pieces(timelines("wall"), cpu)), None,
                       types=("wall",))
            all_threads.update(recordings["wall"].threads)
        waits = None
    fill_sample_counts(profile)
    if clock_errors:
        # Only worth a word when large: py-spy's clock is matched to the kernel's exact events.
        worst = max(abs(e) for e in clock_errors.values())
        if worst > 20e6:
            notes.append(f"py-spy's timestamps were off by up to {worst / 1e6:.0f} ms and were "
                         "matched to the kernel's exact events; waits shorter than that may sit "
                         "on a neighbouring stack")
    result = AttachResult(
        profile=profile, recording=first, elapsed_s=elapsed,
        source=("py-spy timeline (all threads) + eBPF " + ",".join(session.active)) if bpf_on
        else "py-spy timeline (running threads) + schedstat" + (", wall: all threads"
                                                                 if "wall" in want else ""),
        notes=notes, threads=len(all_threads),
        probes_on=list(session.active) if bpf_on else [],
        probes_off=dict(session.off) if session is not None else {},
        probe_load_s=session.load_seconds if session is not None else 0.0,
        kernel_headers=session.headers.detail if bpf_on and session.headers else "",
        waits=waits, counters=dict(data.counters) if data is not None else {})
    if receiver is not None:
        from agent.spansummary import breakdowns
        store = receiver.store
        result.spans_received = store.received
        result.spans_unlinkable = store.unlinkable
        result.otlp_url = receiver.url
        mine = [s for s in store.all() if s.pid == pid]
        result.span_breakdowns = breakdowns(mine, store, cpu, data, profile,
                                            window=(start_ns, end_ns))
        in_tasks = sum(1 for sp in mine if sp.task)
        if in_tasks:
            result.notes.append(
                f"asyncio: {in_tasks} spans ran in tasks; py-spy cannot tell tasks apart, so "
                "samples on their event loop's thread carry the span started last (marked "
                "span_overlap=1); the kernel walker (--sampler bpf) links each to its own task")
    return result


def _calibrate(recordings: dict[str, Recording], pid: int, rate_hz: int, data, store
               ) -> dict[str, int]:
    """Shift each py-spy timeline by its clock error, estimated from exact events: the sched
    probe's transitions and span boundaries (agent/clocksync.py). Returns the errors used."""
    from agent.clocksync import estimate_error_ns, run_transitions, shift, span_transitions

    transitions: dict[int, list[int]] = {}
    if data is not None:
        transitions = run_transitions(data, pid)
    if store is not None:
        start = min(r.start_ns for r in recordings.values())
        end = max(r.end_ns for r in recordings.values())
        for tid, ts in span_transitions(store, pid, start, end).items():
            transitions[tid] = sorted(transitions.get(tid, []) + ts)
    used = {}
    for name, rec in recordings.items():
        err = estimate_error_ns(list(rec.threads.values()), transitions, rate_hz)
        if err:
            rec.threads = {tid: shift(tl, -err) for tid, tl in rec.threads.items()}
            used[name] = err
    return used


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
