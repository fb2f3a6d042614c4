"""Turning a Pyroscope push or ingest body into validated Profiles: the synchronous half of the
ingest, run on the ingest's own threads (agent/admission.py), never on the event loop.

Everything a client sends is bounded before it becomes Python objects, and every number is
checked before anything is stored, so a request is stored whole or not at all:

| bound | value | on excess |
|---|---|---|
| body on the wire (`MAX_BODY`) | 8 MiB | 413 |
| body after Content-Encoding, and the sum of its decompressed profiles (`MAX_DECODED`) | 16 MiB | 413 / 400 |
| one pprof, decompressed (`MAX_PROFILE_BYTES`, Pyroscope's own default) | 4 MiB | 400 |
| profiles per request (`MAX_PROFILES`) | 16 | 400 |
| samples per request, pprof samples or folded lines (`MAX_SAMPLES`) | 50,000 | 400 |
| locations, functions / strings per pprof | 100,000 / 200,000 | 400 |
| sample types per profile (`MAX_SAMPLE_TYPES`) | 16 | 400 |
| a sample value; one sample type's total in a profile (`MAX_TOTAL`) | 0 .. 2^53 | 400 |
| a profile's duration (`MAX_DURATION_S`) | 24 h | 400 |
| stack depth (`model.MAX_STACK_DEPTH`) | 1024 frames | truncated under `[truncated]`, counted |

2^53 per profile keeps sums over many profiles (merges, the store's timeline) inside int64;
merges saturate at int64 anyway.
"""

from __future__ import annotations

import re
import time

from google.protobuf import json_format
from google.protobuf.message import DecodeError

from agent import pprof
from agent.errors import ProfileDecodeError
from agent.httpbody import BodyError, decode_content, gunzip
from agent.model import MAX_STACK_DEPTH, SAMPLE_TYPES, TRUNCATED, Frame, Profile
from agent.params import MAX_UNIX_S
from agent.proto import push_pb2

MAX_BODY = 8 * 1024 * 1024
MAX_DECODED = 16 * 1024 * 1024
MAX_PROFILE_BYTES = 4 * 1024 * 1024
MAX_PROFILES = 16
MAX_SAMPLES = 50_000
MAX_SAMPLE_TYPES = 16
MAX_TOTAL = 1 << 53
MAX_DURATION_S = 24 * 3600
MAX_RATE_HZ = 1_000_000
MAX_LABELS = 32
MAX_LABEL_VALUE = 256
#: How far ahead of this host's clock a profile may be stamped (client clock skew).
MAX_FUTURE_S = 3600.0
PROFILE_LIMITS = pprof.Limits(max_bytes=MAX_PROFILE_BYTES, max_samples=MAX_SAMPLES,
                              max_locations=100_000, max_functions=100_000, max_strings=200_000)

_NAME = re.compile(r"^([^{}]*)(?:\{(.*)\})?$", re.S)
_PID = re.compile(r"[0-9]{1,10}")


def clip(v: str) -> str:
    return v if len(v) <= MAX_LABEL_VALUE else v[:MAX_LABEL_VALUE - 1] + "…"


class TimeRejected(BodyError):
    """A profile stamped outside what the store keeps: refused, never acknowledged and then
    dropped by retention. `result` is its label in the ingest metrics."""

    def __init__(self, result: str, message: str) -> None:
        super().__init__(400, message)
        self.result = result


def parse_app_name(name: str) -> tuple[str, dict[str, str]]:
    """'myapp.cpu{env=prod,region=eu}' -> ('myapp', {'env': 'prod', 'region': 'eu'})."""
    m = _NAME.match(name.strip())
    if not m or not m.group(1):
        raise BodyError(400, f"invalid name {name[:80]!r}: expected app{{key=value,...}}")
    app = m.group(1)
    for suffix in (".cpu", ".itimer", ".wall", ".alloc_objects", ".alloc_space",
                   ".inuse_objects", ".inuse_space"):
        if app.endswith(suffix):
            app = app[: -len(suffix)]
            break
    tags = {}
    if m.group(2):
        for part in m.group(2).split(","):
            if not part.strip():
                continue
            k, sep, v = part.partition("=")
            if not sep or not k.strip():
                raise BodyError(400, f"invalid tag {part[:80]!r} in name")
            if len(tags) >= MAX_LABELS:
                raise BodyError(400, f"more than {MAX_LABELS} tags in name")
            tags[clip(k.strip())] = clip(v.strip())
    check_labels(tags)
    return clip(app), tags


def check_labels(labels: dict[str, str]) -> None:
    """Series labels the store indexes must be what they claim: `pid` a process id."""
    pid = labels.get("pid")
    if pid is not None and pid != "" and (not _PID.fullmatch(pid) or int(pid) >= 1 << 31):
        raise BodyError(400, f"label pid {pid[:40]!r} is not a process id")


def folded_profile(text: str, sample_rate: int, start_ns: int, end_ns: int, *,
                   max_lines: int = MAX_SAMPLES, stats: dict | None = None) -> Profile:
    """Folded stacks ('a;b;c 12' per line, root first) as a cpu profile at `sample_rate` Hz.
    Stacks deeper than MAX_STACK_DEPTH keep their leaf-most frames under `[truncated]`
    (counted in `stats["truncated"]`); counts whose time would pass MAX_TOTAL are refused."""
    period = round(1e9 / max(1, sample_rate))
    p = Profile([SAMPLE_TYPES["samples"], SAMPLE_TYPES["cpu"]], period_type=SAMPLE_TYPES["cpu"],
                period=period, time_ns=start_ns, duration_ns=max(0, end_ns - start_ns),
                default_sample_type="cpu")
    most = MAX_TOTAL // period
    lines = truncated = 0
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        lines += 1
        if lines > max_lines:
            raise BodyError(400, f"more than {max_lines} folded lines in one request")
        stack, _, count = line.rpartition(" ")
        try:
            c = int(count)
        except ValueError:
            raise BodyError(400, f"folded line {n} does not end in a count") from None
        if c < 0 or not stack:
            raise BodyError(400, f"folded line {n} is invalid")
        if c > most:
            shown = count if len(count) <= 24 else count[:23] + "…"
            raise BodyError(400, f"folded line {n}: count {shown} at {sample_rate} Hz is more "
                                 f"than {MAX_TOTAL} ns")
        names = stack.rsplit(";", MAX_STACK_DEPTH)  # never more than the limit split out
        if len(names) > MAX_STACK_DEPTH:
            frames = tuple(Frame(clip(f)) for f in reversed(names[-(MAX_STACK_DEPTH - 1):]))
            frames += (TRUNCATED,)
            truncated += 1
        else:
            frames = tuple(Frame(clip(f)) for f in reversed(names))
        p.add(frames, (), {"samples": c, "cpu": c * period})
    check_values(p, "folded body")
    if stats is not None:
        stats["truncated"] = stats.get("truncated", 0) + truncated
    return p


def check_values(prof: Profile, what: str) -> None:
    """Refuse negative values, sample types beyond MAX_SAMPLE_TYPES or repeated, and a type
    whose total passes MAX_TOTAL."""
    names = [t.name for t in prof.sample_types]
    if len(names) > MAX_SAMPLE_TYPES:
        raise BodyError(400, f"{what}: {len(names)} sample types, more than {MAX_SAMPLE_TYPES}")
    if len(set(names)) != len(names):
        raise BodyError(400, f"{what}: a sample type appears twice")
    totals = [0] * len(names)
    for vec in prof.samples.values():
        for i, v in enumerate(vec):
            if v < 0:
                raise BodyError(400, f"{what}: negative {names[i]} value")
            totals[i] += v
    for name, total in zip(names, totals):
        if total > MAX_TOTAL:
            raise BodyError(400, f"{what}: {name} values add up to {total}, more than "
                                 f"{MAX_TOTAL}")


def check_time(prof: Profile, *, now_s: float, retention_s: float | None,
               default_duration_s: float = 10.0) -> None:
    """Give an unstamped profile the last `default_duration_s` before now; refuse one that is
    stamped before 1970 or lasts longer than MAX_DURATION_S, ends before the retention window
    (it would be deleted at the next sweep) or starts more than MAX_FUTURE_S ahead of this
    host's clock. What passes ends well inside int64 nanoseconds."""
    if prof.time_ns < 0 or prof.duration_ns < 0:
        raise TimeRejected("rejected_bad_time", "profile time and duration must not be negative")
    if prof.duration_ns > MAX_DURATION_S * 10**9:
        raise TimeRejected("rejected_bad_time",
                           f"profile lasts {prof.duration_ns / 1e9:.0f} s, more than "
                           f"{MAX_DURATION_S} s")
    if not prof.time_ns:
        dur = prof.duration_ns or int(default_duration_s * 1e9)
        prof.time_ns, prof.duration_ns = int(now_s * 1e9) - dur, dur
    if prof.time_ns / 1e9 > now_s + MAX_FUTURE_S:
        raise TimeRejected(
            "rejected_future",
            f"profile starts at {_utc(prof.time_ns / 1e9)}, more than {MAX_FUTURE_S / 3600:g} h "
            f"after this host's clock ({_utc(now_s)}): check the client's clock")
    end_s = (prof.time_ns + prof.duration_ns) / 1e9
    if retention_s is not None and end_s < now_s - retention_s:
        raise TimeRejected(
            "rejected_too_old",
            f"profile ends at {_utc(end_s)}, older than the store's retention "
            f"({retention_s / 3600:g} h before now, {_utc(now_s)}): it would not be kept")


def _utc(t_s: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(min(max(t_s, 0), MAX_UNIX_S)))


class Budget:
    """What one request may still decode: bytes and samples, over all its profiles."""

    def __init__(self, max_bytes: int = MAX_DECODED, max_samples: int = MAX_SAMPLES) -> None:
        self.bytes = max_bytes
        self.samples = max_samples
        self.truncated = 0

    def pprof(self, data: bytes, what: str) -> Profile:
        """One (maybe gzipped) pprof, within PROFILE_LIMITS and what is left of the budget."""
        if data[:2] == b"\x1f\x8b":
            data = gunzip(data, min(self.bytes, PROFILE_LIMITS.max_bytes))
        if len(data) > self.bytes:
            raise BodyError(413, f"{what}: profiles decompress to more than {MAX_DECODED} bytes "
                                 "in one request")
        self.bytes -= len(data)
        stats: dict = {}
        try:
            prof = pprof.decode(data, limits=pprof.Limits(
                max_bytes=PROFILE_LIMITS.max_bytes, max_samples=self.samples,
                max_locations=PROFILE_LIMITS.max_locations,
                max_functions=PROFILE_LIMITS.max_functions,
                max_strings=PROFILE_LIMITS.max_strings), stats=stats)
        except ProfileDecodeError as exc:
            raise BodyError(400, f"{what}: {exc}") from None
        self.samples -= len(prof)
        self.truncated += stats.get("truncated", 0)
        check_values(prof, what)
        return prof


def decode_push(body: bytes, ctype: str, encoding: str | None, *, max_decoded: int = MAX_DECODED,
                now_s: float, retention_s: float | None
                ) -> tuple[list[tuple[Profile, str, dict]], int]:
    """A PushRequest body -> ([(profile, service, labels)], stacks truncated); every profile
    decoded and checked, or BodyError for the first that is not."""
    raw = decode_content(body, encoding, max_decoded)
    req = push_pb2.PushRequest()
    if ctype == "application/json":
        try:
            json_format.Parse(raw, req, ignore_unknown_fields=True)
        except (json_format.ParseError, UnicodeDecodeError, ValueError, TypeError,
                RecursionError) as exc:
            raise BodyError(400, f"invalid PushRequest JSON ({str(exc)[:200]})") from None
    else:
        try:
            req.ParseFromString(raw)
        except (DecodeError, ValueError, RuntimeError) as exc:
            raise BodyError(400, f"malformed PushRequest ({exc or 'decode error'})") from None
    n = sum(len(series.samples) for series in req.series)
    if n > MAX_PROFILES:
        raise BodyError(400, f"PushRequest holds {n} profiles, more than {MAX_PROFILES}")
    budget = Budget(max_decoded)
    items = []
    for series in req.series:
        labels = {}
        for lp in series.labels[:MAX_LABELS]:
            labels[clip(lp.name)] = clip(lp.value)
        service = labels.get("service_name") or labels.get("__name__") or "unknown"
        check_labels(labels)
        for smp in series.samples:
            prof = budget.pprof(smp.raw_profile, f"series {service[:80]!r}")
            try:
                check_time(prof, now_s=now_s, retention_s=retention_s)
            except TimeRejected as exc:
                raise TimeRejected(exc.result, f"series {service!r}: {exc.message}") from None
            items.append((prof, service, labels))
    if not items:
        raise BodyError(400, "PushRequest holds no profiles")
    return items, budget.truncated


def decode_ingest(body: bytes, encoding: str | None, fmt: str, *, rate_hz: int, from_s: float,
                  until_s: float, now_s: float, retention_s: float | None,
                  max_decoded: int = MAX_DECODED) -> tuple[Profile, int]:
    """An /ingest body (pprof or folded) -> (profile, stacks truncated), checked."""
    raw = decode_content(body, encoding, max_decoded)
    budget = Budget(max_decoded)
    if fmt == "pprof":
        prof = budget.pprof(raw, "pprof body")
    elif fmt in ("folded", "lines"):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BodyError(400, "folded body is not UTF-8 text") from None
        stats: dict = {}
        prof = folded_profile(text, rate_hz, int(from_s * 1e9), int(until_s * 1e9), stats=stats)
        budget.truncated = stats.get("truncated", 0)
    else:
        raise BodyError(400, f"unsupported format {fmt!r}: use pprof or folded")
    if not prof.time_ns:
        prof.time_ns, prof.duration_ns = int(from_s * 1e9), int((until_s - from_s) * 1e9)
    check_time(prof, now_s=now_s, retention_s=retention_s)
    return prof, budget.truncated
