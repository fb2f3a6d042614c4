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


class Paths:
    """Root-first paths of function ids, with values: what trees are built from.

    A function is (name, file); the line kept is the first one seen. Fill it from leaf-first
    stacks of Frames (`add_stacks`) or straight from pprof (`agent.pprof.decode_paths`, which
    skips building a Profile).
    """

    __slots__ = ("keys", "info", "paths")

    def __init__(self) -> None:
        self.keys: dict[tuple[str, str], int] = {}
        self.info: list[Frame] = []
        self.paths: dict[tuple[int, ...], int] = {}

    def fid(self, name: str, filename: str = "", line: int = 0) -> int:
        k = (name, filename)
        i = self.keys.get(k)
        if i is None:
            i = self.keys[k] = len(self.info)
            self.info.append(Frame(name, filename, line))
        return i

    def add(self, path: tuple[int, ...], value: int) -> None:
        self.paths[path] = self.paths.get(path, 0) + value

    def add_stacks(self, samples: Iterable[tuple[Stack, int]]) -> "Paths":
        paths = self.paths
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
                        fid[f] = self.fid(f[0], f[1], f[2])
                t = tuple(map(lookup, reversed(stack)))
            paths[t] = paths.get(t, 0) + value
        return self

    def scale(self, k: float) -> None:
        for p, v in self.paths.items():
            self.paths[p] = round(v * k)

    def tree(self, root_name: str = "all", min_fraction: float = 0.0) -> Node:
        """The call tree. With `min_fraction`, subtrees below that share of the total are
        folded into their parent's `pruned` value (totals stay true). Paths are sorted, so that
        every subtree is a contiguous range: a subtree's total is a difference of prefix sums,
        and pruned subtrees cost one scan and no allocation."""
        info = self.info
        items = sorted(self.paths.items())
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

    def top(self, limit: int = 20) -> list["FunctionStat"]:
        """Functions by self value (then name); `total` counts each function once per stack
        (recursion-safe). Functions that are never a leaf fill the list only when fewer than
        `limit` functions have self time. Totals are summed for the chosen functions only.

        Self time goes to the innermost *Python* function of a stack: a wait's stack ends in
        a marker (`[lock wait]`) and kernel frames, and the question is which Python function
        waited. Stacks with no Python frame keep their leaf."""
        info = self.info
        py = [bool(f[1]) and not f[1].startswith("[") for f in info]
        self_v: dict[int, int] = {}
        for p, v in self.paths.items():
            if p and v:
                leaf = p[-1]
                if not py[leaf]:
                    leaf = next((i for i in reversed(p) if py[i]), leaf)
                self_v[leaf] = self_v.get(leaf, 0) + v
        order = sorted(self_v, key=lambda i: (-self_v[i], info[i][0], info[i][1]))[:limit]
        if len(order) < limit:  # callers with no self time, by total
            rest: dict[int, int] = {}
            for p, v in self.paths.items():
                for i in set(p).difference(self_v):
                    rest[i] = rest.get(i, 0) + v
            order += sorted(rest, key=lambda i: (-rest[i], info[i][0], info[i][1]))[
                : limit - len(order)]
        wanted = set(order)
        total_v = dict.fromkeys(order, 0)
        for p, v in self.paths.items():
            for i in wanted.intersection(p):
                total_v[i] += v
        return [FunctionStat(info[i][0], info[i][1], info[i][2], self_v.get(i, 0), total_v[i])
                for i in order]


def build_tree(samples: Iterable[tuple[Stack, int]], root_name: str = "all",
               min_fraction: float = 0.0) -> Node:
    """Merge (leaf-first stack, value) pairs into a tree rooted at `root_name` (see
    `Paths.tree` for `min_fraction`)."""
    return Paths().add_stacks(samples).tree(root_name, min_fraction)


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
    """Functions by self value from (leaf-first stack, value) pairs (see `Paths.top`)."""
    return Paths().add_stacks(samples).top(limit)
