"""Python frames from what the kernel stack walker records: (code address, check, instr).

The kernel reports, per frame, the address of a code object, a check over some of its fields
(`pyprocess.code_check`) and where in the code the frame is (`instr`). We read the code object
from /proc/PID/mem on first sight, decode its line table once, and answer later sightings from
a bounded LRU cache with a dict lookup and a bisect.

Target memory is untrusted: every string and table is type-checked and size-bounded, decoders
never raise on garbage, and every failure is counted and answered with None (or, for an
unreadable line table, line 0 = unknown).
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from collections import OrderedDict

from agent.model import Frame
from probes.pyprocess import MemoryReadError, ProcessMemory, PyProcess, code_check

MAX_NAME_CHARS = 1024  # longer names and file names are cut here
MAX_TABLE_BYTES = 64 * 1024  # a longer line table is treated as garbage
_VARINT_MAX_SHIFT = 30  # a line number or column needs at most 32 bits
_PEEK_BYTES = 256  # first read of a str/bytes object: header and (usually) all its data
_NEW_FRAME = tuple.__new__  # Frame(...) without the NamedTuple __new__ overhead

Range = tuple[int, int, "int | None"]  # (start, end) in code units, line (None: no line)


def decode_linetable_310(table: bytes, firstlineno: int) -> list[Range] | None:
    """3.10 co_linetable: (byte delta u8, line delta s8) pairs, -128 = no line.

    Returns non-empty ranges in code units (2 bytes each), as co_lines() reports them in bytes.
    Never raises; a trailing odd byte is ignored (CPython never writes one).
    """
    out: list[Range] = []
    line, start = firstlineno, 0
    for i in range(0, len(table) - 1, 2):
        ldelta = table[i + 1] - 256 if table[i + 1] > 127 else table[i + 1]
        if ldelta == -128:
            current = None
        else:
            line += ldelta
            current = line
        end = start + table[i]
        if end > start:  # CPython skips empty ranges, keeping their line delta
            out.append((start // 2, end // 2, current))
        start = end
    return out


def _varint(table: bytes, i: int) -> tuple[int, int]:
    byte = table[i]
    value, shift = byte & 63, 0
    while byte & 64:
        i += 1
        shift += 6
        if shift > _VARINT_MAX_SHIFT:
            raise ValueError("varint too long")
        byte = table[i]
        value |= (byte & 63) << shift
    return value, i + 1


def _svarint(table: bytes, i: int) -> tuple[int, int]:
    value, i = _varint(table, i)
    return (-(value >> 1) if value & 1 else value >> 1), i


def decode_linetable_311(table: bytes, firstlineno: int) -> list[Range] | None:
    """3.11+ location table (CPython's Objects/locations.md); None if it is malformed.

    Ranges are in code units; line None for "no location" entries (code 15).
    """
    out: list[Range] = []
    line, unit, i, n = firstlineno, 0, 0, len(table)
    try:
        while i < n:
            head = table[i]
            if not head & 0x80:
                return None  # every entry starts with bit 7 set
            code, length = (head >> 3) & 15, (head & 7) + 1
            i += 1
            if code == 15:  # no location
                current = None
            elif code == 14:  # long form: line delta, end line delta, column, end column
                delta, i = _svarint(table, i)
                for _ in range(3):
                    _, i = _varint(table, i)
                line += delta
                current = line
            elif code == 13:  # no columns: line delta only
                delta, i = _svarint(table, i)
                line += delta
                current = line
            elif code >= 10:  # one-line forms: delta code-10, column bytes
                line += code - 10
                current = line
                i += 2
            else:  # short form: same line, one column byte
                current = line
                i += 1
            if i > n:
                return None  # truncated entry
            out.append((unit, unit + length, current))
            unit += length
    except (IndexError, ValueError):
        return None
    return out


class _Stale(Exception):
    """The code object at an address is not the one the kernel saw (freed, address reused)."""


class CodeLines:
    """What we keep of one code object: names and line runs, as arrays for a bisect.

    `ranges` None means the table was unreadable: every in-code position then has line 0.
    A Frame per line run is made on first use, so the frames asked for are shared, not rebuilt.
    """

    __slots__ = ("starts", "lines", "frames", "end", "name", "filename", "first_frame")

    def __init__(self, name: str, filename: str, first: int, ranges: list[Range] | None) -> None:
        self.name, self.filename = name, filename
        self.first_frame = _NEW_FRAME(Frame, (name, filename, first))
        if ranges is None:
            ranges = [(0, 1 << 31, 0)]
        starts, lines = array("i"), array("i")
        for start, _, line in ranges:
            line = 0 if line is None or line < 0 else min(line, 2**31 - 1)
            if not lines or lines[-1] != line:  # one entry per run of the same line
                starts.append(start)
                lines.append(line)
        self.starts, self.lines = starts, lines
        self.frames: list[Frame | None] = [None] * len(starts)
        self.end = ranges[-1][1] if ranges else 0

    def at(self, unit: int) -> Frame:
        """The Frame for code unit `unit`; outside the table: the first line of the code."""
        if not 0 <= unit < self.end:
            return self.first_frame
        i = bisect_right(self.starts, unit) - 1
        return self.frames[i] or self.make(i)

    def make(self, i: int) -> Frame:
        frame = self.frames[i] = _NEW_FRAME(Frame, (self.name, self.filename, self.lines[i]))
        return frame


class Symbolizer:
    """Code-object frames of one process. One owner thread; `close()` (or `with`) frees the fd.

    Counters: `hits` (answered from the cache), `misses` (read from memory), `errors` (not a
    readable code object: None; or a code object with an unreadable line table: line 0),
    `reused` (an address holds another code object than before, or than the kernel saw: the
    latter answers None). Misses cost a few preads of /proc/PID/mem and a table decode.
    """

    def __init__(self, proc: PyProcess, max_entries: int = 20000) -> None:
        self.proc = proc
        self.max_entries = max(1, max_entries)
        self.hits = self.misses = self.errors = self.reused = 0
        o = proc.offsets
        self._o = o
        self._legacy = proc.version < (3, 11)
        # instr -> code unit: 3.10 records f_lasti (units); 3.11+ a byte delta from the code object
        self._base = 0 if self._legacy else o.co_code_adaptive
        self._shift = 0 if self._legacy else 1
        self._name_off = o.co_name if self._legacy else o.co_qualname
        self._header = max(o.co_argcount, o.co_kwonlyargcount, o.co_flags, o.co_firstlineno,
                           o.co_filename, self._name_off, o.co_linetable) + 8
        self._cache: OrderedDict[tuple[int, int], CodeLines] = OrderedDict()
        self._check_at: dict[int, int] = {}  # code address -> check of the cached entry
        self._mem = ProcessMemory(proc.pid)

    def frame(self, code_addr: int, check: int, instr: int) -> Frame | None:
        """The Frame (qualified name, file name, line; 0 = unknown) or None if unreadable."""
        key = (code_addr, check)
        code = self._cache.get(key)
        if code is not None:  # the hot path: CodeLines.at, inlined
            self.hits += 1
            self._cache.move_to_end(key)
            unit = (instr - self._base) >> self._shift
            if 0 <= unit < code.end:
                i = bisect_right(code.starts, unit) - 1
                return code.frames[i] or code.make(i)
            return code.first_frame
        self.misses += 1
        try:
            code = self._load(code_addr, check)
        except _Stale:
            self.reused += 1  # the kernel saw another code object at this address
            return None
        except (MemoryReadError, ValueError, OverflowError):  # garbage read as a code object
            code = None
        if code is None:
            self.errors += 1
            return None
        old = self._check_at.get(code_addr)
        if old is not None:  # same address, another check: the old object was freed
            self.reused += 1
            self._cache.pop((code_addr, old), None)
        self._check_at[code_addr] = check
        self._cache[key] = code
        if len(self._cache) > self.max_entries:
            (addr, _), _ = self._cache.popitem(last=False)
            self._check_at.pop(addr, None)
        return code.at((instr - self._base) >> self._shift)

    def _load(self, addr: int, check: int) -> CodeLines | None:
        o, mem = self._o, self._mem
        head = mem.read(addr, self._header)
        if int.from_bytes(head[8:16], "little") != self.proc.code_type:
            return None

        def i32(off: int) -> int:
            return int.from_bytes(head[off:off + 4], "little", signed=True)

        first = i32(o.co_firstlineno)
        if code_check(first, i32(o.co_argcount), i32(o.co_kwonlyargcount),
                      i32(o.co_flags)) != check:
            raise _Stale

        def ptr(off: int) -> int:
            return int.from_bytes(head[off:off + 8], "little")

        name, filename = self._str(ptr(self._name_off)), self._str(ptr(o.co_filename))
        table = self._bytes(ptr(o.co_linetable))
        if name is None or filename is None or table is None:
            return None
        if self._legacy:
            ranges = decode_linetable_310(table, first)
        else:
            ranges = decode_linetable_311(table, first)
            size = int.from_bytes(head[16:24], "little")  # ob_size: code units
            if ranges is not None and (ranges[-1][1] if ranges else 0) != size:
                ranges = None  # a table that does not cover the code is not this code's
        if ranges is None:
            self.errors += 1  # name and file are good: answer with line 0
        return CodeLines(name, filename, first, ranges)

    def _peek(self, addr: int, type_addr: int, min_bytes: int) -> bytes | None:
        """The first bytes of an object at `addr` (at least `min_bytes`) if its type matches."""
        try:
            raw = self._mem.read(addr, _PEEK_BYTES)
        except MemoryReadError:  # near the end of a mapping: read only the header
            raw = self._mem.read(addr, min_bytes)
        return raw if int.from_bytes(raw[8:16], "little") == type_addr else None

    def _more(self, addr: int, raw: bytes, size: int) -> bytes:
        if len(raw) >= size:
            return raw[:size]
        return raw + self._mem.read(addr + len(raw), size - len(raw))

    def _str(self, addr: int) -> str | None:
        """A str object's text (compact only), cut at MAX_NAME_CHARS; None if not a str."""
        o = self._o
        raw = self._peek(addr, self.proc.unicode_type, o.str_compact_data)
        if raw is None:
            return None
        length = int.from_bytes(raw[16:24], "little", signed=True)
        state = int.from_bytes(raw[32:36], "little")  # after length and hash
        kind, compact, ascii_ = (state >> 2) & 7, (state >> 5) & 1, (state >> 6) & 1
        if not compact or kind not in (1, 2, 4) or (ascii_ and kind != 1) or length < 0:
            return None
        chars = min(length, MAX_NAME_CHARS)
        data_off = o.str_ascii_data if ascii_ else o.str_compact_data
        data = self._more(addr, raw, data_off + chars * kind)[data_off:]
        if kind == 1:
            return data.decode("ascii" if ascii_ else "latin-1", errors="replace")
        return data.decode("utf-16-le" if kind == 2 else "utf-32-le", errors="replace")

    def _bytes(self, addr: int) -> bytes | None:
        """A bytes object's data (ob_size @16, data @32) up to MAX_TABLE_BYTES; None otherwise."""
        raw = self._peek(addr, self.proc.bytes_type, 32)
        if raw is None:
            return None
        size = int.from_bytes(raw[16:24], "little", signed=True)
        if not 0 <= size <= MAX_TABLE_BYTES:
            return None
        return self._more(addr, raw, 32 + size)[32:]

    def close(self) -> None:
        self._mem.close()

    def __enter__(self) -> Symbolizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
