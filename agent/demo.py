"""A bundled demo: a small Python service-like workload, profiled with `spanflame attach`.

`python -m agent.demo` starts the workload, attaches to it for --duration seconds and writes a
flame graph and a pprof into --out. `python -m agent.demo --workload` is the workload itself.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path


def parse_request(payload: bytes) -> dict:
    return json.loads(payload.decode())


def render_page(data: dict) -> str:
    rows = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in sorted(data.items()))
    return f"<table>{rows}</table>" * 20


def checksum(body: str) -> str:
    h = body.encode()
    for _ in range(40):
        h = hashlib.sha256(h).digest()
    return h.hex()


def handle(i: int) -> None:
    data = parse_request(json.dumps({f"key{k}": k * i for k in range(200)}).encode())
    body = render_page(data)
    checksum(body)
    time.sleep(0.002)  # waiting on a "database"


def worker() -> None:
    i = 0
    while True:
        handle(i)
        i += 1


def workload() -> None:
    for n in range(3):
        threading.Thread(target=worker, name=f"worker-{n}", daemon=True).start()
    print(os.getpid(), flush=True)
    while True:
        time.sleep(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workload", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    if args.workload:
        workload()
        return
    spanflame = Path(sys.executable).parent / "spanflame"
    proc = subprocess.Popen([sys.executable, "-m", "agent.demo", "--workload"],
                            stdout=subprocess.PIPE, text=True)
    try:
        pid = int(proc.stdout.readline())
        out = Path(args.out).resolve()
        print(f"demo workload running as PID {pid}; profiling it for {args.duration:.0f} s")
        html = out / "spanflame-demo.html"
        rc = subprocess.call([str(spanflame), "attach", str(pid), "--duration",
                              str(args.duration), "--probes", "cpu,wall", "-o", str(html)])
        if rc == 0:
            print(f"open {html} in a browser (works offline)")
    finally:
        proc.kill()
        proc.wait()
    sys.exit(rc)


if __name__ == "__main__":
    main()
