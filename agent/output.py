"""Writing a Profile to a file whose format follows its extension.

`.pb.gz` and `.pb`: pprof (gzip-compressed or not); `.html`: flame graph; `.json`: speedscope;
`.txt` and `.folded`: folded stacks. Files are written to a temporary name and renamed, so a
failed write never leaves half a file behind.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from agent import pprof
from agent.errors import OutputError, UsageError
from agent.model import Profile

FORMATS = {".pb.gz": "pprof", ".pb": "pprof-raw", ".html": "html", ".json": "speedscope",
           ".txt": "folded", ".folded": "folded"}


def output_format(path: str | os.PathLike) -> str:
    name = str(path).lower()
    for ext in sorted(FORMATS, key=len, reverse=True):
        if name.endswith(ext):
            return FORMATS[ext]
    raise UsageError(f"unknown output format for {path}: use one of "
                     + ", ".join(sorted(FORMATS)))


def check_writable_json(path: str | os.PathLike) -> None:
    if not str(path).lower().endswith(".json"):
        raise UsageError(f"{path}: the span breakdown is JSON, use a .json name")
    check_writable(path)


def check_writable(path: str | os.PathLike) -> None:
    """Fail before a long recording rather than after it: really create (and remove) a
    temporary file beside `path`, since permission bits alone say nothing for root."""
    p = Path(path)
    output_format(p)
    parent = p.parent if str(p.parent) else Path(".")
    try:
        if p.is_dir():
            raise OutputError(f"cannot write {p}: is a directory")
        if not parent.is_dir():
            raise OutputError(f"cannot write {p}: directory {parent} does not exist")
        if p.exists() and not os.access(p, os.W_OK):
            raise OutputError(f"cannot write {p}: permission denied")
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=parent)
    except OSError as exc:
        raise OutputError(f"cannot write {p}: {(exc.strerror or str(exc)).lower()}") from None
    os.close(fd)
    os.unlink(tmp)


def render(profile: Profile, fmt: str, *, type_name: str | None = None, title: str = "",
           subtitle: str = "") -> bytes:
    """Profile -> bytes in `fmt` (one of FORMATS' values)."""
    if fmt == "pprof":
        return pprof.encode(profile)
    if fmt == "pprof-raw":
        return pprof.encode(profile, compress=False)
    if fmt == "html":
        from flamegraph.html import render_html
        return render_html(profile, title=title or "spanflame", subtitle=subtitle,
                           default_type=type_name).encode("utf-8")
    if fmt == "speedscope":
        from flamegraph.speedscope import render_speedscope
        types = [type_name] if type_name else None
        return render_speedscope(profile, name=title or "spanflame", types=types).encode("utf-8")
    if fmt == "folded":
        from flamegraph.folded import render_folded
        return render_folded(profile, type_name).encode("utf-8")
    raise UsageError(f"unknown output format {fmt}")


def write_profile(profile: Profile, path: str | os.PathLike, *, type_name: str | None = None,
                  title: str = "", subtitle: str = "") -> int:
    """Write `profile` to `path` in the format its extension names; returns bytes written."""
    data = render(profile, output_format(path), type_name=type_name, title=title,
                  subtitle=subtitle)
    write_atomic(path, data)
    return len(data)


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=parent)
    except OSError as exc:
        raise OutputError(f"cannot write {p}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, p)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise OutputError(f"cannot write {p}: {exc.strerror or exc}") from None
