import pytest

from agent.errors import OutputError, UsageError
from agent.model import Frame, Profile
from agent.output import check_writable, output_format, write_profile


def test_format_follows_extension():
    assert output_format("a.pb.gz") == "pprof"
    assert output_format("a.PB") == "pprof-raw"
    assert output_format("x/y.html") == "html"
    assert output_format("a.json") == "speedscope"
    assert output_format("a.txt") == output_format("a.folded") == "folded"
    with pytest.raises(UsageError, match="unknown output format"):
        output_format("a.svg")


def test_check_writable(tmp_path):
    check_writable(tmp_path / "ok.pb.gz")
    assert list(tmp_path.iterdir()) == [], "the probe file is removed"
    with pytest.raises(OutputError, match="does not exist"):
        check_writable(tmp_path / "nope" / "x.pb.gz")
    with pytest.raises(OutputError, match="is a directory"):
        (tmp_path / "d.html").mkdir()
        check_writable(tmp_path / "d.html")
    with pytest.raises(OutputError, match="cannot write"):
        check_writable("/proc/x.pb.gz")


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    p = Profile([("cpu", "nanoseconds")])
    p.add((Frame("f"),), (), {"cpu": 1})
    out = tmp_path / "p.html"
    n = write_profile(p, out)
    assert out.stat().st_size == n > 0
    assert [x.name for x in tmp_path.iterdir()] == ["p.html"]
    with pytest.raises(OutputError):
        write_profile(p, "/proc/p.html")
