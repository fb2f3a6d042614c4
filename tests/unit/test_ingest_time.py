"""Captured real-client pushes land in the store whatever today's date is, and a push the
store would not keep is refused with a reason instead of acknowledged and then dropped."""

from __future__ import annotations

import time

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from agent.pyroscope_ingest import PyroscopeIngest
from agent.store import Store
from tests.support import captured_request

RETENTION_S = 72 * 3600


@pytest.fixture()
def ingest(tmp_path):
    store = Store(tmp_path / "store", retention_s=RETENTION_S)

    def sink(profile, service, labels):
        store.add_profile(profile, type_name="cpu", service=service, labels=labels,
                          source="ingest")

    app = Starlette(routes=PyroscopeIngest(sink, retention_s=RETENTION_S).routes())
    with TestClient(app) as client:
        yield client, store
    store.close()


@pytest.mark.parametrize("client_name", ["pyroscope-1.4.0", "pyroscope-0.8.16"])
@pytest.mark.parametrize("age_s", [0, 3600, RETENTION_S - 3600])
def test_replayed_captures_are_stored_at_the_time_they_are_replayed_for(ingest, client_name, age_s):
    client, store = ingest
    end_s = time.time() - age_s
    path, headers, body = captured_request(client_name, end_s=end_s)
    r = client.post(path, content=body, headers=headers)
    assert r.status_code == 200, r.text
    found = store.find(start_ns=int((end_s - 60) * 1e9), end_ns=int((end_s + 1) * 1e9),
                       type_name="cpu")
    assert len(found) == 1
    assert abs(found[0].end_ns / 1e9 - end_s) < 1.5
    # ... and survives the retention sweep.
    assert store.enforce_retention() == 0


@pytest.mark.parametrize("client_name", ["pyroscope-1.4.0", "pyroscope-0.8.16"])
def test_a_capture_older_than_retention_gets_a_400_with_the_reason(ingest, client_name):
    client, store = ingest
    path, headers, body = captured_request(client_name, end_s=time.time() - RETENTION_S - 3600)
    r = client.post(path, content=body, headers=headers)
    assert r.status_code == 400
    assert "retention" in r.text and "72 h" in r.text
    assert store.find(start_ns=0, end_ns=time.time_ns(), type_name="cpu") == []


def test_a_capture_stamped_days_ahead_gets_a_400_naming_the_clock(ingest):
    client, store = ingest
    path, headers, body = captured_request("pyroscope-1.4.0", end_s=time.time() + 3 * 86400)
    r = client.post(path, content=body, headers=headers)
    assert r.status_code == 400 and "clock" in r.json()["message"]
