"""A target whose threads only ever block or run on one known line each, and which reports what
its own interpreter sees of their stacks.

Runs under CPython 3.10-3.13 (standard library only). Threads, each looping forever on ONE line
(marked `# KS-...`): a lock waiter (a holder keeps the lock ~20 ms at a time), a sleeper, a socket
reader (a sender writes one byte every ~5 ms over loopback TCP), an fsync writer (one byte and an
fsync on a file under --dir), a CPU spinner and two GIL fighters (more spinners). Every whole loop
sits on one line, so wherever a sampler catches a thread, on CPU or blocked, its innermost frame
is on that line. The GIL switch interval is 1 ms (--switch-ms).

After a short settle, the main thread samples sys._current_frames() every --every-ms for
--observe seconds and prints ONE JSON line:
  {"pid", "python": [major, minor], "threads": {name: native_id},
   "stacks": {native_id: [[[function, filename, line], ...innermost first], ...]}}
(function: co_qualname where it exists (3.11+), else co_name), then sleeps until killed.
"""

import argparse
import json
import os
import socket
import sys
import threading
import time


def hold_lock(lock):
    while True: lock.acquire(); time.sleep(0.02); lock.release(); time.sleep(0.0005)  # KS-HOLD


def wait_for_lock(lock):
    while True: lock.acquire(); lock.release()  # KS-LOCK


def sleep_often():
    while True: time.sleep(0.005)  # KS-SLEEP


def read_socket(sock):
    while True: sock.recv(1)  # KS-RECV


def send_bytes(sock):
    while True: sock.send(b"x"); time.sleep(0.005)  # KS-SEND


def write_and_fsync(fd):
    while True: os.pwrite(fd, b"x", 0); os.fsync(fd)  # KS-FSYNC


def spin():
    n = 0
    while True: n += 1  # KS-SPIN


def fight_for_gil():
    n = 0
    while True: n += 1  # KS-GIL


def frames(frame):
    """[(function, filename, line), ...] innermost first, as this interpreter sees them."""
    out = []
    while frame is not None:
        code = frame.f_code
        out.append((getattr(code, "co_qualname", code.co_name), code.co_filename, frame.f_lineno))
        frame = frame.f_back
    return tuple(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True, help="where the fsync writer's file goes")
    ap.add_argument("--settle", type=float, default=0.3)
    ap.add_argument("--observe", type=float, default=1.5)
    ap.add_argument("--every-ms", type=float, default=2.0)
    ap.add_argument("--switch-ms", type=float, default=1.0)
    args = ap.parse_args()
    # Three spinners keep the GIL busy: a thread back from a wait waits for it about one switch
    # interval per spinner ahead of it. A short interval keeps those GIL waits short, so that
    # each blocking thread spends most of its time in its own kind of wait.
    sys.setswitchinterval(args.switch_ms / 1000)

    lock = threading.Lock()
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    out = socket.create_connection(srv.getsockname())
    inp, _ = srv.accept()
    fd = os.open(os.path.join(args.dir, f"known-stacks-{os.getpid()}.bin"),
                 os.O_WRONLY | os.O_CREAT, 0o600)
    specs = [("lock-holder", hold_lock, (lock,)), ("lock-waiter", wait_for_lock, (lock,)),
             ("sleeper", sleep_often, ()), ("reader", read_socket, (inp,)),
             ("sender", send_bytes, (out,)), ("fsync-writer", write_and_fsync, (fd,)),
             ("spinner", spin, ()), ("gil-fighter-1", fight_for_gil, ()),
             ("gil-fighter-2", fight_for_gil, ())]
    threads = [threading.Thread(target=fn, args=a, name=name, daemon=True)
               for name, fn, a in specs]
    for t in threads:
        t.start()
    time.sleep(args.settle)

    native = {t.ident: t.native_id for t in threads}
    seen = {t.native_id: set() for t in threads}
    end = time.monotonic() + args.observe
    while time.monotonic() < end:
        for ident, frame in sys._current_frames().items():
            if ident in native:
                seen[native[ident]].add(frames(frame))
        frame = None
        time.sleep(args.every_ms / 1000)

    print(json.dumps({"pid": os.getpid(), "python": list(sys.version_info[:2]),
                      "threads": {t.name: t.native_id for t in threads},
                      "stacks": {str(nid): sorted(s) for nid, s in seen.items()}}), flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
