"""What the kernel stack walker costs in the kernel: per CPU sample, per wait, per other switch.

The kernel's own accounting (sysctl kernel.bpf_stats_enabled=1) gives each BPF program's run
count and run time. Both programs that read Python stacks also run for events that are not ours:
`on_cpu_sample` fires on every CPU at every tick, `raw_tracepoint__sched_switch` at every context
switch of the host. So each figure is isolated by design:

* **non-target** (`filtered`): a context-switch flood from a C process that is not a target
  (bench/c/events.c `switch`), no Python target running: every run of either program is a
  filtered one, so run time / run count is the cost of a switch (or a tick) that is not ours;
* **per CPU sample** (`spin`): one target thread spins at DEPTH frames; the target samples are
  the kernel's own `samples` counter, and the other ticks of the phase are charged at the
  filtered cost: (run time - other ticks x filtered cost) / target samples;
* **per wait** (`lock`, `sleep`): target threads at DEPTH frames block on a lock the other
  one holds (tens of thousands of short waits a second, added up in the kernel) or sleep 1.1 ms
  (a record each); every time a target thread leaves the CPU the walker reads its stack, and
  those switches are counted exactly from /proc (voluntary + involuntary switches of the
  target's threads); the other switches are charged at the filtered cost.

`upper` charges the whole run time to the target events (no subtraction): a bound that holds
whatever the other events cost. Phases alternate in order each round; one probe session
(cpu, offcpu, lock; --rate Hz) serves them all. The decoded stacks are checked to be DEPTH
Python frames deep, and each target is checked to be read by the walker.

    python -m bench.walker_cost [--rounds 3] [--seconds 4] [--depths 10,50] [--rate 99]
                                [--pythons PATH,PATH]

Needs root (BPF) and gcc.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

from bench.probe_overhead import _BpfStats, build_events
from probes.session import ProbeSession

HERE = Path(__file__).resolve().parent
TARGET = HERE / "pystack_target.py"
PYENV = Path.home() / ".pyenv" / "versions"
DEFAULT_PYTHONS = [str(PYENV / "3.11.7/bin/python3.11"), str(PYENV / "3.12.1/bin/python3.12")]
SAMPLE_PROG = "on_cpu_sample"
SWITCH_PROG = "raw_tracepoint__sched_switch"
#: mode -> the program that reads its stacks
MODES = {"spin": SAMPLE_PROG, "lock": SWITCH_PROG, "sleep": SWITCH_PROG}


def ctx_switches(pid: int) -> int:
    """Times the threads of `pid` have left the CPU (voluntary and involuntary)."""
    n = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt", "nonvoluntary_ctxt")):
                        n += int(line.split()[1])
        except OSError:
            pass
    return n


def _delta(a: dict, b: dict, name: str) -> tuple[int, int]:
    return b[name][0] - a[name][0], b[name][1] - a[name][1]


def filtered_phase(s: ProbeSession, events: Path, seconds: float) -> dict:
    p = subprocess.Popen([str(events), "switch", str(seconds)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, env={**os.environ, "SF_WAIT": "1"})
    p.stdout.readline()
    before = s.program_stats()
    p.stdin.write("go\n")
    p.stdin.flush()
    json.loads(p.stdout.readline())
    after = s.program_stats()
    p.wait()
    sw, smp = _delta(before, after, SWITCH_PROG), _delta(before, after, SAMPLE_PROG)
    return {"switch_runs": sw[0], "switch_ns": sw[1], "sample_runs": smp[0], "sample_ns": smp[1]}


def depths_seen(s: ProbeSession, pid: int, mode: str) -> list[int]:
    s.drain()
    d = s.data
    recs = (d.samples if mode == "spin" else
            [r for r in d.runs if r.off_end_ns is not None] + d.short_waits)
    return [len(r.pystack) for r in recs if r.tgid == pid]


def target_phase(s: ProbeSession, python: str, mode: str, depth: int, seconds: float,
                 walk: bool = True) -> dict:
    p = subprocess.Popen([python, str(TARGET), mode, str(depth)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        info = json.loads(p.stdout.readline())
        pid = info["pid"]
        why = s.add_target(pid)
        if why is not None:
            raise SystemExit(f"the kernel walker does not read {python}: {why}")
        if not walk:
            # Attribution only: without its py_procs entry the process is one the walker does
            # not read, so the programs do everything else (wait bookkeeping, kernel stack,
            # syscall registers, records) and the Python walk stops at its first lookup.
            del s._bpf[b"py_procs"][ctypes.c_uint32(pid)]
        time.sleep(0.5)
        c0, x0, st0 = s.read_counters(), ctx_switches(pid), s.program_stats()
        time.sleep(seconds)
        st1, x1, c1 = s.program_stats(), ctx_switches(pid), s.read_counters()
        seen = depths_seen(s, pid, mode) if walk else []
        s.remove_target(pid)
    finally:
        p.stdin.close()
        p.wait(timeout=10)
    runs, ns = _delta(st0, st1, MODES[mode])
    target = (c1.get("samples", 0) - c0.get("samples", 0)) if mode == "spin" else x1 - x0
    errors = {k: c1[k] - c0.get(k, 0) for k in c1
              if k.startswith("python_stack_error") and c1[k] - c0.get(k, 0)}
    return {"runs": runs, "ns": ns, "target_events": target,
            "waits": c1.get("waits", 0) - c0.get("waits", 0),
            "short_waits": c1.get("short_waits", 0) - c0.get("short_waits", 0),
            "depth_reported": info["depth"],
            "depth_decoded_median": statistics.median(seen) if seen else None,
            "records_decoded": len(seen), "stack_errors": errors}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--depths", default="10,50")
    ap.add_argument("--rate", type=int, default=99, help="CPU samples per second per CPU")
    ap.add_argument("--pythons", default=",".join(DEFAULT_PYTHONS))
    ap.add_argument("--modes", default=",".join(MODES), help="of spin, lock, sleep")
    ap.add_argument("--nowalk", action="store_true",
                    help="also run each phase with the Python walk off (what the rest costs)")
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    pythons = [p for p in args.pythons.split(",") if p]
    depths = [int(d) for d in args.depths.split(",")]
    events = build_events()
    variants = [m for m in modes] + ([m + "-nowalk" for m in modes] if args.nowalk else [])
    phases = [("filtered", None, None, None)] + [
        (mode, py, Path(py).name, depth) for py in pythons for depth in depths
        for mode in variants]
    raw: dict[tuple, list[dict]] = {}
    with _BpfStats(), ProbeSession(["cpu", "offcpu", "lock"], rate_hz=args.rate,
                                   python_stacks=True) as s:
        s.start([])
        if "cpu" not in s.active or not s.python_stacks:
            raise SystemExit(f"the kernel walker is off: {s.off}")
        for r in range(args.rounds):
            for mode, py, name, depth in (phases if r % 2 == 0 else phases[::-1]):
                res = (filtered_phase(s, events, args.seconds) if mode == "filtered" else
                       target_phase(s, py, mode.split("-")[0], depth, args.seconds,
                                    walk=not mode.endswith("-nowalk")))
                raw.setdefault((mode, name, depth), []).append(res)
                print(json.dumps({"round": r + 1, "phase": mode, "python": name, "depth": depth,
                                  **res}), flush=True)

    def med(vals):
        vals = [v for v in vals if v is not None]
        return round(statistics.median(vals), 1) if vals else None

    f = raw[("filtered", None, None)]
    sw_filtered = med([x["switch_ns"] / x["switch_runs"] for x in f if x["switch_runs"]])
    smp_filtered = med([x["sample_ns"] / x["sample_runs"] for x in f if x["sample_runs"]])
    summary = {"benchmark": "walker_cost", "rate_hz": args.rate, "rounds": args.rounds,
               "seconds": args.seconds,
               "nontarget_switch_ns": sw_filtered, "nontarget_tick_ns": smp_filtered,
               "nontarget_switches_per_s": med([x["switch_runs"] / args.seconds for x in f]),
               "results": []}
    for (mode, name, depth), xs in raw.items():
        if mode == "filtered":
            continue
        other = smp_filtered if mode.startswith("spin") else sw_filtered
        per = [(x["ns"] - (x["runs"] - x["target_events"]) * other) / x["target_events"]
               for x in xs if x["target_events"]]
        upper = [x["ns"] / x["target_events"] for x in xs if x["target_events"]]
        summary["results"].append({
            "python": name, "depth": depth, "mode": mode,
            "what": ("per CPU sample" if mode.startswith("spin") else "per target switch (wait)")
                    + (", Python walk off" if mode.endswith("-nowalk") else ""),
            "ns": med(per), "ns_upper": med(upper),
            "target_events_per_s": med([x["target_events"] / args.seconds for x in xs]),
            "target_share_of_runs": med([x["target_events"] / x["runs"] for x in xs if x["runs"]]),
            "waits_per_s": med([x["waits"] / args.seconds for x in xs]),
            "short_waits_per_s": med([x["short_waits"] / args.seconds for x in xs]),
            "depth_decoded_median": med([x["depth_decoded_median"] for x in xs]),
            "stack_errors": {k: sum(x["stack_errors"].get(k, 0) for x in xs)
                             for x in xs for k in x["stack_errors"]},
        })
    for row in summary["results"]:
        print(f"{row['python']:>11} depth {row['depth']:>3} {row['mode']:>12}: "
              f"{row['ns']:>7} ns {row['what']} (upper {row['ns_upper']}), "
              f"{row['target_events_per_s']:.0f}/s, decoded depth {row['depth_decoded_median']}")
    print(f"non-target: {sw_filtered} ns per context switch, {smp_filtered} ns per tick")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
