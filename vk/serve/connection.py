"""vk-serve's HTTP/1.1 connections: request parsing, plain responses and vLLM-style error bodies.

Why not aiohttp: at 1,000 concurrent streams the per-token cost must stay around 10 µs, so a token is one
``transport.write`` of a pre-built byte string (no coroutine, no await per token) and one engine step writes to
every stream it advanced. Keep-alive, pipelined requests (handled one after another per connection),
``Content-Length`` and chunked request bodies, ``Expect: 100-continue``; streamed responses use chunked transfer
encoding with one SSE event per chunk, as uvicorn sends them for vLLM.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import time

import orjson

MAX_BODY = 64 * 1024 * 1024
MAX_HEAD = 64 * 1024


class HTTPError(Exception):
    def __init__(self, code: int, message: str, type_: str = "BadRequestError", param=None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.type = type_
        self.param = param


_REASONS = {200: "OK", 100: "Continue", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            411: "Length Required", 413: "Payload Too Large", 429: "Too Many Requests",
            431: "Request Header Fields Too Large", 500: "Internal Server Error", 503: "Service Unavailable"}


def error_body(code: int, message: str, type_: str = "BadRequestError", param=None) -> bytes:
    """A vLLM-style error object."""
    return orjson.dumps({"object": "error", "message": message, "type": type_, "param": param, "code": code})


def http_response(code: int, body: bytes, ctype: bytes = b"application/json", close: bool = False,
                   extra: bytes = b"") -> bytes:
    return b"".join((
        b"HTTP/1.1 %d %s\r\nserver: vk-serve\r\ncontent-type: %s\r\ncontent-length: %d\r\n"
        % (code, _REASONS.get(code, "Error").encode(), ctype, len(body)),
        extra, b"connection: close\r\n" if close else b"", b"\r\n", body,
    ))


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Conn(asyncio.Protocol):
    """One HTTP/1.1 connection: parses requests (pipelined ones queue up) and writes responses."""

    def __init__(self, app):
        self.app = app
        self.transport = None
        self.buf = bytearray()
        self.active = None  # the Seq whose response is being produced
        self.busy = False
        self.close_after = False
        self.closed = False
        self.sent_continue = False
        self.queued = False
        self.t_recv = 0.0

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def connection_lost(self, exc) -> None:
        self.closed = True
        seq = self.active
        if seq is not None and not seq.done:
            if seq.handle is not None and not seq.sink.started:
                seq.handle.cancel()  # still stalled: never reached the engine
                seq.aborted = True
                seq.done = True
            else:
                self.app.sched.abort(seq)
        self.active = None

    def data_received(self, data: bytes) -> None:
        if not self.buf:
            self.t_recv = time.monotonic()
        self.buf += data
        if not self.busy:
            self.app.enqueue(self)

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    def abort_connection(self) -> None:
        """Close mid-response (fault injection)."""
        if not self.closed:
            self.transport.close()
        seq = self.active
        if seq is not None and not seq.done:
            self.app.sched.abort(seq)
        self.active = None
        self.closed = True

    def respond(self, code: int, body: bytes, ctype: bytes = b"application/json", extra: bytes = b"") -> None:
        self.write(http_response(code, body, ctype, self.close_after, extra))
        self.response_done()

    def response_done(self) -> None:
        self.active = None
        self.busy = False
        if self.close_after:
            if not self.closed:
                self.transport.close()
            self.closed = True
            return
        if self.buf:
            self.t_recv = time.monotonic()
            self.app.enqueue(self)

    def _bad(self, code: int, message: str) -> None:
        self.close_after = True
        self.busy = True
        self.respond(code, error_body(code, message))

    def process(self) -> None:
        while not self.busy and not self.closed and self.buf:
            buf = self.buf
            i = buf.find(b"\r\n\r\n")
            if i < 0:
                if len(buf) > MAX_HEAD:
                    self._bad(431, "Request header fields too large")
                return
            try:
                head = bytes(buf[:i]).decode("latin-1")
                lines = head.split("\r\n")
                while lines and not lines[0]:  # tolerate stray CRLF between requests
                    lines.pop(0)
                method, target, version = lines[0].split(" ", 2)
                headers = {}
                for ln in lines[1:]:
                    k, _, v = ln.partition(":")
                    headers[k.strip().lower()] = v.strip()
            except (ValueError, IndexError):
                self._bad(400, "Malformed HTTP request")
                return
            start = i + 4
            te = headers.get("transfer-encoding", "").lower()
            if "chunked" in te:
                body, end = parse_chunked(buf, start)
                if body is None:
                    if end < 0:
                        self._bad(400, "Malformed chunked body")
                    elif len(buf) > MAX_BODY:
                        self._bad(413, "Request body too large")
                    return
            else:
                try:
                    cl = int(headers.get("content-length", "0") or 0)
                except ValueError:
                    self._bad(400, "Bad Content-Length")
                    return
                if cl > MAX_BODY:
                    self._bad(413, "Request body too large")
                    return
                end = start + cl
                if len(buf) < end:
                    if headers.get("expect", "").lower() == "100-continue" and not self.sent_continue:
                        self.sent_continue = True
                        self.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    return
                body = bytes(buf[start:end])
            del buf[:end]
            self.sent_continue = False
            conn_h = headers.get("connection", "").lower()
            self.close_after = "close" in conn_h or (version == "HTTP/1.0" and "keep-alive" not in conn_h)
            self.busy = True
            if self.app.opts.log_requests:
                print(f"vk-serve: {method} {target}", file=sys.stderr)
            try:
                self.app.handle(self, method, target, headers, body)
            except Exception as e:  # noqa: BLE001 - a bug must not kill the server
                self.respond(500, error_body(500, f"internal error: {e!r}", "InternalServerError"))


def parse_chunked(buf: bytearray, pos: int):
    """Decode a chunked body starting at ``pos``: ``(body, end)``, ``(None, 0)`` if incomplete, ``(None, -1)`` bad."""
    out = bytearray()
    while True:
        j = buf.find(b"\r\n", pos)
        if j < 0:
            return None, 0
        try:
            size = int(bytes(buf[pos:j]).split(b";")[0], 16)
        except ValueError:
            return None, -1
        pos = j + 2
        if size == 0:
            k = buf.find(b"\r\n\r\n", pos - 2)  # trailers end with an empty line
            if k < 0:
                return None, 0
            return bytes(out), k + 4
        if len(buf) < pos + size + 2:
            return None, 0
        out += buf[pos:pos + size]
        pos += size + 2


