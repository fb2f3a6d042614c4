"""Profile -> speedscope JSON (https://www.speedscope.app/file-format-schema.json).

One "sampled" profile per sample type; stacks root first, one weight per distinct stack.
"""

from __future__ import annotations

import json
from typing import Sequence

from agent import __version__
from agent.model import Frame, Profile

_UNITS = {"nanoseconds": "nanoseconds", "microseconds": "microseconds",
          "milliseconds": "milliseconds", "seconds": "seconds", "bytes": "bytes"}


def to_speedscope(profile: Profile, *, name: str = "spanflame",
                  types: Sequence[str] | None = None) -> dict:
    frames: list[dict] = []
    index: dict[Frame, int] = {}

    def fid(f: Frame) -> int:
        i = index.get(f)
        if i is None:
            i = index[f] = len(frames)
            entry: dict = {"name": f.name}
            if f.filename:
                entry["file"] = f.filename
            if f.line:
                entry["line"] = f.line
            frames.append(entry)
        return i

    chosen = [t for t in profile.sample_types
              if (types is None and t.name != "samples") or (types is not None and t.name in types)]
    if not chosen:
        chosen = list(profile.sample_types[:1])
    profiles = []
    for t in chosen:
        agg: dict[tuple, int] = {}
        for stack, _labels, v in profile.iter_type(t.name):
            agg[stack] = agg.get(stack, 0) + v
        samples, weights = [], []
        for stack, v in sorted(agg.items(), key=lambda kv: [f.name for f in reversed(kv[0])]):
            samples.append([fid(f) for f in reversed(stack)])
            weights.append(v)
        profiles.append({"type": "sampled", "name": f"{t.name} ({t.unit})",
                         "unit": _UNITS.get(t.unit, "none"), "startValue": 0,
                         "endValue": sum(weights), "samples": samples, "weights": weights})
    default = profile.primary_type()
    active = next((i for i, t in enumerate(chosen) if t.name == default), 0)
    return {"$schema": "https://www.speedscope.app/file-format-schema.json",
            "shared": {"frames": frames}, "profiles": profiles, "name": name,
            "activeProfileIndex": active, "exporter": f"spanflame {__version__}"}


def render_speedscope(profile: Profile, **kw) -> str:
    return json.dumps(to_speedscope(profile, **kw), separators=(",", ":"))
