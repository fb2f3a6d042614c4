"""Pyroscope-compatible ingest, so that apps using the pyroscope-io SDK push to the node agent
unchanged (the SDK's default server address is http://localhost:4040).

- `POST /push.v1.PusherService/Push`: Connect unary, a (usually gzip'd) protobuf PushRequest
  whose samples hold raw pprof, gzipped or not. What pyroscope-io 1.x sends.
- `POST /ingest?name=app{k=v,...}&from=&until=&format=pprof|folded&sampleRate=&spyName=`:
  what pyroscope-io 0.8 sends (a gzipped pprof as `binary/octet-stream`).

Series labels (`service_name`, tags) go to the store's index; per-sample labels, including
`span_id` and `trace_id` from the SDK's span profiles, stay on the samples. Bad bodies get a 4xx
with a reason (Connect error JSON for the push API).
"""

from __future__ import annotations

import base64
import logging
import re
import time
from typing import Callable

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from agent import pprof
from agent.errors import ProfileDecodeError
from agent.httpbody import BodyError, decode_content, maybe_gunzip, read_body
from agent.model import Frame, Profile, SAMPLE_TYPES
from agent.proto import push_pb2

log = logging.getLogger(__name__)

MAX_BODY = 16 * 1024 * 1024
MAX_DECODED = 64 * 1024 * 1024
MAX_LABELS = 32
MAX_LABEL_VALUE = 256
#: How far ahead of this host's clock a profile may be stamped (client clock skew).
MAX_FUTURE_S = 3600.0

_CONNECT_CODES = {400: "invalid_argument", 413: "resource_exhausted", 415: "invalid_argument"}
_NAME = re.compile(r"^([^{}]*)(?:\{(.*)\})?$", re.S)


def _connect_error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"code": _CONNECT_CODES.get(status, "invalid_argument"),
                         "message": message}, status_code=status)


def _clip(v: str) -> str:
    return v if len(v) <= MAX_LABEL_VALUE else v[:MAX_LABEL_VALUE - 1] + "…"


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
            tags[k.strip()] = _clip(v.strip())
    return _clip(app), tags


def folded_profile(text: str, sample_rate: int, start_ns: int, end_ns: int) -> Profile:
    """Folded stacks ('a;b;c 12' per line, root first) as a cpu profile at `sample_rate` Hz."""
    period = round(1e9 / max(1, sample_rate))
    p = Profile([SAMPLE_TYPES["samples"], SAMPLE_TYPES["cpu"]], period_type=SAMPLE_TYPES["cpu"],
                period=period, time_ns=start_ns, duration_ns=max(0, end_ns - start_ns),
                default_sample_type="cpu")
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        try:
            c = int(count)
        except ValueError:
            raise BodyError(400, f"folded line {n} does not end in a count") from None
        if c < 0 or not stack:
            raise BodyError(400, f"folded line {n} is invalid")
        frames = tuple(Frame(_clip(f)) for f in reversed(stack.split(";")))
        p.add(frames, (), {"samples": c, "cpu": c * period})
    return p


class TimeRejected(BodyError):
    """A profile stamped outside what the store keeps: refused, never acknowledged and then
    dropped by retention. `result` is its label in the ingest metrics."""

    def __init__(self, result: str, message: str) -> None:
        super().__init__(400, message)
        self.result = result


def check_time(prof: Profile, *, now_s: float, retention_s: float | None,
               default_duration_s: float = 10.0) -> None:
    """Give an unstamped profile the last `default_duration_s` before now; refuse one that ends
    before the retention window (it would be deleted at the next sweep) or starts more than
    MAX_FUTURE_S ahead of this host's clock."""
    if not prof.time_ns:
        dur = prof.duration_ns or int(default_duration_s * 1e9)
        prof.time_ns, prof.duration_ns = int(now_s * 1e9) - dur, dur
    end_s = (prof.time_ns + prof.duration_ns) / 1e9
    if retention_s is not None and end_s < now_s - retention_s:
        raise TimeRejected(
            "rejected_too_old",
            f"profile ends at {_utc(end_s)}, older than the store's retention "
            f"({retention_s / 3600:g} h before now, {_utc(now_s)}): it would not be kept")
    if prof.time_ns / 1e9 > now_s + MAX_FUTURE_S:
        raise TimeRejected(
            "rejected_future",
            f"profile starts at {_utc(prof.time_ns / 1e9)}, more than {MAX_FUTURE_S / 3600:g} h "
            f"after this host's clock ({_utc(now_s)}): check the client's clock")


def _utc(t_s: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_s))


class PyroscopeIngest:
    """The ingest endpoints. `sink(profile, service, labels, source)` stores one ingested
    profile; it runs on the server's thread pool. Profiles that end before `retention_s` ago
    (None: no limit) are refused with a 400 and counted, never acknowledged and then lost."""

    def __init__(self, sink: Callable[[Profile, str, dict], None], *, metrics=None,
                 max_body: int = MAX_BODY, max_decoded: int = MAX_DECODED,
                 retention_s: float | None = None) -> None:
        self.sink = sink
        self.metrics = metrics
        self.max_body = max_body
        self.max_decoded = max_decoded
        self.retention_s = retention_s

    def routes(self) -> list[Route]:
        return [Route("/push.v1.PusherService/Push", self.push, methods=["POST"]),
                Route("/ingest", self.ingest, methods=["POST"])]

    def _count(self, endpoint: str, result: str, profiles: int = 0) -> None:
        if self.metrics is not None:
            self.metrics.ingest_requests.labels(endpoint=endpoint, result=result).inc()
            if profiles:
                self.metrics.ingest_profiles.labels(endpoint=endpoint).inc(profiles)

    async def push(self, request: Request) -> Response:
        ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        try:
            if ctype not in ("application/proto", "application/x-protobuf", "application/json"):
                raise BodyError(415, f"unsupported Content-Type {ctype[:80]!r}: use "
                                     "application/proto or application/json")
            body = await read_body(request, self.max_body)
            raw = decode_content(body, request.headers.get("content-encoding"), self.max_decoded)
            req = push_pb2.PushRequest()
            if ctype == "application/json":
                try:
                    json_format.Parse(raw, req, ignore_unknown_fields=True)
                except (json_format.ParseError, UnicodeDecodeError) as exc:
                    raise BodyError(400, f"invalid PushRequest JSON ({exc})") from None
            else:
                try:
                    req.ParseFromString(raw)
                except (DecodeError, ValueError, RuntimeError) as exc:
                    raise BodyError(400, f"malformed PushRequest ({exc or 'decode error'})") from None
            items = []
            for series in req.series:
                labels = {}
                for lp in series.labels[:MAX_LABELS]:
                    labels[_clip(lp.name)] = _clip(lp.value)
                service = labels.get("service_name") or labels.get("__name__") or "unknown"
                for smp in series.samples:
                    try:
                        prof = pprof.decode(maybe_gunzip(smp.raw_profile, self.max_decoded),
                                            max_bytes=self.max_decoded)
                    except (ProfileDecodeError, BodyError) as exc:
                        raise BodyError(400, f"series {service!r}: {exc}") from None
                    try:
                        check_time(prof, now_s=time.time(), retention_s=self.retention_s)
                    except TimeRejected as exc:
                        raise TimeRejected(exc.result, f"series {service!r}: {exc.message}") from None
                    items.append((prof, service, labels))
            if not items:
                raise BodyError(400, "PushRequest holds no profiles")
        except BodyError as exc:
            self._count("push", getattr(exc, "result", f"rejected_{exc.status}"))
            return _connect_error(exc.status, exc.message)
        for prof, service, labels in items:
            self.sink(prof, service, labels)
        self._count("push", "ok", len(items))
        body = push_pb2.PushResponse().SerializeToString()
        if ctype == "application/json":
            return JSONResponse({})
        return Response(body, media_type="application/proto")

    async def ingest(self, request: Request) -> Response:
        q = request.query_params
        try:
            name = q.get("name")
            if not name:
                raise BodyError(400, "missing name parameter")
            service, tags = parse_app_name(name)
            fmt = (q.get("format") or "folded").lower()
            now = time.time()
            try:
                until = float(q.get("until") or now)
                frm = float(q.get("from") or until - 10)
                rate = int(q.get("sampleRate") or 100)
            except ValueError:
                raise BodyError(400, "from, until and sampleRate must be numbers") from None
            if until < frm:
                raise BodyError(400, "until is before from")
            ctype = request.headers.get("content-type", "").lower()
            if ctype.startswith("multipart/"):
                raise BodyError(415, "multipart ingest bodies are not supported: send the "
                                     "profile as the raw body")
            body = await read_body(request, self.max_body)
            raw = decode_content(body, request.headers.get("content-encoding"), self.max_decoded)
            if fmt == "pprof":
                try:
                    prof = pprof.decode(maybe_gunzip(raw, self.max_decoded),
                                        max_bytes=self.max_decoded)
                except ProfileDecodeError as exc:
                    raise BodyError(400, str(exc)) from None
            elif fmt in ("folded", "lines"):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise BodyError(400, "folded body is not UTF-8 text") from None
                prof = folded_profile(text, rate, int(frm * 1e9), int(until * 1e9))
            else:
                raise BodyError(400, f"unsupported format {fmt!r}: use pprof or folded")
            if not prof.time_ns:
                prof.time_ns, prof.duration_ns = int(frm * 1e9), int((until - frm) * 1e9)
            check_time(prof, now_s=now, retention_s=self.retention_s)
        except BodyError as exc:
            self._count("ingest", getattr(exc, "result", f"rejected_{exc.status}"))
            return Response(exc.message + "\n", status_code=exc.status, media_type="text/plain")
        labels = {"service_name": service, **tags}
        if q.get("spyName"):
            labels["spy_name"] = _clip(q["spyName"])
        self.sink(prof, service, labels)
        self._count("ingest", "ok", 1)
        return Response(b"", status_code=200)


def connect_json_push(profiles: list[tuple[bytes, dict]]) -> dict:
    """A PushRequest in Connect's JSON form (for clients that prefer JSON; used in tests)."""
    return {"series": [{"labels": [{"name": k, "value": v} for k, v in labels.items()],
                        "samples": [{"rawProfile": base64.b64encode(raw).decode()}]}
                       for raw, labels in profiles]}

