"""probes.pyprocess and probes.pysymbols against real CPython processes of every supported version.

The target (tests/programs/pyintrospect_target.py) reports, from inside, each thread's
PyThreadState* and frames (id(code), f_lasti, f_lineno, name, file). We check that what we read
from outside, the way the kernel will, agrees: the TSD slot, the frame chain walked with the
packed kernel config, the datastack bounds, and symbolized frames.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from agent.errors import NoSuchProcess
from probes.pyprocess import ProcessMemory, Unsupported, code_check, inspect
from probes.pysymbols import MAX_NAME_CHARS, Symbolizer
from tests.support import PROGRAMS, is_root

pytestmark = [pytest.mark.integration, pytest.mark.root,
              pytest.mark.skipif(not is_root(), reason="reading /proc/PID/mem needs root")]

PYENV = Path.home() / ".pyenv" / "versions"
INTERPRETERS = {
    "3.10": PYENV / "3.10.13" / "bin" / "python3.10",
    "3.11": PYENV / "3.11.7" / "bin" / "python3.11",
    "3.12": PYENV / "3.12.1" / "bin" / "python3.12",
    "3.13": PYENV / "3.13.0" / "bin" / "python3.13",
    "debian-3.11": Path("/usr/bin/python3"),
}
BLOCKED = {"lock": "blocked_on_lock", "sleep": "blocked_in_sleep", "recv": "blocked_in_recv",
           "event": "Condition.wait", "unicode": "𠀋"}
PY_PROC = struct.Struct("<QQQII16H")
FIELDS = ("tss_off interp code_type version flags ts_interp ts_frame cf_current ts_chunk ts_top "
          "f_code f_previous f_instr f_owner co_argcount co_kwonlyargcount co_flags "
          "co_firstlineno gen_frame pad1 pad2").split()


@contextmanager
def running(python: Path):
    if not python.exists():
        pytest.skip(f"{python} is not installed")
    proc = subprocess.Popen([str(python), str(PROGRAMS / "pyintrospect_target.py")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        yield proc, json.loads(line)
    finally:
        proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()


@pytest.fixture(scope="module", params=list(INTERPRETERS))
def target(request):
    with running(INTERPRETERS[request.param]) as (proc, info):
        with ProcessMemory(proc.pid) as mem:
            yield inspect(proc.pid), info, mem


def config(pp):
    return dict(zip(FIELDS, PY_PROC.unpack(pp.bpf_config())))


def kernel_check(mem, pp, code):
    o = pp.offsets
    i32 = lambda off: struct.unpack("<i", mem.read(code + off, 4))[0]  # noqa: E731
    return code_check(i32(o.co_firstlineno), i32(o.co_argcount), i32(o.co_kwonlyargcount),
                      i32(o.co_flags))


def kernel_instr(pp, f_lasti):
    """What the kernel records for a frame whose Python-level f_lasti (bytes) is given."""
    return f_lasti // 2 if pp.version < (3, 11) else pp.offsets.co_code_adaptive + f_lasti


def test_inspect_finds_version_interpreter_and_code_type(target):
    pp, info, mem = target
    assert pp.version == tuple(info["version"])
    assert pp.interp == info["interp"]
    assert pp.code_type == info["code_type"]
    assert pp.threads_seen == pp.threads_matched == len(info["threads"])
    cfg = config(pp)
    assert (cfg["tss_off"], cfg["interp"], cfg["code_type"]) == (pp.tss_off, pp.interp, pp.code_type)
    assert cfg["version"] == 0x300 | pp.version[1] and cfg["flags"] == (pp.version < (3, 11))
    for thread in info["threads"]:
        assert mem.u64(thread["tstate"] + cfg["ts_interp"]) == pp.interp


def test_tsd_slot_holds_each_threads_tstate(target):
    pp, info, mem = target
    o = pp.offsets
    for thread in info["threads"]:
        fsbase = mem.u64(thread["tstate"] + o.ts_thread_id)
        assert mem.u64(fsbase + pp.tss_off) == thread["tstate"], thread["role"]
        if o.ts_native_thread_id is not None:
            assert mem.u64(thread["tstate"] + o.ts_native_thread_id) == thread["native_thread_id"]


def walk(mem, pp, tstate, limit=64):
    """The blocked thread's frames as the kernel walks them with the packed config:
    [(frame address, code address, raw instr)], C-stack shim frames skipped."""
    cfg = config(pp)
    frame = mem.u64(tstate + cfg["ts_frame"])
    if cfg["cf_current"] != 0xFFFF:
        frame = mem.u64(frame + cfg["cf_current"])
    out = []
    while frame and len(out) < limit:
        code = mem.u64(frame + cfg["f_code"])
        if cfg["flags"] & 1:
            instr = struct.unpack("<i", mem.read(frame + cfg["f_instr"], 4))[0]
        else:
            instr = mem.u64(frame + cfg["f_instr"]) - code
        owner = mem.read(frame + cfg["f_owner"], 1)[0] if cfg["f_owner"] != 0xFFFF else 0
        if owner != 3 and mem.u64(code + 8) == pp.code_type:  # 3.12+: 3 = owned by the C stack
            out.append((frame, code, instr))
        frame = mem.u64(frame + cfg["f_previous"])
    return out


def test_frame_chain_and_datastack_agree_with_the_target(target):
    pp, info, mem = target
    cfg = config(pp)
    for thread in info["threads"]:
        if thread["role"] not in BLOCKED:
            continue
        frames = walk(mem, pp, thread["tstate"])
        assert [code for _, code, _ in frames] == [f[0] for f in thread["frames"]], thread["role"]
        for (_, _, instr), (_, f_lasti, *_) in zip(frames, thread["frames"]):
            assert instr == kernel_instr(pp, f_lasti), thread["role"]
        if cfg["ts_chunk"] == 0xFFFF:
            continue
        # the innermost frame sits in the current datastack chunk (data @24, size @8), and
        # datastack_top is exactly its size above it: 9 header words, then its slots
        innermost, slots = frames[0][0], thread["frames"][0][5]
        chunk = mem.u64(thread["tstate"] + cfg["ts_chunk"])
        top = mem.u64(thread["tstate"] + cfg["ts_top"])
        assert chunk + 24 <= innermost < top <= chunk + mem.u64(chunk + 8), thread["role"]
        assert top - innermost == 8 * (9 + slots), thread["role"]


def test_symbolizer_matches_sys_current_frames(target):
    pp, info, mem = target
    with Symbolizer(pp) as sym:
        seen = 0
        for thread in info["threads"]:
            for code, f_lasti, f_lineno, name, filename, _ in thread["frames"]:
                frame = sym.frame(code, kernel_check(mem, pp, code), kernel_instr(pp, f_lasti))
                assert tuple(frame) == (name[:MAX_NAME_CHARS], filename, f_lineno or 0), name
                seen += 1
            if thread["role"] in BLOCKED:
                expected = BLOCKED[thread["role"]]  # 3.10 has co_name only
                assert thread["frames"][0][3] == (expected if pp.version >= (3, 11)
                                                  else expected.split(".")[-1])
        assert seen >= 20 and sym.errors == sym.reused == 0
        # str objects of every kind were read: latin-1, UCS-2 and UCS-4 names, one cut short
        names = {f[3] for t in info["threads"] for f in t["frames"]}
        assert {"café", "ожидание", "𠀋"} <= names and max(map(len, names)) > MAX_NAME_CHARS
        assert sym.misses == len({f[0] for t in info["threads"] for f in t["frames"]})
        assert sym.hits == seen - sym.misses


def test_symbolizer_refuses_garbage_and_stale_addresses(target):
    pp, info, mem = target
    code = info["threads"][0]["frames"][0][0]
    check = kernel_check(mem, pp, code)
    with Symbolizer(pp, max_entries=2) as sym:
        assert sym.frame(code, check ^ 1, 0) is None  # another code object than the kernel saw
        assert sym.reused == 1
        for bogus in (0, 8, pp.interp, pp.code_type, pp.runtime_addr, 2**47 - 8, 2**64 - 8, code + 8):
            assert sym.frame(bogus, check, 0) is None
        assert sym.errors == 8
        assert sym.frame(code, check, -10**6).line > 0  # instr out of range: the first line
        codes = {f[0] for t in info["threads"] for f in t["frames"]}
        for other in codes:
            sym.frame(other, kernel_check(mem, pp, other), 0)
        assert len(sym._cache) == 2  # bounded


def test_bpf_config_matches_the_c_struct(tmp_path):
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed")
    members = ["u64 tss_off", "u64 interp", "u64 code_type", "u32 version", "u32 flags"]
    members += [f"u16 {name}" for name in FIELDS[5:]]
    src = tmp_path / "py_proc.c"
    src.write_text(
        "#include <stdio.h>\n#include <stddef.h>\n#include <stdint.h>\n"
        "typedef uint64_t u64; typedef uint32_t u32; typedef uint16_t u16;\n"
        "struct py_proc {" + "".join(f" {m};" for m in members) + " };\n"
        "int main(void) { printf(\"%zu\", sizeof(struct py_proc));"
        + "".join(f" printf(\" %zu\", offsetof(struct py_proc, {m.split()[1]}));" for m in members)
        + " return 0; }\n")
    subprocess.run([gcc, str(src), "-o", str(tmp_path / "py_proc")], check=True)
    size, *offsets = map(int, subprocess.run([str(tmp_path / "py_proc")], capture_output=True,
                                             text=True, check=True).stdout.split())
    assert size == PY_PROC.size == 64
    packed = [PY_PROC.pack(*[(1 << 16) - 1 if i == j else 0 for j in range(len(FIELDS))])
              for i in range(len(FIELDS))]
    assert [p.index(b"\xff") for p in packed] == offsets


def test_python_39_is_refused_with_a_reason():
    with running(PYENV / "3.9.18" / "bin" / "python3.9") as (proc, _):
        with pytest.raises(Unsupported, match=r"CPython 3\.9 is not supported"):
            inspect(proc.pid)


def test_non_python_process_is_refused():
    proc = subprocess.Popen(["sleep", "30"])
    try:
        with pytest.raises(Unsupported, match="not a CPython process"):
            inspect(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def test_missing_process():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    with pytest.raises(NoSuchProcess):
        inspect(proc.pid)
