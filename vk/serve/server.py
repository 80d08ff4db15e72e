"""The HTTP side of vk-serve: a small HTTP/1.1 server on asyncio Protocols that speaks vLLM's OpenAI API.

Why not aiohttp: at 1,000 concurrent streams the per-token cost must stay around 10 µs, so a token is one
``transport.write`` of a pre-built byte string (no coroutine, no await per token) and one engine step writes to
every stream it advanced. Keep-alive, pipelined requests (handled one after another per connection),
``Content-Length`` and chunked request bodies, ``Expect: 100-continue``; streamed responses use chunked transfer
encoding with one SSE event per chunk, as uvicorn sends them for vLLM.
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import socket
import sys
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import orjson

from vk import __version__
from vk.serve.engine import FixedLatency, Seq, Stats
from vk.serve.textgen import words_for

MAX_BODY = 64 * 1024 * 1024
MAX_HEAD = 64 * 1024


@dataclass
class Options:
    """Everything ``vk-serve`` can be told (``vk.serve.serve(**options)`` takes the same names)."""

    host: str = "127.0.0.1"
    port: int = 8000
    model: str = "vk-sim"
    tokenizer: str | None = None
    # fixed-latency mode (both set) or the engine model
    ttft: float | None = None
    tpot: float | None = None
    # engine model (see vk.serve.model); None = the profile's value
    profile: str = "llama3.1-8b-h100"
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    num_blocks: int | None = None
    block_size: int | None = None
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    t_fixed: float | None = None
    t_weights: float | None = None
    t_token: float | None = None
    t_kv: float | None = None
    speed: float = 1.0
    # output lengths when nothing forces them
    stop_mean: float = 256.0
    stop_sigma: float = 0.8
    seed: int = 0
    # ground truth and faults
    server_timestamps: bool = False
    fault_429: float = 0.0
    fault_500: float = 0.0
    fault_503: float = 0.0
    fault_stall: float = 0.0
    stall_seconds: float = 5.0
    fault_disconnect: float = 0.0
    fault_malformed: float = 0.0
    fault_seed: int = 0
    log_requests: bool = False
    extra: dict = field(default_factory=dict)


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


def _http_response(code: int, body: bytes, ctype: bytes = b"application/json", close: bool = False,
                   extra: bytes = b"") -> bytes:
    return b"".join((
        b"HTTP/1.1 %d %s\r\nserver: vk-serve\r\ncontent-type: %s\r\ncontent-length: %d\r\n"
        % (code, _REASONS.get(code, "Error").encode(), ctype, len(body)),
        extra, b"connection: close\r\n" if close else b"", b"\r\n", body,
    ))


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class App:
    """Request handling shared by all connections: validation, tokenization, sinks, faults, metrics."""

    def __init__(self, opts: Options, loop):
        from vk.tokenizer import load_tokenizer

        self.opts = opts
        self.loop = loop
        self.tok = load_tokenizer(opts.tokenizer)
        self.words = words_for(self.tok)
        self.word_ids = np.asarray(self.words.ids, dtype=np.int64)
        if self.tok.has_chat_template:  # compile the template now, not during the first request
            self.tok.encode(self.tok.apply_chat_template([{"role": "user", "content": "hi"}]))
        self.rng = np.random.default_rng(np.random.SeedSequence([opts.seed, 0x5E12]))
        self.fault_rng = random.Random(f"vk-serve-faults-{opts.fault_seed}")
        self.stats = Stats()
        self.created = int(time.time())
        self.start_time = time.time()
        if opts.ttft is not None or opts.tpot is not None:
            self.sched = FixedLatency(loop, opts.ttft or 0.0, opts.tpot or 0.0, self.stats, opts.max_num_seqs)
            self.max_model_len = opts.max_model_len or 131072
            self.mode = "fixed"
        else:
            from vk.serve.model import Engine, EngineConfig

            self.cfg = EngineConfig.from_options(opts)
            self.sched = Engine(loop, self.cfg, self.stats)
            self.max_model_len = self.cfg.max_model_len
            self.mode = "engine"
        self.model_bytes = orjson.dumps(opts.model)
        self._n = 0
        self.intake = deque()  # connections with request bytes to handle
        self.drain_scheduled = False
        self.sched.on_step = self._after_step

    # -- intake: request handling yields to the engine's step timers ----------------------------------------
    def enqueue(self, conn: Conn) -> None:
        if not conn.queued:
            conn.queued = True
            self.intake.append(conn)
            if not self.drain_scheduled:
                self.drain_scheduled = True
                self.loop.call_soon(self._drain)

    def _after_step(self) -> None:
        if self.intake and not self.drain_scheduled:
            self.drain_scheduled = True
            self.loop.call_soon(self._drain)

    def _drain(self) -> None:
        """Handle queued requests in slices of about 1 ms, yielding to the end of the engine step in flight.

        Parsing, tokenizing and templating requests is the server's heaviest work; done in one go after a burst
        of arrivals it would delay the step timers. Like vLLM's API server (a process apart from the engine
        core), intake should not stretch the model's steps: when a step is about to end, the rest waits for it.
        Each call still handles at least 0.3 ms worth (and one request), so that steps shorter than the timer
        margin cannot starve the intake.
        """
        self.drain_scheduled = False
        now = time.monotonic()
        step_deadline = self.sched.deadline()
        deadline = max(min(now + 0.001, step_deadline), now + 0.0003)
        intake = self.intake
        while intake:
            conn = intake.popleft()
            conn.queued = False
            if not conn.busy and not conn.closed:
                conn.process()
            now = time.monotonic()
            if now >= deadline:
                break
        if intake and not self.drain_scheduled and (now < step_deadline or not self.sched.stepping):
            self.drain_scheduled = True
            self.loop.call_soon(self._drain)
        # else: the engine calls _after_step when the step in flight has ended

    # -- routing ----------------------------------------------------------------------------------------------
    def handle(self, conn: Conn, method: str, path: str, headers: dict, body: bytes) -> None:
        path = path.split("?", 1)[0]
        if len(path) > 1:
            path = path.rstrip("/")
        try:
            if path in ("/v1/chat/completions", "/v1/completions"):
                if method != "POST":
                    raise HTTPError(405, "Method Not Allowed")
                self.completion(conn, path == "/v1/chat/completions", headers, body)
                return
            if method not in ("GET", "HEAD"):
                if path in ("/health", "/v1/models", "/metrics", "/version", "/ping"):
                    raise HTTPError(405, "Method Not Allowed")
                raise HTTPError(404, "Not Found")
            if path in ("/health", "/ping"):
                conn.respond(200, b"")
            elif path == "/v1/models":
                conn.respond(200, orjson.dumps({"object": "list", "data": [{
                    "id": self.opts.model, "object": "model", "created": self.created, "owned_by": "vk",
                    "root": self.opts.model, "parent": None, "max_model_len": self.max_model_len,
                    "permission": []}]}))
            elif path == "/metrics":
                conn.respond(200, self.metrics().encode(), b"text/plain; version=0.0.4; charset=utf-8")
            elif path == "/version":
                conn.respond(200, orjson.dumps({"version": f"vk-serve {__version__}"}))
            else:
                raise HTTPError(404, "Not Found")
        except HTTPError as e:
            if e.code in (404, 405) and e.type == "BadRequestError":
                conn.respond(e.code, orjson.dumps({"detail": e.message}))
            else:
                self.stats.errors[e.code] = self.stats.errors.get(e.code, 0) + 1
                conn.respond(e.code, error_body(e.code, e.message, e.type, e.param))

    # -- completions ------------------------------------------------------------------------------------------
    def completion(self, conn: Conn, chat: bool, headers: dict, body: bytes) -> None:
        try:
            req = orjson.loads(body)
        except orjson.JSONDecodeError as e:
            raise HTTPError(400, f"Invalid JSON body: {e}") from None
        if not isinstance(req, dict):
            raise HTTPError(400, "The request body must be a JSON object")
        model = req.get("model")
        if model is not None and model != self.opts.model:
            raise HTTPError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
        if chat:
            prompt_ids = self._chat_prompt(req)
        else:
            prompt_ids = self._completion_prompt(req)
        stream = req.get("stream", False)
        if not isinstance(stream, bool) and stream is not None:
            raise HTTPError(400, "'stream' must be a boolean", param="stream")
        stream = bool(stream)
        so = req.get("stream_options")
        if so is not None:
            if not stream:
                raise HTTPError(400, "Stream options can only be defined when `stream=True`.", param="stream_options")
            if not isinstance(so, dict):
                raise HTTPError(400, "'stream_options' must be an object", param="stream_options")
        so = so or {}
        n = req.get("n", 1)
        if n != 1 and n is not None:
            raise HTTPError(400, "vk-serve supports only n=1", param="n")
        plen = len(prompt_ids)
        room = self.max_model_len - plen
        max_tokens = req.get("max_completion_tokens") if chat else None
        key = "max_completion_tokens"
        if max_tokens is None:
            max_tokens = req.get("max_tokens", None if chat else 16)
            key = "max_tokens"
        if max_tokens is not None:
            if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
                raise HTTPError(400, f"{key} must be an integer >= 1, got {max_tokens!r}", param=key)
        if room <= 0 or (max_tokens is not None and max_tokens > room):
            want = plen + (max_tokens or 0)
            raise HTTPError(400, (
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{want} tokens ({plen} in the messages, {max_tokens or 0} in the completion). Please reduce the "
                "length of the messages or completion."), param="messages" if chat else "prompt")
        if max_tokens is None:
            max_tokens = room
        min_tokens = req.get("min_tokens", 0) or 0
        if not isinstance(min_tokens, int) or isinstance(min_tokens, bool) or min_tokens < 0:
            raise HTTPError(400, f"min_tokens must be an integer >= 0, got {min_tokens!r}", param="min_tokens")
        if min_tokens > max_tokens:
            raise HTTPError(400, f"min_tokens must be less than or equal to max_tokens={max_tokens}, got "
                                 f"{min_tokens}.", param="min_tokens")
        ignore_eos = bool(req.get("ignore_eos", False))
        # output length: forced by ignore_eos, else a sampled natural stop, at least min_tokens, at most max_tokens
        if ignore_eos:
            n_out, reason = max_tokens, "length"
        else:
            natural = self._natural_length()
            if natural < max_tokens:
                n_out, reason = max(natural, min_tokens), "stop"
                if n_out >= max_tokens:
                    n_out, reason = max_tokens, "length"
            else:
                n_out, reason = max_tokens, "length"
        out_ids = self.word_ids[self.rng.integers(0, len(self.word_ids), n_out)].tolist()
        self._n += 1
        rid = uuid.uuid4().hex
        xrid = headers.get("x-request-id") or rid
        fault = self._fault()
        if fault in ("429", "500", "503"):
            code = int(fault)
            msg, typ = {429: ("Too Many Requests (vk-serve injected fault)", "TooManyRequestsError"),
                        500: ("Internal Server Error (vk-serve injected fault)", "InternalServerError"),
                        503: ("Service Unavailable (vk-serve injected fault)", "ServiceUnavailableError")}[code]
            self.stats.errors[code] = self.stats.errors.get(code, 0) + 1
            conn.respond(code, error_body(code, msg, typ), extra=b"x-request-id: %s\r\n" % xrid.encode())
            return
        sink_cls = StreamSink if stream else FullSink
        sink = sink_cls(self, conn, chat, rid, xrid, so, req)
        seq = Seq(rid, prompt_ids, out_ids, reason, sink)
        seq.t_arrival = conn.t_recv or time.monotonic()
        if fault == "disconnect":
            sink.disconnect_at = max(1, n_out // 2)
        elif fault == "malformed":
            sink.malformed_at = max(1, (n_out + 1) // 2)
        conn.active = seq
        if fault == "stall":
            seq.handle = self.loop.call_later(self.opts.stall_seconds, self._start, seq)
        else:
            self._start(seq)

    def _start(self, seq: Seq) -> None:
        if seq.aborted:
            return
        if seq.handle is not None:  # after a stall: the request arrives at the engine now
            seq.handle = None
            seq.t_arrival = time.monotonic()
        seq.sink.start(seq)
        self.sched.add(seq)

    def _natural_length(self) -> int:
        mean, sigma = self.opts.stop_mean, self.opts.stop_sigma
        if sigma <= 0:
            return max(1, int(round(mean)))
        mu = np.log(mean) - sigma * sigma / 2
        return max(1, int(self.rng.lognormal(mu, sigma)))

    def _fault(self) -> str | None:
        o = self.opts
        u = self.fault_rng.random()
        for name, p in (("429", o.fault_429), ("500", o.fault_500), ("503", o.fault_503),
                        ("stall", o.fault_stall), ("disconnect", o.fault_disconnect),
                        ("malformed", o.fault_malformed)):
            if u < p:
                return name
            u -= p
        return None

    def _chat_prompt(self, req: dict) -> list[int]:
        msgs = req.get("messages")
        if msgs is None:
            raise HTTPError(400, "Field required: 'messages'", param="messages")
        if not isinstance(msgs, list) or not msgs:
            raise HTTPError(400, "'messages' must be a non-empty list of messages", param="messages")
        flat = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise HTTPError(400, f"messages[{i}] must be an object with a 'role'", param="messages")
            c = m.get("content")
            if isinstance(c, list):
                parts = []
                for p in c:
                    if isinstance(p, dict) and p.get("type") == "text":
                        parts.append(str(p.get("text", "")))
                    elif isinstance(p, str):
                        parts.append(p)
                    else:
                        raise HTTPError(400, f"messages[{i}].content: only text parts are supported",
                                        param="messages")
                m = {**m, "content": "".join(parts)}
            elif c is not None and not isinstance(c, str):
                raise HTTPError(400, f"messages[{i}].content must be a string or a list of parts",
                                param="messages")
            flat.append(m)
        agp = req.get("add_generation_prompt", True)
        if self.tok.has_chat_template:
            try:
                text = self.tok.apply_chat_template(flat, add_generation_prompt=bool(agp))
            except Exception as e:  # noqa: BLE001 - a template error is the client's bad request
                raise HTTPError(400, f"chat template: {e}", param="messages") from None
        else:
            text = "".join(f"{m['role']}: {m.get('content') or ''}\n" for m in flat) + ("assistant: " if agp else "")
        return self.tok.encode(text)

    def _completion_prompt(self, req: dict) -> list[int]:
        p = req.get("prompt")
        if p is None:
            raise HTTPError(400, "Field required: 'prompt'", param="prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]
        if isinstance(p, str):
            ids = self.tok.encode(p)
        elif isinstance(p, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in p):
            ids = list(p)
        else:
            raise HTTPError(400, "'prompt' must be a string or a list of token ids (one prompt)", param="prompt")
        if not ids:
            raise HTTPError(400, "The prompt is empty", param="prompt")
        return ids

    # -- metrics ----------------------------------------------------------------------------------------------
    def metrics(self) -> str:
        s, sch = self.stats, self.sched
        lab = f'model_name="{self.opts.model}",engine="0"'
        usage = sch.kv_usage()
        out = []

        def g(name, kind, help_, value, labels=lab):
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            out.append(f"{name}{{{labels}}} {value}")

        g("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.", sch.running)
        g("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.", sch.waiting)
        g("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.", usage)
        g("vllm:gpu_cache_usage_perc", "gauge", "GPU KV-cache usage. 1 means 100 percent usage.", usage)
        g("vllm:prefix_cache_queries_total", "counter", "Prefix cache queries, in terms of number of queried "
          "tokens.", s.prefix_queries)
        g("vllm:prefix_cache_hits_total", "counter", "Prefix cache hits, in terms of number of cached tokens.",
          s.prefix_hits)
        g("vllm:gpu_prefix_cache_queries_total", "counter", "GPU prefix cache queries, in terms of number of "
          "queried tokens.", s.prefix_queries)
        g("vllm:gpu_prefix_cache_hits_total", "counter", "GPU prefix cache hits, in terms of number of cached "
          "tokens.", s.prefix_hits)
        g("vllm:num_preemptions_total", "counter", "Cumulative number of preemption from the engine.",
          s.preemptions)
        g("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.", s.prompt_tokens)
        g("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.", s.generation_tokens)
        out.append("# HELP vllm:request_success_total Count of successfully processed requests.")
        out.append("# TYPE vllm:request_success_total counter")
        for reason, v in s.success.items():
            out.append(f'vllm:request_success_total{{{lab},finished_reason="{reason}"}} {v}')
        for name, h, help_ in (
            ("vllm:time_to_first_token_seconds", s.ttft, "Histogram of time to first token in seconds."),
            ("vllm:time_per_output_token_seconds", s.tpot, "Histogram of time per output token in seconds."),
            ("vllm:e2e_request_latency_seconds", s.e2e, "Histogram of e2e request latency in seconds."),
            ("vllm:request_queue_time_seconds", s.queue, "Histogram of time spent in WAITING phase for request."),
            ("vllm:request_prompt_tokens", s.prompt_hist, "Number of prefill tokens processed."),
            ("vllm:request_generation_tokens", s.gen_hist, "Number of generation tokens processed."),
            ("vk_serve_step_lag_seconds", s.step_lag, "Lateness of step ends versus the model (vk-serve extension)."),
        ):
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} histogram")
            out.extend(h.lines(name, lab))
        if self.mode == "engine":
            c = self.cfg
            out.append("# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig")
            out.append("# TYPE vllm:cache_config_info gauge")
            out.append(f'vllm:cache_config_info{{block_size="{c.block_size}",num_gpu_blocks="{c.num_blocks}",'
                       f'enable_prefix_caching="{c.enable_prefix_caching}"}} 1.0')
        out.append("# HELP vk_serve_steps_total Engine steps simulated (vk-serve extension).")
        out.append("# TYPE vk_serve_steps_total counter")
        out.append(f"vk_serve_steps_total {s.steps}")
        out.append("# HELP vk_serve_step_lag_seconds_max Worst lateness of a step end versus the model "
                   "(vk-serve extension).")
        out.append("# TYPE vk_serve_step_lag_seconds_max gauge")
        out.append(f"vk_serve_step_lag_seconds_max {s.step_lag_max}")
        out.append("# HELP vk_serve_step_lag_seconds_mean Mean lateness of a step end versus the model.")
        out.append("# TYPE vk_serve_step_lag_seconds_mean gauge")
        out.append(f"vk_serve_step_lag_seconds_mean {s.step_lag_sum / s.step_lag_n if s.step_lag_n else 0.0}")
        return "\n".join(out) + "\n"


class StreamSink:
    """Writes a streamed response (SSE over chunked transfer encoding) as tokens come out of the engine."""

    __slots__ = ("app", "conn", "chat", "rid", "xrid", "include_usage", "continuous", "ts", "head", "tail",
                 "tail_end", "disconnect_at", "malformed_at", "started")

    def __init__(self, app: App, conn: Conn, chat: bool, rid: str, xrid: str, so: dict, req: dict):
        self.app = app
        self.conn = conn
        self.chat = chat
        self.rid = ("chatcmpl-" if chat else "cmpl-") + rid
        self.xrid = xrid
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
        self.disconnect_at = 0
        self.malformed_at = 0
        self.started = False

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
            parts.append(_chunk(ev + b"}\n\n"))
        if n == self.malformed_at:
            parts.append(_chunk(self.head + b'"broken\n\n'))
        ev = self.head + self.app.words.json[seq.out_ids[n - 1]]
        ev += self.tail_end % seq.finish_reason.encode() if n == seq.out_target else self.tail
        if self.continuous:
            ev += self._usage(seq, False)
        if self.ts:
            ev += b',"vk_server_time":%.6f' % time.time()
        parts.append(_chunk(ev + b"}\n\n"))
        self.conn.write(b"".join(parts) if len(parts) > 1 else parts[0])
        if n == self.disconnect_at and n < seq.out_target:
            self.conn.abort_connection()

    def on_finish(self, seq: Seq, now: float) -> None:
        parts = []
        if self.include_usage:
            ev = self.head[: self.head.index(b'"choices":[') + 11] + b"]" + self._usage(seq, True)
            if self.ts:
                ev += b',"vk_server_time":%.6f' % time.time()
            parts.append(_chunk(ev + b"}\n\n"))
        parts.append(_chunk(b"data: [DONE]\n\n"))
        parts.append(b"0\r\n\r\n")
        self.conn.write(b"".join(parts))
        self.conn.response_done()


class FullSink:
    """Collects a non-streamed response and writes it as one JSON body when the request finishes."""

    __slots__ = ("app", "conn", "chat", "rid", "xrid", "disconnect_at", "malformed_at", "started")

    def __init__(self, app: App, conn: Conn, chat: bool, rid: str, xrid: str, so: dict, req: dict):
        self.app = app
        self.conn = conn
        self.chat = chat
        self.rid = ("chatcmpl-" if chat else "cmpl-") + rid
        self.xrid = xrid
        self.disconnect_at = 0
        self.malformed_at = 0
        self.started = False

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


class Conn(asyncio.Protocol):
    """One HTTP/1.1 connection: parses requests (pipelined ones queue up) and writes responses."""

    def __init__(self, app: App):
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
        self.write(_http_response(code, body, ctype, self.close_after, extra))
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
                body, end = _parse_chunked(buf, start)
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


def _parse_chunked(buf: bytearray, pos: int):
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


def serve(host: str = "127.0.0.1", port: int = 8000, *, ready=None, **options) -> None:
    """Run vk-serve until interrupted (blocking). Prints the base URL as the first stdout line once listening.

    ``options`` are the fields of :class:`Options` (``ttft``, ``tpot``, ``profile``, ``num_blocks``, ...).
    ``ready(url)``, if given, is called instead of printing.
    """
    unknown = set(options) - set(Options.__dataclass_fields__)
    if unknown:
        raise TypeError(f"serve(): unknown options {sorted(unknown)}")
    opts = Options(host=host, port=port, **options)
    raise_fd_limit()
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        app = App(opts, loop)
        # Long-lived objects (tokenizer, vocabulary tables) leave the cyclic GC's view; fewer, later collections
        # keep pauses out of the step timing.
        gc.collect()
        gc.freeze()
        gc.set_threshold(50000, 50, 100)
        server = loop.run_until_complete(loop.create_server(lambda: Conn(app), host, port, backlog=4096,
                                                            reuse_address=True))
        bound = server.sockets[0].getsockname()[1]
        url = f"http://{host}:{bound}/v1"
        if ready is not None:
            ready(url)
        else:
            print(url, flush=True)
        stop = loop.create_future()
        import signal

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
                pass
        loop.run_until_complete(stop)
        server.close()
    finally:
        loop.close()
        asyncio.set_event_loop(None)


def raise_fd_limit() -> None:
    """Thousands of concurrent streams need more than the usual 1,024 open files: raise the soft limit."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = hard if hard != resource.RLIM_INFINITY else 1 << 20
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, 1 << 20), hard))
    except (ImportError, ValueError, OSError):
        pass


def pin_to_cpu(cpu: int) -> None:
    """Pin this process to one core (bench)."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})
