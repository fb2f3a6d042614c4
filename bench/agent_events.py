"""The agent's user-space CPU per event the kernel walker reports: per 1,000 CPU samples a second
and per 1,000 waits a second, drained and decoded, and then turned into a profile.

Known event rates are driven through a `ProbeSession` in this process, set up as `spanflame run`
sets its own (every probe, records kept per process, the ring buffer drained every 250 ms):

* `idle`: one Python process, 4 threads blocked for ever: the session's fixed cost;
* `samples`: two Python processes spinning at 20 frames, --rate Hz per CPU (high, for enough samples: the user-space cost of a sample does not depend on the rate);
* `waits`: 8 threads sleeping 1.1 ms in a loop: waits over the 1 ms threshold, one record each;
* `short_waits`: two threads handing a lock to each other: short waits, added up in the kernel
  (one record per 10 ms of waiting or per change of place).

Per phase, this process's CPU (resource.getrusage: the drain thread reading the ring buffer,
decoding records and symbolising stacks) less the idle phase's rate, divided by the events. Then
each phase's window is turned into a profile as the agent does (session.window,
agent/recordprofile.add_records with exact CPU from the runs, sample counts, pprof encode),
timed on this thread's CPU clock. Phases alternate in order each round; medians are reported,
and the cost of a 64-core node at 19 Hz is predicted from them.

    python -m bench.agent_events [--rounds 5] [--seconds 10] [--rate 999]

Needs root (BPF).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import time
from pathlib import Path

from probes.session import ProbeSession

TARGET = Path(__file__).resolve().parent / "pystack_target.py"
#: phase -> the targets it starts: (mode, depth, threads)
PHASES = {
    "idle": [("idle", 20, 4)],
    "samples": [("spin", 20, 1), ("spin", 20, 1)],
    "waits": [("sleep", 20, 8)],
    "short_waits": [("lock", 20, 2)],
}
TYPES = ["cpu", "off_cpu", "lock_wait", "gil_wait", "io_wait", "net_wait"]


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def build_window(s: ProbeSession, pid: int, start: int, end: int, rate: int) -> dict:
    """Turn one window of `pid` into a stored-profile's bytes, as agent/kernelsource does;
    CPU seconds of each step (this thread)."""
    from agent import pprof
    from agent.aggregate import fill_sample_counts, new_profile
    from agent.recordprofile import add_records, kernel_python_stack
    from agent.spans import SpanStore
    from agent.tracelink import TraceLinker
    from agent.waits import RunsCpu

    t0 = time.thread_time()
    data = s.window(pid, start, end)
    t1 = time.thread_time()
    profile = new_profile(TYPES, rate, start, end)
    linker = TraceLinker(SpanStore(), rate, window=(start - 1, end + 1))
    cpu = RunsCpu(data, pid, start, end)
    add_records(profile, pid, data, python_stack=kernel_python_stack, window=(start, end),
                linker=linker, cpu=cpu)
    fill_sample_counts(profile)
    t2 = time.thread_time()
    size = sum(len(pprof.encode(profile_of(profile, t))) for t in TYPES
               if profile.total(t))
    t3 = time.thread_time()
    return {"window_s": t1 - t0, "add_records_s": t2 - t1, "encode_s": t3 - t2,
            "records": len(data.samples) + len(data.runs) + len(data.short_waits),
            "pprof_bytes": size}


def profile_of(profile, type_name: str):
    from agent.run import _only
    return _only(profile, type_name)


def run_phase(s: ProbeSession, name: str, seconds: float, python: str, rate: int) -> dict:
    procs, pids = [], []
    try:
        for mode, depth, threads in PHASES[name]:
            p = subprocess.Popen([python, str(TARGET), mode, str(depth), str(threads)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            procs.append(p)
            pid = json.loads(p.stdout.readline())["pid"]
            why = s.add_target(pid)
            if why is not None:
                raise SystemExit(f"the kernel walker does not read {python}: {why}")
            pids.append(pid)
        time.sleep(1.0)
        s.drain()
        c0, ns0, k0 = cpu_s(), time.time_ns(), s.read_counters()
        time.sleep(seconds)
        s.drain()
        c1, ns1, k1 = cpu_s(), time.time_ns(), s.read_counters()
        builds = [build_window(s, pid, ns0, ns1, rate) for pid in pids]
    finally:
        for pid in pids:
            s.remove_target(pid)
        for p in procs:
            p.stdin.close()
            p.wait(timeout=10)
    s.prune(time.time_ns())
    d = {k: k1.get(k, 0) - k0.get(k, 0) for k in ("samples", "waits", "short_waits")}
    return {"cpu_s": c1 - c0, "seconds": (ns1 - ns0) / 1e9, **d,
            "records": sum(b["records"] for b in builds),
            "build_s": sum(b["window_s"] + b["add_records_s"] + b["encode_s"] for b in builds),
            "add_records_s": sum(b["add_records_s"] for b in builds),
            "window_s": sum(b["window_s"] for b in builds),
            "encode_s": sum(b["encode_s"] for b in builds),
            "pprof_bytes": sum(b["pprof_bytes"] for b in builds)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=10.0, help="per phase (one agent window)")
    ap.add_argument("--rate", type=int, default=999, help="CPU samples per second per CPU")
    ap.add_argument("--python", default=str(Path.home() / ".pyenv/versions/3.11.7/bin/python3.11"))
    ap.add_argument("--cores", type=int, default=64, help="for the prediction")
    ap.add_argument("--node-rate", type=int, default=19, help="for the prediction")
    args = ap.parse_args(argv)
    raw: dict[str, list[dict]] = {k: [] for k in PHASES}
    memory = {"before_load": rss_mib()}
    with ProbeSession(["cpu", "offcpu", "lock", "io", "net"], rate_hz=args.rate,
                      max_records=500_000, per_process_only=True, python_stacks=True) as s:
        s.start([])
        if "cpu" not in s.active:
            raise SystemExit(f"the kernel walker is off: {s.off}")
        # What loading the probes leaves in this process (the compile runs in a loader child:
        # probes/loader.py; before, bcc and LLVM stayed here), and how much of it glibc gives
        # back when asked.
        memory["after_load"] = rss_mib()
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        memory["after_malloc_trim"] = rss_mib()
        print(json.dumps({"rss_mib": memory}), flush=True)
        names = list(PHASES)
        for r in range(args.rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                res = run_phase(s, name, args.seconds, args.python, args.rate)
                raw[name].append(res)
                print(json.dumps({"round": r + 1, "phase": name, **res}), flush=True)

    med = statistics.median
    idle_rate = med([x["cpu_s"] / x["seconds"] for x in raw["idle"]])
    out = {"benchmark": "agent_events", "rate_hz": args.rate, "rounds": args.rounds,
           "seconds": args.seconds, "idle_cpu_pct": round(100 * idle_rate, 3),
           "rss_mib": memory}
    # Each phase also has a few events of the other kinds (spinners get preempted, lock
    # threads get sampled): those are charged at the cost found for their own kind before the
    # rest is divided by the phase's events. Waits first (they have the fewest others).
    cost: dict[str, tuple[float, float]] = {}  # kind -> (drain s, profile s) per event
    for name in ("waits", "samples", "short_waits"):
        xs = raw[name]

        def others(x: dict, which: int) -> float:
            return sum(x[k] * c[which] for k, c in cost.items())

        ok = [x for x in xs if x[name]]
        per_drain = med([(x["cpu_s"] - idle_rate * x["seconds"] - others(x, 0)) / x[name]
                         for x in ok])
        per_build = med([(x["build_s"] - others(x, 1)) / x[name] for x in ok])
        cost[name] = (per_drain, per_build)
        out[name] = {
            "events_per_s": round(med([x[name] / x["seconds"] for x in xs])),
            "others_per_s": {k: round(med([x[k] / x["seconds"] for x in xs]))
                             for k in ("samples", "waits", "short_waits") if k != name},
            "records_per_event": round(med([x["records"] / x[name] for x in ok]), 4),
            "drain_decode_us_per_event": round(1e6 * per_drain, 2),
            "profile_us_per_event": round(1e6 * per_build, 2),
            "of_which_add_records_us": round(1e6 * med([x["add_records_s"] / x[name]
                                                        for x in ok]), 2),
            "cpu_pct_per_1k_per_s": round(100 * (per_drain + per_build) * 1000, 3),
            "pprof_bytes_per_window": round(med([x["pprof_bytes"] for x in xs])),
        }
    unit = ("samples", "waits", "short_waits")
    node_samples = args.cores * args.node_rate
    pred = out["idle_cpu_pct"] + out["samples"]["cpu_pct_per_1k_per_s"] * node_samples / 1000
    out["prediction"] = {
        "cores": args.cores, "rate_hz": args.node_rate, "samples_per_s": node_samples,
        "cpu_pct_samples_only": round(pred, 2),
        "cpu_pct_plus_1k_waits_per_s": round(pred + out["waits"]["cpu_pct_per_1k_per_s"], 2),
        "cpu_pct_plus_10k_waits_per_s": round(pred + 10 * out["waits"]["cpu_pct_per_1k_per_s"], 2),
    }
    for name in unit:
        o = out[name]
        print(f"{name:>11}: {o['events_per_s']:>7}/s, {o['records_per_event']} records each; "
              f"drain+decode {o['drain_decode_us_per_event']} us, profile "
              f"{o['profile_us_per_event']} us per event: {o['cpu_pct_per_1k_per_s']}% of a core "
              f"per 1,000/s")
    p = out["prediction"]
    print(f"idle session: {out['idle_cpu_pct']}% of a core. {p['cores']} busy cores at "
          f"{p['rate_hz']} Hz ({p['samples_per_s']} samples/s): {p['cpu_pct_samples_only']}% of "
          f"a core; with 1k waits/s {p['cpu_pct_plus_1k_waits_per_s']}%, with 10k "
          f"{p['cpu_pct_plus_10k_waits_per_s']}%")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
