"""The call-tree model every renderer reads: built from a Profile for one sample type.

Nodes merge by function (name and file); the line kept is the first one seen. Parsing (pprof,
folded) stays apart from rendering. Trees are built from sorted paths so that large profiles stay
cheap: only nodes above the pruning threshold become `Node` objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from agent.model import Frame, Profile, Stack


@dataclass(slots=True)
class Node:
    name: str
    filename: str = ""
    line: int = 0
    total: int = 0
    self_value: int = 0
    pruned: int = 0
    children: dict[tuple[str, str], "Node"] = field(default_factory=dict)

    def count(self) -> int:
        """Nodes in this subtree (iterative: stacks can be deeper than the recursion limit)."""
        n, todo = 0, [self]
        while todo:
            node = todo.pop()
            n += 1
            todo.extend(node.children.values())
        return n


def build_tree(samples: Iterable[tuple[Stack, int]], root_name: str = "all",
               min_fraction: float = 0.0) -> Node:
    """Merge (leaf-first stack, value) pairs into a tree rooted at `root_name`.

    With `min_fraction`, subtrees below that share of the total are folded into their parent's
    `pruned` value (totals stay true). Stacks become root-first paths of function ids, sorted, so
    that every subtree is a contiguous range: a subtree's total is a difference of prefix sums,
    and pruned subtrees cost one scan and no allocation.
    """
    keys: dict[tuple[str, str], int] = {}
    info: list[Frame] = []
    paths: dict[tuple[int, ...], int] = {}
    fid: dict[Frame, int] = {}  # frame -> function id (frames differing in line share one)
    lookup = fid.__getitem__
    for stack, value in samples:
        if not value:
            continue
        try:
            t = tuple(map(lookup, reversed(stack)))
        except KeyError:
            for f in stack:
                if f not in fid:
                    k = (f[0], f[1])
                    i = keys.get(k)
                    if i is None:
                        i = keys[k] = len(info)
                        info.append(f)
                    fid[f] = i
            t = tuple(map(lookup, reversed(stack)))
        paths[t] = paths.get(t, 0) + value
    items = sorted(paths.items())
    ps = [k for k, _ in items]
    pref = [0]
    acc = 0
    for _, v in items:
        acc += v
        pref.append(acc)
    limit = acc * min_fraction
    root = Node(root_name, total=acc)
    todo = [(0, len(ps), 0, root)]
    while todo:
        lo, hi, d, node = todo.pop()
        i = lo
        while i < hi and len(ps[i]) == d:  # stacks ending here (shorter paths sort first)
            node.self_value += pref[i + 1] - pref[i]
            i += 1
        while i < hi:
            key = ps[i][d]
            j = i + 1
            while j < hi and ps[j][d] == key:
                j += 1
            total = pref[j] - pref[i]
            if total < limit:
                node.pruned += total
            else:
                f = info[key]
                child = Node(f[0], f[1], f[2], total)
                node.children[(f[0], f[1])] = child
                todo.append((i, j, d + 1, child))
            i = j
    return root


def profile_tree(profile: Profile, type_name: str, min_fraction: float = 0.0) -> Node:
    return build_tree(((stack, v) for stack, _labels, v in profile.iter_type(type_name)),
                      min_fraction=min_fraction)


def prune(root: Node, min_fraction: float = 1e-4) -> int:
    """Drop subtrees whose total is below `min_fraction` of the root's; returns nodes dropped.

    A dropped subtree's value moves to its parent's `pruned` so that totals stay true.
    """
    limit = root.total * min_fraction
    dropped = 0
    stack = [root]
    while stack:
        node = stack.pop()
        keep = {}
        for key, ch in node.children.items():
            if ch.total < limit:
                node.pruned += ch.total
                dropped += ch.count()
            else:
                keep[key] = ch
                stack.append(ch)
        node.children = keep
    return dropped


@dataclass(frozen=True, slots=True)
class FunctionStat:
    name: str
    filename: str
    line: int
    self_value: int
    total: int


def top_functions(samples: Iterable[tuple[Stack, int]], limit: int = 20) -> list[FunctionStat]:
    """Functions by self value (then name); `total` counts each function once per stack
    (recursion-safe). Functions that are never a leaf fill the list only when fewer than
    `limit` functions have self time.

    Totals are computed for the chosen functions only: one pass over the stacks with a set
    lookup per frame, instead of a dictionary update per frame of every function.
    """
    per_stack: dict[Stack, int] = {}
    for stack, value in samples:
        if value and stack:
            per_stack[stack] = per_stack.get(stack, 0) + value
    self_v: dict[tuple[str, str], int] = {}
    for stack, value in per_stack.items():
        leaf = stack[0]
        k = (leaf.name, leaf.filename)
        self_v[k] = self_v.get(k, 0) + value
    order = sorted(self_v, key=lambda k: (-self_v[k], k))[:limit]
    if len(order) < limit:  # callers with no self time, by total
        rest: dict[tuple[str, str], int] = {}
        for stack, value in per_stack.items():
            for fk in {(f.name, f.filename) for f in stack} - self_v.keys():
                rest[fk] = rest.get(fk, 0) + value
        order += sorted(rest, key=lambda k: (-rest[k], k))[: limit - len(order)]
    wanted = set(order)
    names = {k[0] for k in wanted}
    total_v = dict.fromkeys(order, 0)
    lines: dict[tuple[str, str], int] = {}
    for stack, value in per_stack.items():
        seen = None
        for f in stack:
            if f.name in names:
                k = (f.name, f.filename)
                if k in wanted and (seen is None or k not in seen):
                    if seen is None:
                        seen = set()
                    seen.add(k)
                    total_v[k] += value
                    if k not in lines:
                        lines[k] = f.line
    return [FunctionStat(k[0], k[1], lines.get(k, 0), self_v.get(k, 0), total_v[k])
            for k in order]
