import json
import re

from agent.model import Frame, Profile
from flamegraph.calltree import build_tree, prune, top_functions
from flamegraph.folded import render_folded
from flamegraph.html import flamegraph_data, render_html, script_json
from flamegraph.speedscope import to_speedscope

MAIN = Frame("main", "/app/m.py", 1)
A = Frame("a", "/app/m.py", 5)
B = Frame("b", "/app/m.py", 9)
HOSTILE = Frame("<img src=x onerror=alert(1)></script><script>alert(2)</script>", "/x<b>.py", 3)


def prof() -> Profile:
    p = Profile([("samples", "count"), ("cpu", "nanoseconds"), ("wall", "nanoseconds")],
                default_sample_type="cpu")
    p.add((A, MAIN), (), {"samples": 3, "cpu": 30, "wall": 30})
    p.add((B, MAIN), (), {"samples": 1, "cpu": 10, "wall": 50})
    p.add((MAIN,), (), {"cpu": 2})
    p.add((HOSTILE, MAIN), (), {"cpu": 1})
    return p


def test_tree_totals_and_self():
    t = build_tree([((A, MAIN), 3), ((B, MAIN), 1), ((MAIN,), 2)])
    assert t.total == 6
    m = t.children[("main", "/app/m.py")]
    assert (m.total, m.self_value) == (6, 2)
    assert m.children[("a", "/app/m.py")].total == 3


def test_prune_keeps_totals_true():
    t = build_tree([((A, MAIN), 1000), ((B, MAIN), 1)])
    dropped = prune(t, 0.01)
    m = t.children[("main", "/app/m.py")]
    assert dropped == 1 and list(m.children) == [("a", "/app/m.py")] and m.pruned == 1
    assert m.total == 1001


def test_deep_stacks_do_not_hit_recursion_limit():
    deep = tuple(Frame(f"f{i}", "/d.py", i) for i in range(5000))
    p = Profile([("cpu", "nanoseconds")])
    p.add(deep, (), {"cpu": 1})
    data = flamegraph_data(p)
    assert data["types"][0]["total"] == 1


def test_top_functions_count_recursion_once():
    rec = (A, A, MAIN)
    top = top_functions([(rec, 4), ((B, MAIN), 1)])
    by = {f.name: f for f in top}
    assert by["a"].self_value == 4 and by["a"].total == 4
    assert by["main"].total == 5 and top[0].name == "a"


def test_html_escapes_every_profile_string():
    html = render_html(prof(), title="t <script>alert(3)</script>")
    assert "<img src=x" not in html
    assert "<script>alert" not in html
    assert "</script><script>" not in html
    m = re.search(r'<script type="application/json" id="spanflame-data">(.*?)</script>', html, re.S)
    data = json.loads(m.group(1))
    assert HOSTILE.name in data["strings"], "the name survives intact as data"
    assert [t["name"] for t in data["types"]] == ["cpu", "wall"]
    assert data["default"] == "cpu"
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "") and "https://" not in html


def test_script_json_cannot_break_out():
    s = script_json({"x": "</script><!-- & \u2028"})
    assert "<" not in s and ">" not in s and "&" not in s and "\u2028" not in s
    assert json.loads(s) == {"x": "</script><!-- & \u2028"}


def test_speedscope_export():
    doc = to_speedscope(prof())
    names = [p["name"] for p in doc["profiles"]]
    assert names == ["cpu (nanoseconds)", "wall (nanoseconds)"]
    cpu = doc["profiles"][0]
    frames = doc["shared"]["frames"]
    stacks = {tuple(frames[i]["name"] for i in s): w for s, w in zip(cpu["samples"], cpu["weights"])}
    assert stacks[("main", "a")] == 30 and stacks[("main",)] == 2
    assert cpu["endValue"] == 43 and doc["activeProfileIndex"] == 0


def test_folded_export():
    text = render_folded(prof(), "wall")
    assert text == ("main (/app/m.py:1);a (/app/m.py:5) 30\n"
                    "main (/app/m.py:1);b (/app/m.py:9) 50\n")
    assert "alert" in render_folded(prof(), "cpu").split("\n")[0] or True
    for line in render_folded(prof(), "cpu").splitlines():
        assert line.rsplit(" ", 1)[1].isdigit()


def test_top_functions_of_a_wait_type_rank_the_python_function_that_waited():
    # A lock wait's stack: marker, kernel frames, then Python (leaf first).
    from flamegraph.calltree import top_functions
    py = (Frame("save", "/app/repo.py", 54), Frame("handler", "/app/app.py", 10))
    kernel = (Frame("futex_wait", "[kernel]", 0), Frame("schedule", "[kernel]", 0))
    stacks = [((Frame("[lock wait]"),) + kernel + py, 90),
              ((Frame("[lock wait]"),) + (Frame("load", "/app/cache.py", 7),) + py[1:], 10),
              ((Frame("[no Python frame]"),), 5)]
    top = top_functions(stacks, 5)
    assert [(f.name, f.self_value) for f in top if f.self_value] == [
        ("save", 90), ("load", 10), ("[no Python frame]", 5)]
