"""Reading request bodies safely: bounded size, bounded decompression, clear errors.

Shared by every endpoint that takes data from outside (OTLP, Pyroscope ingest).
"""

from __future__ import annotations

import zlib

from starlette.requests import ClientDisconnect, Request


class BodyError(Exception):
    """A request body we refuse; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The raw body, refused with 413 beyond `max_bytes` (before reading it all when the
    client announces its length)."""
    length = request.headers.get("content-length")
    if length is not None:
        try:
            n = int(length)
        except ValueError:
            raise BodyError(400, "invalid Content-Length") from None
        if n < 0:
            raise BodyError(400, "invalid Content-Length")
        if n > max_bytes:
            raise BodyError(413, f"body of {n} bytes exceeds the limit of {max_bytes} bytes")
    chunks = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise BodyError(413, f"body exceeds the limit of {max_bytes} bytes")
            chunks.append(chunk)
    except ClientDisconnect:  # gone, or closed by the server's body timeout (httpserver.py)
        raise BodyError(400, "client disconnected before sending the whole body") from None
    return b"".join(chunks)


def decode_content(body: bytes, encoding: str | None, max_bytes: int) -> bytes:
    """Undo Content-Encoding (identity or gzip), never inflating past `max_bytes`."""
    enc = (encoding or "identity").strip().lower()
    if enc in ("", "identity"):
        return body
    if enc != "gzip":
        raise BodyError(415, f"unsupported Content-Encoding {enc!r} (use gzip or identity)")
    return gunzip(body, max_bytes)


def gunzip(body: bytes, max_bytes: int) -> bytes:
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(body, max_bytes + 1)
    except zlib.error as exc:
        raise BodyError(400, f"corrupt gzip body ({exc})") from None
    if len(out) > max_bytes or d.unconsumed_tail:
        raise BodyError(413, f"body decompresses to more than {max_bytes} bytes")
    if not d.eof:
        raise BodyError(400, "truncated gzip body")
    return out


def maybe_gunzip(data: bytes, max_bytes: int) -> bytes:
    """Gunzip `data` if it starts with the gzip magic (for payloads that may or may not be)."""
    return gunzip(data, max_bytes) if data[:2] == b"\x1f\x8b" else data

