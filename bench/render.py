"""Flame graph rendering cost: Python (pprof -> HTML) and headless Chromium (page -> first view).

A synthetic profile with 50,000 unique stacks (depth 5-25, 3,000 functions) is encoded as pprof,
decoded, turned into HTML, then opened in Debian's Chromium via Playwright. Reported: medians of
--runs runs, in milliseconds.

    python -m bench.render [--stacks 50000] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from agent import pprof
from agent.model import Frame, Profile
from flamegraph.html import render_html

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--no-first-run"]


def synthetic(stacks: int, seed: int = 1) -> Profile:
    rng = random.Random(seed)
    mods = [f"/srv/app/module_{i}.py" for i in range(60)]
    funcs = [Frame(f"function_{i}", mods[i % 60], i % 500 + 1) for i in range(3000)]
    root = Frame("main", "/srv/app/main.py", 1)
    p = Profile([("samples", "count"), ("cpu", "nanoseconds")], period=10_000_000,
                period_type=("cpu", "nanoseconds"), default_sample_type="cpu")
    seen: set = set()
    while len(seen) < stacks:
        depth = rng.randint(5, 25)
        st = tuple(rng.choice(funcs[: 50 + depth * 100]) for _ in range(depth)) + (root,)
        if st not in seen:
            seen.add(st)
            n = rng.randint(1, 50)
            p.add(st, (), {"samples": n, "cpu": n * 10_000_000})
    return p


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stacks", type=int, default=50_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args(argv)
    prof = synthetic(args.stacks)
    data = pprof.encode(prof)
    enc, dec, html_ms = [], [], []
    for _ in range(args.runs):
        t = time.perf_counter()
        pprof.encode(prof)
        enc.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        decoded = pprof.decode(data)
        dec.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        page_html = render_html(decoded)
        html_ms.append((time.perf_counter() - t) * 1000)
    path = Path(tempfile.mkdtemp()) / "big.html"
    path.write_text(page_html)
    load_ms, render_ms, frames = [], [], 0
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
        for _ in range(args.runs):
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            t = time.perf_counter()
            page.goto(path.as_uri())
            page.wait_for_selector("g.frame")
            load_ms.append((time.perf_counter() - t) * 1000)
            render_ms.append(page.evaluate("window.flamegraph.renderMs"))
            frames = page.locator("g.frame").count()
            page.close()
        browser.close()
    summary = {
        "benchmark": "render", "unique_stacks": args.stacks, "pprof_bytes": len(data),
        "html_bytes": len(page_html.encode()),
        "encode_ms": round(statistics.median(enc), 1), "decode_ms": round(statistics.median(dec), 1),
        "html_ms": round(statistics.median(html_ms), 1),
        "chromium_load_to_first_view_ms": round(statistics.median(load_ms), 1),
        "chromium_script_render_ms": round(statistics.median(render_ms), 1),
        "frames_drawn": frames,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
