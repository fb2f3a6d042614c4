"""/api/profile and /api/flamegraph filters on keys outside the index: a tag pushed with the
profile (`env`) is a series label and matches there; other keys match sample labels."""

from __future__ import annotations

import time
from types import SimpleNamespace

from agent.model import Frame, Profile, make_labels
from agent.server import query_profile
from agent.store import Store

S = 1_000_000_000


def _prof(t0: int, thread: str, value: int) -> Profile:
    p = Profile([("samples", "count"), ("cpu", "nanoseconds")], period=10_000_000,
                period_type=("cpu", "nanoseconds"), time_ns=t0, duration_ns=10 * S,
                default_sample_type="cpu")
    p.add((Frame("f", "/a.py", 1),), make_labels({"thread_name": thread}),
          {"samples": 1, "cpu": value})
    return p


def test_pushed_tag_matches_series_labels(tmp_path):
    st = Store(tmp_path)
    now = time.time_ns()
    st.add_profile(_prof(now - 60 * S, "w", 7), type_name="cpu", service="s",
                   labels={"service_name": "s", "env": "prod"}, source="ingest")
    st.add_profile(_prof(now - 50 * S, "w", 5), type_name="cpu", service="s",
                   labels={"service_name": "s", "env": "dev"}, source="ingest")
    st.add_profile(_prof(now - 40 * S, "x", 3), type_name="cpu", service="s",
                   labels={"service_name": "s"}, source="agent")
    agent = SimpleNamespace(store=st)
    q = {"service": "s", "from": str(now / S - 3600)}
    prof, _n = query_profile(agent, {**q, "env": "prod"})
    assert prof is not None and prof.total("cpu") == 7
    prof, _n = query_profile(agent, {**q, "env": "staging"})
    assert prof is None or prof.total("cpu") == 0
    # a key no series has is still a sample label
    prof, _n = query_profile(agent, {**q, "thread_name": "x"})
    assert prof is not None and prof.total("cpu") == 3
