"""Parameters and decoded numbers are validated (finite, in range, int64-safe), sums saturate,
deep stacks are clipped under a marker, and deep documents are encoded without recursion."""

from __future__ import annotations

import asyncio
import json

import pytest

from agent import pprof
from agent.admission import Admission, Overloaded
from agent.errors import ProfileDecodeError
from agent.httpbody import BodyError
from agent.model import MAX_STACK_DEPTH, MAX_VALUE, SAMPLE_TYPES, TRUNCATED, Frame, Profile
from agent.params import BadRequest, integer, number, time_range
from agent.pyroscope_decode import decode_push, folded_profile
from flamegraph.calltree import build_tree
from flamegraph.html import dumps, flamegraph_data
from tests.hostile import cpu_profile, pprof_bytes, push_body


@pytest.mark.parametrize("q", [{"from": "nan"}, {"until": "nan"}, {"until": "1e18"},
                               {"from": "inf"}, {"from": "-inf"}, {"from": "-1"},
                               {"until": str(2**63)}, {"from": "9" * 400}, {"from": "1e309"},
                               {"from": "10", "until": "5"}, {"from": "0", "until": "1e9"}])
def test_bad_ranges_are_refused(q):
    with pytest.raises(BadRequest):
        time_range(q)


def test_a_good_range_is_in_int64_nanoseconds():
    start, end = time_range({"from": "3999999000", "until": "4000000000"})
    assert end == 4_000_000_000 * 10**9 < 2**63 and end - start == 1000 * 10**9


@pytest.mark.parametrize("v", ["nan", "inf", "-inf", "1e999", "abc", "1" * 100])
def test_numbers_must_be_finite_and_in_range(v):
    with pytest.raises(BadRequest):
        number({"x": v}, "x", lo=0, hi=1e9)
    with pytest.raises(BadRequest):
        integer({"x": v}, "x")


def test_merge_saturates_at_int64():
    a = cpu_profile(["ovf", "leaf"], MAX_VALUE - 5)
    b = cpu_profile(["ovf", "leaf"], MAX_VALUE - 5)
    a.merge(b)
    assert a.total("cpu") == MAX_VALUE
    assert pprof.decode(pprof.encode(a)).total("cpu") == MAX_VALUE


def test_a_folded_count_beyond_the_total_bound_is_refused_not_wrapped():
    with pytest.raises(BodyError, match="count"):
        folded_profile("ovf;leaf 500000000000\n", 100, 0, 10**10)
    with pytest.raises(BodyError, match="count"):
        folded_profile("a " + "9" * 40 + "\n", 100, 0, 10**10)


def test_folded_stacks_deeper_than_the_limit_keep_their_leaves_under_a_marker():
    stats: dict = {}
    p = folded_profile(";".join(f"f{i}" for i in range(3000)) + " 2\n", 100, 0, 10**10,
                       stats=stats)
    (stack, _labels), = p.samples
    assert len(stack) == MAX_STACK_DEPTH and stack[-1] == TRUNCATED
    assert stack[0].name == "f2999" and stats["truncated"] == 1


def test_pprof_stacks_deeper_than_the_limit_are_clipped_on_decode():
    stats: dict = {}
    prof = pprof.decode(pprof.encode(cpu_profile([], 10, depth=5000)), stats=stats)
    (stack, _labels), = prof.samples
    assert len(stack) == MAX_STACK_DEPTH and stack[-1] == TRUNCATED and stats["truncated"] == 1


def test_pprof_beyond_its_limits_is_refused_before_building_anything():
    raw = pprof.encode(cpu_profile(["a", "b"], 10))
    with pytest.raises(ProfileDecodeError, match="samples"):
        pprof.decode(raw, limits=pprof.Limits(max_samples=0))
    with pytest.raises(ProfileDecodeError, match="locations"):
        pprof.decode(raw, limits=pprof.Limits(max_locations=1))


def test_a_push_with_one_bad_profile_is_refused_whole():
    good = pprof_bytes(cpu_profile(["ok"], 10**7))
    late = pprof_bytes(cpu_profile(["a"], 10**7), time_nanos=2**62 + 2**61, duration_nanos=2**62)
    huge = pprof_bytes(cpu_profile(["a"], 1), values=[2**63 - 1])
    for bad in (late, huge):
        with pytest.raises(BodyError) as exc:
            decode_push(push_body([(good, {"service_name": "s"}), (bad, {"service_name": "s"})]),
                        "application/proto", None, now_s=1.8e9, retention_s=None)
        assert 400 <= exc.value.status < 500


def deep_doc(depth: int) -> dict:
    doc: dict = {"a": []}
    cur = doc["a"]
    for _ in range(depth):
        nxt: list = []
        cur.append({"c": nxt, "s": "x\u2028<"})
        cur = nxt
    return doc


def test_deep_trees_encode_to_json_without_recursion():
    shallow = deep_doc(100)
    assert dumps(shallow) == json.dumps(shallow, separators=(",", ":"), ensure_ascii=False)
    for depth in (800, 20_000):  # beyond json's recursion: the iterative encoder, same text
        assert dumps(deep_doc(depth)) == ('{"a":' + '[{"c":' * depth + "[]"
                                          + ',"s":"x\u2028<"}]' * depth + "}")
    text = dumps(deep_doc(20_000))
    assert text.startswith('{"a":[{"c":[{"c":') and text.count("[") == 20_001
    prof = cpu_profile([], 1000, depth=MAX_STACK_DEPTH)
    data = flamegraph_data(prof)
    text = dumps(data)
    assert '"f0"' in text and f'"f{MAX_STACK_DEPTH - 1}"' in text
    assert build_tree([(tuple(Frame(f"f{i}") for i in range(3000)), 1)]).count() > 3000


def test_admission_refuses_with_retry_after_when_full_and_counts():
    async def go():
        adm = Admission(2, 1, max_bytes=100)
        async with adm.slot(10), adm.slot(10):
            with pytest.raises(Overloaded) as exc:
                async with adm.slot(10):
                    pass
            assert exc.value.retry_after_s >= 1
        async with adm.slot(60):
            with pytest.raises(Overloaded):
                async with adm.slot(60):  # over the byte bound
                    pass
        assert await adm.run(sum, [1, 2]) == 3
        adm.close()
        return adm.refused

    assert asyncio.run(go()) == 2


def test_the_empty_profile_helper_accepts_any_type():
    p = Profile([SAMPLE_TYPES["cpu"]])
    assert p.total("cpu") == 0
