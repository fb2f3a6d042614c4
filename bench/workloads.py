"""Target programs for benchmarks: they measure their own throughput.

CPU_THREADS: N threads count loop iterations forever (and M more threads mostly wait); each line
on stdin is answered with the total count so far and the time it was read (perf_counter), so a
benchmark can measure throughput over any stretch while a profiler is on or off, in one process.
"""

CPU_THREADS = r'''
import json, sys, threading, time
nthreads = int(sys.argv[1]) if len(sys.argv) > 1 else 4
idle = int(sys.argv[2]) if len(sys.argv) > 2 else 0
counts = [0] * nthreads
def waiter():
    ev = threading.Event()
    while True:
        ev.wait(0.5)
for i in range(idle):
    threading.Thread(target=waiter, name=f"idle{i}", daemon=True).start()
def work(i):
    n = 0
    while True:
        x = 0
        for k in range(2000):
            x += k * k
        n += 1
        counts[i] = n
for i in range(nthreads):
    threading.Thread(target=work, args=(i,), name=f"w{i}", daemon=True).start()
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    print(json.dumps({"ops": sum(counts), "t": time.perf_counter()}), flush=True)
'''
