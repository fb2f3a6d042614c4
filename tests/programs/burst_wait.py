"""Short lock waits between CPU bursts in other functions: the case a sampler outside the
kernel gets wrong (it sees the thread in a neighbour and puts the wait there).

Thread "worker" loops: burn_before() ~2 ms of CPU, wait_for_lock() takes a lock that thread
"holder" keeps most of the time (about 3 ms of waiting), burn_after() ~2 ms of CPU. The worker
times every acquire itself (CLOCK_REALTIME ns).

Prints {"pid", "threads"} when ready; runs --duration seconds; writes {"waits": [[start, end],
...]} to --report; exits.
"""

import argparse
import json
import os
import threading
import time

lock = threading.Lock()
stop = threading.Event()
waits: list = []


def burn(ms: float) -> None:
    end = time.thread_time() + ms / 1000
    while time.thread_time() < end:
        pass


def burn_before() -> None:
    burn(2)


def wait_for_lock() -> None:
    t0 = time.time_ns()
    with lock:  # BW-LOCK
        waits.append([t0, time.time_ns()])


def burn_after() -> None:
    burn(2)


def worker() -> None:
    while not stop.is_set():
        burn_before()
        wait_for_lock()
        burn_after()


def holder() -> None:
    while not stop.is_set():
        with lock:
            time.sleep(0.006)
        time.sleep(0.0005)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--report", required=True)
    args = ap.parse_args()
    threads = [threading.Thread(target=holder, name="holder", daemon=True),
               threading.Thread(target=worker, name="worker")]
    for t in threads:
        t.start()
    print(json.dumps({"pid": os.getpid(), "threads": {t.name: t.native_id for t in threads}}),
          flush=True)
    time.sleep(args.duration)
    stop.set()
    threads[1].join()
    with open(args.report, "w") as f:
        json.dump({"waits": waits}, f)


if __name__ == "__main__":
    main()
