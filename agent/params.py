"""Query parameters of the HTTP API and the ingest, validated in one place.

Every number is finite, in range and int64-safe once turned into nanoseconds; every string is
bounded. A bad value raises `BadRequest` with a one-line reason, which the routes answer with a
400: no parameter can make a route fail with a 5xx.
"""

from __future__ import annotations

import math
import time
from typing import Mapping

#: Largest value of a pprof / SQLite integer.
INT64_MAX = (1 << 63) - 1
#: Latest time a query or a pushed profile may name, in unix seconds (2096-10-02): in
#: nanoseconds, well inside int64 with room for the sums and widths computed from it.
MAX_UNIX_S = 4_000_000_000
#: Longest range a query may cover.
MAX_RANGE_S = 31 * 24 * 3600
#: Longest text a number may be written with (anything longer is not a number we take).
MAX_NUMBER_CHARS = 64
MAX_TYPE_CHARS = 64
MAX_TEXT_CHARS = 256
MAX_LABEL_FILTERS = 32
MAX_LABEL_KEY_CHARS = 128
MAX_LABEL_VALUE_CHARS = 1024


class BadRequest(Exception):
    """A parameter we refuse; `str()` is the one-line reason sent back with the 400."""


def number(q: Mapping[str, str], key: str, default: float | None = None, *, lo: float,
           hi: float) -> float | None:
    """q[key] as a finite float in [lo, hi]; `default` when absent or empty."""
    raw = q.get(key)
    if raw is None or raw == "":
        return default
    try:
        if len(raw) > MAX_NUMBER_CHARS:
            raise ValueError
        v = float(raw)
    except ValueError:
        raise BadRequest(f"{key} must be a number") from None
    if not math.isfinite(v) or not lo <= v <= hi:
        raise BadRequest(f"{key} must be a number between {lo:g} and {hi:g}")
    return v


def integer(q: Mapping[str, str], key: str, default: int | None = None, *, lo: int = 0,
            hi: int = 1 << 62) -> int | None:
    """q[key] as an integer in [lo, hi]; `default` when absent or empty."""
    raw = q.get(key)
    if raw is None or raw == "":
        return default
    try:
        if len(raw) > MAX_NUMBER_CHARS:
            raise ValueError
        v = int(raw)
    except ValueError:
        raise BadRequest(f"{key} must be an integer") from None
    if not lo <= v <= hi:
        raise BadRequest(f"{key} must be between {lo} and {hi}")
    return v


def time_range(q: Mapping[str, str], default_s: float = 3600.0) -> tuple[int, int]:
    """from/until in unix seconds (fractions allowed) -> ns; until defaults to now, from to
    `default_s` before until. Both in [0, MAX_UNIX_S], from before until, at most MAX_RANGE_S
    apart."""
    until, frm = unix_seconds(q, "until"), unix_seconds(q, "from")
    if until is None:
        until = time.time()
    if frm is None:
        frm = max(0.0, until - default_s)
    if until <= frm:
        raise BadRequest("until must be after from")
    if until - frm > MAX_RANGE_S:
        raise BadRequest(f"range longer than {MAX_RANGE_S // 86400} days")
    return int(frm * 1e9), int(until * 1e9)


def unix_seconds(q: Mapping[str, str], key: str) -> float | None:
    """q[key] as unix seconds in [0, MAX_UNIX_S]; None when absent or empty."""
    try:
        return number(q, key, None, lo=0, hi=MAX_UNIX_S)
    except BadRequest:
        raise BadRequest(f"{key} must be unix seconds between 0 and {MAX_UNIX_S}") from None


def hex_id(q: Mapping[str, str], key: str, n: int) -> str | None:
    """q[key] as `n` lowercase hex digits, or None when absent."""
    v = q.get(key)
    if v is None or v == "":
        return None
    v = v.strip().lower()
    if len(v) != n or any(c not in "0123456789abcdef" for c in v):
        raise BadRequest(f"{key} must be {n} hex digits")
    return v


def text(q: Mapping[str, str], key: str, max_chars: int = MAX_TEXT_CHARS) -> str | None:
    """q[key], at most `max_chars` long; None when absent or empty."""
    v = q.get(key)
    if not v:
        return None
    if len(v) > max_chars:
        raise BadRequest(f"{key} longer than {max_chars} characters")
    return v


def label_filters(q: Mapping[str, str], reserved: set[str]) -> dict[str, str]:
    """Every parameter not in `reserved`, as a label filter: bounded in number and length."""
    extra = {k: v for k, v in q.items() if k not in reserved}
    if len(extra) > MAX_LABEL_FILTERS or any(
            len(k) > MAX_LABEL_KEY_CHARS or len(v) > MAX_LABEL_VALUE_CHARS
            for k, v in extra.items()):
        raise BadRequest(f"at most {MAX_LABEL_FILTERS} label filters, keys up to "
                         f"{MAX_LABEL_KEY_CHARS} and values up to {MAX_LABEL_VALUE_CHARS} "
                         "characters")
    return extra
