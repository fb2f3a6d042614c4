"""What the eBPF probes cost per kernel event (a C process's, so without a Python stack), and
to load.

Event generators are tiny C loops (bench/c/events.c, compiled here with gcc), so the per-event
cost is not buried in interpreter noise. For each kind of event we run the loop in alternating
order: without probes, with probes loaded but the loop's process not a target (events filtered
in the kernel), and with the loop's process a target (events captured). Reported per event:

* `prog_ns`: the run time of our BPF programs, from the kernel's own accounting
  (kernel.bpf_stats_enabled=1 during the run): precise, and what our code costs;
* `added_ns`: the loop's slowdown: what a workload pays, including the tracepoint machinery,
  but noisy on these machines (medians of --rounds alternating rounds);
* `empty_prog_added_ns`: the slowdown with an empty program on the same attach points: the
  floor that no probe code can go under.

A C target is not one the kernel walker reads: "captured" here is the wait bookkeeping, kernel
stack and record of an event without its Python stack. What the walker adds for Python targets
is bench/walker_cost.py's; the agent's CPU per record is bench/agent_events.py's. (The futex
rows of earlier versions are gone with the syscalls:sys_enter/exit_futex tracepoints they
measured: the futex a thread blocks on is now read from its saved registers at sched_switch.)

    python -m bench.probe_overhead [--rounds 9] [--seconds 1.0]

Needs root (BPF) and gcc.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from probes.session import ProbeSession

HERE = Path(__file__).resolve().parent
#: event kind -> (events.c mode args, probe watching it, probe events per loop iteration)
KINDS = {
    "sched_switch (offcpu)": (["switch"], "offcpu", 2),
    "tcp send+recv (net)": (["send"], "net", 2),
    "block io (io)": (["io"], "io", 1),
}


def build_events() -> Path:
    out = Path(tempfile.mkdtemp(prefix="spanflame-bench-")) / "events"
    subprocess.run(["gcc", "-O2", "-pthread", "-o", str(out), str(HERE / "c" / "events.c")],
                   check=True)
    return out


def run_loop(binary: Path, args: list[str], seconds: float, session: ProbeSession | None,
             as_target: bool, tmpdir: Path) -> float:
    argv = [str(binary), *args, str(seconds)]
    if args[0] == "io":
        argv += [str(tmpdir / f"io-{os.getpid()}.bin")]
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "SF_WAIT": "1"})
    pid = int(p.stdout.readline())
    if session is not None and as_target:
        session.add_target(pid)
    p.stdin.write("go\n")
    p.stdin.flush()
    out = json.loads(p.stdout.readline())
    p.wait()
    if session is not None and as_target:
        session.remove_target(pid)
    return out["ns_per_iter"]


#: event kind -> the programs that run for it (each event runs one of them, or, for futex and
#: block io, each of them once: enter and exit, start and done)
RUNS_PER_EVENT = {"sched_switch (offcpu)": 1, "tcp send+recv (net)": 1, "block io (io)": 1}
PROGRAMS = {
    "sched_switch (offcpu)": ("raw_tracepoint__sched_switch",),
    "tcp send+recv (net)": ("tracepoint__sock__sock_send_length", "tracepoint__sock__sock_recv_length"),
    "block io (io)": ("tracepoint__block__block_io_start",),
}
EMPTY = {
    "sched_switch (offcpu)": "RAW_TRACEPOINT_PROBE(sched_switch) { return 0; }\n",
    "tcp send+recv (net)": "TRACEPOINT_PROBE(sock, sock_send_length) { return 0; }\n"
                           "TRACEPOINT_PROBE(sock, sock_recv_length) { return 0; }\n",
    "block io (io)": "TRACEPOINT_PROBE(block, block_io_start) { return 0; }\n",
}


class _BpfStats:
    """kernel.bpf_stats_enabled=1 for the duration (it adds two clock reads per program run)."""

    PATH = Path("/proc/sys/kernel/bpf_stats_enabled")

    def __enter__(self):
        self.old = self.PATH.read_text().strip()
        self.PATH.write_text("1")
        return self

    def __exit__(self, *exc):
        self.PATH.write_text(self.old)


def per_event_costs(binary: Path, rounds: int, seconds: float) -> dict:
    from bcc import BPF
    from probes import kheaders
    kheaders.apply(kheaders.resolve())
    tmpdir = Path(tempfile.mkdtemp(prefix="spanflame-bench-io-", dir="/var/tmp"))
    results = {}
    decoy = subprocess.Popen(["sleep", "3600"])  # a target that is not the loop
    try:
        for kind, (args, probe, per_iter) in KINDS.items():
            t = {m: [] for m in ("base", "filtered", "captured", "empty")}
            prog = {"filtered": [], "captured": []}
            for r in range(rounds):
                order = ["base", "filtered", "captured", "empty"]
                if r % 2:
                    order.reverse()
                for mode in order:
                    if mode == "base":
                        t["base"].append(run_loop(binary, args, seconds, None, False, tmpdir))
                    elif mode == "empty":
                        b = BPF(text=EMPTY[kind].encode(), cflags=["-w"])
                        t["empty"].append(run_loop(binary, args, seconds, None, False, tmpdir))
                        b.cleanup()
                    else:
                        with ProbeSession(["offcpu", "lock", "io", "net"]) as s:
                            s.start([decoy.pid])
                            if not s.active:
                                raise SystemExit(f"probes are off: {s.off}")
                            with _BpfStats():
                                before = s.program_stats()
                                v = run_loop(binary, args, seconds, s, mode == "captured", tmpdir)
                                after = s.program_stats()
                        t[mode].append(v)
                        names = PROGRAMS[kind]
                        ns = sum(after[n][1] - before[n][1] for n in names)
                        runs = sum(after[n][0] - before[n][0] for n in names)
                        if runs:
                            prog[mode].append(ns / (runs / RUNS_PER_EVENT[kind]))
            b = statistics.median(t["base"])
            added = lambda m: round((statistics.median(t[m]) - b) / per_iter, 1)
            results[kind] = {
                "probe": probe,
                "base_ns_per_iter": round(b, 1),
                "filtered_prog_ns": round(statistics.median(prog["filtered"]), 1) if prog["filtered"] else None,
                "captured_prog_ns": round(statistics.median(prog["captured"]), 1) if prog["captured"] else None,
                "filtered_added_ns": added("filtered"),
                "captured_added_ns": added("captured"),
                "empty_prog_added_ns": added("empty"),
            }
            print(json.dumps({kind: results[kind]}), flush=True)
    finally:
        decoy.kill()
        decoy.wait()
    return results


def load_time(runs: int = 3) -> dict:
    times = []
    for _ in range(runs):
        with ProbeSession(["offcpu", "lock", "io", "net"]) as s:
            t0 = time.monotonic()
            s.start([])
            times.append(time.monotonic() - t0)
    return {"load_all_probes_s_median": round(statistics.median(times), 2),
            "load_all_probes_s_max": round(max(times), 2)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--seconds", type=float, default=1.0)
    args = ap.parse_args(argv)
    binary = build_events()
    summary = {"benchmark": "probe_overhead", "rounds": args.rounds}
    summary["load"] = load_time()
    print(json.dumps(summary["load"]), flush=True)
    summary["per_event"] = per_event_costs(binary, args.rounds, args.seconds)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
