"""The agent's own BPF layer without a kernel: the ring buffer consumer over memory laid out as
the kernel lays it out, map type descriptions turned into ctypes, kernel symbol lookup."""

from __future__ import annotations

import ctypes
import json
import struct

from probes.bpfsys import KernelSymbols, RingBuffer, ctype_from_desc

PAGE, SIZE = 64, 128
BUSY, DISCARD = 1 << 31, 1 << 30


class FakeRing:
    """A consumer page and a producer page + data mapped twice, as bytearrays: what the
    kernel's producer would write, written into both copies of the data."""

    def __init__(self, start: int = 0) -> None:
        self.cons = bytearray(PAGE)
        self.prod = bytearray(PAGE + 2 * SIZE)
        self.pos = start
        struct.pack_into("<Q", self.cons, 0, start)
        struct.pack_into("<Q", self.prod, 0, start)
        self.rb = RingBuffer(memoryview(self.cons), memoryview(self.prod), SIZE, PAGE)

    def _put(self, pos: int, data: bytes) -> None:
        for i, b in enumerate(data):
            at = (pos + i) % SIZE
            self.prod[PAGE + at] = b
            self.prod[PAGE + SIZE + at] = b

    def write(self, payload: bytes, flags: int = 0, commit: bool = True) -> None:
        self._put(self.pos, struct.pack("<II", len(payload) | flags, 0) + payload)
        self.pos += (len(payload) + 8 + 7) & ~7
        if commit:
            struct.pack_into("<Q", self.prod, 0, self.pos)

    def consumer_pos(self) -> int:
        return struct.unpack_from("<Q", self.cons, 0)[0]


def test_records_come_back_in_order_and_the_consumer_position_advances():
    r = FakeRing()
    r.write(b"abc")
    r.write(b"12345678")
    got, dropped = r.rb.drain()
    assert got == [b"abc", b"12345678"] and dropped == 0
    assert r.consumer_pos() == 16 + 16  # 8-byte header, payload rounded up to 8
    assert r.rb.drain() == ([], 0)


def test_a_record_wrapping_past_the_end_reads_whole():
    r = FakeRing(start=SIZE * 3 - 16)  # positions only grow; the data offset wraps
    payload = bytes(range(40))
    r.write(payload)
    assert r.rb.drain()[0] == [payload]
    assert r.consumer_pos() == SIZE * 3 - 16 + 48


def test_a_record_still_being_written_ends_the_batch_and_discarded_ones_are_skipped():
    r = FakeRing()
    r.write(b"one")
    r.write(b"gone", flags=DISCARD)
    r.write(b"busy", flags=BUSY)
    r.write(b"after")
    got, _ = r.rb.drain()
    assert got == [b"one"]
    assert r.consumer_pos() == 16 + 16  # past the discarded record, stopped at the busy one
    # The producer commits it: the busy bit goes, the rest follows.
    r._put(32, struct.pack("<I", 4))
    assert r.rb.drain()[0] == [b"busy", b"after"]
    assert r.consumer_pos() == r.pos


def test_records_past_the_limit_are_consumed_and_counted():
    r = FakeRing()
    for i in range(5):
        r.write(bytes([i]) * 3)
    got, dropped = r.rb.drain(limit=2)
    assert got == [b"\0\0\0", b"\1\1\1"] and dropped == 3
    assert r.consumer_pos() == r.pos
    assert r.rb.available() == 0


def test_nothing_committed_yet_reads_nothing():
    r = FakeRing()
    r.write(b"x", commit=False)
    assert r.rb.drain() == ([], 0)
    assert r.consumer_pos() == 0


def test_map_descriptions_become_ctypes_with_the_compilers_layout():
    # As bcc describes `struct rec { u16 kind; u32 tgid; struct hdr hdr; union { u64 a;
    # int b; }; struct frame frames[3]; u32 bits:4; }`: nested structs packed with their
    # padding spelled out, an anonymous member described in place.
    desc = ["rec", [["kind", "unsigned short"], ["tgid", "unsigned int"],
                    ["hdr", ["hdr", [["depth", "unsigned char"], ["__pad_1", "char", [3]],
                                     ["hash", "unsigned int"]], "struct_packed"]],
                    ["", [["a", "unsigned long long"], ["b", "int"]], "union"],
                    ["frames", ["frame", [["code", "unsigned long long"],
                                          ["instr", "unsigned int"], ["__pad_2", "char", [4]]],
                                "struct_packed"], [3]],
                    ["bits", "unsigned int", 4]], "struct"]
    T = ctype_from_desc(json.loads(json.dumps(desc)))
    v = T()
    v.tgid, v.hdr.hash, v.a, v.frames[2].instr, v.bits = 7, 9, 1 << 40, 5, 3
    assert (v.tgid, v.hdr.hash, v.a, v.b, v.frames[2].instr, v.bits) == (7, 9, 1 << 40, 0, 5, 3)
    assert len(v.frames) == 3
    assert T.hdr.offset == 8 and T.frames.offset == 24 and ctypes.sizeof(T) == 80
    packed = ctype_from_desc(["p", [["a", "unsigned char"], ["b", "unsigned long long"]],
                                   "struct_packed"])
    assert ctypes.sizeof(packed) == 9
    assert ctype_from_desc("unsigned int") is ctypes.c_uint


def test_kernel_addresses_resolve_to_the_function_containing_them(tmp_path):
    f = tmp_path / "kallsyms"
    f.write_text("ffffffff81000100 T second\n"
                 "ffffffff81000000 T first\n"
                 "ffffffff81000080 D some_data\n"
                 "ffffffffc0001000 t mod_fn\t[mod]\n")
    k = KernelSymbols(str(f))
    assert k.name(0xFFFFFFFF81000000) == b"first"
    assert k.name(0xFFFFFFFF810000FF) == b"first"  # data symbols do not split functions
    assert k.name(0xFFFFFFFF81000104) == b"second"
    assert k.name(0xFFFFFFFFC0001010) == b"mod_fn"
    assert k.name(0x1000) == b"[unknown]"
