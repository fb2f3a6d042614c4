"""A target for the CPython process inspector: threads blocked in known functions, one busy.

Runs under CPython 3.10-3.13 (and older, to be refused). Prints one JSON line:
{"version": [major, minor], "pid", "interp" (main PyInterpreterState*), "code_type"
(&PyCode_Type), "threads": [{"role", "native_thread_id", "tstate",
"frames": [[id(code), f_lasti, f_lineno, name, filename, slots], ...innermost first]}]}
(slots: locals, cells, free variables and value stack: the frame's size in words, less its header)
then waits for stdin to close. Frames are taken with sys._current_frames() after every thread
reported it is about to block, so the blocked threads' innermost frames do not move afterwards.

Options (for the user-space stack walker's tests): --deep=N adds a thread blocked in sleep at the
bottom of an N-deep recursion (role "deep"); --stacks=N adds N threads blocked in sleep about 20
frames deep (roles "stack0"...); --only-extra leaves out the six threads above. Frames are
reported up to 1000 deep.
"""

import ctypes
import json
import os
import socket
import sys
import threading
import time

ctypes.pythonapi.PyThreadState_Get.restype = ctypes.c_void_p
ctypes.pythonapi.PyInterpreterState_Main.restype = ctypes.c_void_p
READY = None  # a Barrier for every thread and main, made in main()
STOP = threading.Event()
INFO = {}


def register(role):
    INFO[threading.get_ident()] = (role, threading.get_native_id(),
                                   ctypes.pythonapi.PyThreadState_Get())
    READY.wait()


def blocked_on_lock(lock):
    register("lock")
    lock.acquire()


def blocked_in_sleep():
    register("sleep")
    time.sleep(3600)


def blocked_in_recv(sock):
    register("recv")
    sock.recv(1)


def blocked_on_event():
    register("event")
    STOP.wait()


# names stored as 1-, 2- and 4-byte compact str objects, and one longer than 1024 characters
def 𠀋():  # U+2000B
    register("unicode")
    time.sleep(3600)


def ожидание():
    𠀋()


LONG_NAME = "long_" + "n" * 1500
exec(f"def {LONG_NAME}(f):\n    f()\n")


def café():
    globals()[LONG_NAME](ожидание)


def spin_inner(n):
    total = 0
    for i in range(n):
        total += i * i
    return total


def recurse(n, role):
    if n <= 0:
        register(role)
        time.sleep(3600)
    return recurse(n - 1, role)


def cpu_bound():
    register("cpu")
    while True:
        spin_inner(10000)


def frames_of(frame, limit=1000):
    out = []
    while frame is not None and len(out) < limit:
        code = frame.f_code
        name = getattr(code, "co_qualname", code.co_name)
        slots = (code.co_nlocals + len(code.co_cellvars) + len(code.co_freevars)
                 + code.co_stacksize)
        out.append([id(code), frame.f_lasti, frame.f_lineno, name, code.co_filename, slots])
        frame = frame.f_back
    return out


def option(name, default=0):
    for arg in sys.argv[1:]:
        if arg.startswith(f"--{name}="):
            return int(arg.split("=", 1)[1])
    return default


def main():
    global READY
    lock = threading.Lock()
    lock.acquire()
    left, right = socket.socketpair()
    threads = [] if "--only-extra" in sys.argv else [
        threading.Thread(target=blocked_on_lock, args=(lock,), daemon=True),
        threading.Thread(target=blocked_in_sleep, daemon=True),
        threading.Thread(target=blocked_in_recv, args=(left,), daemon=True),
        threading.Thread(target=blocked_on_event, daemon=True),
        threading.Thread(target=cpu_bound, daemon=True),
        threading.Thread(target=café, daemon=True)]
    if option("deep"):
        threads.append(threading.Thread(target=recurse, args=(option("deep"), "deep"), daemon=True))
    # 16 recursive calls + threading's 3 bootstrap frames + run(): 20 frames
    threads += [threading.Thread(target=recurse, args=(16, f"stack{i}"), daemon=True)
                for i in range(option("stacks"))]
    READY = threading.Barrier(len(threads) + 1)
    for t in threads:
        t.start()
    INFO[threading.get_ident()] = ("main", threading.get_native_id(),
                                   ctypes.pythonapi.PyThreadState_Get())
    READY.wait()
    time.sleep(0.3)  # every blocked thread is inside its blocking call by now
    current = sys._current_frames()
    report = []
    for ident, (role, native, tstate) in INFO.items():
        frames = frames_of(current[ident]) if role != "main" else []
        report.append({"role": role, "native_thread_id": native, "tstate": tstate,
                       "frames": frames})
    print(json.dumps({"version": list(sys.version_info[:2]), "pid": os.getpid(),
                      "interp": ctypes.pythonapi.PyInterpreterState_Main(),
                      "code_type": id(type(main.__code__)), "threads": report}), flush=True)
    sys.stdin.read()
    right.close()


if __name__ == "__main__":
    main()
