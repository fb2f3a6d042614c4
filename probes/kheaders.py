"""Kernel headers for bcc, with an automatic fallback.

bcc compiles its C at load time against a kernel header tree. Nodes often have none for the
running kernel. Our programs use tracepoints only (whose argument layouts bcc reads from the live
tracefs) and never read kernel structs, so any recent header tree is safe. Order of preference:

1. `$BCC_KERNEL_SOURCE` when the user set it;
2. the running kernel's tree, `/lib/modules/$(uname -r)/build`;
3. an installed Debian `linux-headers-<ver>-<flavour>` tree, in /usr/src or else in
   `$SPANFLAME_KERNEL_SRC` (default /opt/spanflame/kernel-src, where the container image keeps
   its own, so that mounting the host's /usr/src does not hide them). Debian splits a tree into
   `-<flavour>` (generated and config headers) and `-common` (everything else); bcc needs one
   merged tree, so we build one out of symlinks in a cache directory and point
   `BCC_KERNEL_SOURCE` at it.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

SRC_DIR = Path("/usr/src")


def src_dirs() -> list[Path]:
    """Where to look for Debian header trees, in order."""
    return [SRC_DIR, Path(os.environ.get("SPANFLAME_KERNEL_SRC", "/opt/spanflame/kernel-src"))]
_FLAVOURS = {"x86_64": ("amd64", "x86"), "aarch64": ("arm64", "arm64")}


@dataclass(frozen=True)
class Headers:
    kind: str       # "env" | "running" | "fallback" | "none"
    path: str       # the tree bcc will use ("" for none)
    detail: str     # one line for doctor and the attach summary

    @property
    def found(self) -> bool:
        return self.kind != "none"


def cache_dir() -> Path:
    env = os.environ.get("SPANFLAME_CACHE")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/cache/spanflame")
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "spanflame"


def _version_key(name: str) -> tuple:
    return tuple(int(x) if x.isdigit() else x for x in re.split(r"[.-]", name))


def find_debian_trees(src: Path = SRC_DIR) -> list[tuple[Path, Path]]:
    """(flavour dir, common dir) pairs of installed Debian header packages, newest first."""
    flavour, _arch = _FLAVOURS.get(platform.machine(), ("amd64", "x86"))
    pairs = []
    if not src.is_dir():
        return pairs
    for d in src.iterdir():
        m = re.fullmatch(rf"linux-headers-(.+)-{flavour}", d.name)
        if not m or not (d / "include").is_dir():
            continue
        common = src / f"linux-headers-{m.group(1)}-common"
        if (common / "include").is_dir():
            pairs.append((d, common))
    pairs.sort(key=lambda p: _version_key(p[0].name), reverse=True)
    return pairs


def _link_children(src: Path, dst: Path, skip: set[str] = frozenset()) -> None:
    for entry in src.iterdir():
        if entry.name in skip:
            continue
        target = dst / entry.name
        if not target.exists() and not target.is_symlink():
            target.symlink_to(entry)


def merge_tree(flavour_dir: Path, common_dir: Path, dest: Path) -> Path:
    """Build (once) a merged header tree of symlinks at `dest`; returns `dest`."""
    if (dest / ".complete").exists():
        return dest
    _flavour, arch = _FLAVOURS.get(platform.machine(), ("amd64", "x86"))
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    try:
        (tmp / "include").mkdir()
        _link_children(flavour_dir / "include", tmp / "include")
        _link_children(common_dir / "include", tmp / "include")
        arch_dst = tmp / "arch" / arch
        arch_dst.mkdir(parents=True)
        _link_children(common_dir / "arch", tmp / "arch", skip={arch})
        (arch_dst / "include").mkdir()
        for side in (flavour_dir, common_dir):
            a = side / "arch" / arch
            if a.is_dir():
                _link_children(a, arch_dst, skip={"include"})
                if (a / "include").is_dir():
                    _link_children(a / "include", arch_dst / "include")
        for name in (".config", "Makefile", "Module.symvers"):
            for side in (flavour_dir, common_dir):
                if (side / name).exists() and not (tmp / name).exists():
                    (tmp / name).symlink_to(side / name)
        (tmp / ".complete").write_text(f"{flavour_dir}\n{common_dir}\n")
        try:
            tmp.rename(dest)
        except OSError:
            if not (dest / ".complete").exists():
                shutil.rmtree(dest, ignore_errors=True)
                tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def resolve(create: bool = True) -> Headers:
    """Decide which header tree bcc uses; with `create`, build the fallback tree if needed."""
    env = os.environ.get("BCC_KERNEL_SOURCE")
    if env:
        ok = Path(env, "include").is_dir()
        return Headers("env" if ok else "none", env if ok else "",
                       f"BCC_KERNEL_SOURCE={env}" + ("" if ok else " (no include/ there)"))
    release = platform.release()
    build = Path("/lib/modules", release, "build")
    if (build / "include").is_dir():
        return Headers("running", str(build), f"running kernel {release} ({build})")
    trees = []
    for d in src_dirs():
        trees = find_debian_trees(d)
        if trees:
            break
    if not trees:
        return Headers("none", "", f"no headers for kernel {release} and no Debian linux-headers "
                                   f"tree in " + " or ".join(str(d) for d in src_dirs()))
    flavour_dir, common_dir = trees[0]
    dest = cache_dir() / "kheaders" / flavour_dir.name
    if create:
        dest = merge_tree(flavour_dir, common_dir, dest)
    version = flavour_dir.name.removeprefix("linux-headers-")
    return Headers("fallback", str(dest),
                   f"fallback: Debian headers {version} for kernel {release} (merged at {dest})")


def apply(headers: Headers) -> None:
    """Point bcc at the chosen tree (before the first BPF() compile)."""
    if headers.kind == "fallback":
        os.environ["BCC_KERNEL_SOURCE"] = headers.path
