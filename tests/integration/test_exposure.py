"""The real CLI refuses unsafe exposure at start, in one line and at once (agent/httpguard.py);
loopback needs no token."""

from __future__ import annotations

import time

import pytest

from tests.support import run_cli

pytestmark = [pytest.mark.integration]


def one_line_error(out) -> str:
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spanflame: error:"), out.stderr
    assert "Traceback" not in out.stderr
    return lines[0]


@pytest.mark.parametrize("args", [
    ["--listen", "0.0.0.0:0"],
    ["--otlp-listen", "0.0.0.0:0"],
    ["--listen", "[::]:0"],
])
def test_run_beyond_loopback_without_a_token_is_refused(tmp_path, args):
    t0 = time.monotonic()
    out = run_cli("run", "--store", tmp_path / "store", "--sampler", "py-spy", "--probes", "cpu",
                  "--listen", "127.0.0.1:0", "--otlp-listen", "127.0.0.1:0", *args,
                  timeout=60)
    assert out.returncode == 2
    assert "--insecure-no-auth" in one_line_error(out)
    assert time.monotonic() - t0 < 30  # before anything is loaded


@pytest.mark.parametrize("env,args", [
    ({"SPANFLAME_AUTH_TOKEN": ""}, []),
    ({}, ["--auth-token", ""]),
    ({"SPANFLAME_AUTH_TOKEN": "two words"}, []),
])
def test_an_empty_or_bad_token_is_an_error_not_auth_off(tmp_path, env, args):
    out = run_cli("run", "--store", tmp_path / "store", "--listen", "127.0.0.1:0",
                  "--otlp-listen", "127.0.0.1:0", *args, timeout=60, env=env)
    assert out.returncode == 2
    assert "token" in one_line_error(out)


def test_serve_beyond_loopback_without_a_token_is_refused(tmp_path):
    out = run_cli("serve", "--store", tmp_path, "--listen", "0.0.0.0:0", timeout=60)
    assert out.returncode == 2
    assert "--insecure-no-auth" in one_line_error(out)


def test_attach_otlp_beyond_loopback_is_refused(tmp_path):
    out = run_cli("attach", "1", "--otlp-listen", "0.0.0.0:0", "-o", tmp_path / "x.pb.gz",
                  timeout=60)
    assert out.returncode == 2
    assert "--insecure-no-auth" in one_line_error(out)
