"""The web UI: pages (one shell, drawn by flamegraph/static/app.js), its static assets and the
JSON API behind them.

Pages:   /  /explore  /spans  /trace/{trace_id}  /flamegraph?trace_id=..&span_id=..
API:     /api/flamegraph   a flame graph document (format=json), or the same view as pprof
                           (format=pprof) or speedscope (format=speedscope)
         /api/timeline     activity over time, from the store's index (nothing decoded)
         /api/span/{id}    one span, its breakdown and its children

Everything a profiled process or a span client sent is data: it reaches the browser as JSON and
the page puts it into the DOM as text only. The shell carries no data, so it is served without
the bearer token (the script sends the token with every API call); its Content-Security-Policy
allows scripts and styles from this origin only.
"""

from __future__ import annotations

import hashlib
import re
import time
from importlib import resources

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from agent import pprof
from agent.errors import SpanflameError
from agent.model import SAMPLE_TYPES, Profile
from agent.params import (BadRequest, hex_id as _hex, integer as _int, label_filters, number, text,
                          time_range)
from agent.server import RESERVED, _empty, _span_json
from agent.store import INDEX_LABELS
from flamegraph.html import dumps, flamegraph_data, flamegraph_data_paths
from flamegraph.speedscope import render_speedscope

#: Assets the UI may load; nothing else under /static is served.
STATIC = {"app.js": "text/javascript", "app.css": "text/css",
          "flamegraph.js": "text/javascript", "flamegraph.css": "text/css"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'self'")
#: How far around a span its flame graph looks for profiles (windows hold whole spans' parts).
SPAN_MARGIN_NS = 60 * 1_000_000_000
#: Spans of the same name the comparison averages over.
MAX_BASELINE_SPANS = 20
MAX_TYPES = 16
#: A view over more stored profiles than this (per sample type) is estimated from this many,
#: spread evenly over the range, with values scaled up: opening a day of a busy service stays
#: interactive. Span views are always exact (a span's profiles are a handful).
MAX_MERGED_PROFILES = 60

SHELL = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>spanflame</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/static/flamegraph.css?v={flamegraph.css}">
<link rel="stylesheet" href="/static/app.css?v={app.css}">
</head><body>
<nav class="sf-nav"><a class="sf-brand" href="/">spanflame</a>
<a href="/explore" data-nav="explore">Explore</a><a href="/spans" data-nav="spans">Slow spans</a>
<span class="sf-read-only" hidden>read-only</span></nav>
<main id="app"><noscript>The spanflame UI needs JavaScript.</noscript></main>
<script src="/static/flamegraph.js?v={flamegraph.js}"></script>
<script src="/static/app.js?v={app.js}"></script>
</body></html>
"""


def _asset(name: str) -> bytes:
    return resources.files("flamegraph").joinpath("static", name).read_bytes()


def span_lookup(agent, span_id: str) -> dict | None:
    """A span from the store, else from the agent's recent spans (not stored yet)."""
    row = agent.store.span(span_id)
    if row is not None:
        return row
    spans = getattr(agent, "spans", None)
    rec = spans.get(span_id) if spans is not None and hasattr(spans, "get") else None
    if rec is None:
        return None
    from agent.run import _span_row
    return {**_span_row(rec), "duration_ns": rec.duration_ns, "breakdown": None}


def trace_rows(agent, trace_id: str) -> list[dict]:
    rows = agent.store.trace(trace_id)
    known = {r["span_id"] for r in rows}
    spans = getattr(agent, "spans", None)
    if spans is not None:
        from agent.run import _span_row
        for s in spans.trace(trace_id):
            if s.span_id not in known:
                rows.append({**_span_row(s), "duration_ns": s.duration_ns, "breakdown": None})
    rows.sort(key=lambda r: r["start_ns"])
    return rows


def descendants(rows: list[dict], span_id: str) -> set[str]:
    """span_id and every span under it in the trace's rows."""
    children: dict[str, list[str]] = {}
    for r in rows:
        children.setdefault(r["parent_span_id"], []).append(r["span_id"])
    out, todo = {span_id}, [span_id]
    while todo:
        for c in children.get(todo.pop(), ()):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


class View:
    """What /api/flamegraph shows: a range, filters, and optionally one span."""

    def __init__(self, agent, q) -> None:
        self.agent = agent
        self.q = q
        self.span_id = _hex(q, "span_id", 16)
        self.trace_id = _hex(q, "trace_id", 32)
        self.with_descendants = q.get("descendants") in ("1", "true", "yes")
        self.compare = q.get("compare") in ("1", "true", "yes")
        self.pid = _int(q, "pid")
        self.service = text(q, "service")
        self.type = text(q, "type", 64) or ""
        self.min_fraction = number(q, "min_fraction", 1e-4, lo=0, hi=1)
        if self.min_fraction >= 1:
            raise BadRequest("min_fraction must be in [0, 1)")
        extra = label_filters(q, RESERVED)
        self.series = {k: v for k, v in extra.items() if k in INDEX_LABELS and k != "pid"}
        self.sample = {k: v for k, v in extra.items() if k not in self.series}
        self.span: dict | None = None
        self.span_ids: set[str] | None = None
        #: (profiles used, profiles matching) when the view is an estimate
        self.sampled: tuple[int, int] | None = None
        if self.span_id:
            self.span = span_lookup(agent, self.span_id)
            if self.span is None and not self.trace_id:
                raise LookupError(f"span {self.span_id} is not in the store")
            if self.span is not None:
                self.trace_id = self.span["trace_id"]
            self.span_ids = {self.span_id}
            if self.with_descendants and self.trace_id:
                self.span_ids = descendants(trace_rows(agent, self.trace_id), self.span_id)
        if self.span is not None and not q.get("from") and not q.get("until"):
            self.start = self.span["start_ns"] - SPAN_MARGIN_NS
            self.end = self.span["end_ns"] + SPAN_MARGIN_NS
        else:
            self.start, self.end = time_range(q)

    # -- profiles -------------------------------------------------------------------------------
    def types(self) -> list[str]:
        if self.type and self.type != "all":
            return [self.type]
        if self.span_ids is not None:
            got = self.agent.store.types(self.start, self.end, span_ids=sorted(self.span_ids))
        elif self.trace_id:
            got = self.agent.store.types(self.start, self.end, trace_id=self.trace_id)
        elif self.type == "all":
            got = self.agent.store.types(self.start, self.end, service=self.service, pid=self.pid)
        else:
            got = ["cpu"]
        return got[:MAX_TYPES]

    def _found(self, type_name: str, span_ids: set[str] | None,
               window: tuple[int, int] | None = None) -> tuple[list, float]:
        """The stored profiles of the view (at most MAX_MERGED_PROFILES, spread evenly, for
        views that are not about spans) and the factor that scales a subset back up. `window`
        replaces the view's range (and its trace) for other spans than the view's own."""
        start, end = window or (self.start, self.end)
        trace_id = None if window or span_ids else self.trace_id
        found = self.agent.store.find(
            start_ns=start, end_ns=end, type_name=type_name, service=self.service,
            pid=self.pid, labels=self.series or None,
            span_ids=sorted(span_ids) if span_ids else None, trace_id=trace_id)
        if not span_ids and not trace_id and len(found) > MAX_MERGED_PROFILES:
            n = len(found)
            step = n / MAX_MERGED_PROFILES
            found = [found[int(i * step)] for i in range(MAX_MERGED_PROFILES)]
            self.sampled = (len(found), n)
            return found, n / len(found)
        return found, 1.0

    def fast(self) -> bool:
        """Whether the view needs no sample labels: one sample type, no span, no label filter
        on samples. Such views skip building Profiles (agent.pprof.decode_paths)."""
        return (self.span_ids is None and not self.trace_id and not self.sample
                and bool(self.type) and self.type != "all")

    def paths(self):
        """The view's Paths for its one sample type (see `fast`)."""
        from flamegraph.calltree import Paths
        found, scale = self._found(self.type, None)
        paths = Paths()
        for sp in found:
            data = self.agent.store.blob(sp.id)
            if data is None:
                continue
            try:
                pprof.decode_paths(data, self.type, paths)
            except SpanflameError:  # an unreadable stored blob: skipped, as Store.merged does
                continue
        if scale != 1.0:
            paths.scale(scale)
        return paths

    def _load(self, type_name: str, span_ids: set[str] | None,
              window: tuple[int, int] | None = None) -> Profile | None:
        store = self.agent.store
        found, scale = self._found(type_name, span_ids, window)
        sample: dict = {}
        if span_ids:
            sample["span_id"] = set(span_ids)
        elif self.trace_id and window is None:
            sample["trace_id"] = self.trace_id
        # self.sample: keys outside the index, a series label (pushed tag) or a sample label
        prof = store.merged(found, sample_labels=sample or None, type_name=type_name,
                            tags=self.sample or None)
        if prof is not None and scale != 1.0:
            for vec in prof.samples.values():
                for i, v in enumerate(vec):
                    vec[i] = round(v * scale)
        return prof

    def profile(self, span_ids: set[str] | None = None,
                window: tuple[int, int] | None = None) -> Profile:
        span_ids = self.span_ids if span_ids is None else span_ids
        types = self.types()
        merged: Profile | None = None
        for t in types:
            p = self._load(t, span_ids, window)
            if p is None:
                continue
            if merged is None:
                merged = p
            else:
                merged.merge(p)
        if merged is None:
            merged = _empty(types[0] if types else "cpu", self.start, self.end)
        merged.default_sample_type = self._default_type(merged)
        return merged

    def _default_type(self, prof: Profile) -> str:
        if self.type and self.type != "all" and prof.has_type(self.type):
            return self.type
        totals = {t.name: prof.total(t.name) for t in prof.sample_types
                  if t.unit == "nanoseconds"}
        if self.span and self.span.get("breakdown"):
            # the sample type of the span's dominant cause
            from agent.spansummary import CATEGORY_TYPE
            bd = self.span["breakdown"]
            cats = {c: bd.get(f"{c}_ns", 0) for c in CATEGORY_TYPE}
            best = CATEGORY_TYPE[max(cats, key=cats.get)]
            if totals.get(best):
                return best
        if totals.get("cpu"):
            return "cpu"
        if totals:
            return max(totals, key=totals.get)
        return prof.primary_type()

    def baseline(self) -> tuple[Profile | None, int]:
        """The other spans of this span's name and service nearest to it in time (within an
        hour), merged, and how many."""
        if self.span is None:
            return None, 0
        # Only spans with a breakdown: their window was linked, so their samples are stored
        # (a span without one would count as zero and drag the average down).
        others = [r for r in self.agent.store.spans_near(
            self.span["name"], self.span["service"], self.span["start_ns"],
            self.start - 3600 * 10**9, self.end + 3600 * 10**9,
            limit=4 * MAX_BASELINE_SPANS)
            if r["span_id"] != self.span_id and r.get("breakdown")][:MAX_BASELINE_SPANS]
        if not others:
            return None, 0
        ids: set[str] = set()
        for r in others:
            if self.with_descendants:
                ids |= descendants(trace_rows(self.agent, r["trace_id"]), r["span_id"])
            else:
                ids.add(r["span_id"])
        lo = min(r["start_ns"] for r in others) - SPAN_MARGIN_NS
        hi = max(r["end_ns"] for r in others) + SPAN_MARGIN_NS
        return self.profile(span_ids=ids, window=(lo, hi)), len(others)

    def title(self) -> tuple[str, str]:
        if self.span is not None:
            return (f"{self.span['name']} · {self.span['service']}",
                    f"span {self.span_id} of trace {self.span['trace_id']}"
                    + (" with its descendants" if self.with_descendants else ""))
        if self.span_id:
            return f"span {self.span_id}", f"trace {self.trace_id}"
        where = self.service or "all services"
        if self.pid:
            where += f" · pid {self.pid}"
        return where, ""


def flamegraph_document(agent, q) -> tuple[str, object, dict]:
    """(format, payload, headers) for /api/flamegraph."""
    fmt = q.get("format") or "json"
    if fmt not in ("json", "pprof", "speedscope"):
        raise BadRequest("format must be json, pprof or speedscope")
    t0 = time.perf_counter()
    view = View(agent, q)
    if fmt == "json" and not view.compare and view.fast():
        st = SAMPLE_TYPES.get(view.type)
        title, subtitle = view.title()
        data = flamegraph_data_paths([(view.type, st.unit if st else "count", view.paths())],
                                     default_type=view.type, title=title, subtitle=subtitle,
                                     min_fraction=view.min_fraction)
        return fmt, _finish(data, view, 0, t0), {"server-timing": f"build;dur={data['elapsed_ms']}"}
    prof = view.profile()
    if fmt == "pprof":
        return fmt, pprof.encode(prof), {}
    title, subtitle = view.title()
    if fmt == "speedscope":
        return fmt, render_speedscope(prof, name=title), {}
    base, n = view.baseline() if view.compare else (None, 0)
    types = [t.name for t in prof.sample_types if t.name != "samples"] or None
    data = flamegraph_data(prof, types=types, default_type=prof.default_sample_type, title=title,
                           subtitle=subtitle, min_fraction=view.min_fraction, baseline=base,
                           baseline_scale=1.0 / n if n else 1.0)
    data = _finish(data, view, n, t0)
    return fmt, data, {"server-timing": f"build;dur={data['elapsed_ms']}"}


def _finish(data: dict, view: View, n: int, t0: float) -> dict:
    if view.sampled is not None:
        used, total = view.sampled
        data["subtitle"] = ((data["subtitle"] + " · ") if data["subtitle"] else "") + (
            f"estimated from {used} of {total} stored profiles, spread over the range "
            "(narrow the range or filter for exact values)")
    data["sampled"] = list(view.sampled) if view.sampled else None
    data["baseline_spans"] = n
    if n:
        data["baseline_label"] = f"Average of {n} others"
    data["span"] = _span_json(view.span) if view.span is not None else None
    data["from"] = view.start / 1e9
    data["until"] = view.end / 1e9
    data["elapsed_ms"] = round((time.perf_counter() - t0) * 1000, 1)
    return data


def ui_routes(agent) -> list[Route]:
    read_only = bool(getattr(agent, "read_only", False))
    assets = {name: _asset(name) for name in STATIC}
    shell = SHELL
    for name, data in assets.items():  # versioned URLs: assets are cached, never stale
        shell = shell.replace("{" + name + "}", hashlib.sha256(data).hexdigest()[:12])
    shell = shell.replace("<span class=\"sf-read-only\" hidden>",
                          "<span class=\"sf-read-only\">" if read_only else
                          "<span class=\"sf-read-only\" hidden>")
    headers = {"content-security-policy": CSP, "x-content-type-options": "nosniff",
               "referrer-policy": "no-referrer", "cache-control": "no-store"}

    async def page(request: Request) -> Response:
        return Response(shell, media_type="text/html; charset=utf-8", headers=headers)

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC:
            return PlainTextResponse("no such asset\n", status_code=404)
        return Response(assets[name], media_type=STATIC[name] + "; charset=utf-8",
                        headers={"x-content-type-options": "nosniff",
                                 "cache-control": "public, max-age=86400"})

    async def api_flamegraph(request: Request) -> Response:
        q = request.query_params
        try:
            fmt, payload, extra = await run_in_threadpool(flamegraph_document, agent, q)
        except BadRequest as exc:
            return PlainTextResponse(f"{exc}\n", status_code=400)
        except LookupError as exc:
            return PlainTextResponse(f"{exc}\n", status_code=404)
        if fmt == "json":  # flamegraph.html.dumps: trees of any depth
            return Response(dumps(payload), media_type="application/json", headers=extra)
        if fmt == "pprof":
            return Response(payload, media_type="application/octet-stream",
                            headers={"content-disposition": 'attachment; filename="profile.pb.gz"'})
        return Response(payload, media_type="application/json",
                        headers={"content-disposition":
                                 'attachment; filename="profile.speedscope.json"'})

    async def api_timeline(request: Request) -> Response:
        q = request.query_params
        try:
            start, end = time_range(q)
            buckets = _int(q, "buckets", 120, lo=1, hi=2000)
            pid = _int(q, "pid")
            t = text(q, "type", 64) or "cpu"
            service = text(q, "service")
        except BadRequest as exc:
            return PlainTextResponse(f"{exc}\n", status_code=400)
        requested = start
        if q.get("clip", "1") != "0":
            # A range reaching back before the first data (an agent up for minutes, "last
            # 24 h"): the bars start at the first data, not squeezed against the right edge.
            first = await run_in_threadpool(agent.store.first_start, start_ns=start,
                                            end_ns=end, type_name=t, service=service, pid=pid)
            if first is not None and first > start:
                start = max(start, first - (end - first) // max(1, buckets - 1))
        pts = await run_in_threadpool(agent.store.timeline, start_ns=start, end_ns=end,
                                      type_name=t, buckets=buckets,
                                      service=service, pid=pid)
        st = SAMPLE_TYPES.get(t)
        unit = st.unit if st is not None else "count"
        return JSONResponse({"type": t, "unit": unit, "from": start / 1e9, "until": end / 1e9,
                             "requested_from": requested / 1e9, "clipped": start != requested,
                             "points": [[a / 1e9, v] for a, v in pts]})

    async def api_span(request: Request) -> Response:
        sid = request.path_params["span_id"].lower()
        if not re.fullmatch(r"[0-9a-f]{16}", sid):
            return PlainTextResponse("span_id must be 16 hex digits\n", status_code=400)
        row = await run_in_threadpool(span_lookup, agent, sid)
        if row is None:
            return PlainTextResponse(f"span {sid} is not in the store\n", status_code=404)
        rows = await run_in_threadpool(trace_rows, agent, row["trace_id"])
        out = _span_json(row)
        out["children"] = [_span_json(r) for r in rows if r["parent_span_id"] == sid]
        return JSONResponse(out)

    async def api_info(request: Request) -> Response:
        info = {"read_only": read_only, "types": list(SAMPLE_TYPES), "now": time.time()}
        health = getattr(agent, "health", None)
        if health is not None and not read_only:
            h = health()
            info.update({k: h[k] for k in ("sampler", "walker", "sources", "degraded")})
        return JSONResponse(info)

    return [
        Route("/", page), Route("/explore", page), Route("/spans", page),
        Route("/trace/{trace_id}", page), Route("/flamegraph", page),
        Route("/static/{name}", static),
        Route("/api/flamegraph", api_flamegraph),
        Route("/api/timeline", api_timeline),
        Route("/api/span/{span_id}", api_span),
        Route("/api/info", api_info),
    ]


class ReadOnlyAgent:
    """What `spanflame serve` runs: the UI and API over an existing store, and nothing else."""

    read_only = True

    def __init__(self, store: str, *, listen: str = "127.0.0.1:4040",
                 auth_token: str | None = None, allowed_hosts: tuple[str, ...] = (),
                 insecure_no_auth: bool = False) -> None:
        from types import SimpleNamespace

        from agent.metrics import Metrics
        from agent.store import Store

        self.store = Store(store, read_only=True)
        self.opts = SimpleNamespace(listen=listen, otlp_listen=None, auth_token=auth_token,
                                    allowed_hosts=allowed_hosts,
                                    insecure_no_auth=insecure_no_auth)
        self.metrics = Metrics()
        self.spans = None
        self.server = None

    def start(self) -> "ReadOnlyAgent":
        from agent.httpserver import ServerThread, parse_listen
        from agent.server import build_apps

        from agent.httpguard import check_exposure, check_token

        host, port = parse_listen(self.opts.listen)
        check_exposure([(host, port)], check_token(self.opts.auth_token),
                       self.opts.insecure_no_auth)
        app, _ = build_apps(self)
        self.server = ServerThread(app, host, port, name="http").start()
        return self

    @property
    def url(self) -> str:
        return self.server.url if self.server else ""

    def alive(self) -> bool:
        return self.server is not None and self.server.thread.is_alive()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        self.store.close()
