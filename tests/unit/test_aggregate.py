from agent.aggregate import add_counts, add_pieces, fill_sample_counts, new_profile, timeline_pieces
from agent.model import Frame
from agent.timeline import PiecewiseCpu, Slice, ThreadTimeline

F = Frame("f", "/a.py", 1)
G = Frame("g", "/a.py", 2)
MS = 1_000_000


def test_piecewise_cpu_interpolates_and_clamps():
    c = PiecewiseCpu()
    c.add(7, 0, 0)
    c.add(7, 10 * MS, 10 * MS)      # fully busy
    c.add(7, 20 * MS, 10 * MS)      # idle
    assert c.oncpu_ns(7, 0, 10 * MS) == 10 * MS
    assert c.oncpu_ns(7, 5 * MS, 15 * MS) == 5 * MS
    assert c.oncpu_ns(7, 10 * MS, 20 * MS) == 0
    assert c.oncpu_ns(7, -5 * MS, 100 * MS) == 10 * MS
    assert c.oncpu_ns(8, 0, 10 * MS) == 0
    assert c.activity(7, 5 * MS) == 1.0 and c.activity(7, 15 * MS) == 0.0
    assert c.activity(7, 50 * MS) is None


def test_timeline_pieces_and_cpu_values():
    tl = ThreadTimeline(pid=5, tid=6, name="w", slices=[
        Slice(0, 50 * MS, (F,)), Slice(50 * MS, 100 * MS, (G,))])
    c = PiecewiseCpu()
    c.add(6, 0, 0)
    c.add(6, 100 * MS, 100 * MS)
    prof = new_profile(["cpu", "wall"], 100, 0, 100 * MS)
    add_pieces(prof, timeline_pieces([tl], c), c)
    fill_sample_counts(prof)
    assert prof.total("cpu") == 100 * MS and prof.total("wall") == 100 * MS
    assert prof.total("samples") == 10
    by = {s[0].name: v for (s, _l), v in prof.samples.items()}
    assert by["f"][1] == 50 * MS and by["g"][2] == 50 * MS
    labels = {dict(l)["thread_name"] for (_s, l) in prof.samples}
    assert labels == {"w"}


def test_thread_exit_clips_pieces():
    tl = ThreadTimeline(pid=5, tid=6, name="w", slices=[Slice(0, 100 * MS, (F,))])
    c = PiecewiseCpu()
    c.add(6, 0, 0)
    c.mark_exit(6, 40 * MS)
    pieces = list(timeline_pieces([tl], c))
    assert pieces[0].end_ns == 40 * MS


def test_counts_become_samples_and_time():
    prof = new_profile(["cpu"], 100, 0, 1)
    add_counts(prof, {(6, "w", (F,)): 3, (6, "w", ()): 4}, pid=5, type_name="cpu")
    assert prof.total("samples") == 3 and prof.total("cpu") == 30 * MS
    (stack, labels), = prof.samples
    assert dict(labels) == {"pid": 5, "thread_id": 6, "thread_name": "w"}
