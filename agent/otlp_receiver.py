"""OTLP/HTTP trace receiver: POST /v1/traces, protobuf or JSON, gzip or not.

Follows the OTLP/HTTP specification: 200 with an ExportTraceServiceResponse (partial success
when some spans are rejected, with the count and a reason), 4xx with a Status body (code and
message) for requests we refuse, in the request's own encoding. Bodies are bounded before and
after decompression; JSON nesting is bounded (MAX_JSON_DEPTH). Spans go to a sink (the agent's
SpanWriter: durable in the store before the 200) or straight to a SpanStore and, optionally,
unchanged to an upstream OTLP endpoint (agent/otlp_forward.py).

Nothing heavy runs on the event loop: decompression and decoding run on `decoders` threads, the
commit on the SpanWriter's. At most `max_inflight` requests are in progress (bodies of at most
MAX_BODY each, of which `decoders` are decompressed at a time, MAX_DECODED each); beyond that,
and when the SpanWriter's queue is full, the answer is 429 with Retry-After (OTLP exporters
retry it), counted as `rejected_429`. A full disk is 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from concurrent.futures import ThreadPoolExecutor

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from agent.errors import StoreFull
from agent.httpbody import BodyError, decode_content, read_body
from agent.proto import status_pb2
from agent.spans import SpanStore, from_otlp

log = logging.getLogger(__name__)

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
#: Default bounds: the compressed body, and the body after gzip.
MAX_BODY = 8 * 1024 * 1024
MAX_DECODED = 32 * 1024 * 1024
#: Deepest JSON nesting accepted (OTLP needs about 12, plus nested attribute values).
MAX_JSON_DEPTH = 64

# OTLP/JSON writes these ids as hex strings; protobuf's JSON mapping expects base64.
_HEX_ID_KEYS = {"traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id"}


def _hex_ids_to_base64(obj):
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if k in _HEX_ID_KEYS and isinstance(v, str):
                try:
                    out[k] = base64.b64encode(bytes.fromhex(v)).decode() if v else ""
                except ValueError:
                    raise BodyError(400, f"{k} {v[:40]!r} is not hex") from None
            else:
                out[k] = _hex_ids_to_base64(v)
        return out
    if isinstance(obj, list):
        return [_hex_ids_to_base64(v) for v in obj]
    return obj


def parse_request(body: bytes, content_type: str) -> trace_service_pb2.ExportTraceServiceRequest:
    req = trace_service_pb2.ExportTraceServiceRequest()
    if content_type == PROTOBUF:
        try:
            req.ParseFromString(body)
        except (DecodeError, ValueError, RuntimeError) as exc:
            raise BodyError(400, f"malformed ExportTraceServiceRequest ({exc or 'decode error'})") from None
        return req
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BodyError(400, f"malformed JSON ({exc})") from None
    except RecursionError:
        raise BodyError(400, f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    if json_depth(doc) > MAX_JSON_DEPTH:
        raise BodyError(400, f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    if not isinstance(doc, dict):
        raise BodyError(400, "JSON body must be an ExportTraceServiceRequest object")
    try:
        json_format.ParseDict(_hex_ids_to_base64(doc), req, ignore_unknown_fields=True)
    except json_format.ParseError as exc:
        raise BodyError(400, f"invalid ExportTraceServiceRequest JSON ({exc})") from None
    return req


def json_depth(doc) -> int:
    """Nesting depth of decoded JSON, without recursion."""
    deepest = 0
    stack = [(doc, 1)]
    while stack:
        obj, d = stack.pop()
        if isinstance(obj, dict):
            obj = obj.values()
        elif not isinstance(obj, list):
            continue
        deepest = max(deepest, d)
        if d > MAX_JSON_DEPTH:
            return d
        stack.extend((v, d + 1) for v in obj if isinstance(v, (dict, list)))
    return deepest


def _respond(message, content_type: str, status: int = 200) -> Response:
    if content_type == JSON:
        body = json_format.MessageToJson(message, indent=None,
                                         preserving_proto_field_name=False).encode()
        return Response(body, status_code=status, media_type=JSON)
    return Response(message.SerializeToString(), status_code=status, media_type=PROTOBUF)


def _error(status: int, message: str, content_type: str, retry_after_s: int = 0) -> Response:
    # google.rpc.Code: 3 INVALID_ARGUMENT for 4xx we refuse; 8 RESOURCE_EXHAUSTED for too large
    # or too many; 14 UNAVAILABLE when we cannot store.
    code = {413: 8, 429: 8, 503: 14}.get(status, 3)
    resp = _respond(status_pb2.Status(code=code, message=message), content_type, status)
    if retry_after_s:
        resp.headers["retry-after"] = str(retry_after_s)
    return resp


class OtlpReceiver:
    """The /v1/traces endpoint. `metrics` (agent.metrics.Metrics) counts requests and spans;
    `sink(spans) -> Future` (SpanWriter.submit) makes them durable before the answer, else they
    go straight to `store`."""

    def __init__(self, store: SpanStore, *, forwarder=None, metrics=None,
                 max_body: int = MAX_BODY, max_decoded: int = MAX_DECODED,
                 pidns=None, sink=None, max_inflight: int = 8, decoders: int = 2,
                 sender_check=None) -> None:
        from agent.pidns import PidNamespaces

        self.store = store
        #: ids from an app's own PID namespace to the host's (agent/pidns.py)
        self.pidns = pidns if pidns is not None else PidNamespaces()
        #: (request.client, spans) -> spans: drops ids the sender may not name (agent/senders.py)
        self.sender_check = sender_check
        self.forwarder = forwarder
        self.metrics = metrics
        self.max_body = max_body
        self.max_decoded = max_decoded
        self.sink = sink
        self.max_inflight = max_inflight
        self._inflight = 0  # touched on the event loop only
        self._pool = ThreadPoolExecutor(decoders, thread_name_prefix="spanflame-otlp-decode")

    def routes(self) -> list[Route]:
        return [Route("/v1/traces", self.handle, methods=["POST"])]

    def _count(self, result: str, spans: int = 0, rejected: int = 0) -> None:
        if self.metrics is not None:
            self.metrics.otlp_requests.labels(result=result).inc()
            if spans:
                self.metrics.otlp_spans.inc(spans)
            if rejected:
                self.metrics.otlp_spans_rejected.inc(rejected)

    def _decode(self, body: bytes, encoding: str | None, ctype: str):
        """On a decoder thread: gunzip, parse, SpanRecords."""
        decoded = decode_content(body, encoding, self.max_decoded)
        req = parse_request(decoded, ctype)
        return from_otlp(req, self.pidns.to_host)

    async def handle(self, request: Request) -> Response:
        raw_type = request.headers.get("content-type", "")
        ctype = raw_type.split(";", 1)[0].strip().lower()
        reply_type = JSON if ctype == JSON else PROTOBUF
        encoding = request.headers.get("content-encoding")
        if ctype in (PROTOBUF, JSON) and self._inflight >= self.max_inflight:
            self._count("rejected_429")
            return _error(429, f"{self._inflight} OTLP requests in progress: retry later",
                          reply_type, retry_after_s=1)
        self._inflight += 1
        try:
            if ctype not in (PROTOBUF, JSON):
                raise BodyError(415, f"unsupported Content-Type {raw_type[:80]!r}: use "
                                     f"{PROTOBUF} or {JSON}")
            body = await read_body(request, self.max_body)
            loop = asyncio.get_running_loop()
            spans, rejected = await loop.run_in_executor(self._pool, self._decode, body,
                                                         encoding, ctype)
            if self.sender_check is not None:  # reads /proc: off the event loop
                spans = await loop.run_in_executor(self._pool, self.sender_check,
                                                   request.client, spans)
            if self.sink is not None:
                from agent.spanwriter import Overloaded
                try:
                    await asyncio.wrap_future(self.sink(spans))
                except Overloaded as exc:
                    self._count("rejected_429")
                    return _error(429, f"{exc}: retry later", reply_type, retry_after_s=1)
            else:
                self.store.add(spans)
        except BodyError as exc:
            self._count(f"rejected_{exc.status}")
            log.info("OTLP request refused: %s", exc.message)
            return _error(exc.status, exc.message, reply_type)
        except StoreFull as exc:
            self._count("rejected_503")
            return _error(503, str(exc), reply_type, retry_after_s=60)
        finally:
            self._inflight -= 1
        if self.forwarder is not None:
            self.forwarder.submit(body, raw_type, encoding)
        self._count("ok", len(spans), len(rejected))
        resp = trace_service_pb2.ExportTraceServiceResponse()
        if rejected:
            resp.partial_success.rejected_spans = len(rejected)
            resp.partial_success.error_message = f"{len(rejected)} spans rejected: {rejected[0]}"
        return _respond(resp, reply_type)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
