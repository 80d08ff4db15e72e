"""vk-serve's request handling: options, routes, completion requests (validation, prompt counting, output
lengths, faults) and the intake that yields to the engine's step timers."""

from __future__ import annotations

import random
import sys
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import orjson

from vk import __version__
from vk.serve import tasks
from vk.serve.apis import STYLE_MARK, protocol_for
from vk.serve.chat import chat_renderer, no_template_note
from vk.serve.connection import Conn, HTTPError, error_body
from vk.serve.engine import FixedLatency, Seq, Stats
from vk.serve.metrics import exposition
from vk.serve.prompts import (
    INLINE_BYTES,
    PromptWorker,
    add_special_tokens,
    count_tokens,
    encode,
    prepare,
    too_long,
    upper_bound,
)
from vk.serve.sinks import FullSink, StreamSink
from vk.serve.textgen import words_for

FIXED_MAX_MODEL_LEN = 1 << 20  # fixed-latency mode's context window unless --max-model-len: no limit in practice


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
    tls_cert: str | None = None  # PEM certificate (chain) and key: serve https (for vk-send's https tests/bench)
    tls_key: str | None = None
    reasoning_tokens: int = 0  # chat outputs start with this many reasoning tokens (delta.reasoning_content)
    max_body_bytes: int = 32 * 1024 * 1024  # larger request bodies get 413
    idle_timeout: float = 5.0  # seconds a connection may wait between requests or inside one (uvicorn's, for vLLM)
    api_style: str = "openai"  # also speak this provider's API (vk.serve.apis)
    encoder_fixed: float = 0.002  # embeddings/rerank: seconds per request, plus encoder_token per token (tasks.py)
    encoder_token: float = 0.00002
    image_megapixel: float = 0.5  # image generation: seconds per megapixel on the one diffusion queue
    speech_ttfb: float = 0.05  # speech: seconds to the first audio bytes
    speech_speed: float = 10.0  # speech: audio made this many times faster than real time
    extra: dict = field(default_factory=dict)


class App:
    """Request handling shared by all connections: validation, tokenization, sinks, faults, metrics."""

    def __init__(self, opts: Options, loop, worker: PromptWorker | None = None):
        from vk.tokenizer import load_tokenizer

        self.opts = opts
        self.loop = loop
        self.tok = load_tokenizer(opts.tokenizer)
        self.words = words_for(self.tok)
        self.word_ids = np.asarray(self.words.ids, dtype=np.int64)
        self.render = chat_renderer(self.tok)
        for note in (no_template_note(self.tok), self.words.note):
            if note:
                print(note, file=sys.stderr)
        self.tok.encode(self.render([{"role": "user", "content": "hi"}], True))  # compile the template now
        self.worker = worker
        if worker is not None:
            worker.wait_ready()
            worker.attach(loop)
        self.rng = np.random.default_rng(np.random.SeedSequence([opts.seed, 0x5E12]))
        self.fault_rng = random.Random(f"vk-serve-faults-{opts.fault_seed}")
        self.stats = Stats()
        self.created = int(time.time())
        self.start_time = time.time()
        if opts.ttft is not None or opts.tpot is not None:
            self.sched = FixedLatency(loop, opts.ttft or 0.0, opts.tpot or 0.0, self.stats, opts.max_num_seqs)
            self.max_model_len = opts.max_model_len or FIXED_MAX_MODEL_LEN
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
        self.conns: set[Conn] = set()
        if opts.idle_timeout > 0:
            self.loop.call_later(min(1.0, opts.idle_timeout / 2), self._close_idle)
        self.drain_scheduled = False
        self.sched.on_step = self._after_step
        self.protocol = protocol_for(opts.api_style, self)
        self.encoder = tasks.Encoder(opts.encoder_fixed, opts.encoder_token)
        self.painter = tasks.Encoder(0.0, 0.0)  # image generation's queue (vk.serve.tasks.handle_bytes)

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
        if step_deadline < now - 0.005:
            # The scheduler is behind (an overload): its times are lost already, and yielding to it at every turn
            # would starve the intake (and /metrics). Take turns of 1 ms.
            step_deadline = float("inf")
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

    def _close_idle(self) -> None:
        """Close connections with no response in progress that sent nothing for --idle-timeout seconds: idle
        keep-alive connections, and requests that stopped arriving halfway (headers or body)."""
        limit = time.monotonic() - self.opts.idle_timeout
        for conn in [c for c in self.conns if not c.busy and c.t_active < limit]:
            conn.closed = True
            conn.transport.close()
        self.loop.call_later(min(1.0, self.opts.idle_timeout / 2), self._close_idle)

    # -- routing ----------------------------------------------------------------------------------------------
    def handle(self, conn: Conn, method: str, path: str, headers: dict, body: bytes) -> None:
        target = path
        path = path.split("?", 1)[0]
        if len(path) > 1:
            path = path.rstrip("/")
        try:
            if self.protocol is not None and self.protocol.match(method, path):  # --api-style: its own route
                if method != "POST":
                    raise HTTPError(405, "Method Not Allowed")
                self.completion(conn, True, headers, self.protocol.translate(method, target, headers, body))
                return
            if path in ("/v1/chat/completions", "/v1/completions"):
                if method != "POST":
                    raise HTTPError(405, "Method Not Allowed")
                self.completion(conn, path == "/v1/chat/completions", headers, body)
                return
            if path in tasks.PATHS:  # embeddings, rerank, images, speech: their cost models
                tasks.handle(self, conn, method, path, body)
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
                conn.respond(200, exposition(self).encode(), b"text/plain; version=0.0.4; charset=utf-8")
            elif path == "/version":
                conn.respond(200, orjson.dumps({"version": f"vk-serve {__version__}"}))
            else:
                raise HTTPError(404, "Not Found")
        except HTTPError as e:
            self.reply_error(conn, e, path in ("/v1/chat/completions", "/v1/completions"))

    # -- completions ------------------------------------------------------------------------------------------
    def completion(self, conn: Conn, chat: bool, headers: dict, body: bytes) -> None:
        t_recv = conn.t_recv or time.monotonic()
        limit = self.max_model_len
        if self.worker is None or not self.worker.alive or len(body) <= INLINE_BYTES:
            req, prompt = prepare(chat, body, self.opts.model, self.render)
            if isinstance(prompt, list):
                ids = prompt
            elif upper_bound(prompt) <= limit:
                ids = encode(self.tok, prompt, add_special_tokens(chat, req))
            else:
                n, ids = count_tokens(self.tok, prompt, limit, True, add_special_tokens(chat, req))
                if n is None:
                    raise too_long(limit, None, chat)
            self._admit(conn, chat, headers, req, ids, len(ids), t_recv)
            return
        # A big body: parsed, templated and counted by the prompt worker, off the serving loop.
        state = {}

        def on_result(kind, *args) -> None:
            seq = state.get("seq")
            if seq is not None:  # started before its count: the count fills in its usage
                if seq.aborted or conn.closed:
                    return
                if kind == "counted":
                    self._counted(seq, args[0])
                else:  # the count failed after the tokens began (the worker died): end the stream honestly
                    conn.abort_connection()
                return
            if conn.closed or state.get("answered"):
                return
            try:
                if kind == "error":
                    raise args[0]
                if kind == "parsed":
                    req, bound, _exact = args
                    state["req"] = req
                    if self.mode == "fixed" and self._starts_uncounted(chat, req, bound):
                        state["answered"] = True
                        state["seq"] = self._admit(conn, chat, headers, req, None, None, t_recv)  # None: a fault
                    return
                state["answered"] = True
                count, ids = args
                if count is None:
                    raise too_long(limit, None, chat)
                self._admit(conn, chat, headers, state["req"], ids, count, t_recv)
            except HTTPError as e:
                state["answered"] = True
                self.reply_error(conn, e)
            except Exception as e:  # noqa: BLE001 - a bug must not kill the server
                state["answered"] = True
                conn.respond(500, error_body(500, f"internal error: {e!r}", "InternalServerError"))

        self.worker.submit(chat, body, limit, on_result)

    def _starts_uncounted(self, chat: bool, req: dict, bound: int) -> bool:
        """Fixed-latency mode starts a request before its prompt is counted when nothing it sends before the end
        depends on the count: an explicit max_tokens that fits beside any prompt of ``bound`` tokens, and no usage
        in every chunk. (Its usage waits for the count, if the count comes after the last token.)"""
        if tasks.IMAGE_KEY in req:  # the images' tokens join the count: wait for it
            return False
        max_tokens = req.get("max_completion_tokens") if chat else None
        if max_tokens is None:
            max_tokens = req.get("max_tokens", None if chat else 16)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            return False
        so = req.get("stream_options")
        if isinstance(so, dict) and so.get("continuous_usage_stats"):
            return False
        return bound + max_tokens <= self.max_model_len

    def _counted(self, seq: Seq, count: int) -> None:
        """The prompt of a request started uncounted has been counted."""
        seq.prompt_len = count
        self.stats.prompt_tokens += count
        if seq.done and not seq.aborted:
            self.stats.prompt_hist.observe(count)
            if seq.sink.finish_pending:
                seq.sink.finish_pending = False
                seq.sink.on_finish(seq, time.monotonic())

    def reply_error(self, conn: Conn, e: HTTPError, completion: bool = True) -> None:
        if completion:
            self.stats.count_response(e.code)
        if e.code in (404, 405) and e.type == "BadRequestError":
            conn.respond(e.code, orjson.dumps({"detail": e.message}))
        else:
            conn.respond(e.code, error_body(e.code, e.message, e.type, e.param))

    def _admit(self, conn: Conn, chat: bool, headers: dict, req: dict, prompt_ids, plen: int | None,
               t_recv: float) -> Seq | None:
        """Validate the rest of a request whose prompt is known (``plen`` None: not counted yet, see
        :meth:`_starts_uncounted`) and start it; the Seq, or None when it was answered at once (fault)."""
        images = req.pop(tasks.IMAGE_KEY, None)
        if images:  # vision: the images' tokens follow the text's (counted from their sizes)
            plen = None if plen is None else plen + sum(n for n, _ in images)
            if prompt_ids is not None:
                prompt_ids = list(prompt_ids) + tasks.image_ids(images, self.word_ids)
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
        room = self.max_model_len - (plen or 0)
        max_tokens = req.get("max_completion_tokens") if chat else None
        key = "max_completion_tokens"
        if max_tokens is None:
            max_tokens = req.get("max_tokens", None if chat else 16)
            key = "max_tokens"
        if max_tokens is not None:
            if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
                raise HTTPError(400, f"{key} must be an integer >= 1, got {max_tokens!r}", param=key)
        if plen is not None and (room <= 0 or (max_tokens is not None and max_tokens > room)):
            raise too_long(self.max_model_len, plen, chat, max_tokens)
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
        if fault is not None:
            self.stats.faults[fault] += 1
        if fault in ("429", "500", "503"):
            code = int(fault)
            msg, typ = {429: ("Too Many Requests (vk-serve injected fault)", "TooManyRequestsError"),
                        500: ("Internal Server Error (vk-serve injected fault)", "InternalServerError"),
                        503: ("Service Unavailable (vk-serve injected fault)", "ServiceUnavailableError")}[code]
            self.stats.count_response(code)
            conn.respond(code, error_body(code, msg, typ), extra=b"x-request-id: %s\r\n" % xrid.encode())
            return None
        sink_cls = self.protocol.sink_class(stream) if req.get(STYLE_MARK) else StreamSink if stream else FullSink
        sink = sink_cls(self, conn, chat, rid, xrid, so, req)
        seq = Seq(rid, prompt_ids, out_ids, reason, sink, plen)
        seq.t_arrival = t_recv
        if fault == "disconnect":
            sink.disconnect_at = max(1, n_out // 2)
        elif fault == "malformed":
            sink.malformed_at = max(1, (n_out + 1) // 2)
        conn.active = seq
        if fault == "stall":
            seq.handle = self.loop.call_later(self.opts.stall_seconds, self._start, seq)
        else:
            self._start(seq)
        return seq

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
