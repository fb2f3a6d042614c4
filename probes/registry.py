"""The eBPF probes spanflame knows: what each needs from the kernel and which sample types it gives.

Every selected probe is compiled into one bcc module (one compile is most of the load cost).
The `sched` program (on-CPU runs and off-CPU waits) is the base of them all: it gives the exact
on-CPU time that splits py-spy's timeline into CPU, and the off-CPU waits that `offcpu`, `io`
and `net` report.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

PROBE_DIR = Path(__file__).resolve().parent

#: Probe names accepted by --probes (besides cpu and wall, which py-spy provides).
BPF_PROBES = ("offcpu", "lock", "io", "net")


@dataclass(frozen=True)
class TracepointChoice:
    """One of these tracepoints is needed; the first that exists wins and sets `define`."""

    options: tuple[tuple[str, str, str], ...]   # (category, event, -D define or "")

    def pick(self, exists) -> tuple[str, str, str] | None:
        for cat, ev, define in self.options:
            if exists(cat, ev):
                return cat, ev, define
        return None

    def describe(self) -> str:
        return " or ".join(f"{c}:{e}" for c, e, _ in self.options)


@dataclass(frozen=True)
class ProbeSpec:
    name: str
    source: str
    needs: tuple[TracepointChoice, ...]
    #: tracepoints that add detail when present (their define is set when they exist)
    optional: tuple[TracepointChoice, ...] = ()
    sample_types: tuple[str, ...] = ()
    defines: tuple[str, ...] = ()
    doc: str = ""


def _tp(*options: tuple[str, str, str]) -> TracepointChoice:
    return TracepointChoice(tuple(options))


SCHED = ProbeSpec(
    "sched", "sched.bpf.c",
    needs=(_tp(("sched", "sched_switch", "")), _tp(("sched", "sched_process_exit", "")),
           _tp(("task", "task_newtask", ""))),
    defines=("WITH_SCHED",),
    doc="on-CPU runs and off-CPU waits of target threads")

SPECS: dict[str, ProbeSpec] = {
    "cpu": ProbeSpec(
        "cpu", "cpu.bpf.c", needs=SCHED.needs, sample_types=("cpu",), defines=("WITH_CPU",),
        doc="CPU samples (perf cpu-clock on every CPU) with the Python stack read in the kernel"),
    "offcpu": ProbeSpec(
        "offcpu", "sched.bpf.c", needs=SCHED.needs, sample_types=("off_cpu",),
        doc="time off CPU by reason (lock, io, net, sleep, other), on the stack that waited"),
    "lock": ProbeSpec(
        "lock", "sched.bpf.c", needs=SCHED.needs, sample_types=("lock_wait", "gil_wait"),
        doc="lock waits, and GIL waits apart (the futex a thread blocks on, read from its "
            "saved syscall registers)"),
    "io": ProbeSpec(
        "io", "io.bpf.c",
        needs=(_tp(("block", "block_io_start", "HAVE_BLOCK_IO_START"),
                   ("block", "block_bio_queue", "")),),
        sample_types=("io_wait", "io"), defines=("WITH_IO",),
        doc="block requests by submitting thread: bytes, latency; time blocked on IO"),
    "net": ProbeSpec(
        "net", "net.bpf.c",
        needs=(_tp(("sock", "sock_send_length", "")), _tp(("sock", "sock_recv_length", "")),
               _tp(("sock", "inet_sock_set_state", "")), _tp(("tcp", "tcp_retransmit_skb", ""))),
        sample_types=("net_wait", "net_send", "net_recv", "tcp_retransmits"),
        defines=("WITH_NET",),
        doc="TCP bytes per thread, connects, retransmits; time blocked on the network"),
}


def tracefs_root() -> Path | None:
    for p in (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing")):
        if (p / "events").is_dir():
            return p
    return None


def denied_tracepoints() -> set[str]:
    """Tracepoints an operator turned off with SPANFLAME_DENY_TRACEPOINTS=cat:event,... (for a
    kernel where one misbehaves); the probes needing them are then off, with that reason."""
    raw = os.environ.get("SPANFLAME_DENY_TRACEPOINTS", "")
    return {t.strip() for t in raw.split(",") if t.strip()}


def tracepoint_exists(category: str, event: str) -> bool:
    if f"{category}:{event}" in denied_tracepoints():
        return False
    root = tracefs_root()
    return root is not None and (root / "events" / category / event / "format").exists()


@dataclass
class Plan:
    """What will be compiled: sources in order, -D defines, and the probes left off (with why)."""

    probes: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    defines: list[str] = field(default_factory=list)
    off: dict[str, str] = field(default_factory=dict)


def plan(selected: list[str], exists=tracepoint_exists) -> Plan:
    """Choose tracepoints for the selected probes; a probe whose tracepoints are missing is off."""
    p = Plan()
    if tracefs_root() is None and exists is tracepoint_exists:
        for name in selected:
            p.off[name] = "tracefs is not mounted (mount -t tracefs tracefs /sys/kernel/tracing)"
        return p
    base_missing = [c.describe() for c in SCHED.needs if c.pick(exists) is None]
    defines: list[str] = []
    for name in selected:
        spec = SPECS[name]
        missing = [c.describe() for c in spec.needs if c.pick(exists) is None]
        if base_missing or missing:
            p.off[name] = "tracepoint " + ", ".join(base_missing + missing) + " missing"
            continue
        p.probes.append(name)
        for c in spec.needs + spec.optional:
            chosen = c.pick(exists)
            if chosen and chosen[2]:
                defines.append(chosen[2])
        defines.extend(spec.defines)
    if p.probes:
        p.sources = ["sched.bpf.c"] + [s for s in dict.fromkeys(SPECS[n].source for n in p.probes)
                                       if s != "sched.bpf.c"]
        p.defines = ["WITH_SCHED"] + list(dict.fromkeys(defines))
    return p


def source_text(sources: list[str]) -> str:
    """The shared headers and the chosen .bpf.c files, concatenated into one compile unit."""
    parts = [(PROBE_DIR / h).read_text() for h in ("common.h", "pystack.h", "events.h")]
    parts += [(PROBE_DIR / s).read_text() for s in sources]
    return "\n".join(parts)


def agent_tgid() -> int:
    return os.getpid()
