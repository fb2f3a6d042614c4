"""Fuzzing every route of a real agent (tests/hostile.py): seeded, 2,400 requests including the
reproductions of issue 12, in well under 60 s. No answer may be a 5xx, none may take 5 s,
/healthz must answer throughout, and what was stored before must come out unchanged."""

from __future__ import annotations

import time

import pytest

from tests import hostile

pytestmark = [pytest.mark.integration]

SEED = 20261130
CASES = 2400


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    a = hostile.Agent(tmp_path_factory.mktemp("fuzz"))
    yield a
    a.stop()


def test_fuzz_every_route(agent):
    now = time.time()
    hostile.seed_baseline(agent, now)
    before = hostile.baseline_snapshot(agent, now)
    todo = list(hostile.cases(SEED, CASES, now_s=now))  # OTLP depth cases included
    assert len(todo) >= 2000
    rep = hostile.fuzz(agent, todo)
    print(rep.summary())
    assert rep.sent == len(todo)
    assert rep.elapsed_s < 60, rep.summary()
    assert rep.server_errors == [] and rep.elsewhere == [], (rep.summary(), rep.server_errors)
    assert rep.hangs == [], rep.summary()
    assert rep.wrong == [], rep.summary()
    assert rep.health_checks > 10 and rep.health_failures == [], rep.summary()
    assert hostile.baseline_snapshot(agent, now) == before
    assert agent.proc.poll() is None
