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

MAX_HEAD = 64 * 1024
BIG_BODY = 1 << 20  # a body larger than this is collected in parts, joined once


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
        self.t_recv = 0.0  # when the first byte of the request being read arrived
        self.t_active = time.monotonic()  # the last read or finished response (for the idle timeout)
        self.body_need = 0  # bytes still to come of a big body being collected in parts
        self.body_parts = []
        self.pending = None  # (method, target, version, headers) of that request
        self.chunked_seen = 0  # how much of a chunked body was there when it was last found incomplete

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.app.conns.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.app.conns.discard(self)
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
        now = time.monotonic()
        self.t_active = now
        if self.body_need:
            self._body_part(data)
            return
        if not self.buf:
            self.t_recv = now
        self.buf += data
        if not self.busy:
            if self.buf.startswith(b"GET "):  # /metrics, /health, /v1/models: cheap, and wanted most under load
                self.process()
            else:
                self.app.enqueue(self)

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    def abort_connection(self) -> None:
        """Close mid-response (fault injection)."""
        if not self.closed:
            self.transport.close()
        seq = self.active
        if seq is not None:
            if not seq.done:
                self.app.sched.abort(seq)
            else:  # closed at its last token (a 1-token output): counted as aborted, not as a success
                seq.aborted = True
        self.active = None
        self.closed = True

    def respond(self, code: int, body: bytes, ctype: bytes = b"application/json", extra: bytes = b"") -> None:
        self.write(http_response(code, body, ctype, self.close_after, extra))
        self.response_done()

    def response_done(self) -> None:
        self.active = None
        self.busy = False
        self.t_active = time.monotonic()
        if self.close_after:
            if not self.closed:
                self.transport.close()
            self.closed = True
            return
        if self.buf:
            self.t_recv = time.monotonic()
            self.app.enqueue(self)

    def _bad(self, code: int, message: str) -> None:
        """A request that cannot be read (framing, size): answered, and the connection closed."""
        self.close_after = True
        self.busy = True
        self.app.stats.count_response(code)
        self.respond(code, error_body(code, message))

    def process(self) -> None:
        while not self.busy and not self.closed and self.buf and self.body_need == 0:
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
                    k, sep, v = ln.partition(":")
                    k = k.strip().lower()
                    if not sep or not k:
                        raise ValueError(ln)
                    if k in headers and k in ("content-length", "transfer-encoding"):
                        raise ValueError(k)  # two framings: a smuggling attempt
                    headers[k] = v.strip()
            except (ValueError, IndexError):
                self._bad(400, "Malformed HTTP request")
                return
            start = i + 4
            te = headers.get("transfer-encoding")
            cl = headers.get("content-length")
            if te is not None and cl is not None:
                # RFC 9112 6.1: a request with both may be an attempt at request smuggling; answer and close
                self._bad(400, "Both Content-Length and Transfer-Encoding")
                return
            if te is not None:
                if te.lower() != "chunked":
                    self._bad(400, f"Unsupported Transfer-Encoding: {te}")
                    return
                if len(buf) > self.app.opts.max_body_bytes:
                    self._bad(413, "Request body too large")
                    return
                # Decode only once the last chunk may have come (a line starting with 0 after a chunk, in what
                # arrived since the last try): decoding a big body at every read costs time quadratic in its size.
                if buf.find(b"\r\n0", max(start, self.chunked_seen - 3)) < 0 and buf[start:start + 1] != b"0":
                    self.chunked_seen = len(buf)
                    return
                body, end = parse_chunked(buf, start)
                if body is None:  # incomplete (the end was not there yet: look again from the same place)
                    if end < 0:
                        self._bad(400, "Malformed chunked body")
                    return
                self.chunked_seen = 0
                if len(body) > self.app.opts.max_body_bytes:
                    self._bad(413, "Request body too large")
                    return
                del buf[:end]
            else:
                if cl is None:
                    n = 0
                elif cl.isdigit() and cl.isascii():
                    n = int(cl)
                else:
                    self._bad(400, "Bad Content-Length")
                    return
                if n > self.app.opts.max_body_bytes:
                    self._bad(413, "Request body too large")
                    return
                end = start + n
                if len(buf) < end:
                    if headers.get("expect", "").lower() == "100-continue" and not self.sent_continue:
                        self.sent_continue = True
                        self.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    if n > BIG_BODY:  # collect the rest in parts: no copy of the whole buffer per read
                        self.body_parts = [bytes(buf[start:])]
                        self.body_need = end - len(buf)
                        self.pending = (method, target, version, headers)
                        buf.clear()
                    return
                body = bytes(buf[start:end])
                del buf[:end]
            self._dispatch(method, target, version, headers, body)

    def _body_part(self, data: bytes) -> None:
        """The next bytes of a big Content-Length body (``data_received`` while ``body_need``)."""
        need = self.body_need
        if len(data) <= need:
            self.body_parts.append(data)
            self.body_need = need - len(data)
        else:
            self.body_parts.append(data[:need])
            self.buf += data[need:]
            self.body_need = 0
        if self.body_need == 0:
            body = b"".join(self.body_parts)
            self.body_parts = []
            method, target, version, headers = self.pending
            self.pending = None
            self._dispatch(method, target, version, headers, body)

    def _dispatch(self, method: str, target: str, version: str, headers: dict, body: bytes) -> None:
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


