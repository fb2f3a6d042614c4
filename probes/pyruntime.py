"""Where a CPython process keeps `_PyRuntime`, so that futex waits on the GIL can be told apart.

The GIL's condition variable and mutex live inside `_PyRuntime` (in 3.12+ inside the main
interpreter state, which `_PyRuntime` embeds). Offsets move between versions, so we use the
symbol's address range: its value and size from the ELF dynamic symbol table of the executable
or libpython, plus the load base from /proc/<pid>/maps.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)

SYMBOL = "_PyRuntime"


@dataclass(frozen=True)
class Range:
    start: int
    end: int
    path: str


def _mappings(pid: int) -> list[tuple[int, int, str]]:
    """(start address, file offset, path) of file-backed mappings, in /proc/<pid>/maps order."""
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) < 6 or not parts[5].startswith("/"):
                continue
            start = int(parts[0].split("-")[0], 16)
            out.append((start, int(parts[2], 16), parts[5].strip()))
    return out


def find(pid: int) -> Range | None:
    """The address range of `_PyRuntime` in process `pid`, or None if it cannot be found."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        maps = _mappings(pid)
    except OSError:
        return None
    seen = set()
    candidates = []
    for start, offset, path in maps:
        if path in seen:
            continue
        seen.add(path)
        base = os.path.basename(path.removesuffix(" (deleted)"))
        if base.startswith("python") or base.startswith("libpython"):
            candidates.append(path)
    for path in candidates:
        # Read through /proc/<pid>/root so that a process in a container resolves its own files.
        real = f"/proc/{pid}/root{path}" if os.path.exists(f"/proc/{pid}/root{path}") else path
        try:
            with open(real, "rb") as f:
                elf = ELFFile(f)
                sym = None
                for secname in (".dynsym", ".symtab"):
                    sec = elf.get_section_by_name(secname)
                    if sec is not None:
                        found = sec.get_symbol_by_name(SYMBOL)
                        if found:
                            sym = found[0]
                            break
                if sym is None:
                    continue
                first_load = next(s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD")
                vaddr0 = first_load["p_vaddr"] & ~0xFFF
        except (OSError, ELFError, StopIteration) as exc:
            log.debug("cannot read %s: %s", path, exc)
            continue
        map_start = next((s for s, off, p in maps if p == path and off == 0), None)
        if map_start is None:
            continue
        base_addr = map_start - vaddr0
        lo = base_addr + sym["st_value"]
        return Range(lo, lo + max(1, sym["st_size"]), path)
    return None
