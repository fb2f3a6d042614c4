"""probes/btf.py against small BTF blobs built here, byte by byte, from the format in the
kernel's Documentation/bpf/btf.rst."""

from __future__ import annotations

import os
import random
import struct

import pytest

from agent.errors import SpanflameError
from probes import btf
from probes.btf import BtfError, parse_offsets

INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST = range(1, 11)
FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, ENUM64 = 13, 14, 15, 16, 17, 19


class Blob:
    """A BTF builder: ids are handed out in order, starting at 1 (0 is void)."""

    def __init__(self, endian: str = "<") -> None:
        self.e = endian
        self.strings = bytearray(b"\0")
        self.types: list[bytes] = []

    def s(self, name: str) -> int:
        if not name:
            return 0
        off = len(self.strings)
        self.strings += name.encode() + b"\0"
        return off

    def add(self, kind, name="", size_or_type=0, vlen=0, kflag=0, extra=b"") -> int:
        info = (kflag << 31) | (kind << 24) | vlen
        self.types.append(struct.pack(self.e + "III", self.s(name), info, size_or_type) + extra)
        return len(self.types)

    def int_(self, name, size, bits=None, bit_off=0) -> int:
        enc = (bit_off << 16) | (size * 8 if bits is None else bits)
        return self.add(INT, name, size, extra=struct.pack(self.e + "I", enc))

    def struct_(self, name, size, members, kflag=0, kind=STRUCT) -> int:
        """members: (name, type id, bit offset[, bitfield size])."""
        raw = b""
        for m in members:
            mname, mtype, bits, bsize = (*m, 0) if len(m) == 3 else m
            off = (bsize << 24) | bits if kflag else bits
            raw += struct.pack(self.e + "III", self.s(mname), mtype, off)
        return self.add(kind, name, size, len(members), kflag, raw)

    def build(self, magic=0xEB9F) -> bytes:
        types = b"".join(self.types)
        head = struct.pack(self.e + "HBBIIIII", magic, 1, 0, 24, 0, len(types), len(types),
                           len(self.strings))
        return head + types + bytes(self.strings)


def sample(endian: str = "<") -> bytes:
    b = Blob(endian)
    # Kinds with trailing data first: a wrong stride here would shift every later type.
    b.add(ENUM, "color", 4, 2, extra=struct.pack(endian + "IiIi", b.s("RED"), 0, b.s("BLUE"), 1))
    b.add(FUNC_PROTO, "", 0, 2, extra=struct.pack(endian + "IIII", 0, 0, 0, 0))
    b.add(ARRAY, "", 0, extra=struct.pack(endian + "III", 0, 0, 4))
    b.add(VAR, "v", 0, extra=struct.pack(endian + "I", 1))
    b.add(DATASEC, ".data", 8, 1, extra=struct.pack(endian + "III", 4, 0, 4))
    b.add(DECL_TAG, "tag", 0, extra=struct.pack(endian + "i", -1))
    b.add(ENUM64, "big", 8, 1, extra=struct.pack(endian + "III", b.s("X"), 1, 0))
    b.add(FLOAT, "double", 8)
    b.add(FWD, "outer")                               # a declaration only: must be skipped
    t_int = b.int_("int", 4)
    t_long = b.int_("long", 8)
    t_bit1 = b.int_("unsigned int", 4, bits=1)
    n = len(b.types)
    # outer is declared before the types it uses, as in vmlinux.
    t_inner, t_union, t_deep, t_const, t_vol, t_td, t_ptr = range(n + 2, n + 9)
    b.struct_("outer", 48, [("a", t_int, 0), ("in", t_td, 64), ("", t_union, 128),
                            ("bf", t_int, 192, 3), ("after", t_long, 256), ("p", t_ptr, 320)],
              kflag=1)
    b.struct_("inner", 16, [("x", t_int, 0), ("y", t_long, 64)])
    b.struct_("", 8, [("u1", t_int, 0), ("u2", t_long, 0), ("", t_deep, 0)], kind=UNION)
    b.struct_("", 8, [("deep1", t_int, 0), ("deep2", t_int, 32)])
    b.add(CONST, "", t_inner)
    b.add(VOLATILE, "", t_const)
    b.add(TYPEDEF, "inner_t", t_vol)
    b.add(PTR, "", t_inner)
    b.struct_("legacy", 8, [("n", t_int, 0), ("flag", t_bit1, 32)])   # kind_flag 0 bitfield
    loop = len(b.types) + 1
    b.add(TYPEDEF, "loop_t", loop)                                    # typedef of itself
    b.struct_("cyc", 8, [("t", loop, 0)])
    me = len(b.types) + 1
    b.struct_("selfish", 8, [("", me, 0), ("", me, 0)])               # anonymous self-nesting
    b.struct_("", 4, [("w", t_int, 0)], kind=UNION)
    b.struct_("holder", 4, [("w", len(b.types), 0)])                  # after an anonymous union
    return b.build()


def test_offsets_through_typedefs_modifiers_and_anonymous_members():
    got = parse_offsets(sample(), "outer", ["a", "in", "in.x", "in.y", "u1", "u2", "deep1",
                                            "deep2", "after", "p"])
    assert got == {"a": 0, "in": 8, "in.x": 8, "in.y": 16, "u1": 16, "u2": 16, "deep1": 16,
                   "deep2": 20, "after": 32, "p": 40}
    assert parse_offsets(sample(), "inner", ["y"]) == {"y": 8}
    assert parse_offsets(sample(), "holder", ["w"]) == {"w": 0}
    assert parse_offsets(sample(), "legacy", ["n"]) == {"n": 0}


def test_big_endian_blob_reads_the_same():
    assert parse_offsets(sample(">"), "outer", ["deep2", "in.y"]) == {"deep2": 20, "in.y": 16}


@pytest.mark.parametrize("name, path, message", [
    ("outer", "nope", "no member 'nope' in struct outer"),
    ("outer", "in.nope", "no member 'nope' in outer.in"),
    ("outer", "a.b", "outer.a is an int, not a struct or union"),
    ("outer", "p.x", "outer.p is a pointer, not a struct or union"),
    ("outer", "bf", "outer.bf is a bitfield"),
    ("legacy", "flag", "legacy.flag is a bitfield"),
    ("missing", "a", "no struct or union named 'missing'"),
    ("color", "RED", "no struct or union named 'color'"),
    ("cyc", "t.x", "cycle"),
    ("selfish", "x", "cycle"),
])
def test_lookup_errors_name_what_is_wrong(name, path, message):
    with pytest.raises(BtfError, match=message.replace(".", r"\.")) as err:
        parse_offsets(sample(), name, [path])
    assert isinstance(err.value, SpanflameError)


def test_bad_magic_and_version():
    with pytest.raises(BtfError, match="magic 0x1234"):
        parse_offsets(Blob().build(magic=0x1234), "x", ["y"])
    data = bytearray(sample())
    data[2] = 2
    with pytest.raises(BtfError, match="version 2"):
        parse_offsets(bytes(data), "outer", ["a"])


def test_every_truncation_is_a_btf_error():
    data = sample()
    for cut in range(len(data)):
        with pytest.raises(BtfError, match="truncated"):
            parse_offsets(data[:cut], "outer", ["deep2"])


def test_corrupt_bytes_raise_btf_error_or_answer():
    data = sample()
    rng = random.Random(1)
    for _ in range(3000):
        bad = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            bad[rng.randrange(len(bad))] = rng.randrange(256)
        try:
            got = parse_offsets(bytes(bad), "outer", ["in.y", "deep2", "after"])
        except BtfError:
            continue
        assert all(isinstance(v, int) and v >= 0 for v in got.values())


def test_file_lookup_is_cached_by_mtime_and_size(tmp_path):
    path = tmp_path / "vmlinux"
    path.write_bytes(sample())
    assert btf.member_offset("struct outer", "in.y", str(path)) == 16
    assert btf.offsets("outer", ["a", "deep2"], str(path)) == {"a": 0, "deep2": 20}
    b = Blob()
    t_int = b.int_("int", 4)
    b.struct_("outer", 8, [("a", t_int, 0), ("in", t_int, 32)])
    path.write_bytes(b.build())
    os.utime(path, ns=(1, 1))
    assert btf.member_offset("outer", "in", str(path)) == 4
    with pytest.raises(BtfError, match="no BTF at"):
        btf.member_offset("outer", "a", str(tmp_path / "absent"))
