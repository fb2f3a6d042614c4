"""The slow-span list of an asyncio app: dozens of requests share one event-loop thread, and each
span's cause names what its own request awaited, in its own function (never a neighbour's).
A real aiohttp app (tests/programs/async_shop.py, OTel SDK and exporter) under `spanflame run`,
driven by 60 concurrent clients."""

from __future__ import annotations

import json
import re
import subprocess
import time

import httpx
import pytest

from tests.integration.test_asyncio import APPS, CLIENTS
from tests.integration.test_run import AgentProc
from tests.load import Load
from tests.support import ARTIFACTS, PROGRAMS, hot_line, is_root

pytestmark = [pytest.mark.browser, pytest.mark.integration]

VERSION = "3.12.1"
OWN = {"upstream_request": rf"^\d+% awaiting the network in fetch_upstream \(async_shop\.py:"
                           rf"{hot_line('async_shop', 'AS-UPSTREAM')}\)$",
       "lock_request": rf"^\d+% awaiting a lock in take_lock \(async_shop\.py:"
                       rf"{hot_line('async_shop', 'AS-LOCK')}\)$"}
#: each kind's own function; a cause naming another kind's is wrong. (Not `burn`: every kind
#: burns its CPU there, so "on CPU in burn" is right for a lock request that found the lock free.)
OTHERS = ("fetch_upstream", "take_lock", "cpu_work")


@pytest.fixture(scope="module")
def asyncio_shop(tmp_path_factory):
    if not is_root():
        pytest.skip("the agent's probes need root")
    python = APPS / VERSION / "bin" / "python"
    if not python.exists():
        pytest.skip(f"{python} missing")
    d = tmp_path_factory.mktemp("ui-asyncio")
    agent = AgentProc(d / "store", "--include", "async_shop", "--rate", "100", "--window", "5",
                      "--cpu-budget", "200")
    app = subprocess.Popen([str(python), str(PROGRAMS / "async_shop.py"), agent.otlp,
                            str(d / "truth.json"), "--seconds", "15"],
                           stdout=subprocess.PIPE, text=True)
    load = None
    try:
        info = json.loads(app.stdout.readline())
        # Requests start once the agent watches the app (and its await poller has had a look):
        # a request that began before is partly unobserved, and its cause rightly says so.
        agent.wait_watching(info["pid"])
        time.sleep(1)
        load = Load(f"http://127.0.0.1:{info['port']}", CLIENTS)
        app.wait(timeout=60)
        load.stop()
        deadline = time.time() + 90
        while httpx.get(f"{agent.url}/healthz", timeout=10).json()["pending_windows"] or \
                not _spans(agent.url, "lock_request"):
            assert time.time() < deadline, "windows were not stored"
            time.sleep(1)
        yield {"url": agent.url, "truth": json.loads((d / "truth.json").read_text())["spans"]}
    finally:
        if load is not None:
            load.stop()
        if app.poll() is None:
            app.kill()
        app.wait()
        agent.stop()


def _spans(url: str, name: str) -> list[dict]:
    r = httpx.get(f"{url}/api/spans", params={"from": time.time() - 900, "limit": 100,
                                              "name": name}, timeout=30)
    return [s for s in r.json() if s["breakdown"]]


def test_each_request_awaits_in_its_own_function(page, asyncio_shop):
    truth = asyncio_shop["truth"]
    for name, pattern in OWN.items():
        page.goto(f"{asyncio_shop['url']}/spans?range=15m&name={name}")
        page.wait_for_selector("body[data-ready='1']", timeout=30_000)
        rows = page.locator("tr.sf-span-row:not(.sf-pending)")
        ids = rows.evaluate_all("rs => rs.map(r => r.dataset.spanId)")
        all_causes = rows.locator(".sf-cause").all_inner_texts()
        pending = page.locator("tr.sf-span-row.sf-pending .sf-cause").all_inner_texts()
        assert all(c.startswith("no profile linked (yet)") for c in pending), pending
        # What the app measured decides what each span's cause must be: a request that awaited
        # most of its time names its own await; one that found the lock free (it measured no
        # wait) was on CPU, and its cause must say so.
        causes, on_cpu = [], []
        for sid, c in zip(ids, all_causes):
            t = truth.get(sid)
            if t is None:
                continue
            wall = t["end"] - t["start"]
            if t["awaited_ns"] >= 0.6 * wall:
                causes.append(c)
            elif t["awaited_ns"] <= 0.2 * wall:
                on_cpu.append(c)
        print(f"{name}: {len(causes)} spans awaited most of their time, {len(on_cpu)} were on CPU")
        assert len(causes) >= 20, (name, causes)
        assert all(re.match(r"^\d+% on CPU", c) for c in on_cpu), (name, on_cpu)
        own = [c for c in causes if re.match(pattern, c)]
        assert len(own) >= 0.95 * len(causes), (name, len(own), len(causes), "not its own:",
                                                 [c for c in causes if not re.match(pattern, c)])
        own_fn = pattern.split(" in ")[1].split(" ")[0]
        wrong = [c for c in all_causes if any(f" in {o} " in c for o in OTHERS if o != own_fn)]
        assert not wrong, (name, wrong)
    page.screenshot(path=str(ARTIFACTS / "ui-asyncio-spans.png"), full_page=True)
    assert not page.errors, page.errors
