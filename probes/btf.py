"""Kernel struct member offsets from BTF, for BPF programs that must read kernel structs.

bcc compiles against whatever header tree we found (often an older Debian one), so a struct
offset compiled into BPF C can be wrong for the running kernel. The kernel describes its own
types in `/sys/kernel/btf/vmlinux` (format: the kernel's Documentation/bpf/btf.rst); we read the
offsets there and pass them to the C as `-D` constants.

The reader is built for one cold lookup at startup: one pass over the type section records where
each type starts (a compact `array`, no object per type); names are read only for the struct we
look for and for the members we walk. Results are cached per process, keyed by the file's path,
size and mtime. Split (module) BTF is not supported: its type ids refer to the base vmlinux BTF.
"""

from __future__ import annotations

import functools
import os
import struct
from array import array

from agent.errors import SpanflameError

VMLINUX = "/sys/kernel/btf/vmlinux"
MAX_BYTES = 64 << 20        # vmlinux BTF is ~5 MiB; refuse anything absurd
_MAX_HOPS = 64              # typedef/const/volatile chains
_MAX_MEMBERS = 1 << 16      # members visited looking through anonymous structs, per lookup

_MAGIC = 0xEB9F
_INT, _STRUCT, _UNION, _TYPEDEF, _VOLATILE, _CONST, _RESTRICT, _TYPE_TAG = 1, 4, 5, 8, 9, 10, 11, 18
_MODIFIERS = frozenset((_TYPEDEF, _VOLATILE, _CONST, _RESTRICT, _TYPE_TAG))
_KIND_NAMES = ("void", "int", "pointer", "array", "struct", "union", "enum", "forward declaration",
               "typedef", "volatile", "const", "restrict", "function", "function prototype",
               "variable", "data section", "float", "declaration tag", "type tag", "enum64")
# Bytes that follow the 12-byte `struct btf_type`, per kind: (fixed, per vlen entry).
_EXTRA = ((0, 0), (4, 0), (0, 0), (12, 0), (0, 12), (0, 12), (0, 8), (0, 0), (0, 0), (0, 0),
          (0, 0), (0, 0), (0, 0), (0, 8), (4, 0), (0, 12), (0, 0), (4, 0), (0, 0), (0, 12))


class BtfError(SpanflameError):
    """BTF that is missing, corrupt, or lacks the struct or member asked for."""


class _Btf:
    """One BTF blob: header checked, type start offsets indexed, everything else lazy."""

    def __init__(self, data: bytes) -> None:
        if len(data) < 24:
            raise BtfError(f"BTF truncated: {len(data)} bytes, shorter than its header")
        magic = struct.unpack_from("<H", data)[0]
        if magic == _MAGIC:
            e = "<"
        elif magic == 0x9FEB:
            e = ">"
        else:
            raise BtfError(f"not BTF: magic {magic:#06x}, expected {_MAGIC:#06x}")
        version, _flags, hdr_len, t_off, t_len, s_off, s_len = struct.unpack_from(
            e + "BBIIIII", data, 2)
        if version != 1:
            raise BtfError(f"unsupported BTF version {version}")
        if hdr_len < 24 or hdr_len > len(data):
            raise BtfError(f"BTF header length {hdr_len} is invalid")
        for what, off, size in (("type", t_off, t_len), ("string", s_off, s_len)):
            if hdr_len + off + size > len(data):
                raise BtfError(f"BTF truncated: {what} section ends at byte {hdr_len + off + size}"
                               f", file has {len(data)}")
        self.data, self.e = data, e
        self.t_start, self.t_end = hdr_len + t_off, hdr_len + t_off + t_len
        self.s_start, self.s_end = hdr_len + s_off, hdr_len + s_off + s_len
        self._head = struct.Struct(e + "III").unpack_from
        self.offs = array("I", [0])       # offs[type id] = byte offset of that type; id 0 is void

    def index(self, want: str) -> int:
        """Index every type once; the id of the first struct/union named `want` (0: none)."""
        data, head, offs, extra = self.data, self._head, self.offs, _EXTRA
        append = offs.append
        target = want.encode() + b"\0"
        s_start, s_end, t_end = self.s_start, self.s_end, self.t_end
        found = 0
        pos = self.t_start
        while pos < t_end:
            if pos + 12 > t_end:
                raise BtfError(f"BTF truncated: type {len(offs)} header at byte {pos} runs past "
                               f"the type section")
            append(pos)
            name_off, info, _size = head(data, pos)
            kind = (info >> 24) & 0x1F
            if kind >= len(extra):
                raise BtfError(f"BTF type {len(offs) - 1} has unknown kind {kind}")
            fixed, per = extra[kind]
            if (kind == _STRUCT or kind == _UNION) and not found and \
                    data.startswith(target, s_start + name_off, s_end):
                found = len(offs) - 1
            pos += 12 + fixed + per * (info & 0xFFFF)
        if pos != t_end:
            raise BtfError(f"BTF truncated: the last type runs {pos - t_end} bytes past the "
                           f"type section")
        return found

    def name(self, off: int) -> str:
        start = self.s_start + off
        end = self.data.find(b"\0", start, self.s_end)
        if off >= self.s_end - self.s_start or end < 0:
            raise BtfError(f"BTF string offset {off} is outside the string section")
        return self.data[start:end].decode("utf-8", "replace")

    def type(self, tid: int) -> tuple[int, int, int, int, int]:
        """(kind, kind_flag, vlen, size_or_type, byte offset) of type `tid`."""
        if not 0 < tid < len(self.offs):
            raise BtfError(f"BTF type id {tid} is out of range (1..{len(self.offs) - 1})")
        pos = self.offs[tid]
        _name, info, size = self._head(self.data, pos)
        return (info >> 24) & 0x1F, info >> 31, info & 0xFFFF, size, pos

    def strip(self, tid: int) -> int:
        """Follow typedef/const/volatile/restrict/type-tag links to the underlying type id."""
        for _ in range(_MAX_HOPS):
            if tid == 0:
                return 0
            kind, _kf, _vlen, ref, _pos = self.type(tid)
            if kind not in _MODIFIERS:
                return tid
            tid = ref
        raise BtfError(f"BTF type chain longer than {_MAX_HOPS} links (a cycle?)")

    def kind_name(self, tid: int) -> str:
        return _KIND_NAMES[self.type(tid)[0]] if tid else "void"

    def member(self, tid: int, wanted: str):
        """(bit offset, bitfield size, type id) of member `wanted` of struct/union `tid`,
        looking inside anonymous struct/union members; None when absent."""
        todo, budget = [(tid, 0)], _MAX_MEMBERS    # the budget bounds corrupt (cyclic) nesting
        while todo:
            sid, base = todo.pop()
            _kind, kflag, vlen, _size, pos = self.type(sid)
            budget -= vlen
            if budget < 0:
                raise BtfError(f"BTF type {tid} nests over {_MAX_MEMBERS} members (a cycle?)")
            for name_off, mtype, moff in struct.iter_unpack(
                    self.e + "III", self.data[pos + 12:pos + 12 + 12 * vlen]):
                bits, bsize = (moff & 0xFFFFFF, moff >> 24) if kflag else (moff, 0)
                if name_off and self.name(name_off) == wanted:
                    return base + bits, bsize, mtype
                if not name_off:
                    inner = self.strip(mtype)
                    if inner and self.type(inner)[0] in (_STRUCT, _UNION):
                        todo.append((inner, base + bits))
        return None

    def is_int_bitfield(self, tid: int) -> bool:
        """kind_flag=0 encodes a bitfield as an int narrower than its size, or shifted."""
        tid = self.strip(tid)
        if not tid:
            return False
        kind, _kf, _vlen, size, pos = self.type(tid)
        if kind != _INT:
            return False
        enc = struct.unpack_from(self.e + "I", self.data, pos + 12)[0]
        return (enc & 0xFF) != size * 8 or (enc >> 16) & 0xFF != 0

    def offset(self, root: int, struct_name: str, path: str) -> int:
        tid, bits, walked = root, 0, struct_name
        for part in path.split("."):
            inner = self.strip(tid)
            if not inner or self.type(inner)[0] not in (_STRUCT, _UNION):
                kind = self.kind_name(inner)
                article = "an" if kind[0] in "aeiou" else "a"
                raise BtfError(f"{walked} is {article} {kind}, not a struct or union: "
                               f"cannot look up {part!r} in it")
            hit = self.member(inner, part)
            if hit is None:
                where = f"struct {walked}" if walked == struct_name else walked
                raise BtfError(f"no member {part!r} in {where}")
            mbits, bsize, tid = hit
            bits += mbits
            walked = f"{walked}.{part}"
            if bsize or self.is_int_bitfield(tid) or bits % 8:
                raise BtfError(f"{walked} is a bitfield (bit offset {bits}): it has no byte offset")
        return bits // 8


def parse_offsets(data: bytes, struct_name: str, paths: list[str]) -> dict[str, int]:
    """Byte offsets of `paths` (dot-separated members) within `struct_name`, from a BTF blob."""
    try:
        btf = _Btf(data)
        root = btf.index(struct_name)
        if not root:
            raise BtfError(f"no struct or union named {struct_name!r} in BTF")
        return {p: btf.offset(root, struct_name, p) for p in paths}
    except (struct.error, IndexError, ValueError, OverflowError) as err:
        raise BtfError(f"corrupt BTF: {err}") from None


@functools.lru_cache(maxsize=64)
def _cached(btf_path: str, _mtime_ns: int, _size: int, struct_name: str,
            paths: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
    try:
        with open(btf_path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as err:
        raise BtfError(f"cannot read BTF at {btf_path}: {err.strerror or err}") from None
    if len(data) > MAX_BYTES:
        raise BtfError(f"{btf_path} is larger than {MAX_BYTES >> 20} MiB: not a BTF file we trust")
    return tuple(parse_offsets(data, struct_name, list(paths)).items())


def offsets(struct_name: str, paths: list[str], btf_path: str = VMLINUX) -> dict[str, int]:
    """Byte offsets of several members of `struct_name` in one pass over the BTF file.

    Paths are dot-separated (`"thread.fsbase"`); anonymous struct/union members are looked
    through, typedef/const/volatile are followed when descending. Raises `BtfError` naming the
    missing struct or member, a bitfield, or what is wrong with a corrupt file.
    """
    try:
        st = os.stat(btf_path)
    except OSError as err:
        raise BtfError(f"no BTF at {btf_path}: {err.strerror or err}") from None
    name = struct_name.removeprefix("struct ").strip()
    return dict(_cached(btf_path, st.st_mtime_ns, st.st_size, name, tuple(paths)))


def member_offset(struct_name: str, path: str, btf_path: str = VMLINUX) -> int:
    """Byte offset of member `path` (e.g. `"thread.fsbase"`) within `struct struct_name`."""
    return offsets(struct_name, [path], btf_path)[path]
