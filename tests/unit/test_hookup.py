"""The app-side hookup: the attributes each span gets, in a thread, in a task and after a fork."""

from __future__ import annotations

import asyncio
import os
import threading

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agent import otel


def _tracer():
    exp = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(otel.SpanflameSpanProcessor())
    provider.add_span_processor(SimpleSpanProcessor(exp))
    return provider.get_tracer("t"), exp


def test_thread_span_names_its_process_thread_and_itself():
    t, exp = _tracer()
    with t.start_as_current_span("root") as root:
        with t.start_as_current_span("child"):
            pass
    child, parent = exp.get_finished_spans()
    assert child.attributes[otel.ATTR_PID] == os.getpid()
    assert child.attributes[otel.ATTR_TID] == threading.get_native_id()
    assert child.attributes[otel.ATTR_SPAN_ID] == "%016x" % child.context.span_id
    assert otel.ATTR_PROFILE_ID not in child.attributes  # only the local root gets it
    assert parent.attributes[otel.ATTR_PROFILE_ID] == "%016x" % root.get_span_context().span_id
    assert otel.ATTR_TASK not in parent.attributes


def test_other_thread_gets_its_own_tid():
    t, exp = _tracer()
    tids = []

    def work():
        tids.append(threading.get_native_id())
        with t.start_as_current_span("in thread"):
            pass
    th = threading.Thread(target=work)
    th.start()
    th.join()
    (span,) = exp.get_finished_spans()
    assert span.attributes[otel.ATTR_TID] == tids[0] != threading.get_native_id()


def test_task_span_names_the_task_coroutine_and_registry_empties():
    t, exp = _tracer()
    seen = {}

    async def body():
        with t.start_as_current_span("in task"):
            seen["coro"] = id(asyncio.current_task().get_coro())
            seen["open"] = dict(otel._active_tasks)

    asyncio.run(body())
    (span,) = exp.get_finished_spans()
    assert span.attributes[otel.ATTR_TASK] == seen["coro"]
    assert seen["open"] == {seen["coro"]: 1}
    assert otel._active_tasks == {}


def test_forked_child_reports_its_own_pid():
    t, exp = _tracer()
    with t.start_as_current_span("warm"):  # fills the parent's per-thread cache
        pass
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            with t.start_as_current_span("in child"):
                pass
            span = exp.get_finished_spans()[-1]
            os.write(w, str(span.attributes[otel.ATTR_PID]).encode())
        finally:
            os._exit(0)
    os.close(w)
    got = os.read(r, 64).decode()
    os.waitpid(pid, 0)
    assert int(got) == pid
