"""The agent's HTTP server: API, Prometheus metrics, health, Pyroscope-compatible ingest, the
OTLP receiver (on its own port unless both share one) and the web UI.

Every handler that touches the store runs in a worker thread (the store is synchronous).
Bad parameters get a 400 with a reason. Who may call which route (token, Host header, what a
web page may send) is agent/httpguard.py, one middleware in front of both apps; which processes
an OTLP sender may name in its spans is agent/senders.py.
"""

from __future__ import annotations

import logging

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
from agent.params import (MAX_RANGE_S, BadRequest, hex_id as _hex, integer as _int,
                          label_filters, number, text, time_range)
from agent.pyroscope_ingest import PyroscopeIngest
from agent.store import INDEX_LABELS

log = logging.getLogger(__name__)

RESERVED = {"from", "until", "type", "service", "pid", "trace_id", "span_id", "token", "limit",
            "format", "descendants", "compare", "name", "min_duration_ms", "buckets",
            "min_fraction"}


def query_profile(agent, q) -> tuple[Profile | None, int]:
    """The merged profile for /api/profile's parameters, and how many stored profiles made it."""
    start, end = time_range(q)
    type_name = text(q, "type", 64) or "cpu"
    if type_name not in SAMPLE_TYPES:  # a pushed profile may have its own types: ask the store
        known = {t for svc in agent.store.services() for t in svc["types"]}
        if type_name not in known:
            raise BadRequest(f"unknown sample type {type_name!r}: this agent has "
                             + ", ".join(sorted(known | set(SAMPLE_TYPES))))
    pid = _int(q, "pid")
    span_id, trace_id = _hex(q, "span_id", 16), _hex(q, "trace_id", 32)
    extra = label_filters(q, RESERVED)
    series = {k: v for k, v in extra.items() if k in INDEX_LABELS and k != "pid"}
    found = agent.store.find(start_ns=start, end_ns=end, type_name=type_name,
                             service=text(q, "service"), pid=pid, labels=series or None,
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

    async def readyz(request: Request) -> Response:
        """Readiness: 503 with the reasons while new work would be refused (ingest queue or
        in-flight requests at their cap); /healthz (liveness) stays 200 meanwhile."""
        reasons = []
        if ingest is not None and ingest.admission.full:
            reasons.append(f"ingest queue full ({ingest.admission.admitted} requests)")
        guard = getattr(request.app.state, "http_guard", None)
        if guard is not None and guard.inflight >= guard.limits.max_inflight:
            reasons.append(f"{guard.inflight} requests in progress, the limit")
        if reasons:
            return JSONResponse({"status": "overloaded", "reasons": reasons}, status_code=503,
                                headers={"retry-after": "1"})
        return JSONResponse({"status": "ready"})

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
            min_ns = int(number(q, "min_duration_ms", 0, lo=0, hi=MAX_RANGE_S * 1e3) * 1e6)
            limit = _int(q, "limit", 100, lo=1, hi=10_000)
            service, name = text(q, "service"), text(q, "name", 1024)
        except BadRequest as exc:
            return PlainTextResponse(f"{exc}\n", status_code=400)
        rows = await run_in_threadpool(agent.store.slow_spans, start_ns=start, end_ns=end,
                                       service=service, name=name, min_duration_ns=min_ns,
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
        Route("/readyz", readyz),
        Route("/metrics", metrics),
        Route("/api/profile", api_profile),
        Route("/api/spans", api_spans),
        Route("/api/trace/{trace_id}", api_trace),
        Route("/api/services", api_services),
    ]
    routes += ui_routes(agent)
    middleware = [Middleware(RequestGuard, policy=Policy.from_options(agent.opts))]
    ingest = None
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

