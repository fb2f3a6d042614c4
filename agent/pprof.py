"""pprof (profile.proto) encoding and decoding for `Profile`.

`encode` writes one pprof holding every sample type of a profile, with functions (name and file),
locations (one line each), one mapping, labels and a string table whose entry 0 is "".
`decode` reads pprof from any producer, validates every cross-reference and raises
`ProfileDecodeError` with a reason instead of returning garbage. Stacks deeper than
`model.MAX_STACK_DEPTH` keep their innermost frames under `[truncated]`; `Limits` bounds what one
decode may build (the ingest's per-request bounds). Both are loops, never recursion.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from itertools import chain, islice

from google.protobuf.message import DecodeError

from agent.errors import ProfileDecodeError
from agent.model import (MAX_STACK_DEPTH, TRUNCATED, Frame, Profile, SampleType, Stack,
                         saturate)
from agent.proto import profile_pb2

#: Largest decompressed pprof `decode` accepts by default (bytes).
MAX_DECODED_BYTES = 256 * 1024 * 1024

_GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class Limits:
    """What one decode may build: a pprof with more is refused (ProfileDecodeError), before any
    of it is turned into Python objects. None: no bound."""

    max_bytes: int = MAX_DECODED_BYTES
    max_samples: int | None = None
    max_locations: int | None = None
    max_functions: int | None = None
    max_strings: int | None = None


class _Strings:
    __slots__ = ("index", "table")

    def __init__(self) -> None:
        self.index: dict[str, int] = {"": 0}
        self.table: list[str] = [""]

    def __call__(self, s: str) -> int:
        i = self.index.get(s)
        if i is None:
            i = self.index[s] = len(self.table)
            self.table.append(s)
        return i


def encode(profile: Profile, *, compress: bool = True, mapping_file: str = "python") -> bytes:
    """Serialise `profile` as pprof; gzip-compressed unless `compress` is False.

    Samples whose values are all zero are left out.
    """
    st = _Strings()
    pb = profile_pb2.Profile()
    for t in profile.sample_types:
        pb.sample_type.add(type=st(t.name), unit=st(t.unit))
    if profile.period_type is not None:
        pb.period_type.type = st(profile.period_type.name)
        pb.period_type.unit = st(profile.period_type.unit)
    pb.period = saturate(int(profile.period))
    pb.time_nanos = saturate(int(profile.time_ns))
    pb.duration_nanos = saturate(int(profile.duration_ns))
    for c in profile.comments:
        pb.comment.append(st(c))
    if profile.default_sample_type:
        pb.default_sample_type = st(profile.default_sample_type)
    pb.mapping.add(id=1, filename=st(mapping_file), has_functions=True, has_filenames=True,
                   has_line_numbers=True)

    functions: dict[tuple[str, str], int] = {}
    locations: dict[Frame, int] = {}
    pb_functions = pb.function
    pb_locations = pb.location

    def location_id(frame: Frame) -> int:
        loc = locations.get(frame)
        if loc is not None:
            return loc
        fkey = (frame.name, frame.filename)
        fid = functions.get(fkey)
        if fid is None:
            fid = functions[fkey] = len(functions) + 1
            pb_functions.add(id=fid, name=st(frame.name), system_name=st(frame.name),
                             filename=st(frame.filename))
        loc = locations[frame] = len(locations) + 1
        pb_locations.add(id=loc, mapping_id=1).line.add(function_id=fid, line=frame.line)
        return loc

    label_keys: dict[str, int] = {}
    for (stack, labels), vec in profile.samples.items():
        if not any(vec):
            continue
        sample = pb.sample.add()
        sample.location_id.extend([location_id(f) for f in stack])
        try:
            sample.value.extend(vec)
        except ValueError:  # beyond int64 (e.g. scaled up): saturate rather than fail
            del sample.value[:]
            sample.value.extend([saturate(v) for v in vec])
        for key, value in labels:
            k = label_keys.get(key)
            if k is None:
                k = label_keys[key] = st(key)
            if isinstance(value, int):
                sample.label.add(key=k, num=value)
            elif value:
                sample.label.add(key=k, str=st(value))
    pb.string_table.extend(st.table)
    raw = pb.SerializeToString()
    return gzip.compress(raw, compresslevel=6) if compress else raw


def decode(data: bytes, *, max_bytes: int = MAX_DECODED_BYTES, limits: Limits | None = None,
           stats: dict | None = None) -> Profile:
    """Parse pprof bytes (gzip-compressed or not) into a `Profile`.

    Raises ProfileDecodeError with a one-line reason for anything that is not a valid pprof or
    is beyond `limits` (whose max_bytes then replaces `max_bytes`). Stacks deeper than
    MAX_STACK_DEPTH are truncated; `stats["truncated"]` (when given) counts them.
    """
    if limits is not None:
        max_bytes = limits.max_bytes
    pb = _parse(data, max_bytes)
    if limits is not None:
        _check_limits(pb, limits)
    return _from_pb(pb, stats)


def _check_limits(pb: profile_pb2.Profile, limits: Limits) -> None:
    for what, n, most in (("samples", len(pb.sample), limits.max_samples),
                          ("locations", len(pb.location), limits.max_locations),
                          ("functions", len(pb.function), limits.max_functions),
                          ("strings", len(pb.string_table), limits.max_strings)):
        if most is not None and n > most:
            raise ProfileDecodeError(f"profile has {n} {what}, more than the limit of {most}")


def _parse(data: bytes, max_bytes: int) -> profile_pb2.Profile:
    raw = _gunzip(data, max_bytes) if data[:2] == _GZIP_MAGIC else data
    if len(raw) > max_bytes:
        raise ProfileDecodeError(f"profile is larger than {max_bytes} bytes")
    pb = profile_pb2.Profile()
    try:
        pb.ParseFromString(raw)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ProfileDecodeError(f"not a pprof profile ({exc or 'protobuf decode error'})") from None
    return pb


def decode_paths(data: bytes, type_name: str, paths, *,
                 max_bytes: int = MAX_DECODED_BYTES) -> bool:
    """Add the `type_name` values of a pprof to `paths` (a flamegraph.calltree.Paths) without
    building a Profile: no labels, no Frame per sample. Returns False when the profile has no
    such sample type. Raises ProfileDecodeError like `decode`."""
    pb = _parse(data, max_bytes)
    s = _string_reader(pb)
    names = [s(t.type, "sample_type") for t in pb.sample_type]
    if type_name not in names:
        return False
    ti = names.index(type_name)
    acc = paths.paths
    get = _locations(pb, s, paths.fid).__getitem__
    ntypes = len(names)
    most = MAX_STACK_DEPTH + 1
    for sample in pb.sample:  # the hot loop of the flame graph views: kept flat
        values = sample.value
        if len(values) != ntypes:
            raise _wrong_values(len(values), ntypes)
        try:
            path = tuple(islice(chain.from_iterable(map(get, sample.location_id)), most))
        except KeyError as exc:
            raise _missing_location(exc) from None
        if len(path) == most:
            path = path[:MAX_STACK_DEPTH - 1] + (paths.fid(*TRUNCATED),)
        v = values[ti]
        if v:
            path = path[::-1]
            acc[path] = acc.get(path, 0) + v
    return True


def _gunzip(data: bytes, max_bytes: int) -> bytes:
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(data, max_bytes + 1)
    except zlib.error as exc:
        raise ProfileDecodeError(f"corrupt gzip data ({exc})") from None
    if len(out) > max_bytes:
        raise ProfileDecodeError(f"profile decompresses to more than {max_bytes} bytes")
    if not d.eof:
        raise ProfileDecodeError("truncated gzip data")
    return out


def _string_reader(pb: profile_pb2.Profile):
    """s(index, what) -> the string, or a ProfileDecodeError naming what referred to it."""
    strings = list(pb.string_table)
    if not strings or strings[0] != "":
        raise ProfileDecodeError("not a pprof profile (string table must start with \"\")")
    n = len(strings)

    def s(i: int, what: str) -> str:
        if not 0 <= i < n:
            raise ProfileDecodeError(f"invalid pprof: {what} refers to string {i} of {n}")
        return strings[i]
    return s


def _locations(pb: profile_pb2.Profile, s, frame) -> dict[int, tuple]:
    """location id -> what `frame(name, filename, line)` makes of each of its lines (Frames, or
    function ids for Paths), leaf-most (inlined) first as in a leaf-first stack. Every
    reference is checked."""
    functions = {f.id: (s(f.name, "function name"), s(f.filename, "function filename"))
                 for f in pb.function}
    mappings = {m.id: s(m.filename, "mapping filename") for m in pb.mapping}
    locations: dict[int, tuple] = {}
    for loc in pb.location:
        items = []
        for line in loc.line:
            fn = functions.get(line.function_id)
            if fn is None:
                raise ProfileDecodeError(
                    f"invalid pprof: location {loc.id} refers to missing function {line.function_id}")
            items.append(frame(fn[0], fn[1], max(0, line.line)))
        if not items:
            where = mappings.get(loc.mapping_id, "")
            name = f"0x{loc.address:x}"
            items.append(frame(f"{where}+{name}" if where else name, "", 0))
        locations[loc.id] = tuple(items)
    return locations


def _missing_location(exc: KeyError) -> ProfileDecodeError:
    return ProfileDecodeError(f"invalid pprof: sample refers to missing location {exc.args[0]}")


def _wrong_values(n: int, ntypes: int) -> ProfileDecodeError:
    return ProfileDecodeError(f"invalid pprof: a sample has {n} values for {ntypes} sample types")


def _from_pb(pb: profile_pb2.Profile, stats: dict | None = None) -> Profile:
    s = _string_reader(pb)
    if not pb.sample_type:
        raise ProfileDecodeError("not a pprof profile (no sample types)")
    types = [SampleType(s(t.type, "sample_type"), s(t.unit, "sample_type unit"))
             for t in pb.sample_type]
    period_type = None
    if pb.HasField("period_type") and (pb.period_type.type or pb.period_type.unit):
        period_type = (s(pb.period_type.type, "period_type"), s(pb.period_type.unit, "period_type"))
    default = s(pb.default_sample_type, "default_sample_type") or None
    prof = Profile(types, period_type=period_type, period=pb.period, time_ns=pb.time_nanos,
                   duration_ns=pb.duration_nanos,
                   comments=[s(c, "comment") for c in pb.comment], default_sample_type=default)
    samples = prof.samples
    label_cache: dict[tuple, tuple] = {}
    get = _locations(pb, s, Frame).__getitem__
    ntypes = len(types)
    most = MAX_STACK_DEPTH + 1
    truncated = 0
    for sample in pb.sample:
        values = list(sample.value)
        if len(values) != ntypes:
            raise _wrong_values(len(values), ntypes)
        try:
            # islice: a sample of 10^5 locations, each of many lines, is never expanded whole
            stack = tuple(islice(chain.from_iterable(map(get, sample.location_id)), most))
        except KeyError as exc:
            raise _missing_location(exc) from None
        if len(stack) == most:
            stack = stack[:MAX_STACK_DEPTH - 1] + (TRUNCATED,)
            truncated += 1
        raw = tuple((lab.key, lab.str, lab.num) for lab in sample.label)
        labels = label_cache.get(raw)
        if labels is None:
            d = {}
            for k, sv, num in raw:
                d[s(k, "label key")] = s(sv, "label value") if sv else num
            labels = label_cache[raw] = tuple(sorted(d.items()))
        key = (stack, labels)
        vec = samples.get(key)
        if vec is None:
            samples[key] = values
        else:
            for i, v in enumerate(values):
                vec[i] = saturate(vec[i] + v)
    if stats is not None:
        stats["truncated"] = stats.get("truncated", 0) + truncated
    return prof


def stack_key(stack: Stack) -> str:
    """Root-first `a;b;c` form of a stack (used by folded output and tests)."""
    return ";".join(f.name for f in reversed(stack))
