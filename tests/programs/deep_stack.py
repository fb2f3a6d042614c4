"""A thread that recurses 300 frames deep, then spins on CPU at the bottom (deeper than the
kernel walker keeps: its innermost 128 frames and a [truncated] root).

Prints {"pid", "threads"} when ready; runs until killed.
"""

import json
import os
import sys
import threading
import time

sys.setrecursionlimit(2000)


def down(n: int) -> None:
    if n:
        down(n - 1)  # DS-RECURSE
    else:
        while True:  # DS-LOOP
            pass  # DS-BOTTOM


def main() -> None:
    t = threading.Thread(target=down, args=(300,), name="deep", daemon=True)
    t.start()
    print(json.dumps({"pid": os.getpid(), "threads": {"deep": t.native_id}}), flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
