from pathlib import Path

from probes import kheaders


def make_debian_tree(src: Path, version: str) -> None:
    flav = src / f"linux-headers-{version}-amd64"
    com = src / f"linux-headers-{version}-common"
    (flav / "include" / "generated").mkdir(parents=True)
    (flav / "include" / "config").mkdir(parents=True)
    (flav / "arch" / "x86" / "include" / "generated").mkdir(parents=True)
    (flav / ".config").write_text("CONFIG_BPF=y\n")
    (com / "include" / "linux").mkdir(parents=True)
    (com / "include" / "linux" / "sched.h").write_text("/* sched */\n")
    (com / "arch" / "x86" / "include" / "asm").mkdir(parents=True)
    (com / "arch" / "x86" / "include" / "uapi").mkdir(parents=True)
    (com / "arch" / "arm64").mkdir(parents=True)
    (com / "Makefile").write_text("# top\n")


def test_finds_newest_debian_tree(tmp_path):
    make_debian_tree(tmp_path, "6.1.0-9")
    make_debian_tree(tmp_path, "6.1.0-56")
    (tmp_path / "linux-headers-6.9.0-1-amd64").mkdir()  # no -common: ignored
    trees = kheaders.find_debian_trees(tmp_path)
    assert [t[0].name for t in trees] == ["linux-headers-6.1.0-56-amd64",
                                          "linux-headers-6.1.0-9-amd64"]


def test_merged_tree_has_both_halves(tmp_path):
    make_debian_tree(tmp_path / "src", "6.1.0-56")
    flav, com = kheaders.find_debian_trees(tmp_path / "src")[0]
    dest = kheaders.merge_tree(flav, com, tmp_path / "cache" / "kh")
    assert (dest / "include" / "linux" / "sched.h").read_text() == "/* sched */\n"
    assert (dest / "include" / "generated").is_dir()
    assert (dest / "include" / "config").is_dir()
    assert (dest / "arch" / "x86" / "include" / "asm").is_dir()
    assert (dest / "arch" / "x86" / "include" / "uapi").is_dir()
    assert (dest / "arch" / "x86" / "include" / "generated").is_dir()
    assert (dest / "arch" / "arm64").is_dir()
    assert (dest / ".config").read_text() == "CONFIG_BPF=y\n"
    # Idempotent: a second call reuses the tree.
    assert kheaders.merge_tree(flav, com, dest) == dest


def test_resolve_prefers_env(monkeypatch, tmp_path):
    (tmp_path / "include").mkdir()
    monkeypatch.setenv("BCC_KERNEL_SOURCE", str(tmp_path))
    h = kheaders.resolve(create=False)
    assert h.kind == "env" and h.path == str(tmp_path)
    monkeypatch.setenv("BCC_KERNEL_SOURCE", str(tmp_path / "nope"))
    assert kheaders.resolve(create=False).kind == "none"


def test_fallback_directory_for_the_image(monkeypatch, tmp_path):
    empty = tmp_path / "usr-src"
    empty.mkdir()
    make_debian_tree(tmp_path / "kernel-src", "6.1.0-56")
    monkeypatch.setattr(kheaders, "SRC_DIR", empty)
    monkeypatch.setenv("SPANFLAME_KERNEL_SRC", str(tmp_path / "kernel-src"))
    monkeypatch.setenv("SPANFLAME_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)
    monkeypatch.setattr(kheaders.platform, "release", lambda: "0.0.0-no-such-kernel")
    h = kheaders.resolve(create=True)
    assert h.kind == "fallback" and "6.1.0-56" in h.detail
    assert (tmp_path / "cache" / "kheaders" / "linux-headers-6.1.0-56-amd64" / "include").is_dir()
