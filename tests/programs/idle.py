"""A test target that is idle: the main thread sleeps in sleeper(), a thread named "waiter"
blocks on an Event in wait_forever(). Prints {"pid", "threads"} when ready; runs until killed."""

import json
import os
import threading
import time


def wait_forever(ev: threading.Event) -> None:
    ev.wait()  # HOT-WAIT


def sleeper() -> None:
    while True:
        time.sleep(0.05)  # HOT-SLEEP


def main() -> None:
    ev = threading.Event()
    t = threading.Thread(target=wait_forever, args=(ev,), name="waiter", daemon=True)
    t.start()
    print(json.dumps({"pid": os.getpid(),
                      "threads": {"waiter": t.native_id, "MainThread": threading.get_native_id()}}),
          flush=True)
    sleeper()


if __name__ == "__main__":
    main()
