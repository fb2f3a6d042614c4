"""The node agent's own cost: CPU (itself and its py-spy processes) and memory, with 10
profiled processes, at `spanflame run` defaults.

Ten Python programs run: five service-like (small CPU bursts between waits), three idle, two
busy. After a warm-up the agent's CPU is read from /proc for --seconds (the agent process, its
finished children, and its py-spy processes still running), and its RSS is sampled.

    python -m bench.agent_budget [--seconds 60] [--warmup 25] [-- extra run options]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

SPANFLAME = Path(sys.executable).parent / "spanflame"

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


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--warmup", type=float, default=25)
    ap.add_argument("extra", nargs="*")
    args = ap.parse_args(argv)
    d = Path(tempfile.mkdtemp(prefix="spanflame-budget-"))
    progs = []
    for kind, src, n in (("service", SERVICE, 5), ("idle", IDLE, 3), ("busy", BUSY, 2)):
        path = d / f"{kind}.py"
        path.write_text(src)
        for _ in range(n):
            progs.append(subprocess.Popen([sys.executable, str(path)]))
    agent = subprocess.Popen([str(SPANFLAME), "run", "--store", str(d / "store"), "--listen",
                              f"127.0.0.1:{free_port()}", "--otlp-listen",
                              f"127.0.0.1:{free_port()}", "--include", "spanflame-budget|"
                              + str(d), *args.extra],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(args.warmup)
        ap_ = psutil.Process(agent.pid)
        (s0, k0), t0 = tree_cpu(ap_), time.monotonic()
        mem = []
        while time.monotonic() - t0 < args.seconds:
            time.sleep(2)
            kids = [k for k in ap_.children(recursive=True) if k.is_running()]
            mem.append((ap_.memory_info().rss, pss(ap_), sum(pss(k) for k in kids)))
        (s1, k1), t1 = tree_cpu(ap_), time.monotonic()
        dt = t1 - t0
        summary = {
            "benchmark": "agent_budget", "processes": len(progs), "seconds": round(dt),
            "extra_options": " ".join(args.extra),
            "agent_cpu_pct_of_one_core": round(100 * ((s1 - s0) + (k1 - k0)) / dt, 2),
            "agent_process_cpu_pct": round(100 * (s1 - s0) / dt, 2),
            "pyspy_cpu_pct": round(100 * (k1 - k0) / dt, 2),
            "agent_rss_mib_max": round(max(m[0] for m in mem) / 2**20, 1),
            "agent_pss_mib_max": round(max(m[1] for m in mem) / 2**20, 1),
            "pyspy_pss_mib_max": round(max(m[2] for m in mem) / 2**20, 1),
        }
    finally:
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
