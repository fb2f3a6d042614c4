"""Compile, load and attach the probes in a short-lived child process; keep only the fds.

bcc compiles with LLVM inside the process that calls it, and LLVM, libbcc and what the compile
allocated stay mapped afterwards (about 125 MiB of RSS, of which malloc_trim returns 25). So the
agent never imports bcc: `load()` starts `python -m probes.loader` (a fresh interpreter, not a
fork of the agent's threads) with one end of a unix socketpair. The child compiles the sources,
attaches every program (bcc attaches `TRACEPOINT_PROBE`/`RAW_TRACEPOINT_PROBE` functions by
their names when it loads them; the CPU sampler goes on the cpu-clock perf event of every online
CPU), and sends back over the socket, with SCM_RIGHTS:

* every map: fd, name, type, key and value sizes, max entries, and the compiler's description of
  its key and value types (the agent builds its ctypes structs from them: probes/bpfsys.py);
* every program: fd and name;
* every attachment: the perf event fds (tracepoints, cpu-clock) and the raw tracepoint fds. An
  attachment lives as long as some process holds its fd, so the probes keep running after the
  child exits.

Then it waits for the agent's acknowledgement and leaves with os._exit: bcc's cleanup (its atexit
handler, `BPF.cleanup`) would disable the perf events the agent now holds, so it must not run.

A child that fails sends {"error": kind, "detail": one line} (kind "import" or "load") and exits
1; what the compiler printed on stderr stays in a file the parent reads for its first error line.

Wire format (SOCK_SEQPACKET, one message each): the JSON header, then the fds in messages of at
most FDS_PER_MESSAGE (the kernel passes at most 253 per message), each message's payload being
b"F"; the header's indices count fds in the order they arrive.
"""

from __future__ import annotations

import array
import ctypes
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)
FDS_PER_MESSAGE = 200
_MAX_HEADER = 1 << 20


class LoadError(Exception):
    """The child could not compile, load or attach the probes. `kind` is "import" (bcc is not
    importable), "load" (the compile, the verifier or an attach failed) or "child" (the child
    died or broke the protocol); `detail` is one line."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True)
class Request:
    """What to compile and attach: probe source files (in probes/), -D flags, and the perf-event
    program to put on every CPU's cpu-clock with its period in ns (None: no sampler)."""

    sources: tuple[str, ...]
    cflags: tuple[str, ...]
    perf_fn: str | None = None
    perf_period_ns: int = 0
    #: fds per SCM_RIGHTS message (the kernel's limit is 253)
    fds_per_message: int = FDS_PER_MESSAGE


# -- parent ----------------------------------------------------------------------------------
def load(req: Request, timeout_s: float = 120.0):
    """Run the loader child; returns probes.bpfsys.LoadedProbes holding every fd it handed over.
    Raises LoadError (with the compiler's first error line when it printed one)."""
    from probes import bpfsys

    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    err = tempfile.TemporaryFile()
    env = dict(os.environ)
    # The child imports this very package, whatever sys.path made us find it.
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    received: list[int] = []
    proc = None
    try:
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "probes.loader", str(child.fileno())],
                pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=err, env=env, cwd="/")
        except OSError as exc:
            raise LoadError("child", f"cannot start the loader ({exc})") from None
        finally:
            child.close()
        parent.settimeout(timeout_s)
        parent.sendall(json.dumps({"sources": list(req.sources), "cflags": list(req.cflags),
                                   "perf_fn": req.perf_fn,
                                   "perf_period_ns": req.perf_period_ns,
                                   "fds_per_message": req.fds_per_message}).encode())
        deadline = time.monotonic() + timeout_s
        try:
            msg = parent.recv(_MAX_HEADER)
        except socket.timeout:
            raise LoadError("child", f"the loader gave no answer in {timeout_s:.0f} s") from None
        if not msg:
            raise LoadError("child", _child_died(proc, err))
        head = json.loads(msg)
        if "error" in head:
            try:  # let it finish writing stderr; a child that hangs is killed below
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            detail = head.get("detail", "") if head["error"] == "import" else (
                _first_error(_read(err)) or head.get("detail", "") or "unknown error")
            raise LoadError(head["error"], detail)
        total = head["nfds"]
        while len(received) < total:
            fds = _recv_fds(parent, min(req.fds_per_message, total - len(received)))
            if not fds:
                raise LoadError("child", "the loader closed the socket before sending every fd")
            received += fds
        parent.sendall(b"ok")
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        maps = {}
        for m in head["maps"]:
            fd = received[m["fd"]]
            maps[m["name"]] = bpfsys.Map(
                m["name"], fd, m["type"], m["key_size"], m["value_size"], m["max_entries"],
                _type_or_none(bpfsys, m.get("key_desc"), m["key_size"]),
                _type_or_none(bpfsys, m.get("leaf_desc"), m["value_size"]))
        progs = {name: received[i] for name, i in head["progs"].items()}
        links = [received[i] for i in head["links"]]
        used = {m.map_fd for m in maps.values()} | set(progs.values()) | set(links)
        for fd in received:
            if fd not in used:
                os.close(fd)
        received = []
        out = bpfsys.LoadedProbes(maps, progs, links)
        out.loader_pid = proc.pid
        return out
    except (OSError, ValueError, KeyError, subprocess.TimeoutExpired) as exc:
        raise LoadError("child", f"loader protocol failed ({type(exc).__name__}: {exc})") from None
    finally:
        for fd in received:
            os.close(fd)
        parent.close()
        err.close()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()


def _type_or_none(bpfsys, desc: str | None, size: int):
    """The ctypes type of a map's key or value, or None (raw bytes) when there is no usable
    description or it disagrees with the map's own size."""
    if not desc or not size:
        return None
    try:
        t = bpfsys.ctype_from_desc(json.loads(desc))
    except (ValueError, TypeError, IndexError) as exc:
        log.warning("cannot read a map type description (%s): raw bytes instead", exc)
        return None
    if ctypes.sizeof(t) != size:
        log.warning("map type %s is %d bytes, the map says %d: raw bytes instead",
                    t.__name__, ctypes.sizeof(t), size)
        return None
    return t


def _recv_fds(sock: socket.socket, n: int) -> list[int]:
    fds = array.array("i")
    msg, anc, _flags, _addr = sock.recvmsg(16, socket.CMSG_LEN(n * fds.itemsize),
                                           socket.MSG_CMSG_CLOEXEC)
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - (len(data) % fds.itemsize)])
    return list(fds)


def _read(f) -> str:
    f.seek(0)
    return f.read(1 << 16).decode("utf-8", "replace")


def _first_error(text: str) -> str:
    for line in text.splitlines():
        if "error" in line.lower():
            return line.strip()[:300]
    return ""


def _child_died(proc, err) -> str:
    try:
        rc = proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        rc = None
    text = _read(err)
    line = _first_error(text) or next((x.strip() for x in reversed(text.splitlines())
                                       if x.strip()), "")
    return f"the loader exited ({rc}) without an answer" + (f": {line[:300]}" if line else "")


# -- child -----------------------------------------------------------------------------------
def _child(sock: socket.socket) -> int:
    req = json.loads(sock.recv(_MAX_HEADER))
    try:
        from bcc import BPF, PerfSWConfig, PerfType
        from bcc.libbcc import lib
    except Exception as exc:  # a C-backed import can fail many ways
        sock.sendall(json.dumps({"error": "import", "detail":
                                 f"{type(exc).__name__}: {exc}"}).encode())
        return 1
    from probes import registry

    b = None
    try:
        text = registry.source_text(req["sources"])
        b = BPF(text=text.encode(), cflags=req["cflags"])
        if req.get("perf_fn"):
            b.attach_perf_event(ev_type=PerfType.SOFTWARE, ev_config=PerfSWConfig.CPU_CLOCK,
                                fn_name=req["perf_fn"].encode(),
                                sample_period=int(req["perf_period_ns"]))
        head, fds = _describe(b, lib)
    except Exception as exc:
        sock.sendall(json.dumps({"error": "load", "detail":
                                 (str(exc).splitlines() or [type(exc).__name__])[0]}).encode())
        if b is not None:
            b.cleanup()
        return 1
    sock.sendall(json.dumps(head).encode())
    step = max(1, min(int(req.get("fds_per_message") or FDS_PER_MESSAGE), 253))
    for i in range(0, len(fds), step):
        socket.send_fds(sock, [b"F"], fds[i:i + step])
    sock.settimeout(60)
    try:
        sock.recv(16)  # the agent holds them now
    except OSError:
        pass
    return 0


def _describe(b, lib) -> tuple[dict, list[int]]:
    """The header and the fds to send: every map, every program, every attachment."""
    import ctypes

    lib.bpf_num_tables.restype = ctypes.c_size_t
    lib.bpf_num_tables.argtypes = [ctypes.c_void_p]
    lib.bpf_table_name.restype = ctypes.c_char_p
    lib.bpf_table_name.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.bpf_table_key_size_id.restype = ctypes.c_size_t
    lib.bpf_table_key_size_id.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.bpf_table_leaf_size_id.restype = ctypes.c_size_t
    lib.bpf_table_leaf_size_id.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    fds: list[int] = []
    maps = []
    for i in range(lib.bpf_num_tables(b.module)):
        name = lib.bpf_table_name(b.module, i)
        fd = lib.bpf_table_fd(b.module, name)
        if fd < 0:
            continue
        maps.append({"name": name.decode(), "fd": len(fds),
                     "type": lib.bpf_table_type_id(b.module, i),
                     "key_size": lib.bpf_table_key_size_id(b.module, i),
                     "value_size": lib.bpf_table_leaf_size_id(b.module, i),
                     "max_entries": lib.bpf_table_max_entries_id(b.module, i),
                     "key_desc": (lib.bpf_table_key_desc(b.module, name) or b"").decode(),
                     "leaf_desc": (lib.bpf_table_leaf_desc(b.module, name) or b"").decode()})
        fds.append(fd)
    progs = {}
    for name, fn in b.funcs.items():
        progs[name.decode()] = len(fds)
        fds.append(fn.fd)
    attach = list(b.tracepoint_fds.values()) + list(b.raw_tracepoint_fds.values())
    for per_cpu in b.open_perf_events.values():
        attach += list(per_cpu.values())
    for table in (b.kprobe_fds, b.uprobe_fds):
        for v in table.values():
            attach += list(v.values()) if isinstance(v, dict) else [v]
    # Anything else that keeps a program attached (a bcc version attaching through bpf_link,
    # say) goes too: an attachment the agent does not hold would end with this process.
    known = set(fds) | set(attach)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            what = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if fd not in known and what in ("anon_inode:[perf_event]", "anon_inode:bpf_link",
                                        "anon_inode:bpf-link"):
            attach.append(fd)
    links = list(range(len(fds), len(fds) + len(attach)))
    fds += attach
    return {"nfds": len(fds), "maps": maps, "progs": progs, "links": links}, fds


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    try:
        rc = _child(sock)
    except BaseException as exc:  # never let bcc's atexit cleanup run after a handover
        try:
            sys.stderr.write(f"error: loader failed: {type(exc).__name__}: {exc}\n")
            sys.stderr.flush()
        finally:
            os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    main()
