"""The self-contained flame graph page in headless Chromium (Debian's, driven by Playwright)."""

from __future__ import annotations

import random

import pytest

from agent import pprof
from agent.model import Frame, Profile
from flamegraph.html import render_html
from tests.support import ARTIFACTS, run_cli, target

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def attach_html(tmp_path_factory):
    """A flame graph written by a real attach to a real program."""
    d = tmp_path_factory.mktemp("html")
    out = d / "cpu_split.html"
    with target("cpu_split", "--duration", "30", "--report", d / "truth.json") as t:
        res = run_cli("attach", t.pid, "--duration", "3", "--output", out)
    assert res.returncode == 0, res.stderr
    return out


def frame_box(page, name):
    return page.locator(f'g.frame[data-name="{name}"] rect').first.bounding_box()


def test_known_functions_are_frames_and_click_zooms(page, attach_html):
    page.goto(attach_html.as_uri())
    page.wait_for_selector('g.frame[data-name="heavy_a"]')
    names = set(page.eval_on_selector_all("g.frame", "els => els.map(e => e.dataset.name)"))
    assert {"heavy_a", "light_a", "spin_b", "alpha_loop", "beta_loop"} <= names
    svg_width = page.locator("svg.fg-svg").bounding_box()["width"]
    before = frame_box(page, "heavy_a")["width"]
    assert before < 0.9 * svg_width
    page.locator('g.frame[data-name="heavy_a"]').first.click()
    after = frame_box(page, "heavy_a")["width"]
    assert after > 0.97 * svg_width, (before, after, svg_width)
    # Zoomed into heavy_a: the other thread's frames are gone, the breadcrumb says so.
    assert page.locator('g.frame[data-name="spin_b"]').count() == 0
    assert "heavy_a" in page.locator(".fg-breadcrumb").inner_text()
    page.keyboard.press("Escape")
    assert page.locator('g.frame[data-name="spin_b"]').count() >= 1
    page.locator("button.fg-reset").click()
    assert abs(frame_box(page, "heavy_a")["width"] - before) < 2
    assert not page.errors, page.errors


def test_search_highlights_and_reports_share(page, attach_html):
    page.goto(attach_html.as_uri())
    page.fill("input.fg-search", "spin_b")
    matched = page.locator("g.frame.match")
    assert matched.count() >= 1
    assert set(matched.evaluate_all("els => els.map(e => e.dataset.name)")) == {"spin_b"}
    text = page.locator(".fg-matched").inner_text()
    share = float(text.split("Matched:")[1].split("%")[0])
    assert 15 < share < 85, text   # beta's share of the process CPU
    page.fill("input.fg-search", "")
    assert page.locator("g.frame.match").count() == 0


def test_tooltip_shows_self_and_total_in_real_units(page, attach_html):
    page.goto(attach_html.as_uri())
    page.locator('g.frame[data-name="heavy_a"]').first.hover()
    tip = page.locator(".fg-tooltip")
    assert tip.is_visible()
    text = tip.inner_text()
    assert "heavy_a" in text and "Total" in text and "Self" in text
    assert " ms" in text or " s" in text, text
    assert "cpu_split.py:" in text


def test_sample_type_choice(page, tmp_path):
    p = Profile([("samples", "count"), ("cpu", "nanoseconds"), ("io", "bytes")],
                default_sample_type="cpu")
    p.add((Frame("compute", "/a.py", 1),), (), {"cpu": 9_000_000})
    p.add((Frame("write_file", "/a.py", 2),), (), {"io": 5 * 1024 * 1024})
    out = tmp_path / "types.html"
    out.write_text(render_html(p))
    page.goto(out.as_uri())
    options = page.locator("select.fg-type option").all_inner_texts()
    assert options == ["cpu (nanoseconds)", "io (bytes)"]
    assert page.locator('g.frame[data-name="compute"]').count() == 1
    assert page.locator('g.frame[data-name="write_file"]').count() == 0
    page.select_option("select.fg-type", label="io (bytes)")
    assert page.locator('g.frame[data-name="write_file"]').count() == 1
    page.locator('g.frame[data-name="write_file"]').hover()
    assert "5.0 MiB" in page.locator(".fg-tooltip").inner_text()


def test_hostile_names_render_as_text(page, tmp_path):
    evil = '<img src=x onerror="window.__pwned=1;alert(1)">'
    p = Profile([("cpu", "nanoseconds")])
    p.add((Frame(evil, '/x"><script>alert(2)</script>.py', 1), Frame("main", "/m.py", 1)), (),
          {"cpu": 100})
    src = tmp_path / "evil.pb.gz"
    src.write_bytes(pprof.encode(p))
    out = tmp_path / "evil.html"
    res = run_cli("render", src, "-o", out)
    assert res.returncode == 0, res.stderr
    page.goto(out.as_uri())
    page.wait_for_selector("g.frame")
    assert page.evaluate("window.__pwned") is None
    assert page.locator("img").count() == 0
    assert not page.dialogs
    texts = page.eval_on_selector_all("g.frame", "els => els.map(e => e.dataset.name)")
    assert evil in texts
    page.locator("g.frame", has=page.locator(f'text')).last.hover()
    assert page.locator("table.fg-top-table").inner_text().count("<img") == 1


def test_50k_unique_stacks_stays_usable(page, tmp_path):
    rng = random.Random(1)
    mods = [f"/srv/app/mod{i}.py" for i in range(40)]
    funcs = [Frame(f"fn_{i}", mods[i % 40], i) for i in range(3000)]
    p = Profile([("cpu", "nanoseconds")])
    root = Frame("main", "/srv/app/main.py", 1)
    seen = set()
    while len(seen) < 50_000:
        depth = rng.randint(4, 24)
        stack = tuple(rng.choice(funcs[:40 + depth * 60]) for _ in range(depth)) + (root,)
        if stack not in seen:
            seen.add(stack)
            p.add(stack, (), {"cpu": rng.randint(1, 10_000_000)})
    out = tmp_path / "big.html"
    out.write_text(render_html(p))
    page.goto(out.as_uri())
    page.wait_for_selector("g.frame")
    drawn = page.locator("g.frame").count()
    assert 50 < drawn < 20_000, drawn
    first = page.locator('g.frame[data-name="main"]').first
    first.click()
    page.fill("input.fg-search", "fn_1")
    assert page.locator("g.frame.match").count() > 0
    assert not page.errors
