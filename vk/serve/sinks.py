"""How vk-serve writes a completion: streamed (SSE events over chunked transfer encoding) or as one JSON body.

A sink receives the engine's ``on_token`` / ``on_finish`` calls for one request. A streamed token is one
``conn.write`` of a pre-built byte string (the event's constant parts are built once per request), with no
coroutine or await per token.
"""

from __future__ import annotations

import time

import orjson

from vk.serve.connection import Conn, chunk
from vk.serve.engine import Seq


class Sink:
    """What both kinds of response know: the request's ids, its connection and its injected faults."""

    __slots__ = ("app", "conn", "chat", "rid", "xrid", "disconnect_at", "malformed_at", "started")

    def __init__(self, app, conn: Conn, chat: bool, rid: str, xrid: str):
        self.app = app
        self.conn = conn
        self.chat = chat
        self.rid = ("chatcmpl-" if chat else "cmpl-") + rid
        self.xrid = xrid
        self.disconnect_at = 0  # the output token after which the connection is closed (fault), 0 = none
        self.malformed_at = 0  # the output token before which a malformed event is sent (fault), 0 = none
        self.started = False


class StreamSink(Sink):
    """Writes a streamed response (SSE over chunked transfer encoding) as tokens come out of the engine."""

    __slots__ = ("include_usage", "continuous", "ts", "head", "tail", "tail_end")

    def __init__(self, app, conn: Conn, chat: bool, rid: str, xrid: str, so: dict, req: dict):
        super().__init__(app, conn, chat, rid, xrid)
        self.include_usage = bool(so.get("include_usage"))
        self.continuous = bool(so.get("continuous_usage_stats"))
        self.ts = app.opts.server_timestamps
        created = int(time.time())
        common = b'{"id":"%s","object":"%s","created":%d,"model":%s,"choices":[' % (
            self.rid.encode(), b"chat.completion.chunk" if chat else b"text_completion", created,
            app.model_bytes)
        if chat:
            self.head = b"data: " + common + b'{"index":0,"delta":{"content":'
            self.tail = b'},"logprobs":null,"finish_reason":null}]'
            self.tail_end = b'},"logprobs":null,"finish_reason":"%s","stop_reason":null}]'
        else:
            self.head = b"data: " + common + b'{"index":0,"text":'
            self.tail = b',"logprobs":null,"finish_reason":null,"stop_reason":null}]'
            self.tail_end = b',"logprobs":null,"finish_reason":"%s","stop_reason":null}]'

    def start(self, seq: Seq) -> None:
        self.started = True
        # with --server-timestamps, the request's arrival on the server's clock (epoch seconds), the origin of
        # its TTFT: the truth a timing test compares the token times with
        arrival = b"vk-server-arrival: %.6f\r\n" % (time.time() - (time.monotonic() - seq.t_arrival)) \
            if self.ts else b""
        self.conn.write(
            b"HTTP/1.1 200 OK\r\nserver: vk-serve\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
            b"transfer-encoding: chunked\r\nx-request-id: %s\r\n%s%s\r\n"
            % (self.xrid.encode(), arrival, b"connection: close\r\n" if self.conn.close_after else b""))

    def _usage(self, seq: Seq, final: bool) -> bytes:
        p, c = seq.prompt_len, seq.n_out
        if final:
            return b',"usage":{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":%d,' \
                   b'"prompt_tokens_details":{"cached_tokens":%d}}' % (p, p + c, c, seq.cached_tokens)
        return b',"usage":{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":%d}' % (p, p + c, c)

    def on_token(self, seq: Seq, now: float) -> None:
        n = seq.n_out
        parts = []
        if n == 1 and self.chat:
            ev = self.head[:-len(b'"content":')] + b'"role":"assistant","content":""' + self.tail
            if self.continuous:
                ev += b',"usage":{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":0}' % (
                    seq.prompt_len, seq.prompt_len)
            if self.ts:
                ev += b',"vk_server_time":%.6f' % time.time()
            parts.append(chunk(ev + b"}\n\n"))
        if n == self.malformed_at:
            parts.append(chunk(self.head + b'"broken\n\n'))
        ev = self.head + self.app.words.json[seq.out_ids[n - 1]]
        ev += self.tail_end % seq.finish_reason.encode() if n == seq.out_target else self.tail
        if self.continuous:
            ev += self._usage(seq, False)
        if self.ts:
            ev += b',"vk_server_time":%.6f' % time.time()
        parts.append(chunk(ev + b"}\n\n"))
        self.conn.write(b"".join(parts) if len(parts) > 1 else parts[0])
        if n == self.disconnect_at and n < seq.out_target:
            self.conn.abort_connection()

    def on_finish(self, seq: Seq, now: float) -> None:
        parts = []
        if self.include_usage:
            ev = self.head[: self.head.index(b'"choices":[') + 11] + b"]" + self._usage(seq, True)
            if self.ts:
                ev += b',"vk_server_time":%.6f' % time.time()
            parts.append(chunk(ev + b"}\n\n"))
        parts.append(chunk(b"data: [DONE]\n\n"))
        parts.append(b"0\r\n\r\n")
        self.conn.write(b"".join(parts))
        self.conn.response_done()


class FullSink(Sink):
    """Collects a non-streamed response and writes it as one JSON body when the request finishes."""

    __slots__ = ()

    def __init__(self, app, conn: Conn, chat: bool, rid: str, xrid: str, so: dict, req: dict):
        super().__init__(app, conn, chat, rid, xrid)

    def start(self, seq: Seq) -> None:
        self.started = True

    def on_token(self, seq: Seq, now: float) -> None:
        if seq.n_out == self.disconnect_at and seq.n_out < seq.out_target:
            self.conn.abort_connection()

    def on_finish(self, seq: Seq, now: float) -> None:
        text = self.app.words.decode(seq.out_ids[: seq.n_out])
        p, c = seq.prompt_len, seq.n_out
        usage = {"prompt_tokens": p, "total_tokens": p + c, "completion_tokens": c,
                 "prompt_tokens_details": {"cached_tokens": seq.cached_tokens}}
        if self.malformed_at:  # a malformed body instead of a malformed event
            body = b'{"id":"' + self.rid.encode() + b'","object":'
        elif self.chat:
            body = orjson.dumps({
                "id": self.rid, "object": "chat.completion", "created": int(time.time()), "model": self.app.opts.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "reasoning_content": None,
                                                     "tool_calls": []},
                             "logprobs": None, "finish_reason": seq.finish_reason, "stop_reason": None}],
                "usage": usage, "prompt_logprobs": None})
        else:
            body = orjson.dumps({
                "id": self.rid, "object": "text_completion", "created": int(time.time()), "model": self.app.opts.model,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": seq.finish_reason,
                             "stop_reason": None, "prompt_logprobs": None}],
                "usage": usage})
        self.conn.respond(200, body, extra=b"x-request-id: %s\r\n" % self.xrid.encode())
