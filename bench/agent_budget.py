"""The node agent's own cost: CPU (itself and any child, such as py-spy) and memory, with 10
profiled processes, at `spanflame run` defaults (every probe, --rate 19, 10 s windows).

Ten Python programs run: five service-like (small CPU bursts between waits), three idle, two
busy. After a warm-up, `GET /healthz` must say that the kernel walker reads every one of them
(`sources`: each pid "bpf", or what --expect says; otherwise the benchmark stops). Then the agent's CPU is read from
/proc for --seconds (the agent process, its finished children and its live ones), and its RSS
and PSS are sampled.

The BPF programs run in the profiled processes' (and other tasks') context, not the agent's:
their time, from the kernel's accounting (kernel.bpf_stats_enabled=1 during the run), is
reported apart. --profile-agent N then records the agent with py-spy for N seconds (after the
measurement, so it does not count) and prints where its CPU goes.

    python -m bench.agent_budget [--seconds 60] [--warmup 25] [--rate 19]
                                 [--profile-agent 0] [--expect bpf] [-- extra run options]

The agent runs with this checkout first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

import psutil

from bench.attach_overhead import cli_env

SPANFLAME = Path(sys.executable).parent / "spanflame"
STATS = Path("/proc/sys/kernel/bpf_stats_enabled")

SERVICE = r'''
import sys, threading, time, hashlib
def handle():
    h = b"x"
    for _ in range(300): h = hashlib.sha256(h).digest()
def worker():
    while True:
        handle(); time.sleep(0.02)
for i in range(3): threading.Thread(target=worker, daemon=True).start()
time.sleep(3600)  # spanflame-budget
'''
IDLE = "import time\nwhile True: time.sleep(1)  # spanflame-budget\n"
BUSY = r'''
import threading
def spin():
    x = 0
    while True: x += 1
for i in range(2): threading.Thread(target=spin, daemon=True).start()
spin()  # spanflame-budget
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_cpu(p: psutil.Process) -> tuple[float, float]:
    """(CPU seconds of the process itself, of its children: finished ones and live ones)."""
    t = p.cpu_times()
    kids = t.children_user + t.children_system
    for c in p.children(recursive=True):
        try:
            ct = c.cpu_times()
            kids += ct.user + ct.system
        except psutil.NoSuchProcess:
            pass
    return t.user + t.system, kids


def pss(p: psutil.Process) -> float:
    try:
        return p.memory_full_info().pss
    except (psutil.Error, AttributeError):
        return 0.0


def _prog_name(pid: int, fd: int) -> str:
    """The name of BPF program `fd` of process `pid` (pidfd_getfd, then BPF_OBJ_GET_INFO_BY_FD:
    bpf_prog_info.name is at offset 64); "" when it cannot be read."""
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return ""
    try:
        mine = libc.syscall(438, pidfd, fd, 0)  # pidfd_getfd
        if mine < 0:
            return ""
        try:
            info = ctypes.create_string_buffer(256)
            attr = struct.pack("=IIQ", mine, len(info), ctypes.addressof(info)) + bytes(104)
            buf = ctypes.create_string_buffer(attr, len(attr))
            if libc.syscall(321, 15, buf, len(attr)) != 0:  # bpf(BPF_OBJ_GET_INFO_BY_FD)
                return ""
            return info.raw[64:80].split(b"\0", 1)[0].decode("ascii", "replace")
        finally:
            os.close(mine)
    finally:
        os.close(pidfd)


def bpf_prog_stats(pid: int) -> dict[tuple[int, str], tuple[int, int]]:
    """(prog id, name) -> (run count, run time ns) of the BPF programs `pid` holds open."""
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:bpf-prog":
                continue
            info = dict(line.split(":", 1) for line in
                        open(f"/proc/{pid}/fdinfo/{fd}").read().splitlines() if ":" in line)
            key = (int(info["prog_id"]), _prog_name(pid, int(fd)))
            out[key] = (int(info.get("run_cnt", 0)), int(info.get("run_time_ns", 0)))
        except (OSError, KeyError, ValueError):
            pass
    return out


def healthz(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
        return json.loads(r.read())


def wait_for_sources(port: int, pids: list[int], timeout: float) -> dict:
    """/healthz once every pid has a stack source (or the timeout passed)."""
    deadline = time.monotonic() + timeout
    h: dict = {}
    while time.monotonic() < deadline:
        try:
            h = healthz(port)
            if all(str(p) in h.get("sources", {}) for p in pids):
                return h
        except OSError:
            pass
        time.sleep(1)
    return h


def probe_counts(port: int) -> dict[str, float]:
    """The probe session's event counters, from /metrics (updated once per window)."""
    out = {}
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            for kind in ("samples", "waits", "short_waits"):
                if line.startswith(f'spanflame_probe_drops{{kind="{kind}"}}'):
                    out[kind] = float(line.split()[-1])
    return out


def memory_split(pid: int) -> dict[str, float]:
    """MiB of the process's PSS that is anonymous memory and file mappings (libraries)."""
    out = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("Pss_Anon", "Pss_File", "Rss"):
                    out[k] = round(int(v.split()[0]) / 1024, 1)
    except OSError:
        pass
    return out


def profile_agent(pid: int, seconds: float) -> dict[str, list[tuple[str, float]]]:
    """Where the agent's CPU goes: py-spy's on-CPU samples of it, by function, inclusive and
    self, as shares of all samples."""
    py_spy = Path(sys.executable).parent / "py-spy"
    out = Path(tempfile.mkdtemp()) / "agent.txt"
    subprocess.run([str(py_spy), "record", "--pid", str(pid), "--duration", str(int(seconds)),
                    "--rate", "200", "--nonblocking", "--format", "raw", "-o", str(out)],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    incl: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0

    def short(fn: str) -> str:
        name, _, where = fn.partition(" (")
        return f"{name} ({where.split(':')[0].rsplit('/', 1)[-1]})" if where else fn

    for line in out.read_text().splitlines() if out.exists() else []:
        stack, _, n = line.rpartition(" ")
        n = int(n)
        total += n
        frames = [short(f) for f in stack.split(";")]
        for fn in set(frames):
            incl[fn] += n
        own[frames[-1]] += n
    if not total:
        return {}
    return {k: [(fn, round(100 * n / total, 1)) for fn, n in c.most_common(25)]
            for k, c in (("inclusive", incl), ("self", own))}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--warmup", type=float, default=25)
    ap.add_argument("--rate", type=int, default=19, help="spanflame run --rate")
    ap.add_argument("--profile-agent", type=float, default=0, metavar="SECONDS")
    ap.add_argument("--expect", default="bpf", choices=("bpf", "py-spy"),
                    help="the stack source every process must have (py-spy: with "
                         "`-- --sampler py-spy`, to measure the fallback)")
    ap.add_argument("extra", nargs="*")
    args = ap.parse_args(argv)
    d = Path(tempfile.mkdtemp(prefix="spanflame-budget-"))
    progs = []
    for kind, src, n in (("service", SERVICE, 5), ("idle", IDLE, 3), ("busy", BUSY, 2)):
        path = d / f"{kind}.py"
        path.write_text(src)
        for _ in range(n):
            progs.append(subprocess.Popen([sys.executable, str(path)]))
    port = free_port()
    agent = subprocess.Popen([str(SPANFLAME), "run", "--store", str(d / "store"), "--listen",
                              f"127.0.0.1:{port}", "--otlp-listen",
                              f"127.0.0.1:{free_port()}", "--include", "spanflame-budget|"
                              + str(d), "--rate", str(args.rate), *args.extra],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cli_env())
    old_stats = STATS.read_text().strip()
    STATS.write_text("1")
    summary: dict = {}
    try:
        t_start = time.monotonic()
        h = wait_for_sources(port, [p.pid for p in progs], args.warmup + 60)
        sources = {int(pid): v.get("sampler") for pid, v in h.get("sources", {}).items()}
        walker = {p.pid: sources.get(p.pid) for p in progs}
        print("healthz sources: " + json.dumps({str(k): v for k, v in walker.items()}),
              flush=True)
        if not all(v == args.expect for v in walker.values()):
            raise SystemExit(f"not every process has stack source {args.expect}: {h}")
        time.sleep(max(0.0, args.warmup - (time.monotonic() - t_start)))
        ap_ = psutil.Process(agent.pid)
        b0, e0 = bpf_prog_stats(agent.pid), probe_counts(port)
        (s0, k0), t0 = tree_cpu(ap_), time.monotonic()
        mem = []
        while time.monotonic() - t0 < args.seconds:
            time.sleep(2)
            kids = [k for k in ap_.children(recursive=True) if k.is_running()]
            mem.append((ap_.memory_info().rss, pss(ap_), sum(pss(k) for k in kids)))
            if mem[-1][0] >= max(m[0] for m in mem):
                split = memory_split(agent.pid)
        (s1, k1), t1 = tree_cpu(ap_), time.monotonic()
        b1 = bpf_prog_stats(agent.pid)
        time.sleep(0.1)
        e1 = probe_counts(port)
        dt = t1 - t0
        t_user = ap_.cpu_times()
        h = healthz(port)
        bpf_ns = sum(v[1] - b0.get(k, (0, 0))[1] for k, v in b1.items())
        summary = {
            "benchmark": "agent_budget", "processes": len(progs), "seconds": round(dt),
            "rate_hz": args.rate, "extra_options": " ".join(args.extra),
            "sources": sorted(set(walker.values())),
            "agent_cpu_pct_of_one_core": round(100 * ((s1 - s0) + (k1 - k0)) / dt, 2),
            "agent_process_cpu_pct": round(100 * (s1 - s0) / dt, 2),
            "children_cpu_pct": round(100 * (k1 - k0) / dt, 2),
            "agent_rss_mib_max": round(max(m[0] for m in mem) / 2**20, 1),
            "agent_pss_mib_max": round(max(m[1] for m in mem) / 2**20, 1),
            "children_pss_mib_max": round(max(m[2] for m in mem) / 2**20, 1),
            "agent_memory_at_max_mib": split,
            "bpf_programs_cpu_pct": round(100 * bpf_ns / 1e9 / dt, 3),
            "bpf_programs": {name or str(pid_): {
                "runs_per_s": round((v[0] - b0.get((pid_, name), (0, 0))[0]) / dt),
                "ns_per_run": round((v[1] - b0.get((pid_, name), (0, 0))[1])
                                    / max(1, v[0] - b0.get((pid_, name), (0, 0))[0])),
                "cpu_pct": round(100 * (v[1] - b0.get((pid_, name), (0, 0))[1]) / 1e9 / dt, 3)}
                for (pid_, name), v in b1.items() if v[0] > b0.get((pid_, name), (0, 0))[0]},
            # counters reach /metrics once per window: rates over whole windows, roughly dt
            "events_per_s": {k: round((e1.get(k, 0) - e0.get(k, 0)) / dt)
                             for k in ("samples", "waits", "short_waits")},
            "agent_user_s_total": round(t_user.user, 1), "agent_system_s_total": round(t_user.system, 1),
            "pending_windows": h.get("pending_windows"), "degraded": h.get("degraded"),
        }
        print(json.dumps(summary), flush=True)
        if args.profile_agent:
            prof = summary["agent_profile_pct"] = profile_agent(agent.pid, args.profile_agent)
            for kind, rows in prof.items():
                print(f"agent on-CPU samples, {kind}:")
                for fn, pct in rows:
                    print(f"  {pct:5.1f}%  {fn}")
    finally:
        STATS.write_text(old_stats)
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(timeout=60)
        except subprocess.TimeoutExpired:
            agent.kill()
        for p in progs:
            p.kill()
            p.wait()
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
