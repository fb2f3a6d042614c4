"""BTF offsets proven on the running kernel: a BPF program reads task_struct at the offsets
probes/btf.py found and must see what the kernel and the calling thread say themselves.

The compile uses whatever header tree probes.kheaders picks (Debian 6.1 here, on a newer kernel):
the program never uses struct task_struct from those headers, only our -D offsets.
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading

import pytest

from probes import btf, kheaders
from tests.support import is_root

pytestmark = [pytest.mark.integration, pytest.mark.root,
              pytest.mark.skipif(not is_root(), reason="BPF needs root"),
              pytest.mark.skipif(platform.machine() != "x86_64", reason="thread.fsbase is x86-64"),
              pytest.mark.skipif(not os.path.exists(btf.VMLINUX), reason="no kernel BTF")]

# A test-only program: it exists to check offsets, not to ship, so it stays next to its test.
PROGRAM = r"""
struct seen {
    u64 pid_tgid;   /* what the kernel's helper says */
    u32 pid;        /* task->pid, read at PID_OFF */
    u32 tgid;       /* task->tgid, read at TGID_OFF */
    u64 fsbase;     /* task->thread.fsbase, read at FSBASE_OFF */
    s64 err;
    u32 hits;
};
BPF_HASH(seen_by_tid, u32, struct seen, 64);

TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {
    u64 id = bpf_get_current_pid_tgid();
    if ((id >> 32) != TARGET_TGID)
        return 0;
    u32 tid = (u32)id;
    struct seen zero = {}, *s;
    s = seen_by_tid.lookup_or_try_init(&tid, &zero);
    if (!s)
        return 0;
    char *task = (char *)bpf_get_current_task();
    s->pid_tgid = id;
    s->err = bpf_probe_read_kernel(&s->pid, sizeof(s->pid), task + PID_OFF);
    s->err |= bpf_probe_read_kernel(&s->tgid, sizeof(s->tgid), task + TGID_OFF);
    s->err |= bpf_probe_read_kernel(&s->fsbase, sizeof(s->fsbase), task + FSBASE_OFF);
    s->hits++;
    return 0;
}
"""

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.pthread_self.restype = ctypes.c_ulong
_SYS_ARCH_PRCTL, _ARCH_GET_FS = 158, 0x1003


def thread_truth() -> dict:
    """This thread's ids and fs base, from the kernel (arch_prctl) and from glibc (pthread_self,
    the thread control block, which is what fs points at on x86-64)."""
    fs = ctypes.c_ulong()
    if _libc.syscall(_SYS_ARCH_PRCTL, _ARCH_GET_FS, ctypes.byref(fs)) != 0:
        raise OSError(ctypes.get_errno(), "arch_prctl(ARCH_GET_FS)")
    os.getppid()                                   # the syscall the probe watches
    return {"tid": threading.get_native_id(), "tgid": os.getpid(), "fsbase": fs.value,
            "pthread_self": _libc.pthread_self()}


def test_btf_offsets_read_the_calling_threads_task_struct():
    bcc = pytest.importorskip("bcc")
    offs = btf.offsets("task_struct", ["pid", "tgid", "thread.fsbase"])
    headers = kheaders.resolve(create=True)
    if not headers.found:
        pytest.skip(f"no kernel headers for bcc: {headers.detail}")
    kheaders.apply(headers)
    cflags = [f"-DTARGET_TGID={os.getpid()}", f"-DPID_OFF={offs['pid']}",
              f"-DTGID_OFF={offs['tgid']}", f"-DFSBASE_OFF={offs['thread.fsbase']}"]
    truths = []
    with bcc.BPF(text=PROGRAM.encode(), cflags=cflags) as b:
        truths.append(thread_truth())
        # A second thread: its tid differs from the tgid (a swapped pid/tgid would show) and
        # its fs base is its own.
        worker = threading.Thread(target=lambda: truths.append(thread_truth()))
        worker.start()
        worker.join()
        seen = {k.value: v for k, v in b[b"seen_by_tid"].items()}
    assert truths[0]["tid"] != truths[1]["tid"] and truths[0]["fsbase"] != truths[1]["fsbase"]
    for t in truths:
        assert t["fsbase"] == t["pthread_self"]          # the two views of fs agree
        s = seen[t["tid"]]
        assert s.hits >= 1 and s.err == 0, (offs, s.err)
        assert s.pid_tgid == (t["tgid"] << 32) | t["tid"]
        assert (s.pid, s.tgid) == (t["tid"], t["tgid"]), offs
        assert s.fsbase == t["fsbase"], (offs, hex(s.fsbase), hex(t["fsbase"]))
