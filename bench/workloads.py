"""Target programs for benchmarks: they measure their own throughput.

CPU_THREADS: N threads count loop iterations forever; each line on stdin is answered with the
total count so far and the time it was read (perf_counter), so a benchmark can measure throughput
over any stretch while a profiler is on or off, in the same process.
"""

CPU_THREADS = r'''
import json, sys, threading, time
nthreads = int(sys.argv[1]) if len(sys.argv) > 1 else 4
counts = [0] * nthreads
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
