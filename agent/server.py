"""The agent's HTTP server: API, Prometheus metrics, health, Pyroscope-compatible ingest, the
OTLP receiver (on its own port unless both share one) and the web UI.

Every handler that touches the store runs in a worker thread (the store is synchronous).
Bad parameters get a 400 with a reason. Who may call which route (token, Host header, what a
web page may send) is agent/httpguard.py, one middleware in front of both apps; which processes
an OTLP sender may name in its spans is agent/senders.py.
"""

from __future__ import annotations

import logging
import time

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from agent import pprof
from agent.errors import StoreFull
from agent.httpguard import Policy, RequestGuard
from agent.model import SAMPLE_TYPES, Profile
from agent.otlp_receiver import OtlpReceiver
from agent.pyroscope_ingest import PyroscopeIngest
from agent.store import INDEX_LABELS

log = logging.getLogger(__name__)

RESERVED = {"from", "until", "type", "service", "pid", "trace_id", "span_id", "token", "limit",
            "format", "descendants", "compare", "name", "min_duration_ms", "buckets",
            "min_fraction"}
MAX_RANGE_S = 31 * 24 * 3600


class BadRequest(Exception):
    pass


def time_range(q, default_s: float = 3600.0) -> tuple[int, int]:
    """from/until in unix seconds (fractions allowed) -> ns; until defaults to now, from to an
    hour before until."""
    try:
        until = float(q["until"]) if q.get("until") else time.time()
        frm = float(q["from"]) if q.get("from") else until - default_s
    except ValueError:
        raise BadRequest("from and until must be unix seconds") from None
    if until <= frm:
        raise BadRequest("until must be after from")
    if until - frm > MAX_RANGE_S:
        raise BadRequest(f"range longer than {MAX_RANGE_S // 86400} days")
    return int(frm * 1e9), int(until * 1e9)


def _int(q, key: str, default=None, lo: int = 0, hi: int = 1 << 62):
    if not q.get(key):
        return default
    try:
        v = int(q[key])
    except ValueError:
        raise BadRequest(f"{key} must be an integer") from None
    if not lo <= v <= hi:
        raise BadRequest(f"{key} out of range")
    return v


def _hex(q, key: str, n: int):
    v = q.get(key)
    if v is None or v == "":
        return None
    v = v.strip().lower()
    if len(v) != n or any(c not in "0123456789abcdef" for c in v):
        raise BadRequest(f"{key} must be {n} hex digits")
    return v


def query_profile(agent, q) -> tuple[Profile | None, int]:
    """The merged profile for /api/profile's parameters, and how many stored profiles made it."""
    start, end = time_range(q)
    type_name = q.get("type") or "cpu"
    if len(type_name) > 64:
        raise BadRequest("type too long")
    pid = _int(q, "pid")
    span_id, trace_id = _hex(q, "span_id", 16), _hex(q, "trace_id", 32)
    extra = {k: v for k, v in q.items() if k not in RESERVED}
    series = {k: v for k, v in extra.items() if k in INDEX_LABELS and k != "pid"}
    found = agent.store.find(start_ns=start, end_ns=end, type_name=type_name,
                             service=q.get("service") or None, pid=pid, labels=series or None,
                             span_id=span_id, trace_id=trace_id)
    # Keys outside the index: a series label (a pushed tag such as env) or a sample label.
    tags = {k: v for k, v in extra.items() if k not in series}
    sample = {}
    if span_id:
        sample["span_id"] = span_id
    if trace_id:
        sample["trace_id"] = trace_id
    merged = agent.store.merged(found, sample_labels=sample or None, type_name=type_name,
                                tags=tags or None)
    return merged, len(found)


def _empty(type_name: str, start: int, end: int) -> Profile:
    t = SAMPLE_TYPES.get(type_name) or (type_name, "count")
    return Profile([t], time_ns=start, duration_ns=end - start, default_sample_type=type_name)


async def _store_full(request: Request, exc: StoreFull) -> Response:
    """A write refused for a full disk: 507 with the reason (OTLP: 503 and Retry-After, which
    OTLP exporters retry; 507 is not retryable there)."""
    status = 503 if request.url.path == "/v1/traces" else 507
    return PlainTextResponse(f"{exc}\n", status_code=status, headers={"retry-after": "60"})


EXCEPTION_HANDLERS = {StoreFull: _store_full}


def build_apps(agent) -> tuple[Starlette, Starlette]:
    """(main app on --listen, OTLP app on --otlp-listen)."""
    from agent.ui import trace_rows, ui_routes  # agent.ui builds on this module

    m = agent.metrics

    read_only = bool(getattr(agent, "read_only", False))

    async def healthz(request: Request) -> Response:
        if read_only:
            return JSONResponse({"status": "ok", "read_only": True,
                                 "store": str(agent.store.dir)})
        return JSONResponse(agent.health())

    async def metrics(request: Request) -> Response:
        return Response(m.render(), media_type="text/plain; version=0.0.4")

    async def api_profile(request: Request) -> Response:
        q = request.query_params
        try:
            prof, n = await run_in_threadpool(query_profile, agent, q)
        except BadRequest as exc:
            return PlainTextResponse(f"{exc}\n", status_code=400)
        if prof is None:
            start, end = time_range(q)
            prof = _empty(q.get("type") or "cpu", start, end)
        data = await run_in_threadpool(pprof.encode, prof)
        return Response(data, media_type="application/octet-stream",
                        headers={"x-spanflame-profiles": str(n),
                                 "content-disposition": 'attachment; filename="profile.pb.gz"'})

    async def api_spans(request: Request) -> Response:
        q = request.query_params
        try:
            start, end = time_range(q)
            min_ms = q.get("min_duration_ms")
            try:
                min_ns = int(float(min_ms) * 1e6) if min_ms else 0
            except ValueError:
                raise BadRequest("min_duration_ms must be a number") from None
            limit = _int(q, "limit", 100, 1, 10_000)
        except BadRequest as exc:
            return PlainTextResponse(f"{exc}\n", status_code=400)
        rows = await run_in_threadpool(agent.store.slow_spans, start_ns=start, end_ns=end,
                                       service=q.get("service") or None,
                                       name=q.get("name") or None, min_duration_ns=min_ns,
                                       limit=limit)
        return JSONResponse([_span_json(r) for r in rows])

    async def api_trace(request: Request) -> Response:
        tid = request.path_params["trace_id"].lower()
        if len(tid) != 32 or any(c not in "0123456789abcdef" for c in tid):
            return PlainTextResponse("trace_id must be 32 hex digits\n", status_code=400)
        rows = await run_in_threadpool(trace_rows, agent, tid)  # stored and not stored yet
        return JSONResponse([_span_json(r) for r in rows])

    async def api_services(request: Request) -> Response:
        try:
            start, end = time_range(request.query_params, default_s=24 * 3600)
        except BadRequest as exc:
            return PlainTextResponse(f"{exc}\n", status_code=400)
        return JSONResponse(await run_in_threadpool(agent.store.services, start, end))

    routes = [
        Route("/healthz", healthz),
        Route("/metrics", metrics),
        Route("/api/profile", api_profile),
        Route("/api/spans", api_spans),
        Route("/api/trace/{trace_id}", api_trace),
        Route("/api/services", api_services),
    ]
    routes += ui_routes(agent)
    middleware = [Middleware(RequestGuard, policy=Policy.from_options(agent.opts))]
    if read_only:  # `spanflame serve`: no ingest, no OTLP
        return Starlette(routes=routes, middleware=middleware,
                         exception_handlers=EXCEPTION_HANDLERS), None
    ingest = PyroscopeIngest(agent.ingest, metrics=m,
                             retention_s=agent.store.retention_s)
    senders = getattr(agent, "sender_check", None)  # agent/senders.py
    otlp = OtlpReceiver(agent.spans, forwarder=agent.forwarder, metrics=m,
                        sink=agent.span_writer.submit,
                        sender_check=senders.check if senders is not None else None)
    routes += ingest.routes()
    shared = agent.opts.listen == agent.opts.otlp_listen
    if shared:
        routes += otlp.routes()
    main = Starlette(routes=routes, middleware=middleware,
                     exception_handlers=EXCEPTION_HANDLERS)
    otlp_app = Starlette(routes=otlp.routes() + [Route("/healthz", healthz)],
                         middleware=middleware, exception_handlers=EXCEPTION_HANDLERS)
    return main, otlp_app


def _span_json(r: dict) -> dict:
    out = {k: r[k] for k in ("trace_id", "span_id", "parent_span_id", "name", "service", "pid",
                             "tid", "start_ns", "end_ns", "status", "kind") if k in r}
    out["start"] = r["start_ns"] / 1e9
    out["duration_ms"] = (r["end_ns"] - r["start_ns"]) / 1e6
    out["attributes"] = r.get("attributes") or {}
    out["breakdown"] = r.get("breakdown")
    return out

