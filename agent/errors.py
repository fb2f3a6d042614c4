"""The one exception hierarchy of spanflame.

OS and subprocess errors are translated into these in exactly one place each (the sampler driver,
the output writer, the pprof decoder). The CLI turns any `SpanflameError` into a one-line message
and a non-zero exit code; library code never prints or exits.
"""

from __future__ import annotations


class SpanflameError(Exception):
    """Base class. `str(err)` is a complete one-line message for a user."""

    exit_code = 1


class UsageError(SpanflameError):
    """Bad options or arguments (unknown probe, bad tag filter, unknown sample type)."""

    exit_code = 2


class TargetError(SpanflameError):
    """The process to profile cannot be profiled."""


class NoSuchProcess(TargetError):
    pass


class NotPython(TargetError):
    pass


class TargetPermissionError(TargetError):
    pass


class SamplerError(SpanflameError):
    """py-spy is missing or failed in a way we did not expect."""


class OutputError(SpanflameError):
    """An output path cannot be written."""


class InputError(SpanflameError):
    """An input file is missing, corrupt or not of the expected format."""


class ProfileDecodeError(InputError):
    """Bytes that are not a valid pprof profile."""


class ProbeError(SpanflameError):
    """An eBPF probe cannot be loaded or attached."""


class StoreFull(SpanflameError):
    """The store's disk (or filesystem) is full: nothing was written. `path` is the database."""

    def __init__(self, path: str, free_bytes: int | None) -> None:
        free = "" if free_bytes is None else f", {free_bytes} bytes free"
        super().__init__(f"disk full: cannot write the store {path}{free}")
        self.path = path
        self.free_bytes = free_bytes
