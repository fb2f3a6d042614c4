"""The package builds quietly and carries what the agent reads at run time (`make run` installs
it: a fresh clone used to print ~45 setuptools BuildBackendWarning lines before the one line that
matters)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_builds_without_warnings_and_holds_the_ui_and_probe_sources(tmp_path):
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps",
                          "--no-build-isolation", "-w", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    out = res.stdout + res.stderr
    assert "Warning" not in out, out
    wheel, = tmp_path.glob("spanflame-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for static in ("app.js", "app.css", "flamegraph.js", "flamegraph.css"):
        assert f"flamegraph/static/{static}" in names, sorted(names)
    assert any(n.startswith("probes/") and n.endswith(".bpf.c") for n in names), sorted(names)
    assert "agent/proto/pprof.proto" in names or any(n.endswith(".proto") for n in names)
