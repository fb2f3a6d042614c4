"""What one run of a perf_event program on the cpu-clock tick costs here, part by part: the
floor under the CPU sampler's fixed cost per sample (bench/walker_cost.py `spin-nowalk`).

Tiny programs, each doing one thing the sampler does, are attached one at a time to the
software cpu-clock event of every CPU at --rates Hz while a C loop spins in user space on every
CPU (bench/c/events.c `spin`). Run time per run comes from the kernel's accounting
(kernel.bpf_stats_enabled=1). Variants alternate in order each round; medians are reported.

    python -m bench.tick_cost [--rates 19,99,999] [--rounds 3] [--seconds 3]

Needs root (BPF) and gcc.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time

from bench.probe_overhead import _BpfStats, build_events

PROGRAMS = r"""
struct chunk { char b[4096]; };
BPF_RINGBUF_OUTPUT(rb, 64);
BPF_STACK_TRACE(ks, 1024);
BPF_PERCPU_ARRAY(buf, struct chunk, 1);
BPF_HASH(h, u32, u64, 1024);

int empty(void *ctx) { return 0; }

int helpers(void *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    u64 *v = h.lookup(&tid);
    u64 t = bpf_ktime_get_ns();
    if (v)
        *v = t;
    return 0;
}

int kstack(void *ctx)
{
    int id = ks.get_stackid(ctx, 0);
    return id < 0 ? 0 : 1;
}

/* the kernel stack only when the tick interrupted kernel code (saved cs, pt_regs at ctx) */
int kstack_if_kernel(void *ctx)
{
    u64 cs = ((u64 *)ctx)[17];
    if ((cs & 3) == 3)
        return 0;
    int id = ks.get_stackid(ctx, 0);
    return id < 0 ? 0 : 1;
}

int ringbuf(void *ctx)
{
    int z = 0;
    struct chunk *c = buf.lookup(&z);
    if (c)
        rb.ringbuf_output(c, 128, BPF_RB_NO_WAKEUP);
    return 0;
}

/* one 4 KiB read of the interrupted thread's user stack, from its saved sp (pt_regs at ctx) */
int readuser(void *ctx)
{
    int z = 0;
    struct chunk *c = buf.lookup(&z);
    u64 sp = ((u64 *)ctx)[19];
    if (c && sp && sp < 0x00007fffffffffffULL)
        bpf_probe_read_user(c->b, sizeof(c->b), (void *)(sp & ~4095ULL));
    return 0;
}
"""
VARIANTS = ["empty", "helpers", "kstack", "kstack_if_kernel", "ringbuf", "readuser"]


def prog_stats(fd: int) -> tuple[int, int]:
    cnt = ns = 0
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("run_time_ns:"):
                ns = int(line.split()[1])
            elif line.startswith("run_cnt:"):
                cnt = int(line.split()[1])
    return cnt, ns


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="19,99,999")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args(argv)
    from bcc import BPF, PerfSWConfig, PerfType
    from probes import kheaders
    kheaders.apply(kheaders.resolve())
    events = build_events()
    rates = [int(r) for r in args.rates.split(",")]
    raw: dict[tuple[str, int], list[float]] = {}
    spinners = [subprocess.Popen([str(events), "spin", "100000"], stdout=subprocess.DEVNULL)
                for _ in range(os.cpu_count() or 1)]
    try:
        with _BpfStats():
            for r in range(args.rounds):
                for rate in rates:
                    for v in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
                        b = BPF(text=PROGRAMS.encode(), cflags=["-w"])
                        b.attach_perf_event(ev_type=PerfType.SOFTWARE,
                                            ev_config=PerfSWConfig.CPU_CLOCK,
                                            fn_name=v.encode(), sample_period=round(1e9 / rate))
                        fd = b.funcs[v.encode()].fd
                        time.sleep(0.3)
                        c0, n0 = prog_stats(fd)
                        time.sleep(args.seconds)
                        c1, n1 = prog_stats(fd)
                        b.cleanup()
                        if c1 > c0:
                            raw.setdefault((v, rate), []).append((n1 - n0) / (c1 - c0))
                            print(json.dumps({"round": r + 1, "variant": v, "rate_hz": rate,
                                              "runs": c1 - c0,
                                              "ns_per_run": round((n1 - n0) / (c1 - c0), 1)}),
                                  flush=True)
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    out = {"benchmark": "tick_cost", "rounds": args.rounds, "seconds": args.seconds,
           "ns_per_run": {f"{v}@{rate}Hz": round(statistics.median(xs), 1)
                          for (v, rate), xs in sorted(raw.items(), key=lambda kv: (kv[0][1],
                                                      VARIANTS.index(kv[0][0])))}}
    for rate in rates:
        print(f"{rate:>5} Hz: " + ", ".join(f"{v} {out['ns_per_run'].get(f'{v}@{rate}Hz')} ns"
                                           for v in VARIANTS))
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
