"""Line-table decoders against what CPython itself says about the same code objects.

The running 3.11 compiles code in-process; pyenv's 3.10, 3.12 and 3.13 (when present) dump
their tables and co_lines()/co_positions() as JSON from a subprocess. Malformed tables must
decode to "no line" without raising.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import types
from pathlib import Path

import pytest

from probes.pysymbols import CodeLines, decode_linetable_310, decode_linetable_311

PYENV = Path.home() / ".pyenv" / "versions"

SYNTHETIC = {
    # lines above 2**16, and a jump of 100000 lines inside one function (multi-chunk varints)
    "big_lines": "\n" * 70000 + "def f(a, b):\n    x = a\n" + "\n" * 100000
                 + "    return (x +\n            b)\n",
    # lines going backwards: decorators, multi-line calls, loops, handlers, comprehensions
    "backwards": """
import contextlib
@contextlib.contextmanager
def g(
    a,
    b=2,
):
    for i in range(3):
        try:
            y = [j
                 for j in range(i)
                 if j]
        except Exception as exc:
            raise ValueError(
                "x") from exc
        finally:
            z = (1 +
                 2)
    while a:
        break
    with open(__file__) as f:
        pass
    yield lambda q: (q +
        1)

class C:
    attr = 1
    async def m(self, other):
        async with other:
            await other.thing(self,
                              1)
        return [x async for x in other]
""",
    # columns beyond what short forms hold: long-form entries
    "wide": "def w():\n    return " + " + ".join(f"v{i}" for i in range(200)) + "\n",
    # a long straight-line body: entries split at 8 code units
    "long_body": "def b():\n" + "".join(f"    a{i} = {i}\n" for i in range(3000)),
}

DUMPER = r"""
import importlib, json, sys, types
sources = json.load(sys.stdin)
for mod in ("threading", "json.decoder", "argparse", "inspect", "dataclasses"):
    path = importlib.import_module(mod).__file__
    sources[mod] = open(path).read()
def walk(code):
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from walk(const)
out = []
for name, src in sources.items():
    for code in walk(compile(src, name, "exec")):
        item = {"where": name + ":" + code.co_name, "first": code.co_firstlineno,
                "table": code.co_linetable.hex(), "lines": list(code.co_lines())}
        if hasattr(code, "co_positions"):
            item["positions"] = [p[0] for p in code.co_positions()]
        out.append(item)
json.dump(out, sys.stdout)
"""


def merged(ranges):
    """(start, end, line) ranges with consecutive same-line ranges joined (co_lines in 3.10
    does not join them, 3.11+ does)."""
    out = []
    for start, end, line in ranges:
        if out and out[-1][2] == line and out[-1][1] == start:
            out[-1] = (out[-1][0], end, line)
        else:
            out.append((start, end, line))
    return out


def check_code(where, first, table, lines, positions, legacy):
    """Compare our decoder with co_lines() (byte ranges) and co_positions() (per code unit)."""
    decoded = (decode_linetable_310 if legacy else decode_linetable_311)(table, first)
    assert decoded is not None, where
    ours = [(s * 2, e * 2, line) for s, e, line in decoded]
    assert merged(ours) == merged([tuple(r) for r in lines]), where
    lookup = CodeLines("f", "file.py", first, decoded)
    for unit, line in enumerate(positions or ()):
        assert lookup.at(unit).line == (line or 0), (where, unit)
    for start, end, line in lines:
        for unit in {start // 2, (end - 1) // 2}:
            assert lookup.at(unit).line == (line or 0), (where, unit)
    assert lookup.at(-1).line == first and lookup.at(10**9).line == first


def code_objects(source: str, name: str):
    def walk(code):
        yield code
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                yield from walk(const)
    return list(walk(compile(source, name, "exec")))


def corpus_311():
    import argparse, dataclasses, inspect, json.decoder, threading  # noqa: E401
    sources = dict(SYNTHETIC)
    for mod in (threading, json.decoder, argparse, inspect, dataclasses):
        sources[mod.__name__] = Path(mod.__file__).read_text()
    return [c for name, src in sources.items() for c in code_objects(src, name)]


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="the in-process corpus is 3.11's")
def test_in_process_311_tables_match_co_lines_and_co_positions():
    codes = corpus_311()
    assert len(codes) > 500
    entry_codes, max_line, no_line = set(), 0, 0
    for code in codes:
        positions = [p[0] for p in code.co_positions()]
        check_code(code.co_name, code.co_firstlineno, code.co_linetable, list(code.co_lines()),
                   positions, legacy=False)
        entry_codes.update(b >> 3 & 15 for b in code.co_linetable if b & 0x80)
        max_line = max([max_line] + [p for p in positions if p])
        no_line += positions.count(None)
    # the corpus exercises every entry form, lines above 2**16 and no-location entries
    assert entry_codes == set(range(16))
    assert max_line > 170000 and no_line > 0


@pytest.mark.parametrize("version", ["3.10.13", "3.12.1", "3.13.0"])
def test_other_interpreters_tables(version):
    python = PYENV / version / "bin" / "python"
    if not python.exists():
        pytest.skip(f"{python} is not installed")
    res = subprocess.run([str(python), "-c", DUMPER], input=json.dumps(SYNTHETIC),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    items = json.loads(res.stdout)
    assert len(items) > 500
    legacy = version.startswith("3.10")
    for item in items:
        check_code(item["where"], item["first"], bytes.fromhex(item["table"]), item["lines"],
                   item.get("positions"), legacy)
    lines = [r[2] for item in items for r in item["lines"]]
    assert max(line or 0 for line in lines) > 170000
    assert None in lines or legacy  # 3.10 marks no-line ranges only in rare code


def test_truncated_tables_give_no_line_and_never_raise():
    for code in code_objects(SYNTHETIC["backwards"] + SYNTHETIC["wide"], "t")[:20]:
        table = code.co_linetable
        for cut in range(len(table)):
            decoded = decode_linetable_311(table[:cut], code.co_firstlineno)
            if decoded is not None:  # a cut between entries is a valid shorter table
                assert sum(e - s for s, e, _ in decoded) <= len(code.co_code) // 2
            lookup = CodeLines("f", "t", code.co_firstlineno, decoded)
            assert isinstance(lookup.at(3).line, int)
            decode_linetable_310(table[:cut], code.co_firstlineno)


def test_malformed_tables():
    # an entry must start with bit 7 set
    assert decode_linetable_311(b"\x01\x02", 1) is None
    # a varint that never ends (and would otherwise build a huge number)
    assert decode_linetable_311(b"\xe8" + b"\x7f" * 10000, 1) is None
    # long form cut inside its column varints
    assert decode_linetable_311(b"\xf0\x02\x00", 1) is None
    # unreadable table: known name and file, line 0 inside the code, first line outside
    lookup = CodeLines("f", "t.py", 7, None)
    assert lookup.at(5) == ("f", "t.py", 0) and lookup.at(-1).line == 7
    # 3.10: odd length ignores the last byte; no-line entries give None
    assert decode_linetable_310(b"\x04\x01\x02\x80\x07", 10) == [(0, 2, 11), (2, 3, None)]


def test_garbage_never_raises():
    rng = random.Random(1234)
    for _ in range(3000):
        table = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 64)))
        first = rng.randrange(-5, 2**31)
        for decoded in (decode_linetable_311(table, first), decode_linetable_310(table, first)):
            lookup = CodeLines("f", "t", first, decoded)
            for unit in (-3, 0, 1, 7, 100, 2**40):
                assert isinstance(lookup.at(unit).line, int)
