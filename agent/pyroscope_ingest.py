"""Pyroscope-compatible ingest, so that apps using the pyroscope-io SDK push to the node agent
unchanged (the SDK's default server address is http://localhost:4040).

- `POST /push.v1.PusherService/Push`: Connect unary, a (usually gzip'd) protobuf PushRequest
  whose samples hold raw pprof, gzipped or not. What pyroscope-io 1.x sends.
- `POST /ingest?name=app{k=v,...}&from=&until=&format=pprof|folded&sampleRate=&spyName=`:
  what pyroscope-io 0.8 sends (a gzipped pprof as `binary/octet-stream`).

Series labels (`service_name`, tags) go to the store's index; per-sample labels, including
`span_id` and `trace_id` from the SDK's span profiles, stay on the samples. Bad bodies get a 4xx
with a reason (Connect error JSON for the push API).

Heavy input is bounded (agent/pyroscope_decode.py lists the limits) and kept off the event
loop: a request is admitted (agent/admission.py, at most `ADMITTED` at once, else 429 with
Retry-After) before its body is read, then decompressed, decoded, checked and stored on the
ingest's own thread. A request's profiles are all checked before the first is stored: a push is
stored whole or refused whole.
"""

from __future__ import annotations

import base64
import logging
import time
from typing import Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from agent.admission import Admission, Overloaded
from agent.httpbody import BodyError, read_body
from agent.model import Profile
from agent.params import MAX_UNIX_S, BadRequest, integer, unix_seconds
from agent.proto import push_pb2
from agent.pyroscope_decode import (MAX_BODY, MAX_DECODED, MAX_DURATION_S, MAX_RATE_HZ,
                                    TimeRejected, check_time, clip, decode_ingest, decode_push,
                                    folded_profile, parse_app_name)

__all__ = ["PyroscopeIngest", "TimeRejected", "check_time", "connect_json_push",
           "folded_profile", "parse_app_name"]

log = logging.getLogger(__name__)

#: Requests admitted at once (reading a body, waiting, or being decoded and stored), and how
#: many are decoded at a time. One at a time: decoding is CPU work under the GIL, and each
#: admitted request holds at most MAX_BODY, so the queue bounds memory too.
#: Requests admitted at once, and the bodies they may hold between them: what an ingest burst
#: can cost in memory is ADMITTED_BYTES of bodies plus one request being decoded (WORKERS).
ADMITTED = 16
ADMITTED_BYTES = 32 * 1024 * 1024
WORKERS = 1

_CONNECT_CODES = {400: "invalid_argument", 408: "deadline_exceeded", 413: "resource_exhausted",
                  415: "invalid_argument", 429: "resource_exhausted"}
_PROTO_TYPES = ("application/proto", "application/x-protobuf", "application/json")


def _connect_error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"code": _CONNECT_CODES.get(status, "invalid_argument"),
                         "message": message}, status_code=status, headers=headers)


class PyroscopeIngest:
    """The ingest endpoints. `sink(profile, service, labels)` stores one ingested profile; it
    runs on the ingest's thread. Profiles that end before `retention_s` ago (None: no limit)
    are refused with a 400 and counted, never acknowledged and then lost."""

    def __init__(self, sink: Callable[[Profile, str, dict], None], *, metrics=None,
                 max_body: int = MAX_BODY, max_decoded: int = MAX_DECODED,
                 retention_s: float | None = None, admission: Admission | None = None) -> None:
        self.sink = sink
        self.metrics = metrics
        self.max_body = max_body
        self.max_decoded = max_decoded
        self.retention_s = retention_s
        self.admission = admission or Admission(
            ADMITTED, WORKERS, name="ingest", max_bytes=ADMITTED_BYTES,
            gauge=metrics.ingest_queue if metrics is not None else None)

    def routes(self) -> list[Route]:
        return [Route("/push.v1.PusherService/Push", self.push, methods=["POST"]),
                Route("/ingest", self.ingest, methods=["POST"])]

    def close(self) -> None:
        self.admission.close()

    def _count(self, endpoint: str, result: str, profiles: int = 0, truncated: int = 0) -> None:
        if self.metrics is not None:
            self.metrics.ingest_requests.labels(endpoint=endpoint, result=result).inc()
            if profiles:
                self.metrics.ingest_profiles.labels(endpoint=endpoint).inc(profiles)
            if truncated:
                self.metrics.ingest_truncated.inc(truncated)

    def _cost(self, request: Request) -> int:
        """What the request's body may take: its Content-Length, or the limit."""
        try:
            return max(0, min(int(request.headers.get("content-length", "")), self.max_body))
        except ValueError:
            return self.max_body

    def _store(self, items: list[tuple[Profile, str, dict]]) -> None:
        for prof, service, labels in items:
            self.sink(prof, service, labels)

    async def push(self, request: Request) -> Response:
        ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        try:
            if ctype not in _PROTO_TYPES:
                raise BodyError(415, f"unsupported Content-Type {ctype[:80]!r}: use "
                                     "application/proto or application/json")
            async with self.admission.slot(self._cost(request)):
                body = await read_body(request, self.max_body)
                items, truncated = await self.admission.run(self._push, body, ctype,
                                                            request.headers.get("content-encoding"))
        except Overloaded as exc:
            self._count("push", "rejected_429")
            return _connect_error(429, exc.message, {"retry-after": str(exc.retry_after_s)})
        except BodyError as exc:
            self._count("push", getattr(exc, "result", f"rejected_{exc.status}"))
            return _connect_error(exc.status, exc.message)
        self._count("push", "ok", len(items), truncated)
        if ctype == "application/json":
            return JSONResponse({})
        return Response(push_pb2.PushResponse().SerializeToString(),
                        media_type="application/proto")

    def _push(self, body: bytes, ctype: str, encoding: str | None):
        items, truncated = decode_push(body, ctype, encoding, max_decoded=self.max_decoded,
                                       now_s=time.time(), retention_s=self.retention_s)
        self._store(items)
        return items, truncated

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
                until = unix_seconds(q, "until")
                until = now if until is None else until
                frm = unix_seconds(q, "from")
                frm = max(0.0, until - 10) if frm is None else frm
                rate = integer(q, "sampleRate", 100, lo=1, hi=MAX_RATE_HZ)
            except BadRequest as exc:
                raise BodyError(400, f"{exc} (from, until and sampleRate must be numbers: unix "
                                     f"seconds up to {MAX_UNIX_S}, Hz up to {MAX_RATE_HZ})"
                                ) from None
            if until < frm:
                raise BodyError(400, "until is before from")
            if until - frm > MAX_DURATION_S:
                raise BodyError(400, f"from and until are more than {MAX_DURATION_S} s apart")
            if request.headers.get("content-type", "").lower().startswith("multipart/"):
                raise BodyError(415, "multipart ingest bodies are not supported: send the "
                                     "profile as the raw body")
            labels = {"service_name": service, **tags}
            if q.get("spyName"):
                labels["spy_name"] = clip(q["spyName"])
            async with self.admission.slot(self._cost(request)):
                body = await read_body(request, self.max_body)
                truncated = await self.admission.run(
                    self._ingest, body, request.headers.get("content-encoding"), fmt,
                    rate_hz=rate, from_s=frm, until_s=until, now_s=now, service=service,
                    labels=labels)
        except Overloaded as exc:
            self._count("ingest", "rejected_429")
            return Response(exc.message + "\n", status_code=429, media_type="text/plain",
                            headers={"retry-after": str(exc.retry_after_s)})
        except BodyError as exc:
            self._count("ingest", getattr(exc, "result", f"rejected_{exc.status}"))
            return Response(exc.message + "\n", status_code=exc.status, media_type="text/plain")
        self._count("ingest", "ok", 1, truncated)
        return Response(b"", status_code=200)

    def _ingest(self, body: bytes, encoding: str | None, fmt: str, *, rate_hz: int,
                from_s: float, until_s: float, now_s: float, service: str, labels: dict) -> int:
        prof, truncated = decode_ingest(body, encoding, fmt, rate_hz=rate_hz, from_s=from_s,
                                        until_s=until_s, now_s=now_s,
                                        retention_s=self.retention_s,
                                        max_decoded=self.max_decoded)
        self._store([(prof, service, labels)])
        return truncated


def connect_json_push(profiles: list[tuple[bytes, dict]]) -> dict:
    """A PushRequest in Connect's JSON form (for clients that prefer JSON; used in tests)."""
    return {"series": [{"labels": [{"name": k, "value": v} for k, v in labels.items()],
                        "samples": [{"rawProfile": base64.b64encode(raw).decode()}]}
                       for raw, labels in profiles]}
