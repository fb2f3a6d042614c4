"""A test app that uses the real pyroscope-io SDK (1.x or 0.8) to push its own profiles.

Usage: pyroscope_app.py SERVER_ADDRESS APP_NAME [SECONDS]
Runs pyroscope_hot_loop() under a tag_wrapper carrying span_id/trace_id, for SECONDS, then
shuts the SDK down (which flushes). Prints {"pid"} when the SDK is configured.
"""

import json
import os
import sys
import time

import pyroscope


def pyroscope_hot_loop() -> int:
    x = 0
    for i in range(100_000):  # PYRO-HOT
        x += i * i
    return x


def main() -> None:
    server, app = sys.argv[1], sys.argv[2]
    seconds = float(sys.argv[3]) if len(sys.argv) > 3 else 60
    pyroscope.configure(application_name=app, server_address=server, tags={"team": "perf"})
    print(json.dumps({"pid": os.getpid()}), flush=True)
    end = time.time() + seconds
    while time.time() < end:
        with pyroscope.tag_wrapper({"span_id": "00f067aa0ba902b7",
                                    "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736"}):
            pyroscope_hot_loop()
    pyroscope.shutdown()


if __name__ == "__main__":
    main()
