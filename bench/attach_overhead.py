"""Target slowdown under `spanflame attach` versus no profiler.

One long-running target (N CPU-bound threads counting loop iterations) is measured in
alternating stretches: no profiler, then `spanflame attach` for the same length, and so on.
Each pair gives a throughput ratio (attached / not attached); we report the median. Pairs are
adjacent in time in one process, so machine noise mostly cancels.

    python -m bench.attach_overhead [--pairs 31] [--seconds 2] [--rate 100] [--threads 4]
                                    [--idle-threads 0] [--probes cpu] [--sampler auto|bpf|py-spy]
                                    [--aa]

The CLI runs with this checkout first on PYTHONPATH, so it profiles with the code benchmarked.
The first attach's `stacks:` summary line is printed: it says which sampler really ran.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.workloads import CPU_THREADS

SPANFLAME = Path(sys.executable).parent / "spanflame"
ROOT = Path(__file__).resolve().parents[1]


def cli_env() -> dict:
    """The environment for the spanflame CLI: this checkout's code before the installed one."""
    return {**os.environ, "PYTHONPATH": str(ROOT)}


class Target:
    def __init__(self, threads: int, idle: int = 0) -> None:
        self.script = Path(tempfile.mkdtemp()) / "workload.py"
        self.script.write_text(CPU_THREADS)
        self.proc = subprocess.Popen([sys.executable, str(self.script), str(threads), str(idle)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.proc.stdout.readline()
        self.pid = self.proc.pid

    def read(self) -> tuple[int, float]:
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        r = json.loads(self.proc.stdout.readline())
        return r["ops"], r["t"]

    def cpu_s(self) -> float:
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rate_during(self, action) -> tuple[float, float]:
        """(ops per wall second, ops per CPU second of the target) during `action()`."""
        c0 = self.cpu_s()
        o0, t0 = self.read()
        action()
        o1, t1 = self.read()
        c1 = self.cpu_s()
        return (o1 - o0) / (t1 - t0), (o1 - o0) / max(1e-9, c1 - c0)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def bootstrap_ci(values: list[float], n: int = 2000, seed: int = 1) -> tuple[float, float]:
    """95% bootstrap interval of the median: how far noise alone moves it."""
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(n))
    return meds[int(0.025 * n)], meds[int(0.975 * n)]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=31)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--rate", type=int, default=100)
    ap.add_argument("--threads", type=int, default=4, help="CPU-bound threads")
    ap.add_argument("--idle-threads", type=int, default=0, help="mostly waiting threads")
    ap.add_argument("--probes", default="cpu")
    ap.add_argument("--sampler", default="auto", choices=("auto", "bpf", "py-spy"))
    ap.add_argument("--gil", action="store_true", help="attach --gil (what run does for "
                                                         "processes with many threads)")
    ap.add_argument("--warmup", type=float, default=None,
                    help="seconds between starting attach and measuring (default 1.5, or 4 with "
                         "eBPF probes, which take 1-2 s to load)")
    ap.add_argument("--aa", action="store_true",
                    help="A/A run: both halves without a profiler, to show the noise floor")
    args = ap.parse_args(argv)
    if args.warmup is None:
        args.warmup = (1.5 if set(args.probes.split(",")) <= {"cpu", "wall"}
                       and args.sampler == "py-spy" else 4.0)
    out = Path(tempfile.mkdtemp()) / "p.pb.gz"
    t = Target(args.threads, args.idle_threads)
    try:
        time.sleep(1.0)

        def measure_idle() -> tuple[float, float]:
            return t.rate_during(lambda: time.sleep(args.seconds))

        stacks_line: list[str] = []

        def measure_attached() -> tuple[float, float]:
            # The window starts once the CLI is up and sampling (probes loaded), and ends before
            # it writes its output: it measures steady-state sampling, not start-up.
            prof = subprocess.Popen(
                [str(SPANFLAME), "attach", str(t.pid), "--duration", str(args.seconds + args.warmup + 0.5),
                 "--rate", str(args.rate), "--probes", args.probes, "--sampler", args.sampler,
                 "-o", str(out), *(["--gil"] if args.gil else [])],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cli_env())
            time.sleep(args.warmup)
            r = t.rate_during(lambda: time.sleep(args.seconds))
            text, _ = prof.communicate(timeout=120)
            if not stacks_line:
                stacks_line.extend(ln.strip() for ln in text.splitlines()
                                   if ln.strip().startswith(("stacks:", "probes:")))
                print("attach says: " + (" | ".join(stacks_line) or text.strip()[-300:]),
                      flush=True)
            return r

        if args.aa:
            measure_attached = measure_idle  # noqa: F811
        ratios, cpu_ratios = [], []
        for i in range(args.pairs):
            order = [("base", measure_idle), ("attached", measure_attached)]
            if i % 2:
                order.reverse()
            res = {name: fn() for name, fn in order}
            ratios.append(res["attached"][0] / res["base"][0])
            cpu_ratios.append(res["attached"][1] / res["base"][1])
            print(f"pair {i + 1}: base {res['base'][0]:.0f} ops/s, attached "
                  f"{res['attached'][0]:.0f} ops/s, ratio {ratios[-1]:.4f} "
                  f"(per CPU second {cpu_ratios[-1]:.4f})", flush=True)
    finally:
        t.close()
    med = statistics.median(ratios)
    lo, hi = bootstrap_ci(ratios)
    summary = {"benchmark": "attach_overhead" + ("_aa" if args.aa else ""), "threads": args.threads,
               "idle_threads": args.idle_threads, "rate_hz": args.rate,
               "probes": args.probes, "sampler": "none" if args.aa else args.sampler,
               "gil_only": args.gil, "pairs": args.pairs,
               "seconds": args.seconds,
               "median_ratio": round(med, 4), "slowdown_pct": round((1 - med) * 100, 2),
               "min_ratio": round(min(ratios), 4), "max_ratio": round(max(ratios), 4),
               "median_ratio_ci95": [round(lo, 4), round(hi, 4)],
               "median_ratio_per_cpu_s": round(statistics.median(cpu_ratios), 4),
               "median_ratio_per_cpu_s_ci95": [round(x, 4) for x in bootstrap_ci(cpu_ratios)]}
    if stacks_line:
        summary["attach_says"] = stacks_line
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
