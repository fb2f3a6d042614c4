"""The continuous node agent (`spanflame run`): every Python process on this machine, all the time.

Components, each with start()/close():

- Discovery (every `scan_s`): new Python processes are added to the probe session; exits, execs
  and reused PIDs remove theirs.
- Stack sources, one per process (`--sampler`): the kernel stack walker where BPF runs and the
  interpreter is supported (agent/kernelsource.py: the probe session records every sample and
  wait with its Python stack; windows are cut on one thread), else a ProcessWorker (one thread
  per process): py-spy window after window, restarting a failed py-spy with exponential backoff.
- ProbeSession (shared): the eBPF probes, targets added and removed as processes come and go.
- Pipeline (one thread): holds each finished window until its spans have arrived (or a bounded
  wait), links samples to spans, builds one profile per sample type, stores them (and the spans
  with their breakdowns), and hands them to the Pyroscope exporter.
- Budget: after each round of windows, the agent's own CPU (itself and its py-spy processes)
  is compared with the budget, and the rate of py-spy workers adapts between 1 Hz and --rate,
  with a warning when it drops (the kernel walker's rate is held: it is cheap).
"""

from __future__ import annotations

import logging
import os
import resource
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

from agent.aggregate import add_pieces, fill_sample_counts, new_profile, timeline_pieces
from agent.clocksync import estimate_error_ns, run_transitions, shift, span_transitions
from agent.discovery import Discovery, Target
from agent.errors import NoSuchProcess, SamplerError, SpanflameError, StoreFull, TargetError
from agent.k8s import PodResolver
from agent.metrics import Metrics
from agent.model import SAMPLE_TYPES, Profile
from agent.pyspy import PySpyRecorder, Recording
from agent.schedstat import SchedstatPoller
from agent.spans import SpanRecord, SpanStore
from agent.spanwriter import SpanWriter
from agent.store import Store
from agent.timeline import PiecewiseCpu

log = logging.getLogger(__name__)

PROBE_TYPES = {"cpu": ("cpu",), "wall": ("wall",), "offcpu": ("off_cpu",),
               "lock": ("lock_wait", "gil_wait"), "io": ("io_wait", "io"),
               "net": ("net_wait", "net_send", "net_recv", "tcp_retransmits")}
BPF_PROBES = ("offcpu", "lock", "io", "net")


@dataclass
class RunOptions:
    store: str
    listen: str = "127.0.0.1:4040"
    otlp_listen: str = "127.0.0.1:4318"
    rate_hz: int = 19
    window_s: float = 10.0
    probes: tuple[str, ...] = ("cpu", "offcpu", "lock", "io", "net")
    include: str | None = None
    exclude: str | None = None
    export_pyroscope: str | None = None
    export_tenant: str | None = None
    export_user: str | None = None
    export_password: str | None = None
    export_token: str | None = None
    otlp_forward: str | None = None
    auth_token: str | None = None
    #: Host header names accepted besides loopback names and IPs (agent/httpguard.py)
    allowed_hosts: tuple[str, ...] = ()
    #: listen beyond loopback without a token
    insecure_no_auth: bool = False
    node: str = field(default_factory=lambda: os.environ.get("SPANFLAME_NODE") or socket.gethostname())
    retention_hours: float = 72.0
    retention_bytes: int = 10 << 30
    #: CPU budget: cores per 10 profiled processes (0.01 = 1% of one core)
    cpu_budget: float = 0.01
    span_wait_s: float = 30.0
    scan_s: float = 2.0
    #: window profiles older than this are merged into one per series and minute, and spans
    #: thinned to the slowest of each name and minute (with their traces) and errors
    compact_after_s: float = 3600.0
    #: processes with more threads than this are sampled with py-spy --gil (the thread holding
    #: the GIL only): py-spy reads every thread's stack at every sample otherwise, which costs
    #: about a third of a core for 150 threads at 19 Hz on these machines
    gil_only_threads: int = 32
    max_spans: int | None = None
    #: bytes of spans held in memory for linking (agent/spans.py span_bytes estimates them)
    max_span_bytes: int = 64 << 20
    #: where stacks come from: auto (the kernel walker where it can, else py-spy), bpf, py-spy
    sampler: str = "auto"


@dataclass
class WindowJob:
    target: Target
    recording: Recording
    schedstat: PiecewiseCpu | None
    start_ns: int
    end_ns: int
    labels: dict
    done_at: float = field(default_factory=time.monotonic)
    source: str = "py-spy"      # "bpf": the kernel walker's records carry the stacks


class ProcessWorker:
    """py-spy window after window on one process; never raises out of its thread."""

    def __init__(self, agent: "Agent", target: Target, labels: dict) -> None:
        self.agent = agent
        self.target = target
        self.labels = labels
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"spanflame-pid-{target.pid}",
                                        daemon=True)
        self.failures = 0
        self.windows = 0
        self.pyspy_cpu_s = 0.0

    def start(self) -> "ProcessWorker":
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        backoff = 1.0
        a = self.agent
        pid = self.target.pid
        while not self._stop.is_set():
            many = _thread_count(pid) > a.opts.gil_only_threads
            rec = PySpyRecorder(pid, rate_hz=a.rate_hz, idle=a.bpf_on and not many,
                                output="chrometrace", gil_only=many)
            cpu = None
            poller = None
            if not a.bpf_on:
                cpu = PiecewiseCpu()
                poller = SchedstatPoller(pid, rate_hz=20, cpu=cpu)
            try:
                with rec:
                    if poller is not None:
                        poller.start()
                    deadline = time.monotonic() + a.opts.window_s
                    while time.monotonic() < deadline and rec.running():
                        if self._stop.wait(0.2):
                            break
                    self.pyspy_cpu_s += _proc_cpu_s(rec)
                    rec.stop()
                    recording = rec.wait()
            except (SamplerError, TargetError) as exc:
                self.failures += 1
                a.metrics.sampler_failures.inc()
                if not _same_process(self.target) or _exiting(pid):
                    return
                # A process on its way out (or a thread exiting as py-spy read it) is not worth
                # a warning: short-lived Python processes are common on a node.
                level = logging.DEBUG if isinstance(exc, NoSuchProcess) else logging.WARNING
                log.log(level, "py-spy on PID %d failed (%s); retrying in %.0f s", pid, exc,
                        backoff)
                if self._stop.wait(backoff):
                    return
                backoff = min(60.0, backoff * 2)
                continue
            except Exception:  # loop edge: log once, keep the agent alive
                log.exception("worker for PID %d failed", pid)
                self.failures += 1
                if self._stop.wait(backoff):
                    return
                backoff = min(60.0, backoff * 2)
                continue
            finally:
                if poller is not None:
                    poller.close()
            backoff = 1.0
            self.windows += 1
            if recording.threads:
                a.pipeline.submit(WindowJob(self.target, recording, cpu, recording.start_ns,
                                            recording.end_ns, dict(self.labels)))
            if recording.target_exited or not _same_process(self.target):
                return


def _thread_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return 0


def _proc_cpu_s(rec: PySpyRecorder) -> float:
    """CPU seconds the py-spy process used so far (read before it exits)."""
    proc = getattr(rec, "_proc", None)
    if proc is None:
        return 0.0
    try:
        with open(f"/proc/{proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _exiting(pid: int) -> bool:
    try:
        import psutil
        return psutil.Process(pid).status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except Exception:  # gone or unreadable
        return True


def _same_process(t: Target) -> bool:
    try:
        import psutil
        return psutil.Process(t.pid).create_time() == t.create_time
    except Exception:  # gone or unreadable: not the same process any more
        return False


class Pipeline:
    """Turns finished windows into stored profiles (one thread)."""

    def __init__(self, agent: "Agent") -> None:
        self.agent = agent
        self._jobs: list[WindowJob] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spanflame-pipeline", daemon=True)
        self.max_pending = 2000
        self.dropped = 0
        self._building = 0

    def start(self) -> "Pipeline":
        self._thread.start()
        return self

    def submit(self, job: WindowJob) -> None:
        with self._lock:
            if len(self._jobs) >= self.max_pending:
                self.dropped += 1
                self.agent.metrics.windows.labels(result="dropped").inc()
                return
            self._jobs.append(job)

    def pending(self) -> int:
        """Windows not stored yet: queued, and the one being built."""
        with self._lock:
            return len(self._jobs) + self._building

    def _ready(self, job: WindowJob, now: float) -> bool:
        """A window waits for its spans: until the app has sent a span that started after the
        window ended (batch exporters send in order), at most span_wait_s. A process that has
        never sent spans does not wait."""
        a = self.agent
        waited = now - job.done_at
        if waited >= a.opts.span_wait_s:
            return True
        if waited < 0.6:  # one probe drain at least
            return False
        pid = job.target.pid
        latest = a.spans.latest_start(pid)
        if latest is None:
            return True
        if latest <= job.end_ns:
            return False
        # In asyncio, requests overlap: a short one that started after the window may be sent
        # while a long one that overlaps the window is still open. Wait until every task that
        # had an open span at the window's end has ended it, and a span ending later has come.
        settled = a.awaits.settled_at(pid, job.end_ns) if a.awaits is not None else job.end_ns
        if settled is None:
            return False
        return settled <= job.end_ns or (a.spans.latest_end(pid) or 0) >= settled

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            now = time.monotonic()
            with self._lock:
                ready = [j for j in self._jobs if self._ready(j, now)]
                self._jobs = [j for j in self._jobs if j not in ready]
                self._building = len(ready)
            for job in ready:
                try:
                    self.agent.build_window(job)
                    self.agent.metrics.windows.labels(result="ok").inc()
                except StoreFull:  # logged (once a minute) and counted by the store
                    self.agent.metrics.windows.labels(result="dropped").inc()
                except Exception:  # loop edge: one bad window must not stop the agent
                    log.exception("building window of PID %d failed", job.target.pid)
                    self.agent.metrics.windows.labels(result="failed").inc()
                finally:
                    with self._lock:
                        self._building -= 1
            if ready:
                self.agent.after_round()

    def close(self, flush: bool = True) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        if flush:
            with self._lock:
                jobs, self._jobs = self._jobs, []
            for job in jobs:
                try:
                    self.agent.build_window(job)
                except StoreFull:
                    pass  # logged by the store
                except Exception:
                    log.exception("flushing window of PID %d failed", job.target.pid)


class Agent:
    def __init__(self, opts: RunOptions) -> None:
        self.opts = opts
        self.metrics = Metrics()
        self.store = Store(opts.store, retention_s=opts.retention_hours * 3600,
                           max_bytes=opts.retention_bytes)
        self.store.on_full = lambda _err: self.metrics.store_full.inc()
        self.metrics.store_bytes.set_function(self.store.disk_bytes)  # at each scrape
        self.spans = SpanStore(max_spans=opts.max_spans, max_bytes=opts.max_span_bytes)
        #: OTLP batches into the store (durable) before their 200, then into self.spans
        self.span_writer = SpanWriter(self.store, self.spans)
        self.discovery = Discovery(opts.include, opts.exclude)
        self.pods = PodResolver(opts.node)
        self.pipeline = Pipeline(self)
        self.workers: dict[int, ProcessWorker] = {}
        #: pid -> (stack source, why not the kernel walker)
        self.sources: dict[int, tuple[str, str]] = {}
        self.probe_types = PROBE_TYPES
        self.kernel_windows = None
        self.awaits = None
        self.session = None
        self.bpf_on = False
        self.walker_on = False
        self.rate_lowered = False
        self.probes_off: dict[str, str] = {}
        self.rate_hz = max(1, opts.rate_hz)
        self.exporter = None
        self.forwarder = None
        self.servers = []
        self._stop = threading.Event()
        self._scan_thread = threading.Thread(target=self._scan_loop, name="spanflame-discovery",
                                             daemon=True)
        self._last_usage = None
        self._evicted_seen = 0
        self._kernel_keys: dict[int, object] = {}
        self._warned: set[str] = set()
        self._next_housekeeping = 0.0
        self.started_ns = 0
        self.metrics.rate.set(self.rate_hz)

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> "Agent":
        from agent.httpguard import check_exposure, check_token
        from agent.httpserver import parse_listen
        from agent.senders import SenderCheck
        from agent.server import build_apps

        # Before anything is loaded: a refusal is one line, at once.
        check_exposure([parse_listen(self.opts.listen), parse_listen(self.opts.otlp_listen)],
                       check_token(self.opts.auth_token), self.opts.insecure_no_auth)
        self.sender_check = SenderCheck(metrics=self.metrics)
        self.started_ns = time.time_ns()
        from agent.kernelsource import KernelWindows

        bpf = [p for p in self.opts.probes if p in BPF_PROBES]
        walker = self.opts.sampler != "py-spy"
        if bpf or walker:
            from probes.session import ProbeSession
            sample = ["cpu"] if walker and "cpu" in self.opts.probes else []
            self.session = ProbeSession(bpf + sample, rate_hz=self.opts.rate_hz,
                                        max_records=500_000, per_process_only=True,
                                        python_stacks=walker)
            self.session.start([])
            self.bpf_on = self.session.loaded
            self.walker_on = self.bpf_on and self.session.python_stacks
            self.probes_off = dict(self.session.off)
            if self.opts.sampler == "bpf" and not self.walker_on:
                why = next(iter(self.probes_off.values()), "BPF is off")
                self.session.close()
                raise SpanflameError(f"--sampler bpf: the kernel stack walker cannot run here: "
                                     f"{why}")
            for name, why in self.probes_off.items():
                log.warning("probe %s off: %s", name, why)
                self.metrics.degraded.labels(what=f"probe {name} off").set(1)
        self._reload_spans()
        self.span_writer.start()
        self.kernel_windows = KernelWindows(self, self.opts.window_s).start()
        if self.walker_on:  # what suspended asyncio tasks with open spans await
            from agent.awaits import AwaitPoller
            self.awaits = AwaitPoller().start()
            self.spans.on_add(self.awaits.want)
        if self.opts.export_pyroscope:
            from agent.pyroscope_export import PyroscopeExporter
            self.exporter = PyroscopeExporter(
                self.opts.export_pyroscope, tenant=self.opts.export_tenant,
                user=self.opts.export_user, password=self.opts.export_password,
                token=self.opts.export_token, metrics=self.metrics).start()
        if self.opts.otlp_forward:
            from agent.otlp_forward import OtlpForwarder
            self.forwarder = OtlpForwarder(self.opts.otlp_forward, metrics=self.metrics).start()
        from agent.httpserver import ServerThread, parse_listen
        main_app, otlp_app = build_apps(self)
        host, port = parse_listen(self.opts.listen)
        self.servers.append(ServerThread(main_app, host, port, name="http",
                                         metrics=self.metrics).start())
        ohost, oport = parse_listen(self.opts.otlp_listen)
        if (ohost, oport) != (host, port):
            self.servers.append(ServerThread(otlp_app, ohost, oport, name="otlp",
                                             metrics=self.metrics).start())
        self.pipeline.start()
        self._scan_thread.start()
        return self

    def _reload_spans(self) -> None:
        """Hold again the spans stored recently (before a restart or a crash), so that windows
        wait for a process's spans as they did and link to the spans still open around them."""
        since = time.time_ns() - int((self.opts.span_wait_s + 3 * self.opts.window_s) * 1e9)
        try:
            rows = self.store.recent_spans(since)
        except Exception:  # loop edge: an unreadable store is reported by its first write
            log.exception("reloading recent spans failed")
            return
        self.spans.add(SpanRecord(
            trace_id=r["trace_id"], span_id=r["span_id"], parent_span_id=r["parent_span_id"],
            name=sys.intern(r["name"]), service=sys.intern(r["service"]), pid=r["pid"],
            tid=r["tid"], start_ns=r["start_ns"], end_ns=r["end_ns"], status=r["status"],
            kind=r["kind"], attributes=tuple(sorted((str(k), str(v)) for k, v in
                                                    (r["attributes"] or {}).items())))
            for r in rows)
        if rows:
            log.info("holding %d spans stored in the last %.0f s again", len(rows),
                     (time.time_ns() - since) / 1e9)

    @property
    def url(self) -> str:
        return self.servers[0].url if self.servers else ""

    @property
    def otlp_url(self) -> str:
        return self.servers[-1].url if self.servers else ""

    def close(self) -> None:
        """Stop sampling, write what is pending, stop serving (idempotent)."""
        if self._stop.is_set():
            return
        self._stop.set()
        t0 = time.monotonic()
        steps = []

        def step(name: str, fn) -> None:
            t = time.monotonic()
            try:
                fn()
            except Exception:  # closing goes on: the store must still be closed
                log.exception("closing: %s failed", name)
            steps.append((name, time.monotonic() - t))

        def workers() -> None:
            for w in list(self.workers.values()):
                w.close()
            for w in list(self.workers.values()):
                w.join(timeout=self.opts.window_s + 10)

        def kernel() -> None:
            if self.kernel_windows is not None:
                self.kernel_windows.close()
                if self.session is not None:
                    self.session.drain()

        step("scanner", lambda: self._scan_thread.is_alive() and self._scan_thread.join(10))
        step("samplers", workers)
        step("kernel windows", kernel)
        step("await poller", lambda: self.awaits is not None and self.awaits.close())
        step("pending windows", lambda: self.pipeline.close(flush=True))
        step("probes", lambda: self.session is not None and self.session.close())
        step("exporter", lambda: self.exporter is not None and self.exporter.close())
        step("forwarder", lambda: self.forwarder is not None and self.forwarder.close())
        for s in self.servers:
            step("server", s.close)
        step("span writer", self.span_writer.close)
        step("store", self.store.close)
        log.info("stopped in %.1f s (%s)", time.monotonic() - t0,
                 ", ".join(f"{n} {d:.1f} s" for n, d in steps if d >= 0.05))

    def wait(self) -> None:
        """Block until close() or a signal handler sets the stop flag."""
        while not self._stop.wait(1.0):
            pass

    def health(self) -> dict:
        """What /healthz says: the processes and their stack sources, what is off and why."""
        by = {}
        for pid, (source, why) in sorted(self.sources.items()):
            by[str(pid)] = {"sampler": source, **({"why": why} if why else {})}
        degraded = [f"probe {n} off: {w}" for n, w in self.probes_off.items()]
        if self.rate_lowered:
            degraded.append(f"py-spy rate lowered to {self.rate_hz} Hz (of {self.opts.rate_hz}) "
                            "to stay in the CPU budget")
        fallbacks = sorted({why for source, why in self.sources.values() if why})
        degraded += [f"stacks from py-spy or none: {w}" for w in fallbacks]
        full = self.store.full
        if full:
            degraded.insert(0, full)
        return {"status": "degraded" if full else "ok",
                "processes": sum(1 for s, _w in self.sources.values() if s != "none"),
                "sampler": self.opts.sampler, "walker": self.walker_on,
                "probes": self.session.active if self.session else [],
                "probes_off": self.probes_off, "rate_hz": self.opts.rate_hz,
                "pyspy_rate_hz": self.rate_hz, "sources": by, "degraded": degraded,
                "pending_windows": self.pipeline.pending()}

    # -- discovery ------------------------------------------------------------------------------
    def _scan_loop(self) -> None:
        next_retention = 0.0
        while not self._stop.is_set():
            try:
                self.scan_once()
                if time.monotonic() >= next_retention:
                    next_retention = time.monotonic() + 60
                    try:
                        deleted = self.store.enforce_retention()
                    except StoreFull:  # logged and counted by the store; next round
                        deleted = 0
                    if deleted:
                        self.metrics.store_deleted.inc(deleted)
                    # Older than compact_after_s: windows merged into one profile per minute;
                    # spans thinned to the slowest of each name and minute, with their traces.
                    old_ns = time.time_ns() - int(self.opts.compact_after_s * 1e9)
                    try:
                        merged = self.store.compact(old_ns)
                        thinned = sum(self.store.thin_spans(old_ns) for _ in range(6))
                    except StoreFull:
                        merged = thinned = 0
                    if merged:
                        self.metrics.store_compacted.inc(merged)
                    if thinned:
                        self.metrics.store_spans_thinned.inc(thinned)
                    self.metrics.store_profile_bytes.set(self.store.data_bytes())
                self._span_metrics()
            except Exception:  # loop edge
                log.exception("discovery failed")
            self._stop.wait(self.opts.scan_s)

    def _span_metrics(self) -> None:
        m, st = self.metrics, self.spans
        m.spans_held.set(len(st))
        m.spans_held_bytes.set(st.bytes)
        m.spans_evicted.inc(max(0, st.evicted - self._evicted_seen))
        self._evicted_seen = st.evicted

    def scan_once(self) -> None:
        found = self.discovery.scan()
        kw = self.kernel_windows
        for pid, (source, _why) in list(self.sources.items()):
            t = found.get(pid)
            w = self.workers.get(pid)
            gone = t is None or (w is not None and (t.key != w.target.key or not w.alive))
            if source == "bpf" and t is not None and pid in self._kernel_keys:
                gone = gone or t.key != self._kernel_keys[pid]
            if not gone:
                continue
            if w is not None:
                w.close()
                del self.workers[pid]
            if source == "bpf":
                kw.remove(pid)
                self._kernel_keys.pop(pid, None)
                if self.awaits is not None:
                    self.awaits.unwatch(pid)
            if self.session is not None:
                self.session.remove_target(pid)
            del self.sources[pid]
        for pid, t in found.items():
            if self._stop.is_set():  # stopping: adding targets now only delays it
                return
            if pid in self.sources:
                continue
            labels = {"pid": pid, "node": self.opts.node, "process": t.name}
            labels.update(self.pods.labels(pid))
            why = "the kernel stack walker is off (--sampler py-spy)" if not self.walker_on else ""
            if self.session is not None and self.bpf_on:
                added = self.session.add_target(pid)
                if self.walker_on:
                    why = added or ""
            elif self.walker_on is False and self.opts.sampler != "py-spy":
                why = next(iter(self.probes_off.values()), "eBPF is off")
            if not why:
                self.sources[pid] = ("bpf", "")
                self._kernel_keys[pid] = t.key
                kw.add(t, labels)
                if self.awaits is not None and pid in self.session.procs:
                    self.awaits.watch(self.session.procs[pid])
                log.info("profiling PID %d (%s) with the kernel stack walker", pid, t.name)
            elif self.opts.sampler == "bpf":
                self.sources[pid] = ("none", why)
                self._warn_once(f"skip:{pid}", "not profiling PID %d (%s): %s", pid, t.name, why)
            else:
                self.sources[pid] = ("py-spy", why)
                self.workers[pid] = ProcessWorker(self, t, labels).start()
                self._warn_once(f"fallback:{why}", "PID %d (%s): stacks from py-spy: %s",
                                pid, t.name, why)
        counts = {"bpf": 0, "py-spy": 0, "none": 0}
        for source, _why in self.sources.values():
            counts[source] = counts.get(source, 0) + 1
        for k, v in counts.items():
            self.metrics.sampler_processes.labels(sampler=k).set(v)
        if self.opts.sampler != "py-spy":
            self.metrics.degraded.labels(what="stacks from py-spy").set(
                1 if counts["py-spy"] else 0)
        self.metrics.processes.set(counts["bpf"] + counts["py-spy"])

    def _warn_once(self, key: str, msg: str, *args) -> None:
        if key in self._warned:
            log.info(msg, *args)
            return
        self._warned.add(key)
        log.warning(msg, *args)

    # -- windows --------------------------------------------------------------------------------
    def service_name(self, target: Target) -> str:
        return (self.spans.services.get(target.pid) or target.service or target.name
                or f"pid-{target.pid}")

    def build_window(self, job: WindowJob) -> None:
        """Link, build and store the profiles of one finished window."""
        if job.source == "bpf":
            from agent.kernelsource import build_kernel_window
            build_kernel_window(self, job)
        else:
            self.build_pyspy_window(job)

    def build_pyspy_window(self, job: WindowJob) -> None:
        """A py-spy window: its timelines calibrated, snapped to span boundaries, split into CPU
        by exact runs (with probes) or schedstat, and the probes' waits put on what py-spy saw."""
        from agent.tracelink import TraceLinker

        if any(s.task for s in self.spans.all() if s.pid == job.target.pid):
            self._warn_once(f"asyncio-pyspy:{job.target.pid}",
                            "PID %d runs spans in asyncio tasks but its stacks come from py-spy, "
                            "which cannot tell tasks apart: samples on its event loop's thread "
                            "carry the span started last (span_overlap=1)", job.target.pid)
        from agent.waits import RunsCpu, add_probe_samples, run_pieces

        pid = job.target.pid
        rec = job.recording
        start, end = job.start_ns, job.end_ns
        data = self.session.window(pid, start, end) if self.bpf_on else None
        transitions = run_transitions(data, pid) if data is not None else {}
        for tid, ts in span_transitions(self.spans, pid, start, end).items():
            transitions[tid] = sorted(transitions.get(tid, []) + ts)
        err = estimate_error_ns(list(rec.threads.values()), transitions, self.rate_hz)
        threads = {t: shift(tl, -err) for t, tl in rec.threads.items()} if err else rec.threads
        linker = TraceLinker(self.spans, self.rate_hz, window=(start - 1, end + 1))
        tls = [linker.snap(tl) for tl in threads.values()]
        types = []
        for p in self.opts.probes:
            if p in ("cpu", "wall") or (self.bpf_on and p in self.session.active):
                types += [t for t in PROBE_TYPES[p] if t not in types]
        types.sort(key=list(SAMPLE_TYPES).index)
        if "wall" in types and not self.bpf_on:
            types.remove("wall")  # without probes py-spy records running threads only
        profile = new_profile(types, self.rate_hz, start, end)
        if self.bpf_on:
            cpu = RunsCpu(data, pid, start, end, fallback=job.schedstat)
            for tl in tls:
                exact = linker.exact_changes.get((tl.pid, tl.tid), set())
                add_pieces(profile, linker.link_pieces(run_pieces(tl, cpu, exact, (start, end))),
                           cpu, types=("cpu",))
            # Threads py-spy never saw in this window (low rates, short-lived threads) still used
            # CPU: keep it, on a marker stack, so that totals stay exact.
            seen = {tl.tid for tl in tls if tl.slices}
            from agent.aggregate import Piece
            from agent.model import Frame
            unseen = [Piece(pid, tid, "", a, b, (Frame("[no Python stack sampled]"),))
                      for tid in cpu.tids() if tid not in seen
                      for a, b in cpu.runs(tid) if b > start and a < end]
            add_pieces(profile, linker.link_pieces(
                Piece(p.pid, p.tid, p.thread_name, max(p.start_ns, start), min(p.end_ns, end),
                      p.stack) for p in unseen), cpu, types=("cpu",))
            if "wall" in types:
                add_pieces(profile, linker.link_pieces(timeline_pieces(tls, cpu)), None,
                           types=("wall",))
            add_probe_samples(profile, pid, threads, data, window=(start, end), linker=linker)
        else:
            cpu = job.schedstat
            add_pieces(profile, linker.link_pieces(timeline_pieces(tls, cpu, from_ns=start)), cpu,
                       types=("cpu",))
        fill_sample_counts(profile)
        self.store_window(job, profile, types, cpu, data)

    def store_window(self, job: WindowJob, profile: Profile, types: list[str], cpu, data) -> None:
        """Store one window's profile (one per sample type), hand it to the exporter, and store
        the spans it covers with their breakdowns."""
        from agent.spansummary import breakdowns

        pid = job.target.pid
        start, end = job.start_ns, job.end_ns
        service = self.service_name(job.target)
        # Which stack source made it (the --sampler names): kept with the data, so a process
        # long gone still says where its stacks came from.
        labels = {**job.labels, "service_name": service,
                  "stack_source": "bpf" if job.source == "bpf" else "py-spy"}
        span_ids = _span_ids(profile)
        for t in types:
            if not profile.has_type(t) or not profile.total(t):
                continue
            single = _only(profile, t)
            self.store.add_profile(single, type_name=t, service=service, pid=pid, labels=labels,
                                   source="agent", spans=span_ids.get(t, ()))
            if self.exporter is not None:
                self.exporter.submit(single, t, labels)
        mine = [s for s in self.spans.all() if s.pid == pid and s.end_ns > start
                and s.start_ns < end]
        if mine:
            bds = {b.span_id: b for b in breakdowns(mine, self.spans, cpu, data, profile,
                                                    window=(start, end))}
            self._store_spans(mine, bds, (start, end))
        if data is not None:
            self.metrics.probe_drops.labels(kind="records_dropped").set(
                data.counters.get("records_dropped", 0))

    def _store_spans(self, spans, bds: dict, window: tuple[int, int]) -> None:
        from agent.spansummary import unobserved_ns

        rows = []
        for s in spans:
            b = bds.get(s.span_id)
            if b is None:
                # Nothing to add (its part of this window had no thread time): the span's row
                # is in the store already (written before its 200), and a breakdown another
                # window gave it must not be replaced with none.
                continue
            bd = b.to_dict()
            if bd is not None and (s.start_ns < window[0] or s.end_ns > window[1]):
                prev = self.store.span(s.span_id)  # a span across windows: add the parts up
                if prev and prev.get("breakdown"):
                    pb = prev["breakdown"]
                    if window[0] not in pb.get("windows", []):
                        for k in ("cpu_ns", "lock_ns", "gil_ns", "sync_ns", "await_ns", "io_ns", "net_ns", "other_ns",
                                  "children_ns", "unaccounted_ns", "samples"):
                            bd[k] = bd.get(k, 0) + pb.get(k, 0)
                        bd["windows"] = pb.get("windows", []) + [window[0]]
                        bd["top"] = _merge_top(pb.get("top") or {}, bd.get("top") or {})
                        bd["unobserved_ns"] = unobserved_ns(bd)
                        bd["cause"] = _cause_of(bd)
                else:
                    bd["windows"] = [window[0]]
            rows.append({**_span_row(s), "breakdown": bd})
        self.store.add_spans(rows)

    def after_round(self) -> None:
        """Housekeeping after windows were built: spans, probe records, the CPU budget."""
        now = time.monotonic()
        if now < self._next_housekeeping:
            return
        self._next_housekeeping = now + self.opts.window_s
        if self.session is not None and self.bpf_on:
            oldest = time.time_ns() - int((self.opts.span_wait_s + 3 * self.opts.window_s) * 1e9)
            self.session.prune(oldest)
            if self.awaits is not None:
                self.awaits.prune(oldest)
            for k, v in self.session.read_counters().items():
                self.metrics.probe_drops.labels(kind=k).set(v)
        self._adapt_rate()

    def _adapt_rate(self) -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        now = time.monotonic()
        cpu = usage.ru_utime + usage.ru_stime + children.ru_utime + children.ru_stime
        if self._last_usage is None:
            self._last_usage = (now, cpu)
            return
        t0, c0 = self._last_usage
        if now - t0 < self.opts.window_s:
            return
        self._last_usage = (now, cpu)
        used = (cpu - c0) / (now - t0)
        self.metrics.agent_cpu.set(used)
        if not self.workers:  # only py-spy workers have a rate to lower
            return
        n = max(1, len(self.sources))
        budget = self.opts.cpu_budget * max(1.0, n / 10)
        if used <= 0:
            return
        factor = (budget / used) ** 0.7
        new = int(max(1, min(self.opts.rate_hz, round(self.rate_hz * factor))))
        if new != self.rate_hz:
            lowered = new < self.opts.rate_hz
            msg = ("agent CPU %.2f%% of a core for %d processes (budget %.2f%%): py-spy rate "
                   "%d -> %d Hz")
            args = (100 * used, n, 100 * budget, self.rate_hz, new)
            if lowered and not self.rate_lowered:
                log.warning(msg + " (--cpu-budget raises the budget)", *args)
            else:
                log.info(msg, *args)
            self.rate_lowered = lowered
            self.rate_hz = new
            self.metrics.rate.set(new)
            self.metrics.degraded.labels(what="py-spy rate lowered").set(1 if lowered else 0)

    # -- ingest -----------------------------------------------------------------------------------
    def ingest(self, profile: Profile, service: str, labels: dict) -> None:
        """Store a profile pushed by an app (Pyroscope-compatible ingest): one per sample type."""
        span_ids = _span_ids(profile)
        for t in profile.sample_types:
            if t.name == "samples" or not profile.total(t.name):
                continue
            single = _only(profile, t.name)
            self.store.add_profile(single, type_name=t.name, service=service,
                                   pid=int(labels.get("pid", 0) or 0) if str(labels.get("pid", "")).isdigit() else 0,
                                   labels={**labels, "service_name": service}, source="ingest",
                                   spans=span_ids.get(t.name, ()))
            if self.exporter is not None:
                self.exporter.submit(single, t.name, {**labels, "service_name": service})


def _only(profile: Profile, type_name: str) -> Profile:
    """The profile reduced to one sample type (plus samples/count when it has it)."""
    keep = [t for t in profile.sample_types if t.name in (type_name, "samples")]
    out = Profile(keep, period_type=profile.period_type, period=profile.period,
                  time_ns=profile.time_ns, duration_ns=profile.duration_ns,
                  default_sample_type=type_name)
    idx = [profile.index(t.name) for t in keep]
    ti = profile.index(type_name)
    for (stack, labels), vec in profile.samples.items():
        if vec[ti]:
            out.add_vector(stack, labels, [vec[i] for i in idx])
    return out


def _span_ids(profile: Profile) -> dict[str, set[tuple[str, str]]]:
    """type -> {(span_id, trace_id)} of the samples that carry a span and a value of that type."""
    out: dict[str, set] = {}
    names = [t.name for t in profile.sample_types]
    for (stack, labels), vec in profile.samples.items():
        sid = tid = None
        for k, v in labels:
            if k == "span_id":
                sid = v
            elif k == "trace_id":
                tid = v
        if sid is None:
            continue
        for i, v in enumerate(vec):
            if v:
                out.setdefault(names[i], set()).add((str(sid), str(tid or "")))
    return out


def _merge_top(a: dict, b: dict) -> dict:
    """Top function per category over two windows' parts of one span: the larger wins."""
    out = dict(a)
    for cat, v in b.items():
        if cat not in out or v[3] > out[cat][3]:
            out[cat] = v
    return out


def _cause_of(bd: dict) -> str:
    from agent.spansummary import SpanBreakdown, cause
    fields = SpanBreakdown.__dataclass_fields__
    return cause(SpanBreakdown(**{k: v for k, v in bd.items() if k in fields}))


def _span_row(s) -> dict:
    return {"span_id": s.span_id, "trace_id": s.trace_id, "parent_span_id": s.parent_span_id,
            "name": s.name, "service": s.service, "pid": s.pid, "tid": s.tid,
            "start_ns": s.start_ns, "end_ns": s.end_ns, "status": s.status, "kind": s.kind,
            "attributes": dict(s.attributes)}


__all__ = ["Agent", "RunOptions", "SpanflameError"]
