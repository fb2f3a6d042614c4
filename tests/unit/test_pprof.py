import gzip

import pytest

from agent import pprof
from agent.errors import ProfileDecodeError
from agent.model import Frame, Profile, make_labels
from agent.proto import profile_pb2

A = Frame("handler", "/app/server.py", 10)
B = Frame("Repo.save", "/app/repo.py", 88)
C = Frame("<module>", "/app/main.py", 1)


def sample_profile() -> Profile:
    p = Profile([("samples", "count"), ("cpu", "nanoseconds"), ("lock_wait", "nanoseconds")],
                period_type=("cpu", "nanoseconds"), period=10_000_000, time_ns=1_700_000_000_000,
                duration_ns=10_000_000_000, default_sample_type="cpu")
    lab1 = make_labels({"pid": 42, "thread_id": 43, "thread_name": "worker-1"})
    lab2 = make_labels({"pid": 42, "thread_id": 44, "thread_name": "worker-2", "span_id": "ab" * 8})
    p.add((B, A, C), lab1, {"samples": 3, "cpu": 30_000_000})
    p.add((A, C), lab1, {"samples": 1, "cpu": 10_000_000})
    p.add((B, A, C), lab2, {"lock_wait": 5_000_000})
    return p


def test_roundtrip_keeps_types_values_labels_and_lines():
    p = sample_profile()
    q = pprof.decode(pprof.encode(p))
    assert [(t.name, t.unit) for t in q.sample_types] == [
        ("samples", "count"), ("cpu", "nanoseconds"), ("lock_wait", "nanoseconds")]
    assert q.period == 10_000_000 and q.period_type.name == "cpu"
    assert q.time_ns == p.time_ns and q.duration_ns == p.duration_ns
    assert q.default_sample_type == "cpu"
    assert q.samples == p.samples
    assert q.total("cpu") == 40_000_000 and q.total("lock_wait") == 5_000_000


def test_encoded_profile_follows_string_table_rules_and_is_gzipped():
    data = pprof.encode(sample_profile())
    assert data[:2] == b"\x1f\x8b"
    pb = profile_pb2.Profile()
    pb.ParseFromString(gzip.decompress(data))
    assert pb.string_table[0] == ""
    assert len(set(pb.string_table)) == len(pb.string_table), "strings are interned once"
    # numeric labels are numbers, string labels strings
    labels = {pb.string_table[l.key]: l for s in pb.sample for l in s.label}
    assert labels["pid"].num == 42 and labels["pid"].str == 0
    assert pb.string_table[labels["thread_name"].str].startswith("worker-")
    # functions carry name and file, locations one line each, and there is a mapping
    names = {pb.string_table[f.name]: pb.string_table[f.filename] for f in pb.function}
    assert names["Repo.save"] == "/app/repo.py"
    assert all(len(loc.line) == 1 and loc.mapping_id == 1 for loc in pb.location)
    assert {loc.line[0].line for loc in pb.location} == {10, 88, 1}
    assert len(pb.mapping) == 1 and pb.mapping[0].has_functions


def test_uncompressed_encoding():
    raw = pprof.encode(sample_profile(), compress=False)
    assert raw[:2] != b"\x1f\x8b"
    assert pprof.decode(raw).total("cpu") == 40_000_000


def test_zero_samples_are_left_out():
    p = Profile([("cpu", "nanoseconds")])
    p.add((A,), (), {"cpu": 0})
    assert len(pprof.decode(pprof.encode(p))) == 0


@pytest.mark.parametrize("data,reason", [
    (b"", "not a pprof"),
    (b"hello world, not a profile", "not a pprof"),
    (b'{"json": true}', "not a pprof"),
    (gzip.compress(b"\x00\x01garbage")[:-6], "gzip"),
    (b"\x1f\x8b\x08\x00garbage", "gzip"),
])
def test_decode_rejects_non_pprof_with_a_reason(data, reason):
    with pytest.raises(ProfileDecodeError) as e:
        pprof.decode(data)
    assert reason in str(e.value)


def test_decode_rejects_dangling_references():
    pb = profile_pb2.Profile()
    pb.string_table.extend(["", "cpu", "nanoseconds"])
    pb.sample_type.add(type=1, unit=2)
    pb.sample.add(location_id=[7], value=[1])
    with pytest.raises(ProfileDecodeError, match="missing location 7"):
        pprof.decode(pb.SerializeToString())
    pb2 = profile_pb2.Profile()
    pb2.string_table.extend(["", "cpu", "nanoseconds"])
    pb2.sample_type.add(type=1, unit=99)
    with pytest.raises(ProfileDecodeError, match="string 99"):
        pprof.decode(pb2.SerializeToString())
    pb3 = profile_pb2.Profile()
    pb3.string_table.extend(["", "cpu", "nanoseconds"])
    pb3.sample_type.add(type=1, unit=2)
    pb3.sample.add(value=[1, 2])
    with pytest.raises(ProfileDecodeError, match="2 values for 1 sample types"):
        pprof.decode(pb3.SerializeToString())


def test_decode_bounds_decompressed_size():
    big = gzip.compress(b"\x00" * 2_000_000)
    with pytest.raises(ProfileDecodeError, match="more than 1000000 bytes"):
        pprof.decode(big, max_bytes=1_000_000)


def test_decode_location_without_lines_uses_address():
    pb = profile_pb2.Profile()
    pb.string_table.extend(["", "cpu", "nanoseconds", "libc.so.6"])
    pb.sample_type.add(type=1, unit=2)
    pb.mapping.add(id=1, filename=3)
    pb.location.add(id=1, mapping_id=1, address=0x1234)
    pb.sample.add(location_id=[1], value=[5])
    p = pprof.decode(pb.SerializeToString())
    (stack, _labels, v), = p.iter_type("cpu")
    assert stack[0].name == "libc.so.6+0x1234" and v == 5


def test_merge_unions_sample_types_and_time_range():
    a = sample_profile()
    b = Profile([("wall", "nanoseconds")], time_ns=a.time_ns - 5_000_000_000, duration_ns=1)
    b.add((A,), (), {"wall": 7})
    a.merge(b)
    assert a.has_type("wall") and a.total("wall") == 7 and a.total("cpu") == 40_000_000
    assert a.time_ns == b.time_ns and a.duration_ns == 15_000_000_000


def test_filtered_matches_numeric_labels_as_text():
    p = sample_profile()
    assert p.filtered({"thread_id": "44"}).total("lock_wait") == 5_000_000
    assert p.filtered({"thread_id": "44"}).total("cpu") == 0
    assert p.filtered({"nope": "x"}).total("cpu") == 0
