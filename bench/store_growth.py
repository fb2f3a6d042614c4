"""How fast the store grows at `spanflame run` defaults, per profiled process: bytes per
process-hour and per process-day, split into profiles, spans and the database's own overhead.

A typical service: the shop app of the tests (threads serving checkouts, saving orders under a
lock, writing reports with fsync, sending its spans with the OTel SDK), plus the service-like
programs of bench.agent_budget (small CPU bursts between waits, no spans). The agent runs at its
defaults (every probe, kernel stacks) for --seconds after a warm-up, with this checkout first on
PYTHONPATH; it is then stopped (SIGINT: the last windows are written) and the store measured:
`du -sb` of its directory, the sum of the stored profiles' sizes, the spans' rows.

    python -m bench.store_growth [--seconds 180] [--services 4] [-- extra run options]

The goal (issue 13) is <=50 MB per process-day for a typical service.
"""

from __future__ import annotations

import argparse
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.agent_budget import SERVICE, free_port, wait_for_sources
from bench.attach_overhead import cli_env

ROOT = Path(__file__).resolve().parents[1]
SPANFLAME = ROOT / ".venv" / "bin" / "spanflame"
MB = 1e6


def du(path: Path) -> int:
    return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True,
                              check=True).stdout.split()[0])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=180)
    ap.add_argument("--warmup", type=float, default=10)
    ap.add_argument("--services", type=int, default=4, help="service-like programs besides the "
                    "shop app")
    ap.add_argument("extra", nargs="*")
    args = ap.parse_args(argv)
    d = Path(tempfile.mkdtemp(prefix="spanflame-growth-"))
    store = d / "store"
    port, otlp = free_port(), free_port()
    agent = subprocess.Popen([str(SPANFLAME), "run", "--store", str(store), "--listen",
                              f"127.0.0.1:{port}", "--otlp-listen", f"127.0.0.1:{otlp}",
                              "--include", "spanflame-growth|shop_app", *args.extra],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cli_env())
    svc = d / "service.py"
    svc.write_text(SERVICE)
    progs = [subprocess.Popen([sys.executable, str(svc)]) for _ in range(args.services)]
    shop = subprocess.Popen([sys.executable, str(ROOT / "tests" / "programs" / "shop_app.py"),
                             f"http://127.0.0.1:{otlp}/v1/traces", str(d),
                             "--seconds", str(args.warmup + args.seconds + 30)],
                            stdout=subprocess.PIPE, text=True)
    shop.stdout.readline()
    progs.append(shop)
    try:
        wait_for_sources(port, [p.pid for p in progs], 90)
        time.sleep(args.warmup)
        t0, b0 = time.monotonic(), du(store)
        time.sleep(args.seconds)
        agent.send_signal(signal.SIGINT)
        agent.wait(timeout=120)
        elapsed = time.monotonic() - t0
    finally:
        for p in progs:
            p.kill()
            p.wait()
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    total = du(store)
    con = sqlite3.connect(f"file:{store / 'spanflame.db'}?mode=ro", uri=True)
    n_prof, prof_bytes = con.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) "
                                     "FROM profiles").fetchone()
    n_spans = con.execute("SELECT COUNT(*) FROM spans").fetchone()[0]
    tables = {}
    try:
        for name, size in con.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name"):
            tables[name] = size
    except sqlite3.OperationalError:
        pass  # no dbstat in this SQLite build
    n = len(progs)
    hours = (args.warmup + elapsed) / 3600  # the store holds the warm-up too
    reserve_path = store / "spanflame.reserve"  # fixed: disk held back for a full disk
    reserve = reserve_path.stat().st_size if reserve_path.exists() else 0
    per_hour = (total - reserve) / n / hours
    spans_bytes = sum(v for k, v in tables.items() if k.startswith("spans"))
    profile_bytes = sum(v for k, v in tables.items() if k.startswith(("blobs", "profiles")))
    print(f"{n} processes, {args.warmup + elapsed:.0f} s recorded: store {total / MB:.1f} MB "
          f"(du -sb; {b0 / MB:.1f} MB after the warm-up)")
    print(f"  profiles: {n_prof} rows, {prof_bytes / MB:.1f} MB of pprof; spans: {n_spans} rows")
    for name, size in sorted(tables.items(), key=lambda kv: -kv[1])[:8]:
        print(f"  table/index {name}: {size / MB:.2f} MB")
    print(f"per process-hour: {per_hour / MB:.2f} MB; per process-day: "
          f"{24 * per_hour / MB:.0f} MB (goal <=50 MB; less the {reserve / MB:.1f} MB reserve)")
    if tables:
        day = 24 / hours / MB
        print(f"  of which profiles {profile_bytes * day / n:.0f} MB per process-day; spans "
              f"{spans_bytes * day:.0f} MB per day of the one app that sends spans "
              f"({n_spans / (args.warmup + elapsed):.1f} spans/s)")
    # What the agent does to windows older than an hour (RunOptions.compact_after_s): merged
    # into one profile per series and minute. Done here on everything, then measured again.
    from agent.store import Store
    st = Store(store)
    c0, merged = time.process_time(), 0
    while True:
        n_merged = st.compact(before_ns=time.time_ns(), max_groups=10_000)
        if not n_merged:
            break
        merged += n_merged
    thinned, until = 0, time.time_ns()
    while True:
        thinned += st.thin_spans(before_ns=until)
        if st._thinned_until is None or st._thinned_until >= until:
            break
    c1 = time.process_time()
    print(f"spans thinned (the slowest 10 of each name and minute, their traces, errors kept): "
          f"{thinned} of {n_spans} deleted")
    print(f"compaction: {merged} window profiles merged away and spans thinned, {c1 - c0:.2f} CPU-s "
          f"({1e3 * (c1 - c0) / max(1, n_prof):.2f} ms per window profile); "
          f"at these rates the agent spends {100 * (c1 - c0) / (args.warmup + elapsed):.2f}% "
          f"of a core on this")
    con2 = st._con()
    con2.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    st._give_back(con2)
    p_after = sum(r[0] or 0 for r in con2.execute(
        "SELECT SUM(pgsize) FROM dbstat WHERE name LIKE 'blobs%' OR name LIKE 'profiles%'"))
    s_after = sum(r[0] or 0 for r in con2.execute(
        "SELECT SUM(pgsize) FROM dbstat WHERE name LIKE 'spans%'"))
    st.close()
    compacted = du(store) - reserve
    per_hour_c = compacted / n / hours
    print(f"after compaction: store {compacted / MB:.1f} MB (less the reserve); per process-day "
          f"{24 * per_hour_c / MB:.0f} MB; profiles {p_after * 24 / hours / n / MB:.0f} MB per "
          f"process-day (were {profile_bytes * 24 / hours / n / MB:.0f}); spans "
          f"{s_after * 24 / hours / MB:.0f} MB per day of the app that sends them (were "
          f"{spans_bytes * 24 / hours / MB:.0f})")
    return {"bytes_per_process_hour": per_hour, "store_bytes": total,
            "bytes_per_process_hour_compacted": per_hour_c}


if __name__ == "__main__":
    main(sys.argv[1:])
