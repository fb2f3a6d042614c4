"""Self-contained interactive flame graph HTML (inline JS and CSS, no network).

Profile strings are untrusted. They travel as JSON inside a `<script type="application/json">`
element with `<`, `>` and `&` escaped, and the page's script only puts them into the DOM as text.
"""

from __future__ import annotations

import html
import json
from functools import lru_cache
from importlib import resources
from typing import Sequence

from agent.model import Profile
from flamegraph.calltree import Node, Paths, profile_tree

#: Subtrees smaller than this share of the total are folded into their parent.
DEFAULT_MIN_FRACTION = 1e-4
#: Bound on untrusted names, in characters.
MAX_NAME_CHARS = 300


class _Strings:
    def __init__(self) -> None:
        self.index: dict[str, int] = {}
        self.table: list[str] = []

    def __call__(self, s: str) -> int:
        if len(s) > MAX_NAME_CHARS:
            s = s[: MAX_NAME_CHARS - 1] + "…"
        i = self.index.get(s)
        if i is None:
            i = self.index[s] = len(self.table)
            self.table.append(s)
        return i


def _compact(root: Node, st: _Strings, base: Node | None = None) -> list:
    """Node -> [name, file, line, total, self, pruned, children(, baseline total)], children
    sorted by name. With `base` (a baseline tree), each node also carries the baseline's total at
    the same path (0 where the baseline never went), for diff flame graphs.

    Iterative, so that deep stacks cannot hit the recursion limit.
    """
    def entry(n: Node, b: Node | None) -> list:
        e = [st(n.name), st(n.filename), n.line, n.total, n.self_value, n.pruned, []]
        if base is not None:
            e.append(b.total if b is not None else 0)
        return e

    top = entry(root, base)
    todo = [(root, base, top)]
    while todo:
        node, bnode, arr = todo.pop()
        for key in sorted(node.children):
            child = node.children[key]
            bchild = bnode.children.get(key) if bnode is not None else None
            carr = entry(child, bchild)
            arr[6].append(carr)
            todo.append((child, bchild, carr))
    return top


def flamegraph_data(profile: Profile, *, types: Sequence[str] | None = None,
                    default_type: str | None = None, title: str = "", subtitle: str = "",
                    min_fraction: float = DEFAULT_MIN_FRACTION, top: int = 30,
                    baseline: Profile | None = None, baseline_scale: float = 1.0) -> dict:
    """The JSON document the flame graph script renders (see flamegraph.js for its shape).

    With `baseline`, every node also carries the baseline's value at its path times
    `baseline_scale` (e.g. 1/N to compare one span with the average of N others): a diff.
    """
    chosen = [t for t in profile.sample_types if types is None or t.name in types]
    if types is None:
        # `samples/count` duplicates the time types; show it only when it is all there is.
        rest = [t for t in chosen if t.name != "samples"]
        chosen = rest or chosen
    per_type = [(t.name, t.unit, Paths().add_stacks(
        (stack, v) for stack, _l, v in profile.iter_type(t.name))) for t in chosen]
    bases = None
    if baseline is not None:
        bases = {}
        for t in chosen:
            base = profile_tree(baseline, t.name) if baseline.has_type(t.name) else Node("all")
            if baseline_scale != 1.0:
                _scale(base, baseline_scale)
            bases[t.name] = base
    return flamegraph_data_paths(per_type, default_type=default_type or profile.primary_type(),
                                 title=title, subtitle=subtitle, min_fraction=min_fraction,
                                 top=top, baselines=bases)


def flamegraph_data_paths(types: Sequence[tuple[str, str, Paths]], *, default_type: str = "",
                          title: str = "", subtitle: str = "",
                          min_fraction: float = DEFAULT_MIN_FRACTION, top: int = 30,
                          baselines: dict[str, Node] | None = None) -> dict:
    """The document from (name, unit, Paths) per sample type: one Paths gives both the tree
    and the top functions. `flamegraph_data` builds the Paths from a Profile; views that need
    no labels fill them straight from pprof (agent.pprof.decode_paths). With `baselines`
    (type -> baseline tree), a diff."""
    st = _Strings()
    out_types = []
    for name, unit, paths in types:
        tree = paths.tree(min_fraction=min_fraction)
        base = baselines.get(name) if baselines is not None else None
        fstats = [f for f in paths.top(top) if f.self_value]
        out_types.append({
            "name": name,
            "unit": unit,
            "total": tree.total,
            "baseline_total": base.total if base is not None else None,
            "tree": _compact(tree, st, base),
            "top": [[st(f.name), st(f.filename), f.line, f.self_value, f.total] for f in fstats],
        })
    default = default_type
    if out_types and default not in [t["name"] for t in out_types]:
        default = out_types[0]["name"]
    return {"title": title[:500], "subtitle": subtitle[:1000], "default": default,
            "strings": st.table, "types": out_types, "diff": baselines is not None}


def _scale(node: Node, k: float) -> None:
    todo = [node]
    while todo:
        n = todo.pop()
        n.total = round(n.total * k)
        n.self_value = round(n.self_value * k)
        todo.extend(n.children.values())


def dumps(data: object) -> str:
    """Compact JSON of a document of dicts, lists, strings and numbers, however deep.

    json's encoder recurses once per level and gives up near the interpreter's recursion limit;
    a flame graph tree is two levels per frame, so stacks of a few hundred frames need more.
    Documents it cannot write go through an explicit stack instead (slower, same text).
    """
    try:
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except RecursionError:
        return _dumps_iterative(data)


class _Raw:
    """Text the iterative encoder writes as is (brackets, separators, keys)."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


_END_LIST, _END_DICT, _COMMA = _Raw("]"), _Raw("}"), _Raw(",")


def _dumps_iterative(data: object) -> str:
    enc = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode
    out: list[str] = []
    todo: list = [data]
    while todo:
        item = todo.pop()
        if type(item) is _Raw:
            out.append(item.text)
        elif isinstance(item, dict):
            out.append("{")
            todo.append(_END_DICT)
            pairs = list(item.items())
            for i in range(len(pairs) - 1, -1, -1):  # pushed last first: popped in order
                k, v = pairs[i]
                todo.append(v)
                todo.append(_Raw(("," if i else "") + enc(str(k)) + ":"))
        elif isinstance(item, (list, tuple)):
            out.append("[")
            todo.append(_END_LIST)
            for i in range(len(item) - 1, -1, -1):
                todo.append(item[i])
                if i:
                    todo.append(_COMMA)
        else:
            out.append(enc(item))
    return "".join(out)


def script_json(data: object) -> str:
    """JSON safe to embed in a <script> element: no `</script>`, no `<!--`, no entity tricks."""
    text = dumps(data)
    return (text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


@lru_cache(maxsize=None)
def asset(name: str) -> str:
    return resources.files("flamegraph").joinpath("static", name).read_text(encoding="utf-8")


def render_html(profile: Profile, *, title: str = "spanflame", subtitle: str = "",
                default_type: str | None = None, types: Sequence[str] | None = None,
                min_fraction: float = DEFAULT_MIN_FRACTION) -> str:
    """One HTML page that shows `profile` as an interactive flame graph, offline."""
    data = flamegraph_data(profile, types=types, default_type=default_type, title=title,
                           subtitle=subtitle, min_fraction=min_fraction)
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
        "style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:\">"
        f"<title>{html.escape(title[:200])}</title>"
        f"<style>{asset('flamegraph.css')}</style></head>\n<body>\n"
        "<div id=\"flamegraph\"></div>\n"
        f"<script type=\"application/json\" id=\"spanflame-data\">{script_json(data)}</script>\n"
        f"<script>{asset('flamegraph.js')}</script>\n"
        "<script>window.flamegraph = SpanflameFlamegraph.create(document.getElementById('flamegraph'),"
        " JSON.parse(document.getElementById('spanflame-data').textContent));</script>\n"
        "</body></html>\n"
    )
