"""Web UI latency over a big store: a span's flame graph, the slow-span list and a 50k-stack view.

Generates (once; reused while --store holds it) a store with --hours of 10 s windows for
--processes processes: one cpu, off_cpu and lock_wait profile per window and process (each about
200 stacks, samples labelled with the window's spans), one span per second per process with a
breakdown. A further profile with --wide unique stacks stands for a very busy service. Then:

* API: /api/flamegraph for random spans (type=all, the span alone), /api/spans over the day,
  and the explore view of the last hour, timed over HTTP against `spanflame serve` on the store
  (compare=1 is not timed here: the generated store's other windows hold template samples);
* Chromium: navigation to data-ready for a span flame graph page, and for the wide profile
  (fetch, decode and first draw), with the flame graph's own draw time.

Medians of --runs, in milliseconds.

    python -m bench.ui [--store /var/tmp/spanflame-bench-ui] [--hours 24] [--processes 10]
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from agent import pprof
from agent.model import Frame, Profile
from agent.store import Store
from bench.render import CHROMIUM_ARGS, synthetic

ROOT = Path(__file__).resolve().parents[1]
WINDOW_S = 10
SPAN_NAMES = ["GET /orders", "POST /checkout", "save_order", "load_report", "render_page"]


def _template(rng: random.Random, funcs: list[Frame], n: int) -> list[tuple]:
    root = Frame("main", "/srv/app/main.py", 1)
    out = []
    for _ in range(n):
        depth = rng.randint(6, 18)
        out.append(tuple(rng.choice(funcs) for _ in range(depth)) + (root,))
    return out


def _profile(rng, stacks, t: str, unit: str, ws: int, pid: int, spans: list) -> Profile:
    p = Profile([("samples", "count"), (t, unit)], time_ns=ws, duration_ns=WINDOW_S * 10**9,
                period=10_000_000, period_type=("cpu", "nanoseconds"), default_sample_type=t)
    for i in range(200):
        sid, tid, _a, _b = spans[i % len(spans)]
        labels = (("pid", pid), ("span_id", sid), ("span_name", SPAN_NAMES[i % 5]),
                  ("thread_id", pid + 1), ("trace_id", tid))
        p.add(stacks[rng.randrange(len(stacks))], labels, {"samples": 1, t: 10_000_000})
    return p


TYPES = (("cpu", "nanoseconds"), ("off_cpu", "nanoseconds"), ("lock_wait", "nanoseconds"))


def generate(path: Path, hours: float, processes: int, wide: int, real_windows: int) -> dict:
    """Write the store; returns what the benchmark needs to know about it.

    Every window of every process gets its rows (profiles, span index, spans with breakdowns)
    and a blob of realistic size. Encoding 260k distinct profiles in Python would take an hour,
    so only `real_windows` windows, spread over the range, hold blobs whose samples carry their
    own spans; the others reuse a per-process template blob (samples labelled with other span
    ids). The benchmark opens spans of the real windows: its queries go through the full-size
    index, and decode what a real store would hold for them.
    """
    rng = random.Random(7)
    store = Store(path, retention_s=10 * 86400, max_bytes=1 << 40)
    funcs = [Frame(f"handler_{i}", f"/srv/app/mod_{i % 40}.py", i % 300 + 1) for i in range(1500)]
    stacks = _template(rng, funcs, 2000)
    now = int(time.time()) * 10**9
    start = now - int(hours * 3600) * 10**9
    windows = int(hours * 3600 / WINDOW_S)
    real = set(rng.sample(range(windows), min(real_windows, windows)))
    t0 = time.perf_counter()
    con = store._con()
    con.execute("PRAGMA synchronous=OFF")  # generating, not measuring durability
    templates: dict = {}
    n_profiles = 0
    for w in range(windows):
        ws = start + w * WINDOW_S * 10**9
        span_rows, prof_rows, real_spans = [], [], []
        for proc in range(processes):
            pid = 1000 + proc
            spans = []
            for k in range(WINDOW_S):  # one span per second per process
                sid = f"{rng.getrandbits(64):016x}"
                tid = f"{rng.getrandbits(128):032x}"
                s0 = ws + k * 10**9
                dur = int(rng.expovariate(1 / 80e6)) + 1_000_000
                spans.append((sid, tid, s0, min(s0 + dur, ws + WINDOW_S * 10**9)))
            for t, unit in TYPES:
                if w in real:
                    data = pprof.encode(_profile(rng, stacks, t, unit, ws, pid, spans))
                else:
                    key = (t, pid)
                    if key not in templates:
                        templates[key] = pprof.encode(_profile(rng, stacks, t, unit, ws, pid, spans))
                    data = templates[key]
                prof_rows.append((data, t, pid, [(s[0], s[1]) for s in spans], ws))
            for k, (sid, tid, a, b) in enumerate(spans):
                bd = {"cpu_ns": (b - a) // 2, "lock_ns": (b - a) // 4, "io_ns": (b - a) // 8,
                      "other_ns": (b - a) // 8, "gil_ns": 0, "net_ns": 0, "children_ns": 0,
                      "unaccounted_ns": 0, "top": {},
                      "cause": f"50% on CPU in handler_{k} (mod_{k}.py:{k + 1})"}
                span_rows.append({"span_id": sid, "trace_id": tid, "parent_span_id": "",
                                  "name": SPAN_NAMES[k % 5], "service": f"svc-{proc % 3}",
                                  "pid": pid, "tid": pid + 1, "start_ns": a, "end_ns": b,
                                  "breakdown": bd})
                if w in real:
                    real_spans.append((sid, tid))
        for data, t, pid, spans, ws in prof_rows:
            svc = f"svc-{(pid - 1000) % 3}"
            store.add_raw(data, start_ns=ws, end_ns=ws + WINDOW_S * 10**9, type_name=t,
                          service=svc, pid=pid, labels={"service_name": svc, "pid": str(pid)},
                          source="agent", spans=spans, total=2_000_000_000)
            n_profiles += 1
        store.add_spans(span_rows)
        if real_spans:
            (path / "real-spans.txt").open("a").write(
                "".join(f"{s} {t}\n" for s, t in real_spans))
        if w % 1000 == 0:
            print(f"  generating: {100 * (w + 1) / windows:.0f}% "
                  f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    wide_p = synthetic(wide)
    wide_p.time_ns = now - 300 * 10**9
    wide_p.duration_ns = WINDOW_S * 10**9
    store.add_profile(wide_p, type_name="cpu", service="wide", pid=99, labels={})
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    return {"profiles": n_profiles + 1, "seconds": time.perf_counter() - t0}


def _serve(path: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([str(ROOT / ".venv" / "bin" / "spanflame"), "serve", "--store",
                             str(path), "--listen", f"127.0.0.1:{port}"],
                            stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("spanflame serve did not come up")


def _timed(client: httpx.Client, path: str, params: dict) -> float:
    t = time.perf_counter()
    r = client.get(path, params=params)
    r.raise_for_status()
    r.content
    return (time.perf_counter() - t) * 1000


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", default="/var/tmp/spanflame-bench-ui")
    ap.add_argument("--hours", type=float, default=24.0)
    ap.add_argument("--processes", type=int, default=10)
    ap.add_argument("--wide", type=int, default=50_000)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--real-windows", type=int, default=60)
    ap.add_argument("--port", type=int, default=4077)
    args = ap.parse_args(argv)
    path = Path(args.store)
    marker = path / f"generated-{args.hours}h-{args.processes}p-{args.wide}-{args.real_windows}"
    if not marker.exists():
        if path.exists():
            for f in path.iterdir():
                f.unlink()
        info = generate(path, args.hours, args.processes, args.wide, args.real_windows)
        marker.write_text("ok\n")
        print(f"generated {info['profiles']} profiles in {info['seconds']:.0f} s", file=sys.stderr)
    db = path / "spanflame.db"
    store = Store(path, read_only=True)
    con = store._con()
    n_prof = con.execute("SELECT COUNT(*) FROM profiles").fetchone()[0]
    n_spans = con.execute("SELECT COUNT(*) FROM spans").fetchone()[0]
    rng = random.Random(3)
    real = [line.split() for line in (path / "real-spans.txt").read_text().splitlines()]
    w0, w1 = con.execute("SELECT start_ns, end_ns FROM profiles WHERE service = 'wide'").fetchone()
    wide_q = {"from": f"{w0 / 1e9 - 1:.3f}", "until": f"{w1 / 1e9 + 1:.3f}", "service": "wide",
              "type": "cpu"}
    picks = rng.sample(real, min(args.runs, len(real)))
    store.close()
    print(f"store: {n_prof} profiles, {n_spans} spans, {db.stat().st_size / 2**30:.2f} GiB "
          f"({args.hours:g} h x {args.processes} processes)")

    proc = _serve(path, args.port)
    base = f"http://127.0.0.1:{args.port}"
    try:
        with httpx.Client(base_url=base, timeout=120) as c:
            _timed(c, "/api/flamegraph", {"span_id": picks[0][0], "type": "all"})  # warm
            span_ms = [_timed(c, "/api/flamegraph", {"span_id": s, "trace_id": t, "type": "all"})
                       for s, t in picks]
            now = time.time()
            slow_ms = [_timed(c, "/api/spans", {"from": now - 86400, "until": now, "limit": 200})
                       for _ in range(5)]
            explore_ms = [_timed(c, "/api/flamegraph", {"from": now - 3600, "until": now,
                                                       "service": "svc-1", "type": "cpu"})
                          for _ in range(3)]
            wide_ms = [_timed(c, "/api/flamegraph", wide_q) for _ in range(3)]
        med = statistics.median
        print(f"API (HTTP, medians): span flame graph {med(span_ms):.0f} ms "
              f"(max {max(span_ms):.0f}, n={len(span_ms)}); "
              f"slow spans over 24 h {med(slow_ms):.0f} ms; explore 1 h of one service "
              f"{med(explore_ms):.0f} ms; {args.wide} unique stacks {med(wide_ms):.0f} ms")

        from playwright.sync_api import sync_playwright
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = b.new_page(viewport={"width": 1400, "height": 900})

            def load(url: str) -> tuple[float, float]:
                """(navigation start to drawn, as the page measures it; our draw time)"""
                page.goto(base + url)
                page.wait_for_selector("body[data-ready='1']", timeout=60_000)
                t = page.evaluate("window.spanflameTimings")
                return t["readyMs"], t["renderMs"]

            load(f"/flamegraph?span_id={picks[0][0]}&trace_id={picks[0][1]}")
            pages = [load(f"/flamegraph?span_id={s}&trace_id={t}") for s, t in picks[:8]]
            wide_pages = [load("/explore?" + "&".join(f"{k}={v}" for k, v in wide_q.items()))
                          for _ in range(3)]
            nodes = page.evaluate("window.flamegraph.drawn.length")
            b.close()
        print(f"Chromium (navigation to drawn, medians): span flame graph page "
              f"{med([a for a, _ in pages]):.0f} ms (draw {med([d for _, d in pages]):.0f} ms); "
              f"{args.wide}-stack explore page {med([a for a, _ in wide_pages]):.0f} ms "
              f"(draw {med([d for _, d in wide_pages]):.0f} ms, {nodes} frames drawn)")
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
