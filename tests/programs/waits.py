"""Test targets that wait in known ways and measure their own ground truth.

Modes (one per run):
  lock   a holder thread keeps a threading.Lock while it sleeps; two waiter threads wait for it
         in wait_for_lock(). Truth: every acquire's [start, end].
  fsync  a writer thread writes 256 KiB chunks and fsyncs them in write_and_sync().
         Truth: [start, end, bytes] per chunk.
  tcp    a client thread sends 64 KiB chunks over loopback TCP in send_data(); a server thread
         receives in receive_data(). Truth: [start, end, bytes] per sendall().
  sleep  a thread named "napper" sleeps in nap(). Truth: [start, end] per sleep.
  gil    three CPU-bound threads in gil_hungry() fight for the GIL. Truth: thread CPU time.

Prints {"pid", "threads"} when ready, runs --duration seconds, writes {"events": [...]} (times
in CLOCK_REALTIME ns) to --report, exits.
"""

import argparse
import json
import os
import socket
import threading
import time

events: list = []
ev_lock = threading.Lock()
stop = threading.Event()


def log(*item) -> None:
    with ev_lock:
        events.append(item)


# -- lock ---------------------------------------------------------------------------------------
def hold_lock(lock: threading.Lock) -> None:
    while not stop.is_set():
        with lock:
            time.sleep(0.04)
        time.sleep(0.002)


def wait_for_lock(lock: threading.Lock) -> None:
    while not stop.is_set():
        t0 = time.time_ns()
        lock.acquire()  # WAIT-LOCK
        t1 = time.time_ns()
        log(t0, t1)
        lock.release()
        time.sleep(0.003)


# -- fsync --------------------------------------------------------------------------------------
def write_and_sync(path: str) -> None:
    chunk = os.urandom(256 * 1024)
    with open(path, "wb") as f:
        while not stop.is_set():
            t0 = time.time_ns()
            f.write(chunk)
            f.flush()
            os.fsync(f.fileno())  # FSYNC
            log(t0, time.time_ns(), len(chunk))
            if f.tell() > 64 * 1024 * 1024:
                f.seek(0)
                f.truncate()


# -- tcp ----------------------------------------------------------------------------------------
def receive_data(srv: socket.socket) -> None:
    conn, _ = srv.accept()
    with conn:
        while True:
            data = conn.recv(1 << 16)  # RECV
            if not data:
                return


def send_data(port: int) -> None:
    chunk = b"x" * 65536
    with socket.create_connection(("127.0.0.1", port)) as s:
        while not stop.is_set():
            t0 = time.time_ns()
            s.sendall(chunk)  # SEND
            log(t0, time.time_ns(), len(chunk))
            time.sleep(0.001)


# -- sleep and gil ------------------------------------------------------------------------------
def nap() -> None:
    while not stop.is_set():
        t0 = time.time_ns()
        time.sleep(0.02)  # NAP
        log(t0, time.time_ns())


def gil_hungry() -> None:
    t0 = time.thread_time_ns()
    x = 0
    while not stop.is_set():
        for i in range(10_000):  # GIL-HUNGRY
            x += i
    log(threading.current_thread().name, time.thread_time_ns() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["lock", "fsync", "tcp", "sleep", "gil"])
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--report", required=True)
    ap.add_argument("--dir", default="/var/tmp")
    args = ap.parse_args()
    threads: list[threading.Thread] = []
    if args.mode == "lock":
        lock = threading.Lock()
        threads.append(threading.Thread(target=hold_lock, args=(lock,), name="holder"))
        threads += [threading.Thread(target=wait_for_lock, args=(lock,), name=f"waiter-{i}")
                    for i in range(2)]
    elif args.mode == "fsync":
        path = os.path.join(args.dir, f"spanflame-fsync-{os.getpid()}.bin")
        threads.append(threading.Thread(target=write_and_sync, args=(path,), name="writer"))
    elif args.mode == "tcp":
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port = srv.getsockname()[1]
        threads.append(threading.Thread(target=receive_data, args=(srv,), name="server",
                                        daemon=True))
        threads.append(threading.Thread(target=send_data, args=(port,), name="client"))
    elif args.mode == "sleep":
        threads.append(threading.Thread(target=nap, name="napper"))
    else:
        threads += [threading.Thread(target=gil_hungry, name=f"hungry-{i}") for i in range(3)]
    for t in threads:
        t.start()
    print(json.dumps({"pid": os.getpid(), "threads": {t.name: t.native_id for t in threads}}),
          flush=True)
    time.sleep(args.duration)
    stop.set()
    for t in threads:
        if not t.daemon:
            t.join()
    if args.mode == "fsync":
        os.unlink(path)
    with open(args.report, "w") as f:
        json.dump({"events": events}, f)


if __name__ == "__main__":
    main()
