"""The kernel stack walker's Python stacks equal the interpreter's own view, on every supported
interpreter: pyenv's 3.10-3.13 and Debian's /usr/bin/python3.

The target (tests/programs/known_stacks.py) runs threads that block in known functions (a lock,
sleep, a socket, fsync, the GIL) or spin on the CPU, each on one known line, and reports the
stacks sys._current_frames() showed it for each thread. `spanflame attach --sampler bpf` then
profiles it, and every sample of those threads, CPU or wait, must carry one of those stacks:
function, file and line of every Python frame.
"""

from __future__ import annotations

import json
from collections import defaultdict

import pytest

from agent import pprof
from tests.integration.test_pyprocess import INTERPRETERS
from tests.support import assert_go_pprof_reads, hot_line, is_root, run_cli, target

pytestmark = [pytest.mark.integration, pytest.mark.root,
              pytest.mark.skipif(not is_root(), reason="the kernel stack walker needs root")]

#: the sample types that carry time
TIME_TYPES = ("cpu", "off_cpu", "lock_wait", "gil_wait", "io_wait", "net_wait")
#: worker thread -> (its KS- line marker, the sample type and off_cpu reason its time must show)
WORKERS = {
    "spinner": ("KS-SPIN", "cpu", None),
    "lock-waiter": ("KS-LOCK", "lock_wait", None),
    "sleeper": ("KS-SLEEP", "off_cpu", "sleep"),
    "reader": ("KS-RECV", "net_wait", None),
    "fsync-writer": ("KS-FSYNC", "io_wait", None),
    "gil-fighter-1": ("KS-GIL", "gil_wait", None),
    "gil-fighter-2": ("KS-GIL", "gil_wait", None),
}
DURATION_S = 4
#: each worker's expected kind of time, as a share of the profile's window. On an idle 2-CPU
#: machine each shows 15-70% (the rest is mostly GIL waits: three spinners hold the GIL); under
#: a load average of 9 from other processes the spinner's CPU fell to 2%.
MIN_SHARE = 0.01


def python_frames(stack):
    """(function, filename, line) of the Python frames of a pprof stack, innermost first: every
    frame but the marker (no file name) and kernel frames ("[kernel]")."""
    return tuple((f.name, f.filename, f.line) for f in stack
                 if f.filename and not f.filename.startswith("["))


def show(frames) -> str:
    return " <- ".join(f"{n} ({fn.rsplit('/', 1)[-1]}:{ln})" for n, fn, ln in frames) or "(none)"


@pytest.mark.parametrize("version", list(INTERPRETERS))
def test_kernel_stacks_equal_the_interpreters_own_view(version, tmp_path):
    python = INTERPRETERS[version]
    if not python.exists():
        pytest.skip(f"{python} is not installed")
    out = tmp_path / "out.pb.gz"
    with target("known_stacks", "--dir", tmp_path, python=str(python)) as t:
        res = run_cli("attach", t.pid, "--probes", "all", "--duration", DURATION_S,
                      "--sampler", "bpf", "-o", out)
    assert res.returncode == 0, res.stderr
    assert "stacks: kernel stack walker" in res.stdout, res.stdout
    assert_go_pprof_reads(out)

    threads = t.info["threads"]
    expected = {name: {tuple(tuple(f) for f in s) for s in t.info["stacks"][str(threads[name])]}
                for name in WORKERS}
    # The target's own view is what the test needs: every worker seen, always on its KS- line.
    for name, (marker, _, _) in WORKERS.items():
        assert expected[name], f"the target never saw {name}"
        assert {s[0][2] for s in expected[name]} == {hot_line("known_stacks", marker)}, \
            (name, expected[name])

    prof = pprof.decode(out.read_bytes())
    lo, hi = prof.time_ns, prof.time_ns + prof.duration_ns
    assert hi - lo >= 0.9 * DURATION_S * 1e9
    by_tid = {tid: name for name, tid in threads.items() if name in WORKERS}
    right_ns = all_ns = right_n = all_n = 0
    kinds: dict[tuple, int] = defaultdict(int)       # (thread, type, reason) -> ns
    wrong: dict[tuple, int] = defaultdict(int)       # (thread, type, reason, frames) -> ns
    wrong_full: dict[tuple, tuple] = {}
    for type_name in TIME_TYPES:
        assert prof.has_type(type_name), f"no {type_name} in {[x.name for x in prof.sample_types]}"
        for stack, labels, value in prof.iter_type(type_name):
            lab = dict(labels)
            name = by_tid.get(int(lab.get("thread_id", -1)))
            if name is None:
                continue
            assert lab.get("thread_name") == name, lab
            reason = lab.get("reason")
            kinds[(name, type_name, reason)] += value
            got = python_frames(stack)
            all_ns += value
            all_n += 1
            if got in expected[name]:
                right_ns += value
                right_n += 1
            else:
                key = (name, type_name, reason, got)
                wrong[key] += value
                wrong_full.setdefault(key, stack)

    def mismatches() -> str:
        lines = [f"Python {version} ({python}): {len(wrong)} wrong stacks"]
        for key, ns in sorted(wrong.items(), key=lambda kv: -kv[1])[:15]:
            name, type_name, reason, got = key
            lines.append(f"- {name} {type_name}{f' ({reason})' if reason else ''} "
                         f"{ns / 1e6:.1f} ms\n    got:      {show(got)}\n    "
                         f"full:     {' <- '.join(f.name for f in wrong_full[key][:12])}")
            for s in sorted(expected[name]):
                lines.append(f"    expected: {show(s)}")
        return "\n".join(lines)

    assert all_n and all_ns, f"no samples of the worker threads: {res.stdout}"
    time_share, sample_share = right_ns / all_ns, right_n / all_n
    print(f"Python {version}: {100 * time_share:.3f}% of {all_ns / 1e9:.2f} s and "
          f"{right_n}/{all_n} distinct samples ({100 * sample_share:.2f}%) on the "
          f"interpreter's own stacks")
    assert time_share >= 0.99 and sample_share >= 0.99, (
        f"{100 * time_share:.2f}% of the time and {100 * sample_share:.2f}% of the samples "
        f"right\n" + mismatches())

    # Each worker shows the kind of time it spends, where a user looks for it.
    window = hi - lo
    for name, (_, type_name, reason) in WORKERS.items():
        ns = sum(v for (n, ty, r), v in kinds.items()
                 if n == name and ty == type_name and (reason is None or r == reason))
        assert ns >= MIN_SHARE * window, (
            f"{name}: {ns / 1e6:.0f} ms of {type_name}{f' ({reason})' if reason else ''} in "
            f"{window / 1e6:.0f} ms; it has " + ", ".join(
                f"{ty}{f' ({r})' if r else ''} {v / 1e6:.0f} ms"
                for (n, ty, r), v in sorted(kinds.items()) if n == name))
