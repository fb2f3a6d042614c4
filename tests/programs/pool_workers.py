"""A multiprocessing pool whose workers burn CPU in work(), each measuring its own CPU.

Usage: pool_workers.py REPORT [--delay S] [--tasks N] [--seconds-each S]
Prints {"pid"} when started; after --delay seconds starts a Pool(3) (forked workers) and maps N
tasks of work(); writes {"workers": {pid: cpu_ns measured in work()}} to REPORT and exits.
"""

import argparse
import json
import multiprocessing as mp
import os
import time


def work(seconds: float) -> tuple[int, int]:
    c0 = time.thread_time_ns()
    end = time.thread_time() + seconds
    x = 0
    while time.thread_time() < end:
        x += 1
    return os.getpid(), time.thread_time_ns() - c0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("report")
    ap.add_argument("--delay", type=float, default=0.0)
    ap.add_argument("--tasks", type=int, default=12)
    ap.add_argument("--seconds-each", type=float, default=0.4)
    args = ap.parse_args()
    print(json.dumps({"pid": os.getpid()}), flush=True)
    time.sleep(args.delay)
    workers: dict[int, int] = {}
    with mp.get_context("fork").Pool(3) as pool:
        # tasks of different lengths, handed out as workers come free: unequal shares
        tasks = [args.seconds_each * (1 + i % 4) / 2.5 for i in range(args.tasks)]
        for pid, ns in pool.imap_unordered(work, tasks):
            workers[pid] = workers.get(pid, 0) + ns
    with open(args.report, "w") as f:
        json.dump({"workers": {str(k): v for k, v in workers.items()}}, f)


if __name__ == "__main__":
    main()
