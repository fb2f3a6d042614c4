"""Profile -> folded stacks (`root;...;leaf value` per line), as flamegraph.pl and py-spy's raw
format write them. Frames read `name (file:line)`; `;` and newlines inside names are replaced."""

from __future__ import annotations

from agent.model import Frame, Profile


def _frame_text(f: Frame) -> str:
    text = f.display()
    return text.replace(";", ":").replace("\n", " ").replace("\r", " ")


def render_folded(profile: Profile, type_name: str | None = None) -> str:
    type_name = type_name or profile.primary_type()
    agg: dict[str, int] = {}
    cache: dict[Frame, str] = {}
    for stack, _labels, v in profile.iter_type(type_name):
        parts = []
        for f in reversed(stack):
            t = cache.get(f)
            if t is None:
                t = cache[f] = _frame_text(f)
            parts.append(t)
        key = ";".join(parts) or "[unknown]"
        agg[key] = agg.get(key, 0) + v
    return "".join(f"{k} {v}\n" for k, v in sorted(agg.items()))
