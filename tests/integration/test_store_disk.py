"""The store on a small real filesystem (a tmpfs mounted for the test; root only): size
retention keeps close to its limit and gives the space back; a full disk is a clear StoreFull
(507 over HTTP, a /metrics counter, /healthz degraded, a log line naming the path)."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import subprocess
import time

import httpx
import pytest

from agent.errors import StoreFull
from agent.store import Store

S = 1_000_000_000


@contextlib.contextmanager
def small_fs(path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _blob_profiles(st: Store, n: int, t0: int, size: int = 20 << 10) -> None:
    for i in range(n):
        st.add_raw(os.urandom(size), start_ns=t0 + i * S, end_ns=t0 + (i + 1) * S,
                   type_name="cpu", service="a", pid=1, labels={}, source="test")


def test_size_retention_keeps_close_to_the_limit_and_the_file_shrinks(tmp_path):
    """A 1 MiB limit keeps about 1 MiB (it kept 329 KB) and the file shrinks to it (it stayed
    at 7.5 MB)."""
    limit = 1 << 20
    st = Store(tmp_path, max_bytes=limit)
    now = time.time_ns()
    _blob_profiles(st, 200, now - 3600 * S)  # 4 MiB of incompressible profiles
    st.add_spans([{"span_id": f"{i + 1:016x}", "trace_id": "a" * 32, "name": "GET /",
                   "service": "a", "start_ns": now - 3700 * S, "end_ns": now - 3699 * S,
                   "attributes": {"k": "v" * 100}} for i in range(2000)])
    before = st.size_bytes()
    assert before > 4 * limit
    deleted = st.enforce_retention(now)
    assert deleted > 100
    after = st.size_bytes()
    assert 0.8 * limit <= after <= 1.1 * limit, f"{after} bytes on disk for a {limit} limit"
    assert st.data_bytes() >= 0.6 * limit
    assert st.slow_spans(start_ns=0, end_ns=now) == []  # older than every profile: gone first
    left = st.find(start_ns=0, end_ns=now, type_name="cpu")
    assert left and min(p.start_ns for p in left) > now - 3600 * S  # the oldest went
    st.close()


def test_a_full_disk_is_a_clear_error_and_the_store_recovers(tmp_path, caplog):
    with small_fs(tmp_path / "fs", "5m") as fs:
        st = Store(fs / "store", max_bytes=1 << 20)
        now = time.time_ns()
        caplog.set_level(logging.INFO)
        with pytest.raises(StoreFull) as err:
            _blob_profiles(st, 1000, now - 2000 * S)
        msg = str(err.value)
        assert "disk full" in msg and str(fs / "store" / "spanflame.db") in msg
        assert st.full == msg and st.full_errors == 1
        logs = "\n".join(r.getMessage() for r in caplog.records)
        assert "cannot rollback" not in logs and "cannot rollback" not in msg
        assert str(fs / "store") in logs and "disk full" in logs
        # what was acknowledged before is all readable
        kept = st.find(start_ns=0, end_ns=now, type_name="cpu")
        assert len(kept) > 20 and all(st.blob(p.id) for p in kept)
        # retention frees room; writes work again and the reason is cleared
        st.enforce_retention(now)
        _blob_profiles(st, 3, now - 10 * S)
        assert st.full is None
        st.close()


def test_agent_on_a_full_disk_answers_507_with_the_reason(tmp_path):
    from tests.integration.test_run import AgentProc

    with small_fs(tmp_path / "fs" / "store", "6m") as store:
        a = AgentProc(store, "--sampler", "py-spy", "--probes", "cpu")
        try:
            rng = random.Random(7)
            got = None
            for _ in range(400):
                body = "\n".join(";".join(f"f{rng.getrandbits(96):024x}" for _ in range(4))
                                 + f" {rng.randint(1, 99)}" for _ in range(2000))
                r = httpx.post(f"{a.url}/ingest", params={"name": "filler", "format": "folded"},
                               content=body.encode(), timeout=30,
                               headers={"content-type": "application/octet-stream"})
                if r.status_code != 200:
                    got = r
                    break
            assert got is not None, "the disk never filled"
            assert got.status_code == 507, (got.status_code, got.text)
            assert "disk full" in got.text and str(store) in got.text
            assert got.headers.get("retry-after")
            metrics = httpx.get(f"{a.url}/metrics").text
            line = [x for x in metrics.splitlines()
                    if x.startswith("spanflame_store_disk_full_total")]
            assert line and float(line[0].split()[-1]) >= 1
            h = httpx.get(f"{a.url}/healthz")
            assert h.status_code == 200  # liveness: alive, but degraded with the reason
            assert h.json()["status"] == "degraded"
            assert any("disk full" in d for d in h.json()["degraded"])
            r = httpx.get(f"{a.url}/api/services", timeout=30)
            assert r.status_code == 200 and any(s["service"] == "filler" for s in r.json())
        finally:
            a.stop()
        log = open(a.log.name).read()
        assert "disk full" in log and str(store) in log
        assert "cannot rollback" not in log
