"""The few bpf(2) operations the agent needs on maps and programs it holds by file descriptor.

The probes are compiled and attached in a short-lived child (probes/loader.py), which hands the
map, program and attachment fds to the agent; from then on the agent reads and writes the maps
through the system call directly, with ctypes, so that neither libbcc nor LLVM is ever mapped in
its process. What is here:

* `Map`: lookup, update, delete, next key, batch lookup (and lookup-and-delete), per-CPU values
  (one value per *possible* CPU), and the walk of a stack-trace map; keys and values are the
  ctypes types built from the compiler's own description of the map's types (`ctype_from_desc`),
  so a field added to a struct in probes/*.bpf.c needs no change here.
* `RingBuffer`: a consumer of a BPF ring buffer map, read from its mmapped pages: every record
  available now, as bytes, in one call.
* `KernelSymbols`: kernel text addresses to names, from /proc/kallsyms, loaded on first use.
* `prog_info`, `map_info`: BPF_OBJ_GET_INFO_BY_FD.

x86-64 only (the system call number, and the ring buffer's ordering: on x86-64 an ordinary load
is an acquire and an ordinary store a release, which is what the ring buffer protocol asks for).
Errors are OSError with the errno of the system call; a missing key is KeyError.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
from array import array
from bisect import bisect_right
from typing import Iterator

SYS_BPF = 321  # x86-64
MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM, MAP_DELETE_ELEM, MAP_GET_NEXT_KEY = 1, 2, 3, 4
OBJ_GET_INFO_BY_FD = 15
MAP_LOOKUP_BATCH, MAP_LOOKUP_AND_DELETE_BATCH = 24, 25
#: map types (enum bpf_map_type)
HASH, ARRAY, PERCPU_HASH, PERCPU_ARRAY, STACK_TRACE = 1, 2, 5, 6, 7
LRU_HASH, LRU_PERCPU_HASH, RINGBUF = 9, 10, 27
PERCPU_TYPES = frozenset((PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH))
ANY, NOEXIST, EXIST = 0, 1, 2  # update flags

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class _ElemAttr(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("key", ctypes.c_uint64), ("value", ctypes.c_uint64),
                ("flags", ctypes.c_uint64)]


class _BatchAttr(ctypes.Structure):
    _fields_ = [("in_batch", ctypes.c_uint64), ("out_batch", ctypes.c_uint64),
                ("keys", ctypes.c_uint64), ("values", ctypes.c_uint64),
                ("count", ctypes.c_uint32), ("map_fd", ctypes.c_uint32),
                ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32),
                ("info", ctypes.c_uint64)]


def bpf(cmd: int, attr: ctypes.Structure) -> int:
    """bpf(cmd, &attr, sizeof attr); raises OSError with the call's errno."""
    ret = _syscall(ctypes.c_long(SYS_BPF), ctypes.c_long(cmd), ctypes.byref(attr),
                   ctypes.c_ulong(ctypes.sizeof(attr)))
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"bpf({cmd}): {os.strerror(e)}")
    return ret


def possible_cpus() -> int:
    """How many CPUs the kernel could ever bring up: the number of values in a per-CPU map."""
    try:
        with open("/sys/devices/system/cpu/possible") as f:
            text = f.read().strip()
    except OSError:
        return os.cpu_count() or 1
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n = max(n, int(hi or lo) + 1)
    return n


# -- object info -------------------------------------------------------------------------------
#: struct bpf_map_info: type, id, key_size, value_size, max_entries, map_flags, name
_MAP_INFO = struct.Struct("=IIIIII16s")
_PROG_NAME_OFF, _PROG_RUN_TIME_OFF, _PROG_RUN_CNT_OFF = 64, 192, 200  # in struct bpf_prog_info


def _obj_info(fd: int, size: int) -> bytes:
    buf = ctypes.create_string_buffer(size)
    attr = _InfoAttr(fd, size, ctypes.addressof(buf))
    bpf(OBJ_GET_INFO_BY_FD, attr)
    return buf.raw[:attr.info_len]


def map_info(fd: int) -> dict:
    """type, id, key_size, value_size, max_entries, flags and name of map `fd`."""
    t, i, ks, vs, n, fl, name = _MAP_INFO.unpack_from(_obj_info(fd, 96))
    return {"type": t, "id": i, "key_size": ks, "value_size": vs, "max_entries": n,
            "flags": fl, "name": name.split(b"\0", 1)[0].decode("ascii", "replace")}


def prog_info(fd: int) -> dict:
    """id, name, run_cnt and run_time_ns (both 0 unless kernel.bpf_stats_enabled=1) of program
    `fd`."""
    raw = _obj_info(fd, 256).ljust(_PROG_RUN_CNT_OFF + 8, b"\0")
    return {"type": struct.unpack_from("=I", raw, 0)[0], "id": struct.unpack_from("=I", raw, 4)[0],
            "name": raw[_PROG_NAME_OFF:_PROG_NAME_OFF + 16].split(b"\0", 1)[0].decode(
                "ascii", "replace"),
            "run_time_ns": struct.unpack_from("=Q", raw, _PROG_RUN_TIME_OFF)[0],
            "run_cnt": struct.unpack_from("=Q", raw, _PROG_RUN_CNT_OFF)[0]}


# -- types ---------------------------------------------------------------------------------------
_SCALARS = {
    "_Bool": ctypes.c_bool, "char": ctypes.c_char, "signed char": ctypes.c_byte,
    "unsigned char": ctypes.c_ubyte, "short": ctypes.c_short, "unsigned short": ctypes.c_ushort,
    "int": ctypes.c_int, "unsigned int": ctypes.c_uint, "long": ctypes.c_long,
    "unsigned long": ctypes.c_ulong, "long long": ctypes.c_longlong,
    "unsigned long long": ctypes.c_ulonglong, "float": ctypes.c_float,
    "double": ctypes.c_double, "__int128": ctypes.c_int64 * 2,
    "unsigned __int128": ctypes.c_uint64 * 2,
}


def ctype_from_desc(desc):
    """A ctypes type from the JSON description the BPF compiler gives of a map's key or value:
    a scalar's C name, or [name, [fields], "struct" | "struct_packed" | "union"], each field
    [name, type], [name, type, [length]] (an array) or [name, type, bits] (a bit field)."""
    if isinstance(desc, str):
        try:
            return _SCALARS[desc]
        except KeyError:
            raise ValueError(f"unknown scalar type {desc!r} in a map description") from None
    name, members = desc[0], desc[1]
    kind = desc[2] if len(desc) > 2 else "struct"
    fields, anon = [], []
    for m in members:
        if len(m) == 2:
            fields.append((m[0], ctype_from_desc(m[1])))
        elif isinstance(m[2], list):
            t = ctype_from_desc(m[1])
            for n in reversed(m[2]):
                t = t * n
            fields.append((m[0], t))
        elif isinstance(m[2], int):
            fields.append((m[0], ctype_from_desc(m[1]), m[2]))
        elif m[2] in ("struct", "struct_packed", "union"):
            field = m[0] or f"__anon{len(anon)}"
            if not m[0]:
                anon.append(field)
            fields.append((field, ctype_from_desc(m)))
        else:
            raise ValueError(f"cannot read map member description {m!r}")
    base = ctypes.Union if kind == "union" else ctypes.Structure
    ns = {"_fields_": fields, "_anonymous_": anon}
    if kind == "struct_packed":
        ns["_pack_"] = 1
    return type(str(name or "anon"), (base,), ns)


def _scalar_value(t):
    return issubclass(t, ctypes._SimpleCData)


# -- maps ----------------------------------------------------------------------------------------
class Map:
    """One BPF map held by fd. Keys may be ctypes instances of `Key` (or any object of the same
    size with the buffer protocol) or ints; values come back as `Leaf` instances, and for a
    per-CPU map as a list with one value per possible CPU (ints when the value is a scalar)."""

    def __init__(self, name: str, fd: int, map_type: int, key_size: int, value_size: int,
                 max_entries: int, key_type=None, leaf_type=None) -> None:
        self.name = name
        self.map_fd = fd
        self.map_type = map_type
        self.key_size = key_size
        self.value_size = value_size
        self.max_entries = max_entries
        self.Key = key_type or (ctypes.c_ubyte * key_size)
        self.Leaf = leaf_type or (ctypes.c_ubyte * value_size)
        self.percpu = map_type in PERCPU_TYPES
        self.ncpus = possible_cpus() if self.percpu else 1
        self._stride = (value_size + 7) & ~7 if self.percpu else value_size
        self._vsize = self._stride * self.ncpus

    # bytes in, bytes out
    def _kbuf(self, key) -> ctypes.Array:
        if isinstance(key, int):
            key = self.Key(key)
        raw = bytes(key) if not isinstance(key, (bytes, bytearray)) else key
        if len(raw) != self.key_size:
            raise ValueError(f"{self.name}: key of {len(raw)} bytes, the map's are "
                             f"{self.key_size}")
        return (ctypes.c_char * len(raw)).from_buffer_copy(raw)

    def lookup_bytes(self, key) -> bytes | None:
        """The raw value of `key` (all CPUs' for a per-CPU map), or None."""
        k = self._kbuf(key)
        v = ctypes.create_string_buffer(self._vsize)
        try:
            bpf(MAP_LOOKUP_ELEM, _ElemAttr(self.map_fd, 0, ctypes.addressof(k),
                                           ctypes.addressof(v), 0))
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise
        return v.raw

    def update(self, key, value, flags: int = ANY) -> bool:
        """Write `value` (bytes, or a Leaf; for a per-CPU map the same value goes to every CPU
        unless it already holds all of them). False when NOEXIST/EXIST made it a no-op."""
        raw = bytes(value) if not isinstance(value, (bytes, bytearray)) else bytes(value)
        if self.percpu and len(raw) != self._vsize:
            raw = raw.ljust(self._stride, b"\0") * self.ncpus
        if len(raw) != self._vsize:
            raise ValueError(f"{self.name}: value of {len(raw)} bytes, the map's are "
                             f"{self._vsize}")
        k = self._kbuf(key)
        v = ctypes.create_string_buffer(raw, len(raw))
        try:
            bpf(MAP_UPDATE_ELEM, _ElemAttr(self.map_fd, 0, ctypes.addressof(k),
                                           ctypes.addressof(v), flags))
        except OSError as exc:
            if (exc.errno == errno.EEXIST and flags == NOEXIST) or (
                    exc.errno == errno.ENOENT and flags == EXIST):
                return False
            raise
        return True

    def delete(self, key) -> bool:
        """Delete `key`; False when it was not there."""
        k = self._kbuf(key)
        try:
            bpf(MAP_DELETE_ELEM, _ElemAttr(self.map_fd, 0, ctypes.addressof(k), 0, 0))
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        return True

    def next_key(self, key=None) -> bytes | None:
        """The key after `key` (the first for None), or None at the end."""
        nk = ctypes.create_string_buffer(self.key_size)
        k = self._kbuf(key) if key is not None else None
        try:
            bpf(MAP_GET_NEXT_KEY, _ElemAttr(self.map_fd, 0, ctypes.addressof(k) if k else 0,
                                            ctypes.addressof(nk), 0))
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise
        return nk.raw

    # typed access, as bcc's tables offered it
    def _value(self, raw: bytes):
        if not self.percpu:
            return self.Leaf.from_buffer_copy(raw)
        vals = [self.Leaf.from_buffer_copy(raw, i * self._stride) for i in range(self.ncpus)]
        return [v.value for v in vals] if _scalar_value(self.Leaf) else vals

    def __getitem__(self, key):
        raw = self.lookup_bytes(key)
        if raw is None:
            raise KeyError(key)
        return self._value(raw)

    def __setitem__(self, key, value) -> None:
        self.update(key, value)

    def __delitem__(self, key) -> None:
        if not self.delete(key):
            raise KeyError(key)

    def keys(self) -> Iterator:
        k = self.next_key()
        while k is not None:
            yield self.Key.from_buffer_copy(k)
            k = self.next_key(k)

    def items(self) -> list[tuple]:
        """(Key, value) of every entry, one lookup each (prefer items_lookup_batch)."""
        out = []
        for k in list(self.keys()):
            raw = self.lookup_bytes(k)
            if raw is not None:
                out.append((k, self._value(raw)))
        return out

    def items_lookup_batch(self) -> list[tuple]:
        return self._batch(MAP_LOOKUP_BATCH)

    def items_lookup_and_delete_batch(self) -> list[tuple]:
        return self._batch(MAP_LOOKUP_AND_DELETE_BATCH)

    def _batch(self, cmd: int, chunk: int = 1024) -> list[tuple]:
        out = []
        n = min(chunk, self.max_entries) or 1
        token_in = ctypes.create_string_buffer(max(8, self.key_size))
        token_out = ctypes.create_string_buffer(max(8, self.key_size))
        first = True
        while True:
            keys = ctypes.create_string_buffer(n * self.key_size)
            vals = ctypes.create_string_buffer(n * self._vsize)
            attr = _BatchAttr(0 if first else ctypes.addressof(token_in),
                              ctypes.addressof(token_out), ctypes.addressof(keys),
                              ctypes.addressof(vals), n, self.map_fd, 0, 0)
            done = False
            try:
                bpf(cmd, attr)
            except OSError as exc:
                if exc.errno == errno.ENOSPC and attr.count == 0:
                    n *= 2  # one hash bucket holds more entries than we asked for
                    continue
                if exc.errno != errno.ENOENT:
                    raise
                done = True
            kr, vr = keys.raw, vals.raw
            for i in range(attr.count):
                out.append((self.Key.from_buffer_copy(kr, i * self.key_size),
                            self._value(vr[i * self._vsize:(i + 1) * self._vsize])))
            if done:
                return out
            ctypes.memmove(token_in, token_out, len(token_out))
            first = False

    def walk(self, stack_id: int) -> Iterator[int]:
        """The addresses of stack `stack_id` in a stack-trace map, innermost first."""
        raw = self.lookup_bytes(ctypes.c_uint32(stack_id & 0xFFFFFFFF))
        if raw is None:
            raise KeyError(stack_id)
        for addr in array("Q", raw):
            if not addr:
                break
            yield addr


# -- ring buffers --------------------------------------------------------------------------------
_BUSY, _DISCARD = 1 << 31, 1 << 30
_FLAGS, _LEN = _BUSY | _DISCARD, (1 << 30) - 1
_HDR = struct.Struct("<I")
_POS = struct.Struct("<Q")


class RingBuffer:
    """The consumer side of a BPF_MAP_TYPE_RINGBUF map: the consumer page mapped read-write, the
    producer page and the data pages read-only, the data twice in a row so that a record
    wrapping past the end reads as one slice. Not thread-safe: one consumer."""

    def __init__(self, consumer: memoryview, producer: memoryview, size: int,
                 page: int = mmap.PAGESIZE, maps: tuple = ()) -> None:
        """Over already mapped memory: `consumer` the consumer page (writable), `producer` the
        producer page followed by the data twice. `open()` maps a ring buffer map's fd."""
        if size <= 0 or size & (size - 1):
            raise ValueError(f"a ring buffer's size is a power of 2, not {size}")
        self.size = size
        self._mask = size - 1
        self._cons = consumer
        self._prod = producer
        self._words = producer.cast("B").cast("I")
        self._page = page
        self._maps = maps

    @classmethod
    def open(cls, fd: int, size: int) -> "RingBuffer":
        """Map the ring buffer map `fd` of `size` data bytes (its max_entries)."""
        page = mmap.PAGESIZE
        if size % page:
            raise ValueError(f"a ring buffer's size is a number of pages, not {size}")
        cons = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        try:
            data = mmap.mmap(fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        except BaseException:
            cons.close()
            raise
        return cls(memoryview(cons), memoryview(data), size, page, (cons, data))

    def available(self) -> int:
        """Bytes written and not consumed yet."""
        return _POS.unpack_from(self._prod, 0)[0] - _POS.unpack_from(self._cons, 0)[0]

    def drain(self, limit: int | None = None) -> tuple[list[bytes], int]:
        """Every record committed now, in order, as bytes; (records, records past `limit`,
        consumed and dropped). A record still being written ends the batch."""
        cons = _POS.unpack_from(self._cons, 0)[0]
        prod = _POS.unpack_from(self._prod, 0)[0]  # an acquire on x86-64
        start = cons
        data, words, mask, base = self._prod, self._words, self._mask, self._page
        out: list[bytes] = []
        append = out.append
        dropped = 0
        keep = limit if limit is not None else -1
        while cons < prod:
            at = base + (cons & mask)
            h = words[at >> 2]  # the header's length word: records are 8-byte aligned
            if h & _FLAGS:
                if h & _BUSY:
                    break
                cons += ((h & _LEN) + 15) & ~7  # discarded
                continue
            if keep:
                append(data[at + 8:at + 8 + h].tobytes())
                keep -= 1
            else:
                dropped += 1
            cons += (h + 15) & ~7  # 8-byte header, length rounded up to 8
        if cons != start:
            _POS.pack_into(self._cons, 0, cons)  # a release on x86-64: records read before
        return out, dropped

    def close(self) -> None:
        for mv in (self._words, self._cons, self._prod):
            if mv is not None:
                mv.release()
        self._words = self._cons = self._prod = None
        for m in self._maps:
            m.close()
        self._maps = ()


# -- kernel symbols ----------------------------------------------------------------------------
class KernelSymbols:
    """Kernel text symbols from /proc/kallsyms (root sees real addresses), loaded on first use
    into three flat arrays (about 5 MB for 120k symbols), looked up by bisection."""

    def __init__(self, path: str = "/proc/kallsyms") -> None:
        self.path = path
        self._addrs: array | None = None
        self._offs = array("I")
        self._names = b""

    def _load(self) -> None:
        pairs = []
        with open(self.path, "rb") as f:
            for line in f:
                parts = line.split(None, 3)
                if len(parts) < 3 or parts[1] not in (b"t", b"T", b"w", b"W"):
                    continue
                a = int(parts[0], 16)
                if a:
                    pairs.append((a, parts[2]))
        pairs.sort(key=lambda p: p[0])
        addrs, offs, blob, at = array("Q"), array("I"), [], 0
        for a, name in pairs:
            addrs.append(a)
            offs.append(at)
            blob.append(name)
            at += len(name)
        offs.append(at)
        self._addrs, self._offs, self._names = addrs, offs, b"".join(blob)

    def name(self, addr: int) -> bytes:
        """The name of the function containing `addr`, or b"[unknown]"."""
        if self._addrs is None:
            self._load()
        i = bisect_right(self._addrs, addr) - 1
        if i < 0:
            return b"[unknown]"
        return self._names[self._offs[i]:self._offs[i + 1]]


# -- the loaded probes, as the rest of the agent sees them --------------------------------------
class LoadedProbes:
    """The maps (by name), programs (by name) and attachments handed over by the loader. Offers
    what bcc's BPF object offered the session and the decoder: `probes[b"name"]` for a map and
    `ksym(addr)`. `close()` closes every fd: the attachments go, then the programs and maps
    once nothing else holds them."""

    def __init__(self, maps: dict[str, Map], progs: dict[str, int], links: list[int]) -> None:
        self.maps = maps
        self.progs = progs
        self.links = links
        self._ksyms = KernelSymbols()
        self._rings: list[RingBuffer] = []
        #: the pid of the loader child that compiled and attached them (gone by now)
        self.loader_pid: int | None = None

    def __getitem__(self, name: bytes | str) -> Map:
        key = name.decode() if isinstance(name, bytes) else name
        try:
            return self.maps[key]
        except KeyError:
            raise KeyError(name) from None

    def __contains__(self, name: bytes | str) -> bool:
        return (name.decode() if isinstance(name, bytes) else name) in self.maps

    def ksym(self, addr: int) -> bytes:
        return self._ksyms.name(addr)

    def ring_buffer(self, name: str) -> RingBuffer:
        m = self[name]
        if m.map_type != RINGBUF:
            raise ValueError(f"{name} is not a ring buffer")
        rb = RingBuffer.open(m.map_fd, m.max_entries)
        self._rings.append(rb)
        return rb

    def close(self) -> None:
        for rb in self._rings:
            rb.close()
        self._rings = []
        # Attachments first, so that no program runs against a map being torn down.
        for fd in self.links:
            _close(fd)
        for fd in self.progs.values():
            _close(fd)
        for m in self.maps.values():
            _close(m.map_fd)
        self.links, self.progs, self.maps = [], {}, {}


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
