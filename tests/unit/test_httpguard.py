"""agent/httpguard.py: who may call which route (token, Host header, CSRF), and start-up
refusals. The real clients' requests (tests/fixtures) must pass unchanged."""

from __future__ import annotations

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from agent.errors import UsageError
from agent.httpguard import (Policy, RequestGuard, check_exposure, check_token, host_allowed,
                             parse_allowed_hosts)
from tests.support import captured_request

TOKEN = "s3cret-token"


def _ok(request):
    return PlainTextResponse("ok")


def client(policy: Policy) -> TestClient:
    routes = [Route(p, _ok, methods=["GET", "POST"]) for p in
              ("/ingest", "/push.v1.PusherService/Push", "/v1/traces", "/api/spans", "/healthz",
               "/metrics", "/spans")]
    app = Starlette(routes=routes, middleware=[Middleware(RequestGuard, policy=policy)])
    return TestClient(app, base_url="http://127.0.0.1:4040")


# -- start-up ---------------------------------------------------------------------------------

@pytest.mark.parametrize("token", ["", "   ", "has space", "tab\there", "naïve"])
def test_an_empty_or_unusable_token_is_an_error_not_auth_off(token):
    with pytest.raises(UsageError):
        check_token(token)


def test_listening_beyond_loopback_without_a_token_is_refused_unless_insecure():
    with pytest.raises(UsageError, match="--insecure-no-auth"):
        check_exposure([("127.0.0.1", 4040), ("0.0.0.0", 4318)], None, False)
    with pytest.raises(UsageError):
        check_exposure([("::", 4040)], None, False)
    check_exposure([("0.0.0.0", 4040)], TOKEN, False)
    check_exposure([("0.0.0.0", 4040)], None, True)
    check_exposure([("127.0.0.1", 4040), ("::1", 4318), ("localhost", 1)], None, False)


# -- Host header (DNS rebinding) --------------------------------------------------------------

@pytest.mark.parametrize("host,ok", [
    ("127.0.0.1:4040", True), ("localhost:4040", True), ("[::1]:4040", True), ("10.1.2.3", True),
    ("app.localhost", True), ("attacker.example:4040", False), ("127.0.0.1.nip.io", False),
    ("spanflame.monitoring.svc", True), ("x.svc.cluster.local", True), ("", False),
])
def test_host_header_is_a_loopback_name_an_ip_or_a_configured_name(host, ok):
    allowed = parse_allowed_hosts("spanflame.monitoring.svc, .svc.cluster.local")
    assert host_allowed(host, allowed) is ok


def test_a_rebound_name_cannot_read_the_api():
    c = client(Policy())
    r = c.get("/api/spans", headers={"host": "rebind.attacker.example:4040"})
    assert r.status_code == 403 and "--allowed-hosts" in r.text
    assert c.get("/api/spans").status_code == 200
    c = client(Policy(allowed_hosts=("rebind.attacker.example",)))
    assert c.get("/api/spans", headers={"host": "rebind.attacker.example"}).status_code == 200


# -- token ------------------------------------------------------------------------------------

def test_with_a_token_data_routes_want_it_and_probes_do_not():
    c = client(Policy(token=TOKEN))
    assert c.get("/api/spans").status_code == 401
    assert c.get("/api/spans", headers={"authorization": "Bearer nope"}).status_code == 401
    assert c.get("/api/spans", headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert c.get("/api/spans", params={"token": TOKEN}).status_code == 200  # UI download links
    for path in ("/healthz", "/metrics", "/spans"):
        assert c.get(path).status_code == 200, path


@pytest.mark.parametrize("path", ["/ingest", "/push.v1.PusherService/Push", "/v1/traces"])
def test_a_token_in_an_ingest_url_is_refused_even_when_right(path):
    c = client(Policy(token=TOKEN))
    r = c.post(path, params={"token": TOKEN}, content=b"x",
               headers={"content-type": "application/octet-stream"})
    assert r.status_code == 400 and "Authorization" in r.text
    r = c.post(path, content=b"x", headers={"content-type": "application/octet-stream",
                                            "authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200


# -- what a web page can send (CSRF) ----------------------------------------------------------

@pytest.mark.parametrize("path", ["/ingest", "/push.v1.PusherService/Push", "/v1/traces"])
@pytest.mark.parametrize("ctype", [None, "text/plain", "text/plain;charset=UTF-8",
                                   "application/x-www-form-urlencoded",
                                   "multipart/form-data; boundary=x", "Text/Plain"])
def test_a_simple_cross_site_post_cannot_ingest(path, ctype):
    c = client(Policy())
    headers = {"content-type": ctype} if ctype else {}
    r = c.post(path, content=b"a;b 1", headers=headers)
    assert r.status_code == 415, (ctype, r.status_code)
    assert "cross-site" in r.text


def test_a_simple_post_with_the_token_is_fine():
    c = client(Policy(token=TOKEN))
    r = c.post("/ingest", content=b"a;b 1", headers={"content-type": "text/plain",
                                                      "authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200


@pytest.mark.parametrize("name", ["pyroscope-1.4.0", "pyroscope-0.8.16"])
def test_the_real_pyroscope_clients_requests_pass_unchanged(name):
    path, headers, body = captured_request(name)
    assert client(Policy()).post(path, content=body, headers=headers).status_code == 200


@pytest.mark.parametrize("ctype", ["application/x-protobuf", "application/json"])
def test_the_otel_exporters_types_pass(ctype):
    r = client(Policy()).post("/v1/traces", content=b"{}", headers={"content-type": ctype})
    assert r.status_code == 200
