"""A short program for `spanflame record`: CPU in early() right at start, then in late(), then
a sleep; it writes the CPU time each function took (its own ground truth) and exits with 3."""

import json
import sys
import time


def burn(seconds):
    t = time.thread_time()
    while time.thread_time() - t < seconds:
        pass


def early():
    burn(0.5)


def late():
    burn(1.0)


def main():
    truth = {}
    for fn in (early, late):
        t = time.thread_time()
        fn()
        truth[fn.__name__] = time.thread_time() - t
    time.sleep(0.3)
    with open(sys.argv[1], "w") as f:
        json.dump(truth, f)
    sys.exit(3)


main()
