"""Four threads on CPU at once (hashing large buffers releases the GIL), each measuring its own
CPU time; the main thread reads every worker's CPU clock every 20 ms.

Prints {"pid", "threads": {name: native_id}} when ready, runs --duration seconds, writes
{"timeline": [[time_ns, {native_id: cpu_ns}], ...]} to --report and exits.
"""

import argparse
import hashlib
import json
import os
import threading
import time

stop = threading.Event()


def hash_blocks(seed: int) -> None:
    block = bytes([seed]) * (1 << 16)
    while not stop.is_set():
        hashlib.sha256(block).digest()  # FT-HASH


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--report", required=True)
    args = ap.parse_args()
    threads = [threading.Thread(target=hash_blocks, args=(i,), name=f"hasher-{i}")
               for i in range(4)]
    for t in threads:
        t.start()
    clocks = {t.native_id: time.pthread_getcpuclockid(t.ident) for t in threads}
    print(json.dumps({"pid": os.getpid(), "threads": {t.name: t.native_id for t in threads}}),
          flush=True)
    timeline = []
    end = time.monotonic() + args.duration
    while time.monotonic() < end:
        timeline.append([time.time_ns(), {str(tid): time.clock_gettime_ns(c)
                                          for tid, c in clocks.items()}])
        time.sleep(0.02)
    timeline.append([time.time_ns(), {str(tid): time.clock_gettime_ns(c)
                                      for tid, c in clocks.items()}])
    stop.set()
    for t in threads:
        t.join()
    with open(args.report, "w") as f:
        json.dump({"timeline": timeline}, f)


if __name__ == "__main__":
    main()
