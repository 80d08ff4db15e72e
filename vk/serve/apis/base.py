"""What every vk-serve API style shares: the protocol interface and the streaming sink that writes a style's
events (SSE or AWS event-stream frames over chunked transfer encoding) as the engine produces tokens."""

from __future__ import annotations

import time

import orjson

from vk.serve.apis import STYLE_MARK
from vk.serve.connection import HTTPError, chunk
from vk.serve.engine import Seq
from vk.serve.sinks import Sink


def text_of(content, where: str) -> str:
    """A message's text: a string, or text parts (``{"type": "text", "text": ...}`` or ``{"text": ...}``)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for p in content:
            if isinstance(p, dict) and isinstance(p.get("text"), str):
                out.append(p["text"])
            else:
                raise HTTPError(400, f"{where}: only text parts are supported", param=where)
        return "".join(out)
    raise HTTPError(400, f"{where}: expected a string or a list of text parts", param=where)


def load_object(body: bytes) -> dict:
    try:
        req = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise HTTPError(400, f"Invalid JSON body: {e}") from None
    if not isinstance(req, dict):
        raise HTTPError(400, "The request body must be a JSON object")
    return req


def positive_int(value, name: str):
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise HTTPError(400, f"{name} must be an integer >= 1, got {value!r}", param=name)
    return value


# vLLM's output-length extensions, passed through from any style's body (or its extra-fields object) so that
# vk-send --extra-body can ask vk-serve for exact lengths whatever the API style
LENGTH_EXTRAS = ("min_tokens", "ignore_eos")


class Protocol:
    """One API style. ``match`` claims a route; ``request`` turns the body into an OpenAI chat request;
    ``begin`` / ``token`` / ``end`` give a stream's events as ``(name, object)``; ``frame`` writes one."""

    name = "openai"
    media_type = b"text/event-stream; charset=utf-8"

    def __init__(self, app):
        self.app = app

    def match(self, method: str, path: str) -> bool:
        raise NotImplementedError

    def request(self, method: str, target: str, headers: dict, body: bytes) -> dict:
        raise NotImplementedError

    def translate(self, method: str, target: str, headers: dict, body: bytes) -> bytes:
        """The OpenAI chat request body the app serves, marked as this style's (its answer is rendered so)."""
        req = self.request(method, target, headers, body)
        req[STYLE_MARK] = True
        return orjson.dumps(req)

    def sink_class(self, stream: bool):
        return StyleStreamSink if stream else StyleFullSink

    def whole(self, sink, seq: Seq, text: str, thinking: str) -> dict:
        """The non-streamed answer."""
        raise NotImplementedError

    def head_extra(self, sink) -> bytes:
        return b""

    def begin(self, sink, seq: Seq) -> list:
        return []

    def token(self, sink, seq: Seq, n: int, text: str, reasoning: bool) -> list:
        raise NotImplementedError

    def end(self, sink, seq: Seq) -> list:
        return []

    def frame(self, name: str, obj: dict) -> bytes:
        """An SSE event with an ``event:`` line (Anthropic, Cohere); Gemini's have ``data:`` only."""
        return b"event: %s\ndata: %s\n\n" % (name.encode(), orjson.dumps(obj))

    def frame_for(self, sink, name: str, obj: dict) -> bytes:
        """One event of this response (a style whose framing depends on the request overrides this)."""
        return self.frame(name, obj)

    def tail(self, sink) -> bytes:
        """Bytes after the last event (Gemini's JSON array: its closing bracket)."""
        return b""

    def content_type(self, sink) -> bytes:
        return self.media_type

    def malformed(self) -> bytes:
        """A broken event (--fault-malformed): an SSE ``data:`` line that is not JSON."""
        return b'data: {"broken\n\n'


class StyleStreamSink(Sink):
    """A streamed response in an API style: the protocol's events, each stamped with the server's send time
    under --server-timestamps (``vk_server_time``, as the OpenAI stream's chunks are)."""

    __slots__ = ("proto", "req", "ts", "state")

    def __init__(self, app, conn, chat: bool, rid: str, xrid: str, so: dict, req: dict):
        super().__init__(app, conn, chat, rid, xrid)
        self.proto = app.protocol
        self.req = req
        self.ts = app.opts.server_timestamps
        self.state: dict = {}

    def _write(self, events: list, last: bool = False) -> None:
        parts = []
        for name, obj in events:
            if self.ts:
                obj["vk_server_time"] = round(time.time(), 6)
            parts.append(chunk(self.proto.frame_for(self, name, obj)))
        if last:
            tail = self.proto.tail(self)
            if tail:
                parts.append(chunk(tail))
            parts.append(b"0\r\n\r\n")
        if parts:
            self.conn.write(b"".join(parts))

    def start(self, seq: Seq) -> None:
        self.started = True
        self.app.stats.count_response(200)
        arrival = b"vk-server-arrival: %.6f\r\n" % (time.time() - (time.monotonic() - seq.t_arrival)) \
            if self.ts else b""
        self.conn.write(
            b"HTTP/1.1 200 OK\r\nserver: vk-serve\r\ncontent-type: %s\r\ntransfer-encoding: chunked\r\n"
            b"x-request-id: %s\r\n%s%s%s\r\n"
            % (self.proto.content_type(self), self.xrid.encode(), self.proto.head_extra(self), arrival,
               b"connection: close\r\n" if self.conn.close_after else b""))
        self._write(self.proto.begin(self, seq))

    def on_token(self, seq: Seq, now: float) -> None:
        n = seq.n_out
        if n == self.disconnect_at and n == seq.out_target:
            self.conn.abort_connection()
            return
        if n == self.malformed_at:
            self.conn.write(chunk(self.proto.malformed()))
        self._write(self.proto.token(self, seq, n, self.app.words.text[seq.out_ids[n - 1]], n <= self.n_reasoning))
        if n == self.disconnect_at and n < seq.out_target:
            self.conn.abort_connection()

    def on_finish(self, seq: Seq, now: float) -> None:
        if seq.prompt_len < 0:
            self.finish_pending = True
            return
        self._write(self.proto.end(self, seq), last=True)
        self.conn.response_done()

    def counts(self, seq: Seq) -> tuple[int, int, int, int]:
        """(prompt, output, cached prompt, reasoning) tokens so far."""
        p = max(seq.prompt_len, 0)
        return p, seq.n_out, seq.cached_tokens, min(self.n_reasoning, seq.n_out)


class StyleFullSink(Sink):
    """A non-streamed response in an API style: one JSON body when the request finishes."""

    __slots__ = ("proto", "req")

    def __init__(self, app, conn, chat: bool, rid: str, xrid: str, so: dict, req: dict):
        super().__init__(app, conn, chat, rid, xrid)
        self.proto = app.protocol
        self.req = req

    def start(self, seq: Seq) -> None:
        self.started = True

    def on_token(self, seq: Seq, now: float) -> None:
        if seq.n_out == self.disconnect_at:
            self.conn.abort_connection()

    def on_finish(self, seq: Seq, now: float) -> None:
        if seq.prompt_len < 0:
            self.finish_pending = True
            return
        words = self.app.words
        r = min(self.n_reasoning, seq.n_out)
        body = orjson.dumps(self.proto.whole(self, seq, words.decode(seq.out_ids[r:seq.n_out]),
                                             words.decode(seq.out_ids[:r])))
        if self.malformed_at:
            body = body[: len(body) // 2]
        if not self.conn.closed:
            self.app.stats.count_response(200)
        self.conn.respond(200, body, extra=b"x-request-id: %s\r\n" % self.xrid.encode())

    def counts(self, seq: Seq) -> tuple[int, int, int, int]:
        return StyleStreamSink.counts(self, seq)
