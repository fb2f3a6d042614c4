"""A web page the developer opens cannot write into their local agent (CSRF) nor read it through
a rebound DNS name: real Chromium, a real `spanflame run` (agent/httpguard.py)."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import threading
import time

import httpx
import pytest

from tests.browser.conftest import CHROMIUM, CHROMIUM_ARGS
from tests.support import SPANFLAME

pytestmark = [pytest.mark.browser]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PAGE = """<!doctype html><html><body>
<iframe name="sink" style="display:none"></iframe>
<form id="f" method="POST" enctype="text/plain" target="sink"
      action="{agent}/ingest?name=csrf-form&format=folded&from={t0}&until={t1}">
  <input name="evil;form_stack 100000#" value="">
</form>
<script>
  var done = [];
  function post(path, type) {{
    return fetch('{agent}' + path, {{method: 'POST', mode: 'no-cors', body: 'evil;fetch_stack 100000',
                                    headers: type ? {{'Content-Type': type}} : {{}}}})
      .then(function () {{ done.push(path); }}, function (e) {{ done.push('error ' + e); }});
  }}
  Promise.all([
    post('/ingest?name=csrf-fetch&format=folded&from={t0}&until={t1}', 'text/plain'),
    post('/ingest?name=csrf-notype&format=folded&from={t0}&until={t1}', null),
    post('/v1/traces', 'text/plain'),
  ]).then(function () {{
    document.getElementById('f').submit();
    setTimeout(function () {{ document.body.dataset.done = done.join(','); }}, 1500);
  }});
</script></body></html>"""


class Page(http.server.BaseHTTPRequestHandler):
    html = b""

    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(200)
        self.send_header("content-type", "text/html")
        self.end_headers()
        self.wfile.write(self.html)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    d = tmp_path_factory.mktemp("csrf")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(d / "agent.log", "w")
    proc = subprocess.Popen(
        [str(SPANFLAME), "run", "--store", str(d / "store"), "--listen", f"127.0.0.1:{port}",
         "--otlp-listen", f"127.0.0.1:{free_port()}", "--sampler", "py-spy", "--probes", "cpu",
         "--include", "^nothing-to-profile$"], stdout=log, stderr=subprocess.STDOUT,
        env={k: v for k, v in os.environ.items() if k != "SPANFLAME_AUTH_TOKEN"})
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.time() < deadline, (d / "agent.log").read_text()
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def services(url: str) -> set[str]:
    r = httpx.get(url + "/api/services", params={"from": time.time() - 3600}, timeout=10)
    assert r.status_code == 200, r.text
    return {s["service"] if isinstance(s, dict) else s for s in r.json()}


def test_a_cross_site_page_cannot_write_profiles_or_spans(browser, agent):
    t1 = int(time.time())
    Page.html = PAGE.format(agent=agent, t0=t1 - 10, t1=t1).encode()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        ctx = browser.new_context()
        pg = ctx.new_page()
        # Another origin (another port) than the agent's: what any web page is.
        pg.goto(f"http://127.0.0.1:{srv.server_address[1]}/")
        pg.wait_for_selector("body[data-done]", state="attached", timeout=30_000)
        sent = pg.evaluate("document.body.dataset.done")
        ctx.close()
    finally:
        srv.shutdown()
    sent = sent.split(",")
    assert len(sent) == 3 and not any(x.startswith("error") for x in sent), sent  # all sent
    time.sleep(1)
    written = {s for s in services(agent) if "csrf" in str(s)}
    assert not written, f"a cross-site page wrote {written}"
    r = httpx.get(agent + "/api/spans", params={"from": time.time() - 3600}, timeout=10)
    assert r.status_code == 200 and r.json() == []
    # The same body with a type no page can send cross-site is accepted: only the type differs.
    r = httpx.post(f"{agent}/ingest", params={"name": "csrf-control", "format": "folded",
                                              "from": t1 - 10, "until": t1},
                   content=b"evil;fetch_stack 100000",
                   headers={"content-type": "application/octet-stream"}, timeout=10)
    assert r.status_code == 200, r.text
    assert "csrf-control" in {str(s) for s in services(agent)}


def test_a_rebound_dns_name_cannot_read_the_api(browser, agent):
    """Chromium resolving attacker.example to 127.0.0.1 (what DNS rebinding achieves): a page
    there is same-origin with the agent, but its requests name the attacker in Host."""
    port = agent.rsplit(":", 1)[1]
    rebound = browser.browser_type.launch(
        executable_path=CHROMIUM,
        args=CHROMIUM_ARGS + ["--host-resolver-rules=MAP attacker.example 127.0.0.1"])
    try:
        pg = rebound.new_page()
        resp = pg.goto(f"http://attacker.example:{port}/api/services")
        assert resp.status == 403, resp.status
        assert "allowed-hosts" in pg.content()
        resp = pg.goto(f"http://127.0.0.1:{port}/api/services")
        assert resp.status == 200
    finally:
        rebound.close()
