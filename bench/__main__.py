"""Run every benchmark and print its figures: python -m bench [name ...]"""

import importlib
import sys

BENCHMARKS = ["attach_overhead", "probe_overhead", "walker_cost", "tick_cost", "agent_events",
              "linker", "render", "ui", "agent_budget", "fuzz"]


def main() -> None:
    names = sys.argv[1:] or BENCHMARKS
    for name in names:
        print(f"== {name}", flush=True)
        importlib.import_module(f"bench.{name}").main([])


if __name__ == "__main__":
    main()
