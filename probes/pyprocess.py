"""What the in-kernel CPython stack walker needs to know about one target process.

`inspect(pid)` finds the ELF (libpython3.X.so or a static python) defining `_PyRuntime`, checks
the version against the target's memory, picks that version's struct offsets (3.13: from its
`_Py_DebugOffsets`) and calibrates where glibc keeps each thread's `PyThreadState*` (the TSD slot
of `autoTSSkey`). `PyProcess.bpf_config()` packs it all into the kernel's `struct py_proc`.
Supported: x86-64 glibc CPython 3.10-3.13 release builds, not free-threaded; anything else
raises `Unsupported` with a one-line reason. Target memory is untrusted: pointers are checked.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass

from agent.errors import NoSuchProcess, SpanflameError, TargetPermissionError


class Unsupported(SpanflameError):
    """The kernel stack walker cannot read this process. `reason` is one line for a user."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class MemoryReadError(SpanflameError):
    """Target memory could not be read (address unmapped or implausible, process gone)."""


# x86-64 user space (47-bit) minus the lowest pages that mmap_min_addr keeps unmapped
_USER_MIN, _USER_MAX = 0x10000, 0x7FFF_FFFF_F000
NONE = 0xFFFF  # "no such field" in the kernel config
GLIBC_TSD_DEFAULT = 0x310  # offsetof(struct pthread, specific_1stblock) in Debian 12's glibc 2.36
TSD_SCAN_START, TSD_SCAN_END = 0x200, 0x1000  # where to look for the TSD block above fsbase
GLIBC_FIRST_BLOCK_KEYS = 32  # PTHREAD_KEY_2NDLEVEL_SIZE
MAX_THREADS = 4096  # a longer tstate list is treated as corrupt


def plausible(addr: int) -> bool:
    """Whether `addr` can be a user-space address of a live object on x86-64."""
    return _USER_MIN <= addr < _USER_MAX


def code_check(firstlineno: int, argcount: int, kwonly: int, flags: int) -> int:
    """The per-code-object check the kernel records (u32 arithmetic on int32 fields)."""
    return (firstlineno * 2654435761 + argcount * 40503 + kwonly * 97 + flags) & 0xFFFFFFFF


class ProcessMemory:
    """Reads another process's memory with pread on /proc/PID/mem (one fd; thread-safe)."""

    def __init__(self, pid: int) -> None:
        try:
            self._fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NoSuchProcess(f"no process {pid}") from None
        except PermissionError:
            raise TargetPermissionError(
                f"cannot read the memory of process {pid}: needs root or CAP_SYS_PTRACE") from None

    def read(self, addr: int, size: int) -> bytes:
        """Exactly `size` bytes at `addr`, or MemoryReadError."""
        if not plausible(addr) or not plausible(addr + size - 1):
            raise MemoryReadError(f"implausible address {addr:#x}")
        try:
            data = os.pread(self._fd, size, addr)
        except OSError as exc:
            raise MemoryReadError(f"reading {size} bytes at {addr:#x}: {exc.strerror}") from None
        if len(data) != size:
            raise MemoryReadError(f"short read of {len(data)}/{size} bytes at {addr:#x}")
        return data

    def u64(self, addr: int) -> int:
        return int.from_bytes(self.read(addr, 8), "little")

    def ptr(self, addr: int, what: str) -> int:
        """A pointer stored at `addr` that must be non-null, 8-aligned and in user space."""
        if (value := self.u64(addr)) & 7 or not plausible(value):
            raise MemoryReadError(f"{what} is not a valid pointer ({value:#x})")
        return value

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> ProcessMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Offsets:
    """Byte offsets into CPython's structs for one version; None where the field does not exist."""

    rt_interp_head: int  # _PyRuntime.interpreters.head (.main is the next pointer)
    rt_tss: int  # _PyRuntime autoTSSkey (Py_tss_t: int initialised, then pthread_key_t)
    interp_threads: int  # PyInterpreterState -> first PyThreadState
    ts_next: int
    ts_interp: int
    ts_frame: int  # 3.10 frame, 3.11/3.12 cframe, 3.13 current_frame
    cf_current: int | None  # _PyCFrame.current_frame
    ts_thread_id: int  # pthread_self(), which is fsbase on x86-64 glibc
    ts_native_thread_id: int | None
    ts_chunk: int | None  # datastack_chunk
    ts_top: int | None  # datastack_top
    f_code: int
    f_previous: int
    f_instr: int
    f_owner: int | None
    co_argcount: int
    co_kwonlyargcount: int
    co_flags: int
    co_firstlineno: int
    co_filename: int
    co_name: int
    co_qualname: int | None
    co_linetable: int
    co_code_adaptive: int | None
    gen_frame: int  # 3.11+: PyGenObject.gi_iframe; 3.10: PyFrameObject.f_gen
    str_ascii_data: int  # sizeof(PyASCIIObject)
    str_compact_data: int  # sizeof(PyCompactUnicodeObject)


# offsetof() against the internal headers of pyenv's 3.10.13, 3.11.7, 3.12.1, 3.13.0 builds;
# the last column: index of the field among the u64s after 3.13's _Py_DebugOffsets cookie
_N = None
_TABLE = {  # field: (3.10, 3.11, 3.12, 3.13, _Py_DebugOffsets index)
    "rt_interp_head": (32, 40, 40, 632, 4), "rt_tss": (584, 592, 1544, 2160, _N),
    "interp_threads": (8, 16, 72, 7344, 8), "ts_next": (8, 8, 8, 8, 20),
    "ts_interp": (16, 16, 16, 16, 21), "ts_frame": (24, 56, 56, 72, 22),
    "cf_current": (_N, 8, 0, _N, _N), "ts_thread_id": (176, 152, 136, 152, 23),
    "ts_native_thread_id": (_N, 160, 144, 160, 24), "ts_chunk": (_N, 296, 232, 232, 25),
    "ts_top": (_N, 304, 240, 240, _N), "f_code": (32, 32, 0, 0, 29),
    "f_previous": (24, 48, 8, 8, 28), "f_instr": (96, 56, 56, 56, 30),
    "f_owner": (_N, 69, 70, 70, 32), "co_argcount": (16, 56, 52, 52, 39),
    "co_kwonlyargcount": (24, 64, 60, 60, _N), "co_flags": (36, 48, 48, 48, _N),
    "co_firstlineno": (40, 72, 68, 68, 38), "co_filename": (104, 112, 112, 112, 34),
    "co_name": (112, 120, 120, 120, 35), "co_qualname": (_N, 128, 128, 128, 36),
    "co_linetable": (120, 136, 136, 136, 37), "co_code_adaptive": (_N, 184, 192, 200, 42),
    # checked on live objects: id(coro) + this holds the coroutine's frame (3.11+), whose code
    # pointer is id(coro.cr_code); 3.10: the frame's f_gen is id(coro)
    "gen_frame": (88, 80, 72, 72, _N),
    "str_ascii_data": (48, 48, 40, 40, 69), "str_compact_data": (72, 72, 56, 56, _N),
}
OFFSETS = {minor: Offsets(**{k: v[minor - 10] for k, v in _TABLE.items()})
           for minor in range(10, 14)}
_DEBUG_COUNT = 72  # u64s after the cookie in 3.13's _Py_DebugOffsets

_PY_PROC = struct.Struct("<QQQII16H")  # struct py_proc; see bpf_config()


@dataclass(frozen=True)
class PyProcess:
    """One inspected CPython process: addresses (absolute, in the target) and offsets."""

    pid: int
    version: tuple[int, int]  # (major, minor)
    path: str  # the ELF defining _PyRuntime, as the target's /proc/PID/maps names it
    load_bias: int
    runtime_addr: int  # &_PyRuntime
    interp: int  # the main PyInterpreterState*
    code_type: int  # &PyCode_Type
    unicode_type: int  # &PyUnicode_Type
    bytes_type: int  # &PyBytes_Type
    tss_key: int  # autoTSSkey's pthread key
    tss_off: int  # fsbase + tss_off holds a thread's PyThreadState*
    threads_seen: int  # tstates walked while calibrating tss_off
    threads_matched: int  # ... whose TSD slot held them
    offsets: Offsets

    def bpf_config(self) -> bytes:
        """The little-endian `struct py_proc` (64 bytes: 3 u64, 2 u32, 16 u16) for the kernel."""
        o = self.offsets
        fields = (o.ts_interp, o.ts_frame, o.cf_current, o.ts_chunk, o.ts_top, o.f_code,
                  o.f_previous, o.f_instr, o.f_owner, o.co_argcount, o.co_kwonlyargcount,
                  o.co_flags, o.co_firstlineno, o.gen_frame, 0, 0)
        data = _PY_PROC.pack(self.tss_off, self.interp, self.code_type,
                             (self.version[0] << 8) | self.version[1], int(self.version < (3, 11)),
                             *(NONE if v is None else v for v in fields))
        assert len(data) == 64
        return data


_NAME = re.compile(r"^(?:lib)?python(\d+)\.(\d+)([a-z]*)(?:\.so|$)")
_WANTED = ("_PyRuntime", "PyCode_Type", "PyUnicode_Type", "PyBytes_Type", "Py_Version",
           "PyModule_AddObjectRef", "_Py_NegativeRefcount", "_Py_PrintReferences")


def _maps(pid: int) -> list[tuple[int, int, str]]:
    """(start, file offset, path) of every mapping with a path, in address order."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            rows = [line.split(None, 5) for line in f]
    except (FileNotFoundError, ProcessLookupError):
        raise NoSuchProcess(f"no process {pid}") from None
    return [(int(r[0].split("-")[0], 16), int(r[2], 16), r[5].rstrip("\n"))
            for r in rows if len(r) == 6 and r[5].startswith("/")]


def _elf_symbols(pid: int, path: str):
    """(path, e_machine, wanted symbol values, PT_LOAD (offset, vaddr)s) of an ELF file, or None."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    clean = path.removesuffix(" (deleted)")
    for real in (f"/proc/{pid}/root{clean}", clean):  # the target's view first: containers
        try:
            with open(real, "rb") as f:
                elf = ELFFile(f)
                symbols: dict[str, int] = {}
                for name in (".dynsym", ".symtab"):  # .symtab (big) only if .dynsym lacks it
                    section = elf.get_section_by_name(name)
                    for want in _WANTED if section and "_PyRuntime" not in symbols else ():
                        found = want not in symbols and section.get_symbol_by_name(want)
                        if found and found[0]["st_shndx"] != "SHN_UNDEF":
                            symbols[want] = found[0]["st_value"]
                loads = [(s["p_offset"], s["p_vaddr"]) for s in elf.iter_segments()
                         if s["p_type"] == "PT_LOAD"]
                return path, elf.header["e_machine"], symbols, loads
        except (OSError, ELFError, ValueError):
            continue
    return None


def _load_bias(maps: list[tuple[int, int, str]], path: str, loads: list[tuple[int, int]]) -> int:
    for p_offset, p_vaddr in loads:
        for start, offset, mpath in maps:
            if mpath == path and offset == p_offset & ~0xFFF:
                return start - (p_vaddr & ~0xFFF)
    raise Unsupported(f"cannot find where {path} is loaded")


def inspect(pid: int) -> PyProcess:
    """Inspect process `pid` for the kernel stack walker.

    Raises Unsupported (one-line reason) for anything but a glibc x86-64 CPython 3.10-3.13
    release build, NoSuchProcess / TargetPermissionError when /proc cannot be read.
    Reads a few KiB of target memory; takes tens of milliseconds (ELF symbol lookup).
    """
    maps = _maps(pid)
    names = {os.path.basename(p.removesuffix(" (deleted)")) for _, _, p in maps}
    if any(n.startswith("ld-musl") for n in names):
        raise Unsupported("musl libc (Alpine) is not supported by the kernel stack walker")
    if any(n.startswith(("libpypy", "pypy")) for n in names):
        raise Unsupported("PyPy is not supported by the kernel stack walker")
    paths = list(dict.fromkeys(p for _, _, p in maps))  # unique, the executable first
    named = [p for p in paths if os.path.basename(p).startswith(("libpython", "python"))]
    named.sort(key=lambda p: not os.path.basename(p).startswith("lib"))  # libpython first
    found = next((info for path in dict.fromkeys(named + paths[:1])
                  if (info := _elf_symbols(pid, path)) and "_PyRuntime" in info[2]), None)
    if found is None:
        if versions := sorted({m.group(1, 2) for n in names if (m := _NAME.match(n))}):
            raise Unsupported(f"CPython {'.'.join(versions[-1])} is not supported by the kernel "
                              "stack walker (no _PyRuntime)")
        raise Unsupported("not a CPython process")
    path, machine, symbols, loads = found
    if machine != "EM_X86_64":
        raise Unsupported(f"{machine} is not supported by the kernel stack walker (x86-64 only)")
    bias = _load_bias(maps, path, loads)
    with ProcessMemory(pid) as mem:
        try:
            return _inspect_memory(pid, mem, path, bias, symbols)
        except MemoryReadError as exc:
            if not os.path.exists(f"/proc/{pid}"):
                raise NoSuchProcess(f"process {pid} exited") from None
            raise Unsupported(f"unexpected memory contents: {exc}") from None


def _version(mem: ProcessMemory, path: str, bias: int, symbols: dict[str, int]) -> tuple[int, int]:
    m = _NAME.match(os.path.basename(path.removesuffix(" (deleted)")))
    flags = m.group(3) if m else ""
    named = (int(m.group(1)), int(m.group(2))) if m else None
    if "t" in flags:
        raise Unsupported(f"free-threaded CPython {named[0]}.{named[1]}t is not supported")
    if "d" in flags or "_Py_NegativeRefcount" in symbols or "_Py_PrintReferences" in symbols:
        raise Unsupported("debug build (Py_DEBUG) of CPython is not supported")
    if "Py_Version" in symbols:  # 3.11+: PY_VERSION_HEX
        hexv = int.from_bytes(mem.read(bias + symbols["Py_Version"], 4), "little")
        version = (hexv >> 24, (hexv >> 16) & 0xFF)
        if (hexv >> 4) & 0xF in (0xA, 0xB):
            raise Unsupported(f"CPython {hexv:#010x} is a pre-release (alpha/beta): not supported")
    elif "PyModule_AddObjectRef" in symbols:  # new in 3.10, and 3.10 has no Py_Version
        version = (3, 10)
    else:
        version = named if named and named < (3, 10) else (3, 9)
    if named is not None and named != version:
        raise Unsupported(f"{os.path.basename(path)} holds CPython {version[0]}.{version[1]}")
    if version < (3, 10) or version > (3, 13):
        raise Unsupported(f"CPython {version[0]}.{version[1]} is not supported by the kernel "
                          "stack walker")
    return version


def _debug_offsets(mem: ProcessMemory, runtime: int) -> Offsets:
    """3.13: offsets from `_PyRuntime.debug_offsets`; the table only cross-checks them."""
    raw = mem.read(runtime, 8 + 8 * _DEBUG_COUNT)
    if raw[:8] != b"xdebugpy":
        raise Unsupported("CPython 3.13 without the _Py_DebugOffsets cookie")
    values = struct.unpack_from(f"<{_DEBUG_COUNT}Q", raw, 8)
    if values[1]:
        raise Unsupported("free-threaded CPython 3.13t is not supported")
    if (values[0] >> 16) != 0x030D:
        raise Unsupported(f"_Py_DebugOffsets reports version {values[0]:#x}, not 3.13")
    table = OFFSETS[13]
    taken = {k: values[v[4]] for k, v in _TABLE.items() if v[4] is not None}
    taken["ts_top"] = taken["ts_chunk"] + 8  # datastack_top follows datastack_chunk
    for field, value in taken.items():
        if value != getattr(table, field):
            raise Unsupported(f"CPython 3.13 layout differs from the known one ({field}: {value} "
                              f"in _Py_DebugOffsets, {getattr(table, field)} known)")
    return Offsets(**{**table.__dict__, **taken})


def _inspect_memory(pid: int, mem: ProcessMemory, path: str, bias: int,
                    symbols: dict[str, int]) -> PyProcess:
    version = _version(mem, path, bias, symbols)
    if missing := {"PyCode_Type", "PyUnicode_Type", "PyBytes_Type"} - symbols.keys():
        raise Unsupported(f"{os.path.basename(path)} does not export {', '.join(sorted(missing))}")
    runtime = bias + symbols["_PyRuntime"]
    o = _debug_offsets(mem, runtime) if version == (3, 13) else OFFSETS[version[1]]
    # .main, next to .head (the newest interpreter when there are subinterpreters)
    interp = mem.ptr(runtime + o.rt_interp_head + 8, "_PyRuntime.interpreters.main")
    tstates = _tstates(mem, interp, o)
    initialised, key = struct.unpack("<iI", mem.read(runtime + o.rt_tss, 8))
    if initialised != 1:
        raise Unsupported("autoTSSkey is not initialised yet")
    if key >= GLIBC_FIRST_BLOCK_KEYS:
        raise Unsupported(f"pthread key {key} ≥ {GLIBC_FIRST_BLOCK_KEYS} is outside glibc's "
                          "first TSD block")
    tss_off, matched = _calibrate_tss(mem, tstates, key)
    return PyProcess(pid=pid, version=version, path=path, load_bias=bias, runtime_addr=runtime,
                     interp=interp, code_type=bias + symbols["PyCode_Type"],
                     unicode_type=bias + symbols["PyUnicode_Type"],
                     bytes_type=bias + symbols["PyBytes_Type"], tss_key=key, tss_off=tss_off,
                     threads_seen=len(tstates), threads_matched=matched, offsets=o)


def _tstates(mem: ProcessMemory, interp: int, o: Offsets) -> list[tuple[int, int]]:
    """(tstate, thread_id) of the interpreter's threads; the list must read back consistently."""
    out: list[tuple[int, int]] = []
    addr = mem.u64(interp + o.interp_threads)
    while addr and len(out) < MAX_THREADS:
        if addr & 7 or not plausible(addr):
            raise Unsupported(f"the interpreter's thread list holds a bad pointer {addr:#x}")
        if mem.u64(addr + o.ts_interp) != interp:
            raise Unsupported("a thread state points to another interpreter: unknown layout")
        out.append((addr, mem.u64(addr + o.ts_thread_id)))
        addr = mem.u64(addr + o.ts_next)
    if not out:
        raise Unsupported("the main interpreter has no thread states yet")
    return out


def _readable_prefix(mem: ProcessMemory, addr: int, size: int) -> bytes:
    """As many bytes from [addr, addr+size) as are readable, page by page from the start."""
    out = b""
    while len(out) < size:
        at = addr + len(out)
        try:
            out += mem.read(at, min(size - len(out), 0x1000 - at % 0x1000))
        except MemoryReadError:
            break
    return out


def _calibrate_tss(mem: ProcessMemory, tstates: list[tuple[int, int]], key: int) -> tuple[int, int]:
    """(tss_off, threads matched): where above fsbase glibc keeps autoTSSkey's value.

    glibc's first TSD block is {seq, data} pairs at fsbase + S; the slot of `key` holds the
    thread's PyThreadState* with an odd (in-use) seq. S depends on glibc's struct pthread, so
    we find it: every thread whose slot we find must give the same S.
    """
    common: set[int] | None = None
    matched = scanned = 0
    for tstate, fsbase in tstates:
        if fsbase & 7 or not plausible(fsbase):
            continue  # 3.12+: a thread state not bound to a thread yet
        window = _readable_prefix(mem, fsbase + TSD_SCAN_START, TSD_SCAN_END - TSD_SCAN_START)
        scanned += bool(window)
        needle = tstate.to_bytes(8, "little")  # as data of a {seq, data} pair with an odd seq
        found = {TSD_SCAN_START + at - 8 - key * 16 for at in range(8, len(window) - 7, 8)
                 if window[at:at + 8] == needle and window[at - 8] & 1}
        if found:
            matched += 1
            common = found if common is None else common & found
    if common is None and scanned == 0:  # nothing readable to scan: try glibc 2.36's layout
        off = GLIBC_TSD_DEFAULT + key * 16 + 8
        if matched := sum(_readable_prefix(mem, fs + off, 8) == ts.to_bytes(8, "little")
                          for ts, fs in tstates):
            return off, matched
    if not common:
        raise Unsupported("cannot find the threads' PyThreadState* in glibc's TSD block"
                          if common is None else "threads disagree on where glibc keeps TSD")
    base = GLIBC_TSD_DEFAULT if GLIBC_TSD_DEFAULT in common else min(common)
    if len(common) > 1 and base != GLIBC_TSD_DEFAULT:
        raise Unsupported("ambiguous glibc TSD layout: " + ", ".join(map(hex, sorted(common))))
    return base + key * 16 + 8, matched
