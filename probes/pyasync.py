"""What suspended asyncio tasks are waiting for, read from /proc/PID/mem without stopping them.

The app-side hookup keeps `agent.otel._active_tasks` {id(coroutine): count} for the tasks with
an open span. `active_tasks()` reads its keys; `await_chain()` follows one task's coroutine down
what it awaits (coroutine -> coroutine -> ... -> a Future, a Task or anything else), recording
each coroutine's frame as the kernel records frames (probes/pywalk.py): (code address, instr,
check), innermost first, so `Symbolizer.frame` names them. 3.10-3.13 x86-64, as pyprocess.

A suspended coroutine keeps its frame: 3.11+ inside the coroutine object (gi_iframe), 3.10 in a
PyFrameObject (gi_frame). While it suspends in `await` (3.10 YIELD_FROM; 3.11/3.12 the next
instruction is RESUME with oparg >= 2; 3.13 the state FRAME_SUSPENDED_YIELD_FROM), the awaited
iterator is on top of its value stack, as CPython's own `_PyGen_yf()` finds it. Awaiting a C
Future or Task leaves an `_asyncio.FutureIter` there: we look through it to its future.

The target keeps running while we read: a task may resume meanwhile. Every pointer, type,
state and index is checked, loops are bounded, and garbage is answered with an error string
(or counted, for active_tasks), never raised; only a process that is gone raises NoSuchProcess.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from agent.errors import NoSuchProcess
from probes.pyprocess import MemoryReadError, ProcessMemory, PyProcess, code_check
from probes.pythreads import (GARBAGE, MAX_ENTRIES, BadMemory, Missing, ObjectReader,
                              checked_ptr, process_gone)
from probes.pywalk import Frame  # (code address, instr, check), as the kernel records frames

MAX_DEPTH = 64  # default bound on the coroutines followed per chain
MAX_TYPE_NAME = 128  # longer tp_name strings are cut here
MAX_INSTR_DELTA = 1 << 24  # as pywalk: bound on instr_ptr - code
CO_ITERABLE_COROUTINE = 0x100  # a generator made awaitable by @types.coroutine
_OWNED_BY_GENERATOR, _TP_NAME = 1, 24  # a coroutine's frame's owner; PyTypeObject.tp_name
_PEEK, _CODE_BYTES = 320, 80  # first reads: a coroutine with its frame; a code object's fields
_FUTUREITER = "_asyncio.FutureIter"  # {PyObject_HEAD; FutureObj *future;} in _asynciomodule.c

# offsetof() against each pyenv build's headers (3.10.13, 3.11.7, 3.12.1, 3.13.0; Debian's 3.11.2
# agrees with 3.11.7), and checked on live coroutines with ctypes. 3.11+: gi_frame_state (int8),
# gi_iframe (embedded _PyInterpreterFrame), co_stacksize, co_nlocalsplus; in the frame
# stacktop (int, slots above localsplus) @64 and localsplus @72 in all three.
_GEN = {11: (75, 80, 68, 76), 12: (67, 72, 64, 72), 13: (67, 72, 64, 72)}
_STACKTOP, _LOCALSPLUS = 64, 72
# 3.10: gi_frame; PyFrameObject f_valuestack, f_stackdepth, f_gen, f_state (int8); co_stacksize,
# co_code (a bytes object); the opcode YIELD_FROM
_GI_FRAME, _F_VALUESTACK, _F_STACKDEPTH, _F_GEN, _F_STATE = 16, 64, 80, 88, 108
_CO_STACKSIZE_310, _CO_CODE_310, _YIELD_FROM_310 = 32, 48, 72
_RESUME = {11: (151, 150), 12: (151, 240)}  # RESUME, and RESUME_QUICK / INSTRUMENTED_RESUME
_CREATED = {10: -2, 11: -2, 12: -2, 13: -3}  # frame states; 0 is executing, >0 finished
_SUSPENDED = {10: (-1,), 11: (-1,), 12: (-1,), 13: (-2, -1)}  # 3.13: -1 = in yield from


@dataclass(frozen=True)
class AwaitChain:
    """A task's await chain. `frames`: its coroutines' frames, innermost first (empty when the
    coroutine is running, not started or finished); `leaf`: the type name (tp_name) of what the
    innermost coroutine awaits ("_asyncio.Future", "_asyncio.Task", ...; "coroutine" when the
    chain was cut at max_depth, "" when nothing is awaited: a bare yield, or an error);
    `running`: the coroutine is executing, so it awaits nothing; `error`: why the walk stopped
    early ("" if it did not)."""

    frames: tuple[Frame, ...]
    leaf: str
    running: bool = False
    error: str = ""


class ActiveTasks(list):
    """Coroutine addresses; `errors` counts what could not be read, `error` is the first reason."""

    errors = 0
    error: str | None = None
    present = False  # the registry exists (the module is imported and has the name)

    def fail(self, reason: str) -> None:
        self.errors += 1
        self.error = self.error or reason


def active_tasks(proc: PyProcess, mem: ProcessMemory, module: str = "agent.otel",
                 name: str = "_active_tasks") -> ActiveTasks:
    """The int keys of the dict `module.name` (sys.modules[module].__dict__[name]) as addresses,
    in dict order, at most MAX_ENTRIES (more is counted as an error). [] without errors if the
    module was never imported or has no such name. Never raises for what the target's memory
    holds; raises NoSuchProcess if the process is gone. Cost: ~4 preads plus one per key.
    """
    out = ActiveTasks()
    try:
        reader = ObjectReader(proc, mem)
        namespace = reader.module_namespace(module)
        if namespace is not None:
            registry = reader.lookup(reader.dict_table(namespace), name, namespace)
            out.present = True
            entries, complete = reader.entries(*reader.dict_table(registry))
            if not complete:
                out.fail(f"{module}.{name} holds more than {MAX_ENTRIES} entries")
            for key, _ in entries:
                try:
                    out.append(checked_ptr(reader.read_int(key), "coroutine id"))
                except GARBAGE as exc:
                    out.fail(f"key at {key:#x}: {exc}")
    except Missing:
        pass  # the module has no such name (yet)
    except GARBAGE as exc:
        out.fail(str(exc) or type(exc).__name__)
    if out.errors and process_gone(proc.pid):
        raise NoSuchProcess(f"process {proc.pid} exited")
    return out


def await_chain(proc: PyProcess, mem: ProcessMemory, coro: int,
                max_depth: int = MAX_DEPTH) -> AwaitChain:
    """The await chain of the coroutine (or @types.coroutine generator) at address `coro`.

    Frames as the kernel records them, innermost first, at most `max_depth` (then the leaf is
    "coroutine"). Never raises for garbage: `error` says what was wrong and `frames` keeps
    what was read before. Raises NoSuchProcess if the process is gone. Cost in preads: 1 per
    coroutine (3.10: 3), 1 per distinct code object, 4 for a Future or Task leaf.
    """
    walk = _Walk(proc, mem)
    try:
        return walk.chain(coro, max(0, max_depth))
    except _Running as exc:
        return AwaitChain((), "", True, str(exc))
    except (GARBAGE + (_Stop,)) as exc:
        if not isinstance(exc, _Stop) and process_gone(proc.pid):
            raise NoSuchProcess(f"process {proc.pid} exited") from None
        return AwaitChain(tuple(reversed(walk.frames)), "", False, str(exc) or type(exc).__name__)


class _Stop(Exception):
    """The coroutine is not started, or finished: it has no chain."""


class _Running(Exception):
    """The coroutine is executing: what it awaits is not on its stack."""


_types: dict[tuple[int, int, str], tuple[int, int]] = {}  # (pid, load bias, path) -> types
_names: dict[tuple[int, int, int], str] = {}  # (pid, type, tp_name pointer) -> tp_name


def _gen_types(proc: PyProcess) -> tuple[int, int]:
    """(&PyCoro_Type, &PyGen_Type) in the target, from the ELF that defines _PyRuntime."""
    key = (proc.pid, proc.load_bias, proc.path)
    if key not in _types:
        from elftools.common.exceptions import ELFError
        from elftools.elf.elffile import ELFFile

        found: dict[str, int] = {}
        clean = proc.path.removesuffix(" (deleted)")
        for path in (f"/proc/{proc.pid}/root{clean}", clean):  # the target's view first
            try:
                with open(path, "rb") as f:
                    elf = ELFFile(f)
                    for name in (".dynsym", ".symtab"):
                        section = elf.get_section_by_name(name)
                        for want in {"PyCoro_Type", "PyGen_Type"} - found.keys() if section else ():
                            symbol = section.get_symbol_by_name(want)
                            if symbol and symbol[0]["st_shndx"] != "SHN_UNDEF":
                                found[want] = proc.load_bias + symbol[0]["st_value"]
                break
            except (OSError, ELFError, ValueError):
                continue
        if len(found) < 2:
            raise BadMemory(f"{proc.path} defines no PyCoro_Type / PyGen_Type")
        if len(_types) >= 256:  # bounded: processes come and go
            _types.clear()
        _types[key] = found["PyCoro_Type"], found["PyGen_Type"]
    return _types[key]


class _Walk:
    """One await_chain() call: code objects are cached for the call only (addresses get reused)."""

    def __init__(self, proc: PyProcess, mem: ProcessMemory) -> None:
        self.proc, self.mem, self.o, self.minor = proc, mem, proc.offsets, proc.version[1]
        self.frames: list[Frame] = []  # outermost first while walking
        self.codes: dict[int, tuple[int, int, int, int, int, int]] = {}

    def chain(self, coro: int, max_depth: int) -> AwaitChain:
        coro_type, gen_type = _gen_types(self.proc)
        obj = checked_ptr(coro, "coroutine")
        for depth in range(max_depth + 1):
            raw = self.peek(obj)
            kind = int.from_bytes(raw[8:16], "little")
            if kind not in (coro_type, gen_type):
                if depth == 0:
                    raise BadMemory(f"{obj:#x} is not a coroutine but {self.type_name(kind)!r}")
                return self.done(self.leaf(raw, kind))
            if kind == gen_type and not self.gen_flags(raw) & CO_ITERABLE_COROUTINE:
                if depth == 0:
                    raise BadMemory(f"{obj:#x} is a generator, not a coroutine")
                return self.done(self.type_name(kind))  # a plain generator: a leaf
            if depth == max_depth:
                break
            obj = self.coroutine(obj, raw, depth, generator=kind == gen_type)
            if not obj:
                return self.done("")  # a generator-based coroutine at a bare yield (sleep(0))
        return self.done("coroutine")  # cut at max_depth

    def done(self, leaf: str) -> AwaitChain:
        return AwaitChain(tuple(reversed(self.frames)), leaf)

    def peek(self, addr: int) -> bytes:
        """An object's first bytes; less where it ends a mapping (a coroutine's frame still)."""
        for size in (_PEEK, 160):
            try:
                return self.mem.read(addr, size)
            except MemoryReadError:
                pass
        return self.mem.read(addr, 24)

    def gen_flags(self, raw: bytes) -> int:
        """co_flags of a generator's code (3.10: gi_code; 3.11+: its embedded frame's code)."""
        at = 24 if self.minor == 10 else _GEN[self.minor][1] + self.o.f_code
        return self.code(int.from_bytes(raw[at:at + 8], "little"))[2]

    def coroutine(self, obj: int, raw: bytes, depth: int, generator: bool) -> int:
        """Records a suspended coroutine's frame; the address of what it awaits, or 0.

        An async def coroutine suspends only in an await (`yield` would make it an async
        generator); only a generator-based one can be at a bare yield: that needs a look at the
        instruction (3.11/3.12; 3.10) or the state (3.13)."""
        if self.minor == 10:
            frame = int.from_bytes(raw[_GI_FRAME:_GI_FRAME + 8], "little")
            if not frame:
                raise _Stop(f"coroutine at {obj:#x} finished")
            frame = checked_ptr(frame, "gi_frame")
            fraw = self.mem.read(frame, _F_STATE + 1)
            if int.from_bytes(fraw[_F_GEN:_F_GEN + 8], "little") != obj:
                raise BadMemory(f"frame {frame:#x} does not belong to coroutine {obj:#x}")
            self.state(obj, struct.unpack_from("<b", fraw, _F_STATE)[0], depth)
            code = int.from_bytes(fraw[self.o.f_code:self.o.f_code + 8], "little")
            lasti = struct.unpack_from("<i", fraw, self.o.f_instr)[0]
            check, _, _, _, stacksize, co_code = self.code(code)
            if not 0 <= lasti < MAX_INSTR_DELTA:
                raise BadMemory(f"frame {frame:#x}: f_lasti {lasti} out of range")
            self.frames.append((code, lasti, check))
            if generator and self.opcode(co_code, 2 * (lasti + 1)) != _YIELD_FROM_310:
                return 0
            top = struct.unpack_from("<i", fraw, _F_STACKDEPTH)[0]
            base = int.from_bytes(fraw[_F_VALUESTACK:_F_VALUESTACK + 8], "little")
            if not 0 < top <= stacksize or not frame < base < frame + (1 << 20):
                raise BadMemory(f"frame {frame:#x}: implausible value stack")
            return checked_ptr(self.mem.u64(base + 8 * (top - 1)), "awaited object")
        state_at, iframe, _, _ = _GEN[self.minor]
        state = self.state(obj, struct.unpack_from("<b", raw, state_at)[0], depth)
        o = self.o
        code, instr = (int.from_bytes(raw[iframe + at:iframe + at + 8], "little")
                       for at in (o.f_code, o.f_instr))
        if raw[iframe + o.f_owner] != _OWNED_BY_GENERATOR:
            raise BadMemory(f"coroutine {obj:#x}: its frame is not owned by it")
        check, units, _, nlocalsplus, stacksize, _ = self.code(code)
        delta = instr - code
        if not o.co_code_adaptive - 2 <= delta <= o.co_code_adaptive + 2 * units:
            raise BadMemory(f"coroutine {obj:#x}: instruction pointer outside its code")
        self.frames.append((code, delta, check))
        if self.minor == 13 and state != -1:  # FRAME_SUSPENDED, not .._YIELD_FROM
            if generator:
                return 0
            raise BadMemory(f"coroutine {obj:#x} is suspended outside an await")
        if generator and self.minor < 13:  # as _PyGen_yf: next, RESUME after a yield from
            if delta + 4 > o.co_code_adaptive + 2 * units:
                return 0
            op, arg = self.mem.read(instr + 2, 2)
            if op not in _RESUME[self.minor] or arg < 2:
                return 0
        top = struct.unpack_from("<i", raw, iframe + _STACKTOP)[0]
        if not nlocalsplus < top <= nlocalsplus + stacksize:
            raise BadMemory(f"coroutine {obj:#x}: stack top {top} out of range")
        at = iframe + _LOCALSPLUS + 8 * (top - 1)
        value = (int.from_bytes(raw[at:at + 8], "little") if at + 8 <= len(raw)
                 else self.mem.u64(obj + at))
        return checked_ptr(value, "awaited object")

    def state(self, obj: int, state: int, depth: int) -> int:
        """The frame state if suspended; otherwise raises why there is no chain."""
        if state in _SUSPENDED[self.minor]:
            return state
        if state == 0:
            raise _Running("" if depth == 0 else f"coroutine {obj:#x} resumed while being read")
        what = ("not started" if state == _CREATED[self.minor] else
                "finished" if state > 0 else f"in an unknown state {state}")
        raise (_Stop if depth == 0 else BadMemory)(f"coroutine at {obj:#x} {what}")

    def code(self, addr: int) -> tuple[int, int, int, int, int, int]:
        """(check, code units, co_flags, co_nlocalsplus, co_stacksize, 3.10 co_code) of a
        validated code object."""
        if (known := self.codes.get(addr)) is not None:
            return known
        raw = self.mem.read(checked_ptr(addr, "code object"), _CODE_BYTES)
        if int.from_bytes(raw[8:16], "little") != self.proc.code_type:
            raise BadMemory(f"{addr:#x} is not a code object")
        o = self.o

        def i32(off: int) -> int:
            return struct.unpack_from("<i", raw, off)[0]

        check = code_check(i32(o.co_firstlineno), i32(o.co_argcount), i32(o.co_kwonlyargcount),
                           i32(o.co_flags))
        if self.minor == 10:
            info = (check, 0, i32(o.co_flags), 0, i32(_CO_STACKSIZE_310),
                    int.from_bytes(raw[_CO_CODE_310:_CO_CODE_310 + 8], "little"))
        else:
            _, _, stacksize_at, nlocalsplus_at = _GEN[self.minor]
            info = (check, int.from_bytes(raw[16:24], "little"), i32(o.co_flags),
                    i32(nlocalsplus_at), i32(stacksize_at), 0)
            if info[1] > MAX_INSTR_DELTA or not 0 <= info[3] <= 1 << 16 or info[4] < 0:
                raise BadMemory(f"code object {addr:#x} is implausible")
        self.codes[addr] = info
        return info

    def opcode(self, co_code: int, at: int) -> int:
        """3.10: the byte at offset `at` of the bytes object co_code; -1 past its end."""
        raw = self.mem.read(checked_ptr(co_code, "co_code"), 24)
        if int.from_bytes(raw[8:16], "little") != self.proc.bytes_type:
            raise BadMemory(f"co_code {co_code:#x} is not bytes")
        size = int.from_bytes(raw[16:24], "little", signed=True)
        return self.mem.read(co_code + 32 + at, 1)[0] if 0 <= at < size else -1

    def leaf(self, raw: bytes, kind: int) -> str:
        """The type name of an awaited object; through a FutureIter to its future."""
        name = self.type_name(kind)
        if name == _FUTUREITER and len(raw) >= 24:
            future = int.from_bytes(raw[16:24], "little")
            if future:  # NULL once the iterator is exhausted
                head = self.mem.read(checked_ptr(future, "FutureIter.future"), 16)
                name = self.type_name(int.from_bytes(head[8:16], "little"))
        return name

    def type_name(self, kind: int) -> str:
        """A type object's tp_name (dotted identifiers), cut at MAX_TYPE_NAME; never reading past
        the page where it ends."""
        at = self.mem.u64(checked_ptr(kind, "ob_type") + _TP_NAME)
        if not at or at < 0x10000:
            raise BadMemory(f"type {kind:#x} has no tp_name")
        if (known := _names.get((self.proc.pid, kind, at))) is not None:
            return known  # the same type with the same name pointer: read once per process
        text = b""
        while len(text) < MAX_TYPE_NAME and b"\0" not in text:  # at most two pages
            chunk = min(MAX_TYPE_NAME - len(text), 0x1000 - (at + len(text)) % 0x1000)
            text += self.mem.read(at + len(text), chunk)
        cut = b"\0" not in text  # then a character may be split: drop it (else: ValueError)
        name = text.split(b"\0", 1)[0].decode("utf-8", errors="ignore" if cut else "strict")
        if not all(part.isidentifier() for part in name.split(".")):
            raise BadMemory(f"type {kind:#x}: implausible tp_name")
        if len(_names) >= 4096:  # bounded: heap types come and go
            _names.clear()
        _names[self.proc.pid, kind, at] = name
        return name
