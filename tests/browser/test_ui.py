"""The web UI in headless Chromium (Debian's, driven by Playwright) against a real agent fed by a
real run: `spanflame run` profiling tests/programs/shop_app.py, an app instrumented with the real
OpenTelemetry SDK and exporter, whose requests have a CPU-heavy, a lock-bound and an IO-bound
span, and a span and a function with hostile names. Screenshots land in tests/artifacts/."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import time
from urllib.parse import quote

import httpx
import pytest

from tests.integration.test_run import AgentProc, free_port
from tests.support import (ARTIFACTS, PROGRAMS, SPANFLAME, assert_go_pprof_reads, cli_env, hot_line,
                           is_root)

pytestmark = [pytest.mark.browser, pytest.mark.integration]

HOSTILE_SPAN = "<script>alert(1)</script>"
HOSTILE_FN = "<img src=x onerror=alert(1)>"
EXPECTED = {
    "checkout": r"^\d+% on CPU in (burn|compute_prices) \(shop_app\.py:\d+\)$",
    "save_order": rf"^\d+% waiting on a lock in Repo\.save \(shop_app\.py:{hot_line('shop_app', 'SAVE-LOCK')}\)$",
    "load_report": r"^\d+% waiting on disk IO in write_report \(shop_app\.py:\d+\)$",
}
#: The cause a span should get when the app's own measurement says the other side dominated
#: (None: that span kind is not checked then, e.g. a CPU-bound span starved of CPU).
OTHER_SIDE = {"checkout": None, "save_order": None,
              "load_report": r"^\d+% on CPU in write_report \(shop_app\.py:\d+\)$"}
ON_CPU_SIDE = {"checkout": True, "save_order": False, "load_report": False}
#: A span's truth is clear when one side holds at least this share of its wall time.
CLEAR = 0.6


def truth(shop) -> dict[str, dict]:
    """span_id -> what the app measured of that span (cpu_ns, wall_ns)."""
    rows = (json.loads(line) for line in (shop["dir"] / "truth.jsonl").read_text().splitlines())
    return {r["span_id"]: r for r in rows}


def expected_cause(name: str, measured: dict | None) -> str | None:
    """The cause pattern the app's own measurement of a span calls for, or None if unclear."""
    if measured is None or not measured["wall_ns"]:
        return None
    cpu_share = measured["cpu_ns"] / measured["wall_ns"]
    if cpu_share >= CLEAR:
        on_cpu = True
    elif 1 - cpu_share >= CLEAR:
        on_cpu = False
    else:
        return None
    return EXPECTED[name] if on_cpu == ON_CPU_SIDE[name] else OTHER_SIDE[name]


def spans(url: str, **params) -> list[dict]:
    r = httpx.get(f"{url}/api/spans", params={"from": time.time() - 900, "limit": 500, **params},
                  timeout=30)
    r.raise_for_status()
    return r.json()


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    if not is_root():
        pytest.skip("the agent's probes need root")
    d = tmp_path_factory.mktemp("ui")
    agent = AgentProc(d / "store", "--include", "shop_app", "--rate", "100", "--window", "5",
                      "--cpu-budget", "200")
    app = subprocess.Popen([sys.executable, str(PROGRAMS / "shop_app.py"), agent.otlp, str(d),
                            "--seconds", "25"], stdout=subprocess.PIPE, text=True)
    try:
        app_pid = json.loads(app.stdout.readline())["pid"]
        # The app works from its first moment; spans that began before the agent watched it are
        # partly unobserved (their cause says so), so cause checks take those after.
        watched_ns = agent.wait_watching(app_pid) + 500_000_000
        deadline = time.time() + 150
        while True:  # until every kind of span is stored with its breakdown
            done = all(len([s for s in spans(agent.url, name=n) if s["breakdown"]]) >= 5
                       for n in (*EXPECTED, HOSTILE_SPAN))
            if done and app.poll() is not None:
                health = httpx.get(f"{agent.url}/healthz", timeout=10).json()
                if health["pending_windows"] == 0:  # every window linked and stored
                    break
            assert time.time() < deadline, "spans did not arrive: " + (d / "store").as_posix()
            time.sleep(2)
        yield {"url": agent.url, "agent": agent, "dir": d, "pid": app_pid,
               "watched_ns": watched_ns}
    finally:
        if app.poll() is None:
            app.kill()
        app.wait()
        agent.stop()


def observed_causes(page, shop) -> list[tuple[int, str]]:
    """(row index, cause) of the linked rows on the page whose span began after the agent
    watched the app (see the fixture)."""
    rows = page.locator("tr.sf-span-row:not(.sf-pending)")
    ids = rows.evaluate_all("rs => rs.map(r => r.dataset.spanId)")
    causes = rows.locator(".sf-cause").all_inner_texts()
    start = {s["span_id"]: s["start_ns"] for s in spans(shop["url"], limit=2000)}
    return [(i, c) for i, (sid, c) in enumerate(zip(ids, causes))
            if start.get(sid, 0) >= shop["watched_ns"]]


def open_page(page, url):
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']", timeout=30_000)


def test_slow_span_list_shows_each_slow_span_with_its_dominant_cause(page, shop):
    open_page(page, f"{shop['url']}/spans?range=15m")
    for name, pattern in EXPECTED.items():
        page.fill("input.sf-name", name)
        page.evaluate("document.body.removeAttribute('data-ready')")
        page.click("button.sf-apply")
        page.wait_for_selector("body[data-ready='1']")
        rows = page.locator("tr.sf-span-row:not(.sf-pending)")  # linked spans only
        n = rows.count()
        assert n >= 5, name
        names = rows.locator("a.sf-span-link").all_inner_texts()
        assert set(names) == {name}
        causes = rows.locator(".sf-cause").all_inner_texts()
        ids = [rows.nth(i).get_attribute("data-span-id") for i in range(n)]
        measured = truth(shop)
        observed = {i for i, _c in observed_causes(page, shop)}
        checked = [(c, expected_cause(name, measured.get(sid)))
                   for i, (c, sid) in enumerate(zip(causes, ids)) if i in observed]
        checked = [(c, p) for c, p in checked if p is not None]
        assert len(checked) >= 5, (name, "too few spans with a clear ground truth", causes)
        right = [c for c, p in checked if re.match(p, c)]
        assert len(right) >= 0.95 * len(checked), (name, checked)
        # Every bar agrees with its cause: its widest segment is the cause's category.
        words = {"on CPU": "cpu", "waiting on a lock": "lock", "waiting on disk IO": "io",
                 "waiting for the GIL": "gil", "waiting for another thread": "sync",
                 "off CPU": "other", "in child spans": "children",
                 "unaccounted": "unaccounted", "not observed": "unobserved"}
        bars = page.eval_on_selector_all(
            "tr.sf-span-row:not(.sf-pending)", "rows => rows.map(r => [r.querySelector('.sf-cause').textContent,"
            " [...r.querySelectorAll('.sf-seg')].map(e => [e.dataset.cat,"
            "  e.getBoundingClientRect().width])])")
        for cause, segs in bars:
            widest = max(segs, key=lambda w: w[1])[0]
            assert any(w in cause and c == widest for w, c in words.items()), (cause, segs)
    page.screenshot(path=str(ARTIFACTS / "ui-slow-spans.png"), full_page=True)
    assert not page.errors, page.errors


@pytest.mark.parametrize("name,function,type_name", [
    ("checkout", "compute_prices", "cpu"), ("save_order", "Repo.save", "lock_wait"),
    ("load_report", "write_report", "io_wait")])
def test_clicking_a_slow_span_opens_its_flame_graph(page, shop, name, function, type_name):
    open_page(page, f"{shop['url']}/spans?range=15m&name={name}")
    k = next(i for i, c in observed_causes(page, shop) if re.match(EXPECTED[name], c))
    first = page.locator("tr.sf-span-row:not(.sf-pending)").nth(k)  # the slowest with the usual cause
    span_id = first.get_attribute("data-span-id")
    page.evaluate("document.body.removeAttribute('data-ready')")
    first.locator("a.sf-span-link").click()
    page.wait_for_url(re.compile(r"/flamegraph\?"))
    page.wait_for_selector("body[data-ready='1']")
    assert f"span_id={span_id}" in page.url
    assert page.locator(".sf-span-title").inner_text() == name
    # The flame graph opens on the sample type of the span's dominant cause, with the function.
    assert page.evaluate("window.flamegraph.type.name") == type_name
    page.wait_for_selector(f'g.frame[data-name="{function}"]')
    # Only this span: the other spans' functions carry (almost) none of it.
    others = {"compute_prices", "Repo.save", "write_report", HOSTILE_FN} - {function}
    regex = "^(" + "|".join(re.escape(o) for o in others) + ")$"
    share = page.evaluate("re => { const fg = window.flamegraph; fg.search(re);"
                          " return fg.matchedTotal / fg.tree.total; }", regex)
    assert share < 0.05, share
    assert not page.errors, page.errors


def test_deep_link_opens_the_span_flame_graph(page, shop):
    s = next(s for s in spans(shop["url"], name="load_report") if s["breakdown"])
    open_page(page, f"{shop['url']}/flamegraph?trace_id={s['trace_id']}&span_id={s['span_id']}")
    assert page.locator(".sf-span-title").inner_text() == "load_report"
    page.wait_for_selector('g.frame[data-name="write_report"]')
    assert page.locator(".sf-span-header .sf-cause").inner_text() == s["breakdown"]["cause"]
    # type= picks the sample type; the switch to descendants of the root shows every child.
    # Off-CPU: every child waits on every request (the lock, the disk), unlike its CPU, which
    # for the O_DIRECT writes is a couple of milliseconds that a 100 Hz sampler may not catch.
    # A request whose save_order did wait on the lock (the janitor sometimes misses a turn).
    saved = next(x for x in spans(shop["url"], name="save_order")
                 if x["breakdown"] and re.match(EXPECTED["save_order"], x["breakdown"]["cause"]))
    root = saved["parent_span_id"]
    open_page(page, f"{shop['url']}/flamegraph?trace_id={saved['trace_id']}&span_id={root}"
                    "&descendants=1&type=off_cpu")
    assert page.evaluate("window.flamegraph.type.name") == "off_cpu"
    for fn in ("Repo.save", "write_report"):
        page.wait_for_selector(f'g.frame[data-name="{fn}"]')
    assert page.locator("#sf-scope-1").is_checked()
    in_save = ("() => { const fg = window.flamegraph; fg.search('^Repo\\\\.save$');"
               " return fg.matchedTotal; }")
    with_children = page.evaluate(in_save)
    assert with_children > 0
    page.evaluate("document.body.removeAttribute('data-ready')")
    page.click("#sf-scope-0")  # the root span alone: its own time only
    page.wait_for_selector("body[data-ready='1']")
    assert page.evaluate(in_save) < 0.1 * with_children
    # A span the agent never saw: a clear message, not a broken page.
    open_page_missing = f"{shop['url']}/flamegraph?span_id=00000000000000ff"
    page.goto(open_page_missing)
    page.wait_for_selector(".sf-error")
    assert "not in the store" in page.locator(".sf-error").inner_text()


def test_search_highlights_matching_frames(page, shop):
    open_page(page, f"{shop['url']}/explore?service=shop&type=cpu&range=15m")
    page.wait_for_selector('g.frame[data-name="compute_prices"]')
    assert not page.locator("select.sf-pod").is_visible()  # not on Kubernetes: no pod menu
    page.fill("input.fg-search", "compute_pr")
    matched = page.locator("g.frame.match")
    assert matched.count() >= 1
    assert set(matched.evaluate_all("els => els.map(e => e.dataset.name)")) == {"compute_prices"}
    assert page.locator("g.frame.dim").count() >= 3
    assert page.locator(".fg-matched").inner_text().startswith("Matched: ")
    page.screenshot(path=str(ARTIFACTS / "ui-search.png"), full_page=True)
    assert not page.errors, page.errors


def test_hostile_names_render_as_text(page, shop):
    open_page(page, f"{shop['url']}/spans?range=15m&name={quote(HOSTILE_SPAN)}")
    assert set(page.locator("a.sf-span-link").all_inner_texts()) == {HOSTILE_SPAN}
    causes = observed_causes(page, shop)
    usual = [i for i, c in causes if re.match(r"^\d+% on CPU in burn ", c)]
    assert len(usual) >= 0.95 * len(causes), causes
    link = page.locator("tr.sf-span-row:not(.sf-pending)").nth(usual[0]).locator("a.sf-span-link")
    assert link.inner_text() == HOSTILE_SPAN
    page.evaluate("document.body.removeAttribute('data-ready')")
    link.click()
    page.wait_for_selector("body[data-ready='1']")
    page.wait_for_selector("g.frame text")
    names = page.eval_on_selector_all("g.frame", "els => els.map(e => e.dataset.name)")
    assert HOSTILE_FN in names
    # Shown as text, never parsed: no <img>, no <script> from the data, no dialog, no error.
    assert page.locator("img").count() == 0
    assert page.locator("script").count() == 2  # the page's own two
    assert page.locator(".sf-span-title").inner_text() == HOSTILE_SPAN
    box = page.locator(f'g.frame[data-name="{HOSTILE_FN}"]').first
    box.hover()
    assert page.locator(".fg-tooltip .fg-tt-name").inner_text() == HOSTILE_FN
    page.screenshot(path=str(ARTIFACTS / "ui-hostile.png"), full_page=True)
    assert not page.dialogs and not page.errors, (page.dialogs, page.errors)


def test_trace_view_draws_the_waterfall_with_breakdowns(page, shop):
    s = next(s for s in spans(shop["url"], name="save_order") if s["breakdown"])
    open_page(page, f"{shop['url']}/trace/{s['trace_id']}")
    rows = page.locator(".sf-wf-row")
    names = rows.locator("a.sf-span-link").all_inner_texts()
    assert names[0] == "handle_request"
    assert names[1:4] == ["checkout", "save_order", "load_report"]
    # Bars sit in time order, left to right.
    lefts = [b["x"] for b in (rows.nth(i).locator(".sf-wf-bar").bounding_box() for i in range(4))]
    assert lefts[1] <= lefts[2] <= lefts[3], lefts
    row = page.locator(f'.sf-wf-row[data-span-id="{s["span_id"]}"]')
    assert row.locator(".sf-wf-cause").inner_text() == s["breakdown"]["cause"]
    assert row.locator('.sf-seg[data-cat="lock"]').count() == 1
    page.screenshot(path=str(ARTIFACTS / "ui-trace.png"), full_page=True)
    page.evaluate("document.body.removeAttribute('data-ready')")
    row.locator("a.sf-span-link").click()
    page.wait_for_selector("body[data-ready='1']")
    page.wait_for_selector('g.frame[data-name="Repo.save"]')
    assert not page.errors, page.errors


def test_compare_with_other_spans_of_the_same_name(page, shop):
    s = max((s for s in spans(shop["url"], name="save_order") if s["breakdown"]),
            key=lambda s: s["duration_ms"])
    open_page(page, f"{shop['url']}/flamegraph?trace_id={s['trace_id']}&span_id={s['span_id']}")
    page.evaluate("document.body.removeAttribute('data-ready')")
    page.click("#sf-compare")
    page.wait_for_selector("body[data-ready='1']")
    assert "compare=1" in page.url
    data = page.evaluate("({diff: window.flamegraph.data.diff, n: window.flamegraph.data.baseline_spans,"
                         " base: window.flamegraph.type.baseline_total, total: window.flamegraph.type.total})")
    assert data["diff"] and data["n"] >= 4
    # The baseline is the average of the others: about one lock wait of ~200 ms, like this one.
    assert 0.5 < data["base"] / data["total"] < 2.0, data
    assert "other spans of this name" in page.locator(".sf-status").inner_text()
    page.locator('g.frame[data-name="Repo.save"]').first.hover()
    assert "Average of" in page.locator(".fg-tooltip").inner_text()
    page.screenshot(path=str(ARTIFACTS / "ui-compare.png"), full_page=True)


def test_a_long_range_on_a_young_agent_starts_its_timeline_at_the_first_data(page, shop):
    """'Last 24 h' on an agent up for a minute: the bars spread over the data, not two bars
    at the right edge."""
    open_page(page, f"{shop['url']}/explore?service=shop&type=cpu&range=24h")
    page.wait_for_selector("rect.sf-tl-bar", state="attached")
    heights = page.eval_on_selector_all(
        "rect.sf-tl-bar", "rs => rs.map(r => parseFloat(r.getAttribute('height')))")
    first = next(i for i, h in enumerate(heights) if h > 0)
    assert first <= 0.1 * len(heights), (first, len(heights))
    assert page.locator("svg.sf-timeline-svg[data-clipped='1']").count() == 1
    assert "first data" in page.locator("text.sf-tl-label").first.text_content()
    # the API says what it did
    r = httpx.get(f"{shop['url']}/api/timeline", params={"type": "cpu", "service": "shop",
                                                         "from": time.time() - 86400}).json()
    assert r["clipped"] and r["from"] > r["requested_from"] + 3600
    off = httpx.get(f"{shop['url']}/api/timeline", params={"type": "cpu", "service": "shop",
                                                           "from": time.time() - 86400,
                                                           "clip": "0"}).json()
    assert not off["clipped"]


def test_explore_timeline_label_filters_and_downloads(page, shop, tmp_path):
    open_page(page, f"{shop['url']}/explore?service=shop&type=cpu&range=15m")
    assert page.locator("rect.sf-tl-bar").count() == 120
    page.wait_for_selector(f'g.frame[data-name="{HOSTILE_FN}"]')
    page.fill("input.sf-labels", "span_name=checkout")
    page.evaluate("document.body.removeAttribute('data-ready')")
    page.click("button.sf-apply")
    page.wait_for_selector("body[data-ready='1']")
    page.wait_for_selector('g.frame[data-name="compute_prices"]')
    assert page.locator(f'g.frame[data-name="{HOSTILE_FN}"]').count() == 0
    assert "labels=span_name" in page.url
    page.screenshot(path=str(ARTIFACTS / "ui-explore.png"), full_page=True)
    hrefs = page.eval_on_selector_all(".sf-downloads a", "els => els.map(e => e.href)")
    pb, ss = (h for h in hrefs if "format=pprof" in h), (h for h in hrefs if "format=speedscope" in h)
    out = tmp_path / "view.pb.gz"
    out.write_bytes(httpx.get(next(pb), timeout=30).content)
    raw = assert_go_pprof_reads(out)
    assert "compute_prices" in raw and HOSTILE_FN not in raw
    doc = httpx.get(next(ss), timeout=30).json()
    assert any(f["name"] == "compute_prices" for f in doc["shared"]["frames"])
    # Drag across the timeline: the range becomes absolute.
    box = page.locator("svg.sf-timeline-svg").bounding_box()
    page.evaluate("document.body.removeAttribute('data-ready')")
    page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + 20)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.99, box["y"] + 20)
    page.mouse.up()
    page.wait_for_selector("body[data-ready='1']")
    assert "from=" in page.url and "until=" in page.url
    assert not page.errors, page.errors


def test_explore_says_where_a_processs_stacks_come_from(page, shop):
    pid = shop["pid"]
    open_page(page, f"{shop['url']}/explore?service=shop&type=cpu&range=15m&pid={pid}")
    source = page.locator(".sf-source")
    deadline = time.time() + 10
    while not source.inner_text() and time.time() < deadline:
        time.sleep(0.1)
    assert source.inner_text().startswith("stacks: kernel walker"), source.inner_text()
    option = page.locator(f'select.sf-pid option[value="{pid}"]').inner_text()
    assert "kernel walker" in option, option
    assert page.locator(".sf-degraded").count() == 0  # nothing runs below what was asked
    assert not page.errors, page.errors


def test_a_probe_turned_off_is_shown_on_every_page(page, tmp_path):
    """Never degrade silently: a probe off (here: its tracepoint denied) is in /healthz,
    /metrics and a banner on every page of the UI."""
    agent = AgentProc(tmp_path / "store", env={"SPANFLAME_DENY_TRACEPOINTS": "sock:sock_send_length"})
    try:
        health = httpx.get(f"{agent.url}/healthz", timeout=10).json()
        assert any(d.startswith("probe net off") for d in health["degraded"]), health
        assert 'spanflame_degraded{what="probe net off"} 1.0' in httpx.get(
            f"{agent.url}/metrics", timeout=10).text
        for path in ("/explore", "/spans"):
            open_page(page, agent.url + path)
            banner = page.locator(".sf-degraded")
            banner.wait_for()
            assert "probe net off" in banner.inner_text() and "sock_send_length" in banner.inner_text()
    finally:
        agent.stop()


def test_api_rejects_bad_input_with_reasons(shop):
    url = shop["url"]
    cases = [("/api/flamegraph?span_id=zz", 400, "span_id must be 16 hex digits"),
             ("/api/flamegraph?span_id=00000000000000ff", 404, "not in the store"),
             ("/api/flamegraph?format=svg", 400, "format must be"),
             ("/api/flamegraph?min_fraction=2", 400, "min_fraction"),
             ("/api/flamegraph?from=abc", 400, "unix seconds"),
             ("/api/timeline?buckets=99999", 400, "buckets must be between 1 and 2000"),
             ("/api/span/xyz", 400, "16 hex digits"),
             ("/api/span/00000000000000ff", 404, "not in the store"),
             ("/static/../agent/ui.py", 404, ""),
             ("/static/secret.js", 404, "no such asset")]
    for path, status, reason in cases:
        r = httpx.get(url + path, timeout=30)
        assert r.status_code == status, (path, r.status_code, r.text)
        assert reason in r.text, (path, r.text)
    page = httpx.get(url + "/spans", timeout=30)
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "<script" not in page.text.split("<script src=")[0]


@contextlib.contextmanager
def serving(store, *extra):
    """`spanflame serve` on a free port, until the block ends; yields its URL."""
    port = free_port()
    proc = subprocess.Popen([str(SPANFLAME), "serve", "--store", str(store),
                             "--listen", f"127.0.0.1:{port}", *extra],
                            stderr=subprocess.PIPE, text=True, env=cli_env())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_is_read_only_and_honours_the_token(browser, shop):
    with serving(shop["dir"] / "store", "--auth-token", "s3cret") as url:
        assert httpx.get(url + "/api/spans", timeout=10).status_code == 401
        ok = httpx.get(url + "/api/spans", params={"name": "checkout", "from": time.time() - 900},
                       headers={"authorization": "Bearer s3cret"}, timeout=10)
        assert ok.status_code == 200 and len(ok.json()) >= 5
        # No ingest on a read-only store.
        r = httpx.post(url + "/ingest?name=x&from=1&until=2", content=b"a;b 1",
                       headers={"authorization": "Bearer s3cret"}, timeout=10)
        assert r.status_code in (404, 405), r.status_code
        ctx = browser.new_context(viewport={"width": 1400, "height": 900})
        pg = ctx.new_page()
        pg.goto(f"{url}/spans?range=15m&name=checkout&token=s3cret")
        pg.wait_for_selector("body[data-ready='1']", timeout=30_000)
        assert pg.locator("tr.sf-span-row").count() >= 5
        assert "token" not in pg.url  # kept out of the address bar (and of Referer headers)
        assert pg.locator(".sf-read-only").is_visible()
        pg.screenshot(path=str(ARTIFACTS / "ui-serve-token.png"))
        ctx.close()
        ctx = browser.new_context()
        pg = ctx.new_page()
        pg.goto(f"{url}/spans")  # no token: the page says what is missing
        pg.wait_for_selector(".sf-error")
        assert "token" in pg.locator(".sf-error").inner_text()
        ctx.close()


def test_explore_picks_a_kubernetes_pod(page, tmp_path):
    """Pods come from the profiles' labels; picking one shows only its samples."""
    from agent.model import Frame, Profile
    from agent.store import Store

    store = Store(tmp_path / "store")
    t0 = int(time.time() - 600) * 10**9
    for pod, fn in (("shop-a", "pod_a_work"), ("shop-b", "pod_b_work")):
        p = Profile([("cpu", "nanoseconds")], time_ns=t0, duration_ns=10 * 10**9,
                    default_sample_type="cpu")
        p.add((Frame(fn, "shop.py", 3), Frame("main", "shop.py", 1)), (), {"cpu": 10**9})
        store.add_profile(p, type_name="cpu", service="shop", pid=1,
                          labels={"service_name": "shop", "namespace": "prod", "pod": pod})
    store.close()
    with serving(tmp_path / "store") as url:
        open_page(page, f"{url}/explore?service=shop&type=cpu&range=1h")
        page.wait_for_selector('g.frame[data-name="pod_b_work"]')
        assert page.locator("select.sf-pod").is_visible()
        assert page.locator("select.sf-pod option").all_inner_texts() == [
            "all pods", "prod/shop-a", "prod/shop-b"]
        page.evaluate("document.body.removeAttribute('data-ready')")
        page.select_option("select.sf-pod", "prod/shop-a")
        page.wait_for_selector("body[data-ready='1']")
        page.wait_for_selector('g.frame[data-name="pod_a_work"]')
        assert page.locator('g.frame[data-name="pod_b_work"]').count() == 0
        assert "pod=shop-a" in page.url and "namespace=prod" in page.url
        assert not page.errors, page.errors
