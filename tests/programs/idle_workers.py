"""Idle threads waiting to be signalled, next to one real lock contention.

Idle: "evt" in idle_on_event() (Event.wait), "queue" in idle_on_queue() (Queue.get), a
ThreadPoolExecutor worker with nothing to do, "joiner" in join_forever() (Thread.join of a
thread that never ends), "cond" in idle_on_condition() (Condition.wait with a timeout). Each is
woken every 20 ms so that its waits end and are recorded.
Contended: "contender" in contend() waits for a lock that "hog" holds most of the time.

Prints {"pid", "threads"} when ready; runs until killed.
"""

import concurrent.futures
import json
import os
import queue
import threading
import time

ev = threading.Event()
q: queue.Queue = queue.Queue()
cond = threading.Condition()
lock = threading.Lock()


def idle_on_event() -> None:
    while True:
        ev.wait(0.02)  # IW-EVENT


def idle_on_queue() -> None:
    while True:
        try:
            q.get(timeout=0.02)  # IW-QUEUE
        except queue.Empty:
            pass


def idle_on_condition() -> None:
    while True:
        with cond:
            cond.wait(0.02)  # IW-COND


def forever() -> None:
    while True:
        time.sleep(3600)


def join_forever(t: threading.Thread) -> None:
    while True:
        t.join(0.02)  # IW-JOIN


def contend() -> None:
    while True:
        with lock:  # IW-CONTEND
            pass
        time.sleep(0.001)


def hog() -> None:
    while True:
        with lock:
            time.sleep(0.01)
        time.sleep(0.0005)


def main() -> None:
    sleeper = threading.Thread(target=forever, name="forever", daemon=True)
    threads = [sleeper, threading.Thread(target=idle_on_event, name="evt", daemon=True),
               threading.Thread(target=idle_on_queue, name="queue", daemon=True),
               threading.Thread(target=idle_on_condition, name="cond", daemon=True),
               threading.Thread(target=join_forever, args=(sleeper,), name="joiner",
                                daemon=True),
               threading.Thread(target=contend, name="contender", daemon=True),
               threading.Thread(target=hog, name="hog", daemon=True)]
    for t in threads:
        t.start()
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pool")
    pool.submit(lambda: None).result()  # one idle pool worker, waiting for work
    print(json.dumps({"pid": os.getpid(), "threads": {t.name: t.native_id for t in threads}}),
          flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
