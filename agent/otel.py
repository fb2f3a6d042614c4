"""One-line hookup for applications that use the OpenTelemetry SDK.

    from agent.otel import SpanflameSpanProcessor
    provider.add_span_processor(SpanflameSpanProcessor())

Every span gets `spanflame.pid` and `spanflame.tid` (the OS thread id, `threading.get_native_id()`,
the id py-spy and the kernel use), in an asyncio task `spanflame.task` (`id()` of the task's
coroutine, what the kernel walker reports as the outermost coroutine of a stack),
`spanflame.pid_ns` (the app's PID namespace, so that an agent
outside a container can translate those ids) and `thread.name`, so that the spanflame agent can put each
sample on the span that was running on its thread, and `spanflame.span_id` (its own span id in
hex), which tracing UIs that can only template links from tags (Jaeger) use for deep links. A local root span also gets
`pyroscope.profile.id` (its span id), which Grafana's "Profiles for this span" looks for.

With `opentelemetry-instrument`, no code change is needed: the `spanflame` instrumentor entry
point adds the processor to the global tracer provider.

This module needs nothing beyond opentelemetry-sdk (and the standard library).
"""

from __future__ import annotations

import os
import sys
import threading

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

ATTR_PID = "spanflame.pid"
ATTR_TID = "spanflame.tid"
ATTR_THREAD_NAME = "thread.name"
ATTR_PROFILE_ID = "pyroscope.profile.id"
ATTR_SPAN_ID = "spanflame.span_id"
ATTR_PID_NS = "spanflame.pid_ns"
ATTR_TASK = "spanflame.task"
_ns_of_pid: list = [0, 0]  # [pid, namespace inode] (re-read after a fork)
#: id(coroutine) of every asyncio task with an open span -> how many are open in it. The agent
#: reads this dict from outside the process (probes/pyasync.py) to see what such a task awaits
#: while it is suspended; keep its name and shape.
_active_tasks: dict[int, int] = {}


def _task_id() -> int:
    """id() of the running asyncio task's coroutine (what the kernel walker reports as the
    task's coroutine frame), 0 outside a task. asyncio is never imported here, and no exception
    is raised on the way (current_task() raises outside a loop: that would cost a microsecond
    on every span of a threaded app)."""
    aio = sys.modules.get("asyncio")
    if aio is None:
        return 0
    loop = aio._get_running_loop()
    if loop is None:
        return 0
    task = aio.current_task(loop)
    return id(task.get_coro()) if task is not None else 0


def _pid_ns(pid: int) -> int:
    if _ns_of_pid[0] != pid:
        try:
            ns = os.stat("/proc/self/ns/pid").st_ino
        except OSError:
            ns = 0
        _ns_of_pid[:] = [pid, ns]
    return _ns_of_pid[1]


_local = threading.local()


def _after_fork() -> None:
    # A forked child is another process: its threads' cached ids are wrong, and it has no
    # open spans of its own yet.
    global _local
    _local = threading.local()
    _active_tasks.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def _thread_items() -> dict:
    """This thread's attributes (its ids and name, the process's namespace), cached per thread
    (a fork starts a new cache)."""
    pid = os.getpid()
    cached = {ATTR_PID: pid, ATTR_TID: threading.get_native_id(),
              ATTR_THREAD_NAME: threading.current_thread().name}
    ns = _pid_ns(pid)
    if ns:
        cached[ATTR_PID_NS] = ns
    _local.items = cached
    return cached


class SpanflameSpanProcessor(SpanProcessor):
    """Records where each span runs. Thread-safe; never blocks; about a microsecond a span
    (bench/hookup.py)."""

    def on_start(self, span: Span, parent_context=None) -> None:
        cached = getattr(_local, "items", None) or _thread_items()
        ctx = span.get_span_context()
        sid = "%016x" % ctx.span_id
        parent = span._parent if hasattr(span, "_parent") else span.parent
        task = 0
        aio = sys.modules.get("asyncio")
        if aio is not None:
            loop = aio._get_running_loop()
            if loop is not None:
                t = aio.current_task(loop)
                if t is not None:
                    task = id(t.get_coro())
        attrs = getattr(span, "_attributes", None)
        d = getattr(attrs, "_dict", None)
        if (type(d) is dict and not getattr(attrs, "_immutable", True)
                and (attrs.maxlen is None or len(d) + len(cached) + 3 <= attrs.maxlen)):
            # A span just started is not visible to any other thread yet, so its attribute
            # map needs no lock; the values are known to be valid (ints, short strs), so the
            # SDK's per-value validation (half a microsecond each) is skipped.
            d.update(cached)
            d[ATTR_SPAN_ID] = sid
            if parent is None or parent.is_remote:
                d[ATTR_PROFILE_ID] = sid
            if task:
                d[ATTR_TASK] = task
                _active_tasks[task] = _active_tasks.get(task, 0) + 1
            return
        extra = {ATTR_SPAN_ID: sid}
        if parent is None or parent.is_remote:
            extra[ATTR_PROFILE_ID] = sid
        if task:
            extra[ATTR_TASK] = task
            _active_tasks[task] = _active_tasks.get(task, 0) + 1
        span.set_attributes({**cached, **extra})

    def on_end(self, span: ReadableSpan) -> None:
        if not _active_tasks:
            return
        d = getattr(getattr(span, "_attributes", None), "_dict", None)
        if type(d) is not dict:
            d = span.attributes or {}
        task = d.get(ATTR_TASK)
        if task:
            n = _active_tasks.get(task, 0) - 1
            if n > 0:
                _active_tasks[task] = n
            else:
                _active_tasks.pop(task, None)

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def install(provider=None) -> bool:
    """Add the processor to `provider` (default: the global one); False if it cannot take
    span processors (the no-op provider of an app without the SDK)."""
    provider = provider or trace.get_tracer_provider()
    add = getattr(provider, "add_span_processor", None)
    if add is None:
        return False
    add(SpanflameSpanProcessor())
    return True


try:  # the instrumentor exists only where opentelemetry-instrumentation is installed
    from opentelemetry.instrumentation.instrumentor import BaseInstrumentor

    class SpanflameInstrumentor(BaseInstrumentor):
        """Entry point `opentelemetry_instrumentor: spanflame`, run by opentelemetry-instrument
        after the SDK is configured."""

        def instrumentation_dependencies(self):
            return []

        def _instrument(self, **kwargs) -> None:
            install(kwargs.get("tracer_provider"))

        def _uninstrument(self, **kwargs) -> None:
            pass
except ImportError:  # pragma: no cover - depends on the app's environment
    pass
