"""`spanflame doctor`: what this machine lets spanflame do, with a fix for each failing line."""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

OK, WARN, FAIL = "ok", "warn", "fail"

_SYSCALLS = {"x86_64": {"bpf": 321, "perf_event_open": 298},
             "aarch64": {"bpf": 280, "perf_event_open": 241}}
_CAP_SYS_PTRACE = 19
_CAP_SYS_ADMIN = 21
_CAP_PERFMON = 38
_CAP_BPF = 39

TRACEFS_PATHS = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str
    hint: str = ""


def _caps() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def has_cap(bit: int) -> bool:
    return bool(_caps() >> bit & 1)


def _syscall(name: str, *args: object) -> tuple[int, int]:
    nr = _SYSCALLS.get(platform.machine(), {}).get(name)
    if nr is None:
        return -1, errno.ENOSYS
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    rc = libc.syscall(ctypes.c_long(nr), *args)
    return rc, ctypes.get_errno()


def check_python() -> Check:
    return Check("python", OK, f"{platform.python_implementation()} {platform.python_version()} "
                               f"({sys.executable})")


def check_pyspy() -> Check:
    from agent.errors import SamplerError
    from agent.pyspy import pyspy_path, pyspy_version
    try:
        return Check("py-spy", OK, f"{pyspy_version()} ({pyspy_path()})")
    except (SamplerError, OSError) as exc:
        return Check("py-spy", FAIL, str(exc), "pip install py-spy (make setup does)")


def check_ptrace() -> Check:
    scope_file = Path("/proc/sys/kernel/yama/ptrace_scope")
    scope = int(scope_file.read_text().strip()) if scope_file.exists() else None
    privileged = os.geteuid() == 0 or has_cap(_CAP_SYS_PTRACE)
    scope_text = f", yama ptrace_scope={scope}" if scope is not None else ", no yama"
    if scope == 3:
        return Check("ptrace", FAIL, f"ptrace disabled (yama ptrace_scope=3)",
                     "reboot with kernel.yama.ptrace_scope<3; scope 3 cannot be lowered at runtime")
    if privileged:
        return Check("ptrace", OK, f"CAP_SYS_PTRACE{scope_text}: can read any process")
    if scope in (None, 0):
        return Check("ptrace", WARN, f"unprivileged{scope_text}: only your own processes",
                     "run as root or grant CAP_SYS_PTRACE to profile other users' processes")
    return Check("ptrace", FAIL, f"unprivileged{scope_text}: cannot read other processes",
                 "run as root, grant CAP_SYS_PTRACE, or sysctl kernel.yama.ptrace_scope=0")


def check_bpf_syscall() -> Check:
    # BPF_MAP_CREATE of a 1-entry array map: the cheapest proof that bpf() works for us.
    attr = (ctypes.c_uint32 * 32)()
    attr[0], attr[1], attr[2], attr[3] = 2, 4, 4, 1  # BPF_MAP_TYPE_ARRAY, key 4, value 4, 1 entry
    fd, err = _syscall("bpf", ctypes.c_int(0), ctypes.byref(attr), ctypes.c_uint(ctypes.sizeof(attr)))
    if fd >= 0:
        os.close(fd)
        return Check("bpf syscall", OK, "bpf() map creation works")
    if err in (errno.EPERM, errno.EACCES):
        return Check("bpf syscall", FAIL, f"bpf() denied ({errno.errorcode.get(err, err)})",
                     "run as root or grant CAP_BPF, CAP_PERFMON (and CAP_SYS_ADMIN on older kernels)")
    return Check("bpf syscall", FAIL, f"bpf() unavailable ({os.strerror(err)})",
                 "use a kernel built with CONFIG_BPF_SYSCALL=y")


def check_btf() -> Check:
    p = Path("/sys/kernel/btf/vmlinux")
    if not p.exists():
        return Check("btf", WARN, "no kernel BTF: the kernel stack walker cannot find a thread's "
                                  "TLS (task_struct.thread.fsbase); py-spy does the stacks",
                     "use a kernel built with CONFIG_DEBUG_INFO_BTF=y")
    from probes import btf
    try:
        off = btf.member_offset("task_struct", "thread.fsbase")
    except btf.BtfError as exc:
        return Check("btf", WARN, f"{p}: {exc}", "the kernel stack walker is off; py-spy does "
                                                 "the stacks")
    return Check("btf", OK, f"{p}: task_struct.thread.fsbase at {off}")


def check_processes(limit: int = 20) -> Check:
    """Which stack source each Python process here would get, and why (reading processes needs
    root, like profiling them)."""
    from agent.discovery import Discovery
    from probes.pyprocess import Unsupported, inspect

    try:
        found = Discovery().scan()
    except Exception as exc:  # /proc unreadable: say so
        return Check("python processes", WARN, f"cannot list processes ({exc})")
    if not found:
        return Check("python processes", OK, "none running")
    parts, fallbacks = [], 0
    for pid, t in sorted(found.items())[:limit]:
        try:
            proc = inspect(pid)
            parts.append(f"{pid} {t.name} {proc.version[0]}.{proc.version[1]}: kernel walker")
        except Unsupported as exc:
            fallbacks += 1
            parts.append(f"{pid} {t.name}: py-spy ({exc.reason})")
        except Exception as exc:  # gone, or unreadable without root
            fallbacks += 1
            parts.append(f"{pid} {t.name}: cannot inspect ({type(exc).__name__}: {exc})")
    more = f"; and {len(found) - limit} more" if len(found) > limit else ""
    return Check("python processes", WARN if fallbacks else OK, "; ".join(parts) + more,
                 "py-spy samples the others: it cannot tell a wait's exact stack; "
                 "CPython 3.10-3.13 on x86-64 glibc get the kernel walker")


def tracefs_root() -> Path | None:
    for p in TRACEFS_PATHS:
        try:
            if (p / "events").is_dir():
                return p
        except PermissionError:
            continue
    return None


def check_tracefs() -> Check:
    root = tracefs_root()
    if root is None and os.geteuid() != 0:
        denied = []
        for p in TRACEFS_PATHS:
            try:
                (p / "events").is_dir()
            except PermissionError:
                denied.append(str(p))
        if denied:
            return Check("tracefs", FAIL, f"permission denied reading {denied[0]}",
                         "run as root (or with CAP_SYS_ADMIN): the probes need tracefs")
    if root:
        return Check("tracefs", OK, f"mounted at {root}")
    return Check("tracefs", FAIL, "tracefs is not mounted",
                 "mount -t tracefs tracefs /sys/kernel/tracing (the DaemonSet mounts it from the host)")


def check_perf_events() -> Check:
    # perf_event_open(PERF_TYPE_SOFTWARE, PERF_COUNT_SW_CPU_CLOCK) on CPU 0, all processes.
    attr = (ctypes.c_uint8 * 128)()
    ctypes.c_uint32.from_buffer(attr, 0).value = 1     # type = PERF_TYPE_SOFTWARE
    ctypes.c_uint32.from_buffer(attr, 4).value = 128   # size
    ctypes.c_uint64.from_buffer(attr, 8).value = 0     # config = PERF_COUNT_SW_CPU_CLOCK
    ctypes.c_uint64.from_buffer(attr, 40).value = 1    # flags: disabled
    fd, err = _syscall("perf_event_open", ctypes.byref(attr), ctypes.c_int(-1), ctypes.c_int(0),
                       ctypes.c_int(-1), ctypes.c_ulong(0))
    if fd >= 0:
        os.close(fd)
        return Check("perf events", OK, "software cpu-clock events available")
    paranoid = Path("/proc/sys/kernel/perf_event_paranoid")
    level = paranoid.read_text().strip() if paranoid.exists() else "?"
    return Check("perf events", FAIL, f"perf_event_open failed ({os.strerror(err)}), "
                                      f"perf_event_paranoid={level}",
                 "run as root or grant CAP_PERFMON; or sysctl kernel.perf_event_paranoid=-1")


def check_bcc() -> Check:
    try:
        import bcc  # noqa: F401
        from bcc.version import __version__ as v
    except Exception as exc:  # import of a C-backed module can fail many ways
        return Check("bcc", FAIL, f"cannot import bcc ({type(exc).__name__}: {exc})",
                     "apt-get install python3-bpfcc bpfcc-tools; make setup links it into .venv")
    return Check("bcc", OK, f"bcc {v} ({Path(bcc.__file__).parent})")


def check_kernel_headers() -> Check:
    from probes import kheaders
    try:
        h = kheaders.resolve(create=False)
    except PermissionError as exc:
        return Check("kernel headers", FAIL,
                     f"permission denied reading {exc.filename or 'the header cache'}",
                     "run as root, or set SPANFLAME_CACHE to a directory this user can write")
    if h.kind in ("running", "env"):
        return Check("kernel headers", OK, h.detail)
    if h.kind == "fallback":
        dest = Path(h.path)
        if not dest.is_dir():
            parent = next((p for p in dest.parents if p.exists()), None)
            if parent is None or not os.access(parent, os.W_OK):
                return Check("kernel headers", FAIL,
                             f"{h.detail.split(' (merged at')[0]}: cannot be merged, "
                             f"{parent or dest.anchor} is not writable for this user",
                             "run as root, or set SPANFLAME_CACHE to a writable directory")
            return Check("kernel headers", OK, h.detail.replace("(merged at", "(to be merged at"))
        return Check("kernel headers", OK, h.detail)
    return Check("kernel headers", FAIL, h.detail,
                 "apt-get install linux-headers-amd64 (any recent Debian tree works as fallback)")


def run_checks() -> list[Check]:
    checks = [check_python, check_pyspy, check_ptrace, check_bpf_syscall, check_btf,
              check_tracefs, check_perf_events, check_bcc, check_kernel_headers, check_processes]
    out = []
    for fn in checks:
        try:
            out.append(fn())
        except Exception as exc:  # a doctor must report, not crash
            out.append(Check(fn.__name__.removeprefix("check_").replace("_", " "), FAIL,
                             f"check crashed: {type(exc).__name__}: {exc}"))
    return out


def stack_source(checks: list[Check]) -> str:
    """One line: where Python stacks will come from on this machine."""
    by = {c.name: c.status for c in checks}
    need = ("bpf syscall", "btf", "tracefs", "perf events", "bcc", "kernel headers")
    if all(by.get(n) == OK for n in need):
        return ("stacks: the kernel walker (eBPF) for CPython 3.10-3.13 on x86-64 glibc, "
                "every CPU sample and wait on its exact stack; py-spy for other interpreters")
    off = ", ".join(n for n in need if by.get(n) != OK)
    return f"stacks: py-spy only (the kernel walker needs: {off})"


def summary(checks: list[Check]) -> list[str]:
    """What will work here, in a few lines (after the checks): CPU profiles, waits, spans."""
    by = {c.name: c.status for c in checks}
    bpf_needs = ("bpf syscall", "btf", "tracefs", "perf events", "bcc", "kernel headers")
    bpf = all(by.get(n) == OK for n in bpf_needs)
    pyspy = by.get("py-spy") == OK and by.get("ptrace") != FAIL
    own = " (your own processes only)" if by.get("ptrace") == WARN else ""
    out = []
    if bpf:
        out.append("CPU profiles: yes, stacks read in the kernel (CPython 3.10-3.13, x86-64 "
                   "glibc), py-spy for other interpreters" + ("" if pyspy else " (py-spy: no)"))
    elif pyspy:
        out.append("CPU profiles: yes, from py-spy only" + own)
    else:
        out.append("CPU profiles: no (neither the kernel walker nor py-spy can run)")
    missing = [n for n in bpf_needs if by.get(n) != OK]
    out.append("waits (off-CPU, lock, GIL, IO, network), each on its Python line: "
               + ("yes" if bpf else "no, needs " + ", ".join(missing)))
    out.append("spans: yes, from any OpenTelemetry SDK app sending OTLP/HTTP to the agent")
    return out


def as_json(checks: list[Check]) -> list[dict]:
    return [asdict(c) for c in checks]
