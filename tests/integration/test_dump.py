"""`spanflame dump PID`: each thread's stack equals the interpreter's own view, and what each
thread is doing is named as the probes would name its wait."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from tests.integration.test_pyprocess import INTERPRETERS
from tests.support import hot_line, is_root, run_cli, target

pytestmark = pytest.mark.integration

#: thread name -> (its line's marker, the state it is in most of the time)
THREADS = {"lock-waiter": ("KS-LOCK", "lock"), "sleeper": ("KS-SLEEP", "sleep"),
           "reader": ("KS-RECV", "net"), "spinner": ("KS-SPIN", None)}
DUMPS = 7
MAX_DUMPS = 40


@pytest.mark.parametrize("version", ["3.10", "3.12", "3.13", "debian-3.11"])
def test_dump_shows_each_threads_line_and_what_it_waits_on(version, tmp_path):
    if not is_root():
        pytest.skip("reading another process's memory and kernel stack needs root")
    python = INTERPRETERS[version]
    if not python.exists():
        pytest.skip(f"{python} is not installed")
    with target("known_stacks", "--dir", tmp_path, "--observe", "0.2",
                python=str(python)) as t:
        tids = t.info["threads"]
        docs = []
        # A blocked thread here is in its own wait or back and waiting for the GIL (three
        # spinners hold it in turns): dump until each was caught in its own wait, or give up.
        for _ in range(MAX_DUMPS):
            res = run_cli("dump", t.pid, "--json")
            assert res.returncode == 0, res.stderr
            docs.append(json.loads(res.stdout))
            seen = {x["tid"]: set() for x in docs[0]["threads"]}
            for d in docs:
                for x in d["threads"]:
                    seen.setdefault(x["tid"], set()).add(x["state"])
            if len(docs) >= DUMPS and all(state in seen[tids[name]] for name, (_m, state)
                                          in THREADS.items() if state):
                break
        text = run_cli("dump", t.pid)
    assert text.returncode == 0, text.stderr
    assert f"Process {t.pid}: CPython {version.removeprefix('debian-')}" in text.stdout
    assert 'Thread' in text.stdout and '"lock-waiter"' in text.stdout
    for name, (marker, state) in THREADS.items():
        states = Counter()
        for d in docs:
            assert d["source"] == "memory"
            th = next(x for x in d["threads"] if x["tid"] == tids[name])
            assert th["name"] == name
            top = th["frames"][0]
            assert top["filename"].endswith("known_stacks.py"), th
            assert top["line"] == hot_line("known_stacks", marker), th
            states[th["state"]] += 1
        if state:  # blocked threads: in their own kind of wait, or back and waiting for the
            # GIL (three spinners hold it in turns), nothing else
            assert states[state] >= 1, (name, states)
            assert states[state] + states["gil"] + states["running"] >= 0.8 * len(docs), \
                (name, states)
        else:
            assert states["running"] + states["gil"] >= 0.5 * len(docs), (name, states)


def test_dump_of_an_interpreter_the_walker_does_not_read_uses_py_spy(tmp_path):
    if not is_root():
        pytest.skip("root")
    from pathlib import Path
    py39 = sorted(Path.home().glob(".pyenv/versions/3.9*/bin/python3"))
    if not py39:
        pytest.skip("no CPython 3.9")
    with target("known_stacks", "--dir", tmp_path, "--observe", "0.2", python=str(py39[0])) as t:
        res = run_cli("dump", t.pid, "--json")
    assert res.returncode == 0, res.stderr
    d = json.loads(res.stdout)
    assert d["source"] == "py-spy" and "py-spy" in d["note"]
    names = {x["name"] for x in d["threads"]}
    assert "lock-waiter" in names


def test_dump_of_a_missing_or_non_python_process_is_one_clear_line():
    res = run_cli("dump", "999999999")
    assert res.returncode != 0
    assert res.stderr.startswith("spanflame: error:") and len(res.stderr.splitlines()) == 1
    res = run_cli("dump", "1")
    assert res.returncode != 0 and "Traceback" not in res.stderr
