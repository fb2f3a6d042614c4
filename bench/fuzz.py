"""Fuzzing a real agent at length: the CI fuzz test (tests/integration/test_fuzz.py) run over
more cases, with the figures a reader wants: requests per status, server errors, hangs, how
/healthz answered meanwhile, the agent's RSS, and whether the baseline profile came out unchanged.

    python -m bench.fuzz [--cases 20000] [--seed 20261130] [--concurrency 6]
                         [--skip-owned-elsewhere]

Cases owned by another part of issue 12 (OTLP JSON depth) are counted apart.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from tests import hostile


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.fuzz")
    ap.add_argument("--cases", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=20261130)
    ap.add_argument("--concurrency", type=int, default=6)
    ap.add_argument("--skip-owned-elsewhere", action="store_true",
                    help="leave out the cases another part of issue 12 fixes (OTLP JSON depth)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="spanflame-fuzz-") as tmp:
        agent = hostile.Agent(Path(tmp))
        try:
            now = time.time()
            hostile.seed_baseline(agent, now)
            before = hostile.baseline_snapshot(agent, now)
            todo = hostile.cases(args.seed, args.cases, now_s=now)  # generated as sent
            if args.skip_owned_elsewhere:
                todo = (c for c in todo if not c.owned_elsewhere)
            rss0 = agent.rss_bytes()
            rep = hostile.fuzz(agent, todo, args.concurrency)
            unchanged = hostile.baseline_snapshot(agent, now) == before
            print(f"seed {args.seed}, {args.cases} cases, concurrency {args.concurrency} "
                  "(the elapsed time includes generating them)")
            print(rep.summary())
            print(f"{rep.sent / rep.elapsed_s:.0f} requests/s; agent RSS {rss0 / 2**20:.0f} MiB "
                  f"before, {agent.rss_bytes() / 2**20:.0f} MiB after, peak "
                  f"{agent.peak_rss_bytes() / 2**20:.0f} MiB; baseline unchanged: {unchanged}; "
                  f"agent alive: {agent.proc.poll() is None}")
            for what, items in (("server errors", rep.server_errors), ("hangs", rep.hangs),
                                ("wrong answers", rep.wrong),
                                ("owned elsewhere", rep.elsewhere),
                                ("/healthz failures", rep.health_failures)):
                if items:
                    print(f"{what} ({len(items)}), first: {items[:5]}")
        finally:
            agent.stop()


if __name__ == "__main__":
    main()
