"""What the eBPF probes cost: per event, per captured event, in agent CPU, and to load.

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

    python -m bench.probe_overhead [--rounds 9] [--seconds 1.0]

Needs root (BPF) and gcc.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from probes.session import ProbeSession

HERE = Path(__file__).resolve().parent
#: event kind -> (events.c mode args, probe watching it, probe events per loop iteration)
KINDS = {
    "futex (lock)": (["futex", "1"], "lock", 1),
    "sched_switch (offcpu)": (["switch"], "offcpu", 2),
    "tcp send+recv (net)": (["send"], "net", 2),
    "block io (io)": (["io"], "io", 1),
    "other syscall": (["nop"], "lock", 1),
}


def build_events() -> Path:
    out = Path(tempfile.mkdtemp(prefix="spanflame-bench-")) / "events"
    subprocess.run(["gcc", "-O2", "-pthread", "-o", str(out), str(HERE / "c" / "events.c")],
                   check=True)
    return out


def run_loop(binary: Path, args: list[str], seconds: float, session: ProbeSession | None,
             as_target: bool, tmpdir: Path) -> float:
    argv = [str(binary), *args]
    if args[0] == "futex":
        argv += [str(seconds)]
    else:
        argv += [str(seconds)]
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
RUNS_PER_EVENT = {"futex (lock)": 2, "sched_switch (offcpu)": 1, "tcp send+recv (net)": 1,
                  "block io (io)": 2, "other syscall": 1}
PROGRAMS = {
    "futex (lock)": ("tracepoint__syscalls__sys_enter_futex", "tracepoint__syscalls__sys_exit_futex"),
    "sched_switch (offcpu)": ("raw_tracepoint__sched_switch",),
    "tcp send+recv (net)": ("tracepoint__sock__sock_send_length", "tracepoint__sock__sock_recv_length"),
    "block io (io)": ("tracepoint__block__block_io_start", "tracepoint__block__block_io_done"),
    "other syscall": (),
}
EMPTY = {
    "futex (lock)": "TRACEPOINT_PROBE(syscalls, sys_enter_futex) { return 0; }\n"
                    "TRACEPOINT_PROBE(syscalls, sys_exit_futex) { return 0; }\n",
    "sched_switch (offcpu)": "RAW_TRACEPOINT_PROBE(sched_switch) { return 0; }\n",
    "tcp send+recv (net)": "TRACEPOINT_PROBE(sock, sock_send_length) { return 0; }\n"
                           "TRACEPOINT_PROBE(sock, sock_recv_length) { return 0; }\n",
    "block io (io)": "TRACEPOINT_PROBE(block, block_io_start) { return 0; }\n"
                     "TRACEPOINT_PROBE(block, block_io_done) { return 0; }\n",
    "other syscall": "TRACEPOINT_PROBE(syscalls, sys_enter_futex) { return 0; }\n",
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


SLEEPERS = r'''
import os, sys, threading, time
def nap():
    while True:
        time.sleep(0.0012)
for _ in range(int(sys.argv[1])):
    threading.Thread(target=nap, daemon=True).start()
print(os.getpid(), flush=True)
time.sleep(3600)
'''


def agent_cpu_per_10k(seconds: float) -> dict:
    """Agent CPU while the sched probe reports ~1 off-CPU wait per sleeper per 1.2 ms."""
    script = Path(tempfile.mkdtemp()) / "sleepers.py"
    script.write_text(SLEEPERS)
    p = subprocess.Popen([sys.executable, str(script), "12"], stdout=subprocess.PIPE, text=True)
    pid = int(p.stdout.readline())
    try:
        with ProbeSession(["offcpu"], offcpu_min_ns=1_000_000) as s:
            s.start([pid])
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.monotonic()
            time.sleep(seconds)
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            t1 = time.monotonic()
            data = s.close()
    finally:
        p.kill()
        p.wait()
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    events = len(data.runs)
    rate = events / (t1 - t0)
    return {"events_per_s": round(rate), "agent_cpu_pct": round(100 * cpu / (t1 - t0), 2),
            "agent_cpu_pct_per_10k_events_per_s": round(100 * cpu / (t1 - t0) / rate * 10_000, 2)}


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
    summary["agent_cpu"] = agent_cpu_per_10k(10.0)
    print(json.dumps(summary["agent_cpu"]), flush=True)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
