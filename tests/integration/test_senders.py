"""Spans may only name processes the agent can tie to their sender (agent/senders.py), over real
TCP with real PID namespaces (unshare): a client in its own PID namespace that claims a host
process is not attributed to it; its spans naming itself are."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import httpx
import pytest
from starlette.applications import Starlette

from agent.httpserver import ServerThread
from agent.metrics import Metrics
from agent.otlp_receiver import OtlpReceiver
from agent.senders import SenderCheck
from agent.spans import SpanStore
from tests.support import target

pytestmark = [pytest.mark.integration]

CLIENT = r"""
import json, os, sys, urllib.request
url, victim, host_ns = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
own_ns = os.stat("/proc/self/ns/pid").st_ino

def span(span_id, name, attrs):
    return {"traceId": "0af7651916cd43dd8448eb211c80319c", "spanId": span_id, "name": name,
            "startTimeUnixNano": "1000", "endTimeUnixNano": "2000",
            "attributes": [{"key": k, "value": {"intValue": str(v)}} for k, v in attrs.items()]}

spans = [
    span("0000000000000001", "claims-host-pid", {"spanflame.pid": victim, "spanflame.tid": victim}),
    span("0000000000000002", "claims-host-pid-and-ns",
         {"spanflame.pid": victim, "spanflame.tid": victim, "spanflame.pid_ns": host_ns}),
    span("0000000000000003", "names-itself", {"spanflame.pid": os.getpid(),
                                               "spanflame.tid": os.getpid(),
                                               "spanflame.pid_ns": own_ns}),
]
body = {"resourceSpans": [{"resource": {"attributes": [
    {"key": "service.name", "value": {"stringValue": "intruder"}}]},
    "scopeSpans": [{"spans": spans}]}]}
req = urllib.request.Request(url, data=json.dumps(body).encode(),
                             headers={"content-type": "application/json"})
print(urllib.request.urlopen(req, timeout=20).status, os.getpid(), flush=True)
"""


@pytest.fixture()
def receiver():
    store, metrics = SpanStore(), Metrics()
    check = SenderCheck(metrics=metrics)
    rx = OtlpReceiver(store, metrics=metrics, sender_check=check.check)
    with ServerThread(Starlette(routes=rx.routes()), "127.0.0.1", 0) as srv:
        yield srv, store, metrics, check


def by_name(store) -> dict:
    return {s.name: s for s in store.all()}


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root")
def test_a_client_in_its_own_pid_namespace_cannot_claim_a_host_process(receiver):
    srv, store, metrics, check = receiver
    host_ns = os.stat("/proc/self/ns/pid").st_ino
    with target("idle") as victim:
        out = subprocess.run(
            ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", CLIENT,
             f"{srv.url}/v1/traces", str(victim.pid), str(host_ns)],
            capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        status, inner_pid = map(int, out.stdout.split())
        assert status == 200 and inner_pid == 1  # it is alone in its namespace
        spans = by_name(store)
        assert set(spans) == {"claims-host-pid", "claims-host-pid-and-ns", "names-itself"}
        for name in ("claims-host-pid", "claims-host-pid-and-ns"):
            assert (spans[name].pid, spans[name].tid) == (0, 0), name  # kept, linked to nothing
        # Its own spans name its host pid (translated from its namespace) and are kept.
        assert spans["names-itself"].pid not in (0, 1, victim.pid)
        assert check.refused == 2
        assert "spanflame_otlp_span_pids_refused_total 2.0" in metrics.render().decode()


def test_a_host_client_names_itself_and_its_children_not_an_unrelated_process(receiver):
    srv, store, metrics, check = receiver
    host_ns = os.stat("/proc/self/ns/pid").st_ino
    with target("idle") as victim:
        # A host client is this test's child: it may name itself, not its sibling `victim`
        # (which is not its descendant).
        out = subprocess.run([sys.executable, "-c", CLIENT, f"{srv.url}/v1/traces",
                              str(victim.pid), str(host_ns)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        _status, client_pid = map(int, out.stdout.split())
        spans = by_name(store)
        assert spans["names-itself"].pid == client_pid
        assert spans["claims-host-pid"].pid == 0 and spans["claims-host-pid-and-ns"].pid == 0
        assert check.refused == 2


def test_an_unknown_sender_names_no_process(receiver):
    """The sender check on a peer it cannot find (not a local socket): nothing is attributed."""
    srv, store, metrics, check = receiver
    assert check.sender(("203.0.113.9", 40000)) is None
    assert check.allowed_pids(("203.0.113.9", 40000)) == set()
    assert httpx.get(f"{srv.url}/v1/traces").status_code == 405
