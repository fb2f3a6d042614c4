import pytest

from agent.errors import SamplerError
from agent.pyspy import is_python, parse_chrometrace, parse_speedscope


def ev(ph, name, ts, tid=1, filename="/app/x.py", line=1):
    return {"ph": ph, "name": name, "ts": ts, "tid": tid, "pid": 9, "cat": "py-spy",
            "args": {"filename": filename, "line": line}}


def thread(ph, ts, tid=1, os_tid=101, name="worker"):
    return {"ph": ph, "name": f"thread ({os_tid}): {name}" if name is not None else f"thread ({os_tid})",
            "ts": ts, "tid": tid, "pid": 9, "cat": "py-spy", "args": {"filename": "", "line": 0}}


def test_chrometrace_slices_per_os_thread_with_clock_offset():
    events = [
        thread("B", 100), ev("B", "main", 100), ev("B", "a", 100, line=5),
        ev("E", "a", 300, line=5), ev("B", "b", 300, line=7),
        ev("E", "b", 450, line=7), ev("E", "main", 450), thread("E", 450),
    ]
    out = parse_chrometrace(events, pid=9, start_ns=1_000_000_000)
    tl = out[101]
    assert tl.tid == 101 and tl.name == "worker" and tl.pid == 9
    assert [(s.start_ns, s.end_ns, [f.name for f in s.stack]) for s in tl.slices] == [
        (1_000_100_000, 1_000_300_000, ["a", "main"]),
        (1_000_300_000, 1_000_450_000, ["b", "main"]),
    ]
    assert tl.slices[0].stack[0].line == 5
    assert tl.stack_at(1_000_350_000).stack[0].name == "b"
    assert tl.stack_at(1_000_500_000) is None


def test_chrometrace_threads_are_separated_and_odd_names_survive():
    odd = "we(ird): name; <b>"
    events = [thread("B", 0, tid=1, os_tid=11, name=odd), ev("B", "f", 0, tid=1),
              thread("B", 0, tid=2, os_tid=12, name=None), ev("B", "g", 0, tid=2),
              ev("E", "f", 10, tid=1), thread("E", 10, tid=1, os_tid=11, name=odd),
              ev("E", "g", 20, tid=2), thread("E", 20, tid=2, os_tid=12, name=None)]
    out = parse_chrometrace(events, pid=9, start_ns=0)
    assert out[11].name == odd and out[12].name == ""
    assert out[11].slices[0].stack[0].name == "f" and out[12].slices[0].end_ns == 20_000


def test_chrometrace_ignores_malformed_events_and_rejects_non_lists():
    events = [{"ph": "B"}, "junk", thread("B", 0), ev("B", "f", 0), ev("E", "f", 5), thread("E", 5)]
    assert list(parse_chrometrace(events, 1, 0)) == [101]
    with pytest.raises(SamplerError):
        parse_chrometrace({"not": "a list"}, 1, 0)


def test_speedscope_counts_per_thread_and_stack():
    doc = {"shared": {"frames": [
        {"name": "thread (101): alpha", "file": "", "line": 0},
        {"name": "main", "file": "/a.py", "line": 3},
        {"name": "hot", "file": "/a.py", "line": 9},
        {"name": "thread (102): beta", "file": "", "line": 0},
    ]}, "profiles": [
        {"name": 'Thread 101 "alpha"', "samples": [[0, 1, 2], [0, 1, 2], [0, 1]]},
        {"name": 'Thread 102 "beta"', "samples": [[3, 1, 2], [9, 9]]},
    ]}
    counts = parse_speedscope(doc)
    assert {(tid, name, tuple(f.name for f in st)): n for (tid, name, st), n in counts.items()} == {
        (101, "alpha", ("hot", "main")): 2, (101, "alpha", ("main",)): 1,
        (102, "beta", ("hot", "main")): 1}
    with pytest.raises(SamplerError):
        parse_speedscope({"profiles": "nope"})


def test_is_python_for_this_interpreter_and_not_for_init(tmp_path):
    import os
    assert is_python(os.getpid())
