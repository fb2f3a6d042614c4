"""A test target with known CPU work in known functions on several named threads.

Thread "alpha" spends 3/4 of its work in heavy_a() and 1/4 in light_a() (by iteration count);
thread "beta" only runs spin_b(); the main thread sleeps. Every function measures its own thread
CPU time (time.thread_time_ns), which is the ground truth the tests compare the profile with.

Prints one JSON line {"pid", "threads": {name: native_id}} when ready; runs for --duration seconds;
then writes {"cpu_ns": {"alpha/heavy_a": ns, ...}, "timeline": [[time_ns, {key: ns so far}], ...]}
to --report and exits. The timeline (every 20 ms, CLOCK_REALTIME) lets a test take the truth over
exactly the stretch a profile covers.
"""

import argparse
import json
import os
import threading
import time

# Per-thread ground truth: no shared lock, so measuring does not make threads wait on each other.
local = threading.local()
all_truth: list[dict[str, int]] = []


def account(key: str, ns: int) -> None:
    d = getattr(local, "truth", None)
    if d is None:
        d = local.truth = {}
        all_truth.append(d)
    d[key] = d.get(key, 0) + ns


def heavy_a(n: int) -> int:
    t0 = time.thread_time_ns()
    x = 0
    for i in range(n):  # HOT-HEAVY-A
        x += i * i
    account("alpha/heavy_a", time.thread_time_ns() - t0)
    return x


def light_a(n: int) -> int:
    t0 = time.thread_time_ns()
    x = 0
    for i in range(n):  # HOT-LIGHT-A
        x += i * i
    account("alpha/light_a", time.thread_time_ns() - t0)
    return x


def spin_b(n: int) -> int:
    t0 = time.thread_time_ns()
    x = 0
    for i in range(n):  # HOT-SPIN-B
        x ^= i
    account("beta/spin_b", time.thread_time_ns() - t0)
    return x


def alpha_loop(stop: threading.Event) -> None:
    while not stop.is_set():
        heavy_a(30_000)
        light_a(10_000)


def beta_loop(stop: threading.Event) -> None:
    while not stop.is_set():
        spin_b(20_000)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--report", required=True)
    ap.add_argument("--delay", type=float, default=0.0, help="sleep before working")
    args = ap.parse_args()
    stop = threading.Event()
    threads = [threading.Thread(target=alpha_loop, args=(stop,), name="alpha"),
               threading.Thread(target=beta_loop, args=(stop,), name="beta")]
    for t in threads:
        t.start()
    info = {"pid": os.getpid(), "threads": {t.name: t.native_id for t in threads}}
    info["threads"]["MainThread"] = threading.get_native_id()
    print(json.dumps(info), flush=True)
    timeline = [[time.time_ns(), {}]]
    end = time.monotonic() + args.duration
    while time.monotonic() < end:
        time.sleep(0.02)
        timeline.append([time.time_ns(), merged()])
    stop.set()
    for t in threads:
        t.join()
    timeline.append([time.time_ns(), merged()])
    with open(args.report, "w") as f:
        json.dump({"cpu_ns": merged(), "timeline": timeline}, f)


def merged() -> dict[str, int]:
    truth: dict[str, int] = {}
    for d in list(all_truth):
        for k, v in list(d.items()):
            truth[k] = truth.get(k, 0) + v
    return truth


if __name__ == "__main__":
    main()
