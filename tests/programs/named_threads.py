"""A target for probes.pythreads: threads whose names are stored every way CPython stores them.

Runs under CPython 3.10-3.13. Starts named threads (ASCII, Latin-1, Cyrillic and astral names:
1-, 2- and 4-byte str kinds; one name longer than 256 characters), renames one after it started,
gives one a materialized __dict__ and one so many attributes that they no longer fit the shared
keys, clears one's `_native_id` (as if it had not run yet: a reader must find it by `_ident`),
starts a Thread subclass, a ThreadPoolExecutor of POOL workers (first argument, default 50), and
one thread that has exited before the report. Then prints one JSON line: {"pid", "version",
"threads": {native_id: name} of threading.enumerate() (the cleared one by the id it reported
from inside), "cleared": its native id, "exited": [name, native_id]}; waits for stdin to close.
"""

import json
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

STOP = threading.Event()
NATIVE = {}


def wait():
    NATIVE[threading.current_thread().name] = threading.get_native_id()
    STOP.wait()


class Worker(threading.Thread):
    """A subclass that sets its own attributes first: another type, other shared keys."""

    def __init__(self, name):
        self.job = "report"
        super().__init__(name=name, target=wait, daemon=True)


def main():
    pool_size = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    exited = threading.Thread(name="exited", target=lambda: None)
    exited.start()
    exited.join()

    names = ["café-worker", "работник", "𠀋", "plain", "long-" + "x" * 300, "to-rename",
             "dict-materialized", "many-attrs", "no-native-id"]
    threads = {name: threading.Thread(name=name, target=wait, daemon=True) for name in names}
    threads["subclass"] = Worker("subclass-ö")
    for t in threads.values():
        t.start()
    threads["to-rename"].name = "renamed"
    vars(threads["dict-materialized"])["extra"] = 1
    for i in range(40):
        setattr(threads["many-attrs"], f"attr_{i}", i)
    while "no-native-id" not in NATIVE:
        STOP.wait(0.001)
    threads["no-native-id"]._native_id = None

    started = threading.Barrier(pool_size + 1)
    pool = ThreadPoolExecutor(max_workers=max(1, pool_size), thread_name_prefix="pool")
    for _ in range(pool_size):
        pool.submit(lambda: (started.wait(), STOP.wait()))
    started.wait()  # every pool worker is running its task

    truth = {t.native_id or NATIVE[t.name]: t.name for t in threading.enumerate()}
    print(json.dumps({"pid": os.getpid(), "version": list(sys.version_info[:2]),
                      "threads": truth, "cleared": NATIVE["no-native-id"],
                      "exited": [exited.name, exited.native_id]}, ensure_ascii=False),
          flush=True)
    sys.stdin.read()
    STOP.set()
    pool.shutdown()


if __name__ == "__main__":
    main()
