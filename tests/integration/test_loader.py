"""The probes are compiled and attached by a short-lived child (probes/loader.py), which hands
every fd to the agent and exits: the probes must go on recording after it is gone, the agent
must never map LLVM or libbcc, and a child that fails must say why."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.support import ROOT, is_root

pytestmark = [pytest.mark.integration, pytest.mark.root,
              pytest.mark.skipif(not is_root(), reason="eBPF probes need root")]

# Runs in a fresh interpreter, so that nothing else in this test session (another test that
# imported bcc, say) can hide a mapping or an import.
AGENT = textwrap.dedent(r'''
    import json, os, subprocess, sys, threading, time
    from probes.session import ProbeSession

    target = subprocess.Popen([sys.executable, "-c", """
    import threading, time
    def spin():
        while True: sum(range(1000))
    threading.Thread(target=spin, daemon=True).start()
    print("ready", flush=True)
    while True: time.sleep(0.005)
    """], stdout=subprocess.PIPE, text=True)
    target.stdout.readline()
    s = ProbeSession(["cpu", "offcpu", "lock"], rate_hz=99)
    s.start([target.pid])
    out = {"active": s.active, "off": s.off}
    loader = s._bpf.loader_pid
    out["loader_alive"] = os.path.exists(f"/proc/{loader}")
    with open("/proc/self/maps") as f:
        out["mapped"] = sorted({l.split()[-1] for l in f
                                if "LLVM" in l or "libbcc" in l or "clang" in l.lower()})
    out["bcc_imported"] = any(m == "bcc" or m.startswith("bcc.") for m in sys.modules)
    time.sleep(3.0)  # everything recorded now happens after the loader has exited
    s.drain()
    stats = s.program_stats()
    fdinfo = {}
    for name, fd in s._bpf.progs.items():
        with open(f"/proc/self/fdinfo/{fd}") as f:
            fdinfo[name] = dict(l.split(":", 1) for l in f.read().splitlines() if ":" in l)
    out["programs"] = {n: list(v) for n, v in stats.items()}
    out["prog_ids_match"] = all(s._bpf.progs and
                                int(fdinfo[n]["prog_id"]) == __import__("probes.bpfsys").bpfsys
                                .prog_info(fd)["id"] for n, fd in s._bpf.progs.items())
    data = s.close()
    target.kill()
    out["runs"] = sum(1 for r in data.runs if r.tgid == target.pid and r.off_end_ns)
    out["samples"] = sum(1 for x in data.samples if x.tgid == target.pid)
    out["python_frames"] = sum(1 for x in data.samples if x.pystack)
    out["kernel_frames"] = sorted({f.name for r in data.runs if r.tgid == target.pid
                                   for f in r.kstack})
    out["counters"] = data.counters
    def link(fd):
        try:
            return os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the directory's own fd
            return ""
    out["fds_left"] = sorted(x for x in map(link, os.listdir("/proc/self/fd"))
                             if "bpf" in x or "perf_event" in x)
    print(json.dumps(out))
''')


def test_probes_keep_recording_after_the_loader_exits_and_llvm_is_never_mapped():
    res = subprocess.run([sys.executable, "-c", AGENT], cwd=ROOT, capture_output=True, text=True,
                         timeout=180, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert "cpu" in out["active"] and "offcpu" in out["active"], out["off"]
    assert out["loader_alive"] is False
    assert out["mapped"] == [] and out["bcc_imported"] is False, out
    # The sleeping thread's waits (5 ms each) and the spinning thread's CPU samples (99 Hz
    # while it gets a CPU: a shared machine gives it less), all from attachments only this
    # process held; kernel stacks resolve to the kernel's function names.
    assert out["runs"] > 100, out
    assert out["samples"] >= 5 and out["python_frames"] > 0, out
    assert "do_nanosleep" in out["kernel_frames"], out["kernel_frames"]
    assert out["counters"]["samples"] >= out["samples"] and out["counters"]["waits"] > 100
    assert {"on_cpu_sample", "raw_tracepoint__sched_switch"} <= set(out["programs"])
    assert out["prog_ids_match"]
    assert out["fds_left"] == []  # close() let go of every map, program and attachment


def test_fds_arrive_whatever_their_number_per_message():
    from probes import bpfsys, kheaders, loader, registry

    kheaders.apply(kheaders.resolve(create=True))
    plan = registry.plan(["offcpu", "cpu"])
    req = loader.Request(tuple(plan.sources), tuple(f"-D{d}" for d in plan.defines) + ("-w",),
                         "on_cpu_sample" if "cpu" in plan.probes else None, 10_000_000,
                         fds_per_message=3)
    probes = loader.load(req)
    try:
        assert {"tstates", "tstacks", "events", "counters", "targets"} <= set(probes.maps)
        for m in probes.maps.values():
            info = bpfsys.map_info(m.map_fd)
            assert (info["type"], info["key_size"], info["value_size"]) == (
                m.map_type, m.key_size, m.value_size), m.name
        assert probes.links and all(
            os.readlink(f"/proc/self/fd/{fd}") in ("anon_inode:[perf_event]",
                                                   "anon_inode:bpf_link") for fd in probes.links)
        st = probes["tstates"]
        leaf = st.Leaf()
        leaf.tgid = 4242
        assert st.update(st.Key(7), leaf, bpfsys.NOEXIST)
        assert not st.update(st.Key(7), leaf, bpfsys.NOEXIST)
        assert st[7].tgid == 4242
        batch = st.items_lookup_batch()
        assert [(k.value, v.tgid) for k, v in batch if k.value == 7] == [(7, 4242)]
        del st[st.Key(7)]
        with pytest.raises(KeyError):
            st[7]
        assert len(probes["counters"][0]) == bpfsys.possible_cpus()
    finally:
        probes.close()


def test_a_compile_error_turns_the_probes_off_with_the_compilers_first_error():
    from probes.session import ProbeSession

    with ProbeSession(["offcpu"], max_threads="no_such_limit") as s:
        s.start([])
        assert not s.loaded and s.active == []
        why = s.off["offcpu"]
    assert why.startswith("BPF load failed: "), why
    assert "error" in why and "no_such_limit" in why, why


def test_bcc_not_importable_in_the_loader_is_said(tmp_path, monkeypatch):
    from probes.session import ProbeSession

    (tmp_path / "bcc").mkdir()
    (tmp_path / "bcc" / "__init__.py").write_text("raise ImportError('libbcc.so.0: not found')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    with ProbeSession(["offcpu"]) as s:
        s.start([])
        assert not s.loaded
    assert s.off["offcpu"] == ("bcc is not importable (ImportError: libbcc.so.0: not found); "
                               "apt-get install python3-bpfcc"), s.off
