"""OTLP/HTTP trace receiver: POST /v1/traces, protobuf or JSON, gzip or not.

Follows the OTLP/HTTP specification: 200 with an ExportTraceServiceResponse (partial success
when some spans are rejected, with the count and a reason), 4xx with a Status body (code and
message) for requests we refuse, in the request's own encoding. Bodies are bounded before and
after decompression. Spans go to a SpanStore and, optionally, unchanged to an upstream OTLP
endpoint (agent/otlp_forward.py).
"""

from __future__ import annotations

import base64
import json
import logging

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from agent.httpbody import BodyError, decode_content, read_body
from agent.proto import status_pb2
from agent.spans import SpanStore, from_otlp

log = logging.getLogger(__name__)

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
#: Default bounds: the compressed body, and the body after gzip.
MAX_BODY = 8 * 1024 * 1024
MAX_DECODED = 32 * 1024 * 1024

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
    if not isinstance(doc, dict):
        raise BodyError(400, "JSON body must be an ExportTraceServiceRequest object")
    try:
        json_format.ParseDict(_hex_ids_to_base64(doc), req, ignore_unknown_fields=True)
    except json_format.ParseError as exc:
        raise BodyError(400, f"invalid ExportTraceServiceRequest JSON ({exc})") from None
    return req


def _respond(message, content_type: str, status: int = 200) -> Response:
    if content_type == JSON:
        body = json_format.MessageToJson(message, indent=None,
                                         preserving_proto_field_name=False).encode()
        return Response(body, status_code=status, media_type=JSON)
    return Response(message.SerializeToString(), status_code=status, media_type=PROTOBUF)


def _error(status: int, message: str, content_type: str) -> Response:
    # google.rpc.Code: 3 INVALID_ARGUMENT for 4xx we refuse; 8 RESOURCE_EXHAUSTED for too large.
    code = 8 if status == 413 else 3
    return _respond(status_pb2.Status(code=code, message=message), content_type, status)


class OtlpReceiver:
    """The /v1/traces endpoint. `metrics` (agent.metrics.Metrics) counts requests and spans."""

    def __init__(self, store: SpanStore, *, forwarder=None, metrics=None,
                 max_body: int = MAX_BODY, max_decoded: int = MAX_DECODED,
                 pidns=None, sender_check=None) -> None:
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

    def routes(self) -> list[Route]:
        return [Route("/v1/traces", self.handle, methods=["POST"])]

    def _count(self, result: str, spans: int = 0, rejected: int = 0) -> None:
        if self.metrics is not None:
            self.metrics.otlp_requests.labels(result=result).inc()
            if spans:
                self.metrics.otlp_spans.inc(spans)
            if rejected:
                self.metrics.otlp_spans_rejected.inc(rejected)

    async def handle(self, request: Request) -> Response:
        raw_type = request.headers.get("content-type", "")
        ctype = raw_type.split(";", 1)[0].strip().lower()
        reply_type = JSON if ctype == JSON else PROTOBUF
        try:
            if ctype not in (PROTOBUF, JSON):
                raise BodyError(415, f"unsupported Content-Type {raw_type[:80]!r}: use "
                                     f"{PROTOBUF} or {JSON}")
            body = await read_body(request, self.max_body)
            decoded = decode_content(body, request.headers.get("content-encoding"),
                                     self.max_decoded)
            req = parse_request(decoded, ctype)
        except BodyError as exc:
            self._count(f"rejected_{exc.status}")
            log.info("OTLP request refused: %s", exc.message)
            return _error(exc.status, exc.message, reply_type)
        spans, rejected = from_otlp(req, self.pidns.to_host)
        if self.sender_check is not None:  # reads /proc: off the event loop
            spans = await run_in_threadpool(self.sender_check, request.client, spans)
        self.store.add(spans)
        if self.forwarder is not None:
            self.forwarder.submit(body, raw_type, request.headers.get("content-encoding"))
        self._count("ok", len(spans), len(rejected))
        resp = trace_service_pb2.ExportTraceServiceResponse()
        if rejected:
            resp.partial_success.rejected_spans = len(rejected)
            resp.partial_success.error_message = f"{len(rejected)} spans rejected: {rejected[0]}"
        return _respond(resp, reply_type)
