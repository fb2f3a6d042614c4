"""Python thread names of a running CPython process, read from /proc/PID/mem without stopping it.

The kernel reports stacks per OS thread id; users know their threads by `threading.Thread.name`.
`thread_names()` reads the target's `threading._active` (ident -> Thread), found through
`sys.modules` (interp->modules; 3.12+: interp->imports.modules), and answers
{native thread id: name} from each Thread's `_native_id` and `_name` (3.10-3.13, x86-64).

Instance attributes live in different places per version: a dict at tp_dictoffset (3.10),
values or a dict in the pre-header (3.11: values at -32, dict at -24; 3.12: one tagged word at
-24), or values inline after the object described by the type's cached keys (3.13). Target
memory is untrusted and changes under us: sizes and lengths are bounded, types checked, and
anything unreadable is counted in the answer's `errors` instead of raised.
"""

from __future__ import annotations

import struct

from agent.errors import NoSuchProcess
from probes.pyprocess import MAX_THREADS, MemoryReadError, ProcessMemory, PyProcess, plausible

MAX_ENTRIES = 4096  # a longer dict is read up to here and counted as an error
MAX_NAME_CHARS = 256  # longer thread names are cut here
MAX_DIGITS = 3  # 90 bits: enough for a thread id or a pthread_t

# offsetof() against each pyenv build's internal headers (3.10.13, 3.11.7, 3.12.1, 3.13.0;
# Debian's 3.11.2 headers agree with 3.11.7): interp->modules (3.12+: imports.modules),
# PyHeapTypeObject.ht_cached_keys, PyDictValues.values. 3.13 takes modules from _Py_DebugOffsets.
_LAYOUT = {10: (856, 872, 0), 11: (888, 872, 0), 12: (944, 880, 0), 13: (7656, 880, 8)}
_DEBUG_IMPORTS_MODULES = 8 + 8 * 10  # _Py_DebugOffsets.interpreter_state.imports_modules
_TP_BASICSIZE, _TP_FLAGS, _TP_DICTOFFSET = 32, 168, 288
_HEAPTYPE, _LONG_SUBCLASS, _DICT_SUBCLASS = 1 << 9, 1 << 24, 1 << 29
_MANAGED_DICT, _INLINE_VALUES = 1 << 4, 1 << 2  # 3.11+, 3.13+
_MODULE_DICT = 16  # PyModuleObject.md_dict
_DICT_HEADER = 48  # through ma_values (ma_used @16, ma_keys @32, ma_values @40)
_KEYS_HEADER = 40  # 3.10 keys: dk_size @8, dk_nentries @32, indices @40; 3.11+ indices @32
_hints: dict[tuple[int, int, str], int] = {}  # (pid, dict, key) -> entry index; checked on use


class BadMemory(Exception):
    """What we read is not what it should be (garbage, freed, or moved while we read)."""


class Missing(BadMemory):
    """A dict we read completely has no such key."""


def checked_ptr(addr: int, what: str) -> int:
    if addr & 7 or not plausible(addr):
        raise BadMemory(f"{what} is not a valid pointer ({addr:#x})")
    return addr


GARBAGE = (MemoryReadError, BadMemory, ValueError, OverflowError, IndexError, struct.error)


class ThreadNames(dict):
    """{native thread id: Python thread name}; `errors` counts what could not be read and
    `error` is the first reason (None when nothing failed)."""

    errors = 0
    error: str | None = None

    def fail(self, reason: str) -> None:
        self.errors += 1
        self.error = self.error or reason


def thread_names(proc: PyProcess, mem: ProcessMemory) -> ThreadNames:
    """Native thread id -> `threading.Thread.name` for every thread in `threading._active`.

    Threads whose `_native_id` is not set are matched to the interpreter's thread states
    through `_ident` (3.11+; 3.10 thread states have no native id). Never raises for what the
    target's memory holds: a partial answer carries `errors`. Raises NoSuchProcess if the
    process is gone. Costs 4-5 preads per thread: ~0.25 ms for 10 threads, ~3 ms for 200
    (the first call per process also scans sys.modules: ~0.7 ms, ~4 ms).
    """
    out = ThreadNames()
    try:
        ObjectReader(proc, mem).collect(out)
    except GARBAGE as exc:
        out.fail(str(exc) or type(exc).__name__)
    if out.errors and process_gone(proc.pid):
        raise NoSuchProcess(f"process {proc.pid} exited")
    return out


def process_gone(pid: int) -> bool:
    """Whether the process exited (a zombie's memory is gone too)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except (OSError, IndexError):
        return True


class ObjectReader:
    """Reads sys.modules, dicts, instance attributes, ints and strs (shared with pyasync).

    One call's reads. Types, key strings and shared keys are cached for the call only:
    between calls their addresses may be freed and reused."""

    def __init__(self, proc: PyProcess, mem: ProcessMemory) -> None:
        self.proc, self.mem, self.minor = proc, mem, proc.version[1]
        self.modules_off, self.cached_keys_off, self.values_off = _LAYOUT[self.minor]
        self.types: dict[int, tuple[int, int, int, int]] = {}
        self.strs: dict[int, str | None] = {}
        self.shared: dict[int, tuple[list, int]] = {}
        self.tstates: dict[int, int] | None = None

    def collect(self, out: ThreadNames) -> None:
        namespace = self.module_namespace("threading")
        if namespace is None:  # never imported: no thread has a name
            return
        active = self.lookup(self.dict_table(namespace), "_active", namespace)
        entries, complete = self.entries(*self.dict_table(active))
        if not complete:
            out.fail(f"threading._active holds more than {MAX_ENTRIES} threads")
        for _, thread in entries:
            try:
                native, name = self.thread(thread)
            except GARBAGE as exc:
                out.fail(f"thread object at {thread:#x}: {exc}")
                continue
            out[native] = name

    def thread(self, obj: int) -> tuple[int, str]:
        attrs = self.attributes(obj)
        if "_name" not in attrs or "_ident" not in attrs:
            raise BadMemory("not a Thread: no _name or _ident attribute")
        name = self.read_str(attrs["_name"])
        try:
            native = self.read_int(attrs["_native_id"])
        except (KeyError, BadMemory):  # None until the thread ran: find its thread state by ident
            native = self.native_of_ident(self.read_int(attrs["_ident"]))
        if native <= 0:
            raise BadMemory(f"native thread id {native}")
        return native, name

    def module_namespace(self, module: str) -> int | None:
        """The `__dict__` of sys.modules[module], or None if `module` was never imported."""
        if self.minor == 13:  # _Py_DebugOffsets is authoritative; pyprocess checked its cookie
            at = self.mem.u64(self.proc.runtime_addr + _DEBUG_IMPORTS_MODULES)
            self.modules_off = at if 0 < at < 1 << 16 else self.modules_off
        modules = self.ptr(self.proc.interp + self.modules_off, "interp->modules")
        table = self.dict_table(modules)
        try:
            found = self.lookup(table, module, modules)
        except Missing:
            try:  # only sys.modules proves the module absent: it always holds builtins
                self.lookup(table, "builtins", modules)
            except Missing:
                raise BadMemory("no 'builtins' in what should be sys.modules") from None
            return None
        return self.ptr(found + _MODULE_DICT, f"{module}.__dict__")

    # -- objects

    def peek(self, addr: int, size: int, minimum: int) -> bytes:
        """`size` bytes at `addr`, or only `minimum` where the object ends a mapping."""
        try:
            return self.mem.read(addr, size)
        except MemoryReadError:
            return self.mem.read(addr, minimum)

    def ptr(self, addr: int, what: str) -> int:
        return checked_ptr(self.mem.u64(addr), what)

    def type_info(self, header: bytes) -> tuple[int, int, int, int]:
        """(tp_basicsize, tp_flags, tp_dictoffset, ht_cached_keys or 0) of a header's type."""
        tp = int.from_bytes(header[8:16], "little")
        if tp not in self.types:
            tp = checked_ptr(tp, "ob_type")
            raw = self.peek(tp, self.cached_keys_off + 8, _TP_DICTOFFSET + 8)
            (basic,), (flags,), (dictoff,) = (struct.unpack_from(f, raw, at) for f, at in (
                ("<q", _TP_BASICSIZE), ("<Q", _TP_FLAGS), ("<q", _TP_DICTOFFSET)))
            if not 16 <= basic <= 1 << 16:
                raise BadMemory(f"implausible type at {tp:#x}")
            heap = flags & _HEAPTYPE and len(raw) > self.cached_keys_off
            keys = int.from_bytes(raw[self.cached_keys_off:], "little") if heap else 0
            self.types[tp] = (basic, flags, dictoff, keys)
        return self.types[tp]

    def read_str(self, addr: int) -> str:
        """An exact, compact str object's text, cut at MAX_NAME_CHARS."""
        o = self.proc.offsets
        raw = self.peek(addr, 128, o.str_compact_data)
        if int.from_bytes(raw[8:16], "little") != self.proc.unicode_type:
            raise BadMemory(f"not a str at {addr:#x}")
        length = int.from_bytes(raw[16:24], "little", signed=True)
        state = int.from_bytes(raw[32:36], "little")
        kind, compact, ascii_ = (state >> 2) & 7, (state >> 5) & 1, (state >> 6) & 1
        if not compact or kind not in (1, 2, 4) or (ascii_ and kind != 1) or length < 0:
            raise BadMemory(f"not a compact str at {addr:#x}")
        data_off = o.str_ascii_data if ascii_ else o.str_compact_data
        end = data_off + min(length, MAX_NAME_CHARS) * kind
        if len(raw) < end:
            raw += self.mem.read(addr + len(raw), end - len(raw))
        codec = ("ascii" if ascii_ else "latin-1") if kind == 1 else f"utf-{8 * kind}-le"
        return raw[data_off:end].decode(codec, errors="replace")

    def key(self, addr: int) -> str | None:
        """A dict key's text if it is a str (keys are interned: cached by address)."""
        if addr not in self.strs:
            try:
                self.strs[addr] = self.read_str(addr)
            except (BadMemory, MemoryReadError):
                self.strs[addr] = None
        return self.strs[addr]

    def read_int(self, addr: int) -> int:
        """A PyLong's value (3.10/3.11: signed ob_size; 3.12+: lv_tag, sign in the low bits)."""
        raw = self.peek(addr, 24 + 4 * MAX_DIGITS, 24)
        if not self.type_info(raw)[1] & _LONG_SUBCLASS:
            raise BadMemory(f"not an int at {addr:#x}")
        tag = int.from_bytes(raw[16:24], "little", signed=True)
        if self.minor >= 12:
            ndigits, sign = tag >> 3, (0 if tag & 3 == 1 else -1 if tag & 3 == 2 else 1)
        else:
            ndigits, sign = abs(tag), (tag > 0) - (tag < 0)
        if not 0 <= ndigits <= MAX_DIGITS or (sign == 0) != (ndigits == 0):
            raise BadMemory(f"implausible int at {addr:#x}")
        if len(raw) < 24 + 4 * ndigits:
            raw += self.mem.read(addr + 24, 4 * ndigits)
        digits = struct.unpack_from(f"<{ndigits}I", raw, 24)
        if any(d >> 30 for d in digits):
            raise BadMemory(f"implausible int digits at {addr:#x}")
        return sign * sum(d << (30 * i) for i, d in enumerate(digits))

    # -- dicts and instance attributes: a table is (keys object, values array or 0)

    def dict_table(self, addr: int) -> tuple[int, int]:
        raw = self.mem.read(addr, _DICT_HEADER)
        if not self.type_info(raw)[1] & _DICT_SUBCLASS:
            raise BadMemory(f"not a dict at {addr:#x}")
        keys, values = struct.unpack_from("<QQ", raw, 32)
        return checked_ptr(keys, "ma_keys"), values and checked_ptr(values, "ma_values")

    def attributes(self, obj: int) -> dict[str, int]:
        """An instance's str-keyed attributes: name -> object address."""
        # 3.11+ keeps values/dict pointers in a pre-header at obj-32 (before the GC header is
        # allocated too); 3.10 GC objects have only the 16-byte GC header before them.
        pre = 32 if self.minor >= 11 else 0
        raw = self.peek(obj - pre, pre + 64, pre + 16)
        basic, flags, dictoff, cached_keys = self.type_info(raw[pre:])
        if pre and flags & _MANAGED_DICT:
            values, dict_ = struct.unpack_from("<QQ", raw)  # 3.11: values, dict
            if self.minor == 12:  # one word at -24: the dict, or the values pointer - 1 (odd)
                values, dict_ = (dict_ + 1, 0) if dict_ & 1 else (0, dict_)
            elif self.minor >= 13:  # the dict if there is one, else valid inline values
                inline = not dict_ and flags & _INLINE_VALUES and self.mem.read(obj + basic, 4)[3]
                values = obj + basic if inline else 0
            if values:
                return self.named((checked_ptr(cached_keys, "ht_cached_keys"), values))
        elif dictoff <= 0 or dictoff > basic - 8:
            raise BadMemory(f"type without an instance dict (tp_dictoffset {dictoff})")
        else:  # 3.10 (and types without a managed dict): a dict pointer inside the object
            at = pre + dictoff
            dict_ = self.mem.u64(obj + dictoff) if at + 8 > len(raw) else (
                int.from_bytes(raw[at:at + 8], "little"))
        if not dict_:
            raise BadMemory("instance has neither values nor a dict")
        return self.named(self.dict_table(dict_))

    def named(self, table: tuple[int, int]) -> dict[str, int]:
        entries, _ = self.entries(*table)
        return {name: value for key, value in entries if (name := self.key(key)) is not None}

    def lookup(self, table: tuple[int, int], name: str, where: int) -> int:
        """The value under str key `name`; tries the entry index where it was last time first."""
        hint_key = (self.proc.pid, where, name)
        hint = _hints.get(hint_key)
        if hint is not None:
            found = self.entries(*table, only=hint)[0]
            if found and self.key(found[0][0]) == name:
                return found[0][1]
        entries, complete = self.entries(*table, indexed=True)
        for index, key, value in entries:
            if self.key(key) == name:
                if len(_hints) >= 1024:
                    _hints.clear()
                _hints[hint_key] = index
                return value
        if not complete:
            raise BadMemory(f"no {name!r} in the first {MAX_ENTRIES} entries of the dict at "
                            f"{where:#x}")
        raise Missing(f"no {name!r} in the dict at {where:#x}")

    def entries(self, keys: int, values: int, only: int | None = None,
                indexed: bool = False) -> tuple[list, bool]:
        """([(key, value)] or with `indexed` [(index, key, value)], complete?) of live entries.

        A shared (split) keys object is read once per call. `only` reads just that entry.
        """
        cached = values and only is None
        if cached and keys in self.shared:
            pairs, nentries = self.shared[keys]
        else:
            pairs, nentries = self.keys_entries(keys, only)
            if cached:
                self.shared[keys] = pairs, nentries
        if values and pairs:  # split table: this instance's values, by entry index
            end = pairs[-1][0] + 1
            raw = self.mem.read(values, self.values_off + 8 * end)
            if self.minor >= 13 and end > raw[0]:  # 3.13 PyDictValues starts with its capacity
                raise BadMemory("inline values shorter than the shared keys")
            vals = struct.unpack_from(f"<{end}Q", raw, self.values_off)
            pairs = [(i, k, vals[i]) for i, k, _ in pairs]
        live = [(i, k, v) for i, k, v in pairs if k and v]
        if any(k & 7 or v & 7 or not plausible(k) or not plausible(v) for _, k, v in live):
            raise BadMemory(f"dict keys at {keys:#x} hold bad pointers")
        complete = only is not None or len(pairs) == nentries
        return (live if indexed else [(k, v) for _, k, v in live]), complete

    def keys_entries(self, keys: int, only: int | None) -> tuple[list[tuple[int, int, int]], int]:
        """[(index, key, value)] of a keys object's entries (first MAX_ENTRIES) and their count."""
        raw = self.peek(keys, 1024, _KEYS_HEADER)  # small dicts: header and entries at once
        if self.minor == 10:
            size, nentries = (struct.unpack_from("<q", raw, at)[0] for at in (8, 32))
            if size < 8 or size & (size - 1) or size > 1 << 26:
                raise BadMemory(f"dict keys at {keys:#x}: size {size}")
            index_bytes = size * (1 if size <= 0xFF else 2 if size <= 0xFFFF else 4)
            start, width = 40 + index_bytes, 24
        else:
            log2_size, log2_index, kind = raw[8], raw[9], raw[10]
            nentries = struct.unpack_from("<q", raw, 24)[0]
            wide = 0 if log2_size < 8 else 1 if log2_size < 16 else 2 if log2_size < 32 else 3
            if not 3 <= log2_size <= 26 or log2_index != log2_size + wide or kind > 2:
                raise BadMemory(f"dict keys at {keys:#x}: bad header")
            start, width = 32 + (1 << log2_index), 24 if kind == 0 else 16
            size = 1 << log2_size
        if not 0 <= nentries <= size:
            raise BadMemory(f"dict keys at {keys:#x}: {nentries} entries in {size} slots")
        if only is not None:
            first, count = only, int(0 <= only < nentries)
        else:
            first, count = 0, min(nentries, MAX_ENTRIES)
        begin, end = start + width * first, start + width * (first + count)
        raw = raw[begin:end] if len(raw) >= end else self.mem.read(keys + begin, end - begin)
        skip = 8 if width == 24 else 0  # 3.10 and general 3.11+ entries start with the hash
        return [(first + i,) + struct.unpack_from("<QQ", raw, width * i + skip)
                for i in range(count)], nentries

    # -- the thread-state fallback

    def native_of_ident(self, ident: int) -> int:
        o = self.proc.offsets
        if o.ts_native_thread_id is None:
            raise BadMemory("_native_id unset and 3.10 thread states hold no native id")
        if self.tstates is None:
            self.tstates, addr = {}, self.mem.u64(self.proc.interp + o.interp_threads)
            span = max(o.ts_next, o.ts_thread_id, o.ts_native_thread_id) + 8
            while addr and len(self.tstates) < MAX_THREADS:
                raw = self.mem.read(checked_ptr(addr, "thread state"), span)
                thread_id, native, addr = (struct.unpack_from("<Q", raw, at)[0] for at in
                                           (o.ts_thread_id, o.ts_native_thread_id, o.ts_next))
                self.tstates[thread_id] = native
        if ident not in self.tstates:
            raise BadMemory(f"no thread state for ident {ident:#x}")
        return self.tstates[ident]
