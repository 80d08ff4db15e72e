"""The session engine of one worker: one event loop, sessions on absolute deadlines, one record per request.

A worker receives scheduled sessions (already validated, in start order) from an ``asyncio.Queue`` and:

- open loop: starts each session at ``run start + start`` (absolute deadlines through ``clock.Deadlines``, so
  there is no drift from relative sleeps and no millisecond timer granularity);
- closed loop: keeps ``slots`` sessions active, with an optional ramp-up (slot i opens at i * ramp_up / slots)
  and rate limit (at most ``rate_limit`` session starts per second);
- within a session: a request is ready when all its parents completed; it is intended at the latest parent's
  completion plus its think time (roots: session start plus think time); a failed parent makes it ``skipped``;
- builds the conversation from the history parent's conversation and the text the server actually returned.

Records go to ``emit(dict)``; the caller writes them (in-process) or ships them to the parent process.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vk import __version__
from vk.records import STATUS_CANCELLED, STATUS_ERROR, STATUS_OK, STATUS_SKIPPED, new_response
from vk.send import tasks
from vk.send.answer import interpret
from vk.send.apis import adapter_for
from vk.send.clock import Deadlines, RunClock
from vk.send.rawhttp import Exchange, RawClient
from vk.send.tls import make_context, sni_host

_mono = time.monotonic

LOOKAHEAD = 1.0  # seconds: how early an open-loop session is taken from the queue before its start
PARSE_GUARD = 0.0006  # seconds: a finished response is parsed only when no dispatch is due sooner than this
PARSE_WAIT_MAX = 0.02  # seconds: ... but never postponed longer than this

# fields of the input records that vk-send interprets; every other field is copied into the response
_SS_KNOWN = {"kind", "v", "index", "start", "warmup", "session"}
_SESSION_KNOWN = {"kind", "v", "id", "requests", "source", "trace_time"}
_REQUEST_KNOWN = {"id", "parents", "history", "think_time", "messages", "prompt", "input_tokens", "prefix_tokens",
                  "output_tokens", "output_control", "params", *tasks.CONTENT_FIELDS}


@dataclass
class Config:
    """Everything a worker needs (plain data, so it crosses into worker processes)."""

    run_id: str
    api: str
    scheme: str
    host: str
    port: int
    path: str  # full request path, e.g. /v1/chat/completions
    endpoint: str = "chat"
    model: str | None = None
    stream: bool = True
    api_key: str | None = None
    headers: list = field(default_factory=list)  # [(name, value)]
    extra_body: dict | None = None
    timeout: float | None = None
    first_byte_timeout: float | None = None
    idle_timeout: float | None = None
    cacert: str | None = None
    insecure: bool = False
    save_text: bool = False
    continuous_usage: bool = False
    max_tokens_param: str = "max_tokens"
    min_tokens_param: str = "min_tokens"
    ignore_eos_param: str = "ignore_eos"
    client: str = "raw"
    http2: bool = False
    kernel_timestamps: bool = True
    mode: str = "open"
    concurrency: int = 1
    ramp_up: float = 0.0
    rate_limit: float | None = None
    duration: float | None = None
    worker: int = 0
    workers: int = 1
    api_style: str = "openai"  # vk.send.apis: how requests are built and answers read


class _Sess:
    __slots__ = ("ss", "sess", "index", "warmup", "t_start", "reqs", "pos", "children", "indeg", "status",
                 "t_done", "conv", "keep_conv", "pending", "fut", "pool", "extra", "recorded", "launched")

    def __init__(self, ss: dict, t_start: float, pool, loop):
        self.ss = ss
        sess = ss["session"]
        self.sess = sess
        self.index = ss.get("index")
        self.warmup = bool(ss.get("warmup", False))
        self.t_start = t_start
        reqs = sess["requests"]
        self.reqs = {r["id"]: r for r in reqs}
        self.pos = {r["id"]: i for i, r in enumerate(reqs)}
        self.children: dict[str, list[str]] = {r["id"]: [] for r in reqs}
        self.indeg = {}
        self.keep_conv = set()
        for r in reqs:
            ps = r.get("parents") or []
            self.indeg[r["id"]] = len(ps)
            for p in ps:
                self.children[p].append(r["id"])
            h = r.get("history")
            if h:
                self.keep_conv.add(h)
        self.status: dict[str, str] = {}
        self.t_done: dict[str, float] = {}
        self.conv: dict[str, Any] = {}
        self.pending = len(reqs)
        self.fut = loop.create_future()
        self.pool = pool
        self.recorded: set[str] = set()
        self.launched: set[str] = set()
        extra = {k: v for k, v in ss.items() if k not in _SS_KNOWN}
        for k, v in sess.items():
            if k not in _SESSION_KNOWN:
                extra[k] = v
        self.extra = extra


class Engine:
    def __init__(self, cfg: Config, clock: RunClock, loop: asyncio.AbstractEventLoop, emit: Callable[[dict], None]):
        self.cfg = cfg
        self.clock = clock
        self.loop = loop
        self.emit = emit
        self.deadlines = Deadlines(loop)
        self.stopping = False
        self.stop_reason: str | None = None
        self.t_stop: float | None = None
        self.tasks: set[asyncio.Task] = set()
        self.active: set[_Sess] = set()
        self.sessions_started = 0
        self.sessions_done = 0
        self.sessions_not_started = 0
        self.inflight = 0
        self.duration_reached = False
        self.completions = cfg.endpoint == "completions"  # (invoke: Bedrock's other operation, chat messages)
        self.adapter = adapter_for(cfg)
        self.client = self._make_client()
        self.run_short = cfg.run_id.replace("-", "")[:8]
        self._wake_stop = loop.create_future()
        self._idle: asyncio.Future | None = None  # set once the input ended and no session is active

    # ---------------------------------------------------------------------------------------------------------
    def _http_headers(self) -> dict[str, str]:
        return http_headers(self.cfg, self.adapter)

    def _make_client(self):
        cfg = self.cfg
        h = self._http_headers()
        label = client_label(cfg)
        if label != "raw":
            from vk.send.altclient import AiohttpClient, HttpxClient

            host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host  # an IPv6 literal keeps its brackets
            url = f"{cfg.scheme}://{host}:{cfg.port}{cfg.path}"
            cls = HttpxClient if label == "httpx" else AiohttpClient
            return cls(url, h, http2=cfg.http2, ssl_context=tls_context(cfg, label), idle_timeout=cfg.idle_timeout)
        user_host = h.pop("Host", None)
        client = RawClient(self.loop, self.clock, cfg.host, cfg.port, kernel_timestamps=cfg.kernel_timestamps,
                           ssl_context=tls_context(cfg, label), idle_timeout=cfg.idle_timeout,
                           server_hostname=sni_host(user_host) if user_host else None)
        default_port = 443 if cfg.scheme == "https" else 80
        hostport = cfg.host if cfg.port == default_port else f"{cfg.host}:{cfg.port}"
        if ":" in cfg.host:
            hostport = f"[{cfg.host}]" if cfg.port == default_port else f"[{cfg.host}]:{cfg.port}"
        lines = [f"POST {cfg.path} HTTP/1.1", f"Host: {user_host or hostport}"]
        lines += [f"{k}: {v}" for k, v in h.items()]
        self._head_prefix = ("\r\n".join(lines) + "\r\n").encode("latin-1")
        return client

    # ---------------------------------------------------------------------------------------------------------
    def request_stop(self, reason: str) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.stop_reason = reason
        self.t_stop = _mono()
        if not self._wake_stop.done():
            self._wake_stop.set_result(None)

    async def run(self, queue: asyncio.Queue) -> None:
        """Run every session from ``queue`` (None ends it), then return after everything is recorded."""
        housekeeping = self.loop.create_task(self._housekeeping())
        try:
            if self.cfg.mode == "closed":
                feeder = self.loop.create_task(self._feed_closed(queue))
            else:
                feeder = self.loop.create_task(self._feed_open(queue))
            await asyncio.wait([feeder, self._wake_stop], return_when=asyncio.FIRST_COMPLETED)
            if not feeder.done():
                feeder.cancel()
                try:
                    await feeder
                except (asyncio.CancelledError, Exception):  # noqa: BLE001
                    pass
            elif feeder.exception() is not None:
                raise feeder.exception()
            # wait for the active sessions to finish (or the stop signal)
            if self.active and not self.stopping:
                self._idle = self.loop.create_future()
                await asyncio.wait([self._idle, self._wake_stop], return_when=asyncio.FIRST_COMPLETED)
            if self.stopping:
                await self._cancel_all()
        finally:
            housekeeping.cancel()
            await self.client.close()
            self.deadlines.close()

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.clock.refresh()
            # The collector is off during the run (a collection would stall the loop for milliseconds); the hot
            # path makes no reference cycles, so memory stays flat without it. Safety valve for pathological
            # cases only (millions of surviving tracked objects).
            if gc.get_count()[0] > 5_000_000:
                gc.collect(0)

    async def _cancel_all(self) -> None:
        tasks = list(self.tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for s in list(self.active):
            if s.t_start > self.t_stop:
                # not started yet: nothing was sent
                self.sessions_not_started += 1
                self.sessions_started -= 1
                self.active.discard(s)
                continue
            for rid in s.reqs:
                if rid not in s.recorded:
                    self._record_unsent(s, rid, STATUS_CANCELLED, "not sent: the run was stopped")
            self._session_end(s)

    # ---------------------------------------------------------------------------------------------------------
    async def _feed_open(self, queue: asyncio.Queue) -> None:
        mono0 = self.clock.mono0
        while True:
            ss = await queue.get()
            if ss is None:
                return
            t_start = mono0 + ss["start"]
            early = t_start - LOOKAHEAD
            if early > _mono():
                await self.deadlines.sleep_until(early)
            if self.stopping:
                return
            self._start_session(ss, t_start)

    async def _feed_closed(self, queue: asyncio.Queue) -> None:
        cfg = self.cfg
        slots = max(1, cfg.concurrency)
        self._next_start = self.clock.mono0
        if self.clock.mono0 > _mono():
            await self.deadlines.sleep_until(self.clock.mono0)  # nothing starts before the run does
        self._queue_done = False
        runners = [self.loop.create_task(self._slot(queue, i, slots)) for i in range(slots)]
        await asyncio.gather(*runners)

    async def _slot(self, queue, i: int, slots: int) -> None:
        """One closed-loop slot: run sessions back to back; each is intended when its slot became free."""
        cfg = self.cfg
        mono0 = self.clock.mono0
        t_open = mono0 + (cfg.ramp_up * i / slots if cfg.ramp_up else 0.0)
        if t_open > _mono():
            await self.deadlines.sleep_until(t_open)
        while not self.stopping and not self._queue_done:
            waited = queue.empty()
            ss = await queue.get()
            if ss is None:
                self._queue_done = True
                queue.put_nowait(None)  # let the other slots see the end too
                return
            now = _mono()
            if cfg.duration is not None and now - mono0 >= cfg.duration:
                self._queue_done = True
                self.duration_reached = True
                return
            # intended: when the slot opened, unless the input itself kept us waiting
            t_start = now if waited else min(t_open, now)
            if cfg.rate_limit:
                t_start = max(t_start, self._next_start)
                self._next_start = t_start + 1.0 / cfg.rate_limit
                if t_start > _mono():
                    await self.deadlines.sleep_until(t_start)
                    if self.stopping:
                        return
            s = self._start_session(ss, t_start)
            await s.fut
            t_open = max(s.t_done.values()) if s.t_done else _mono()

    def _start_session(self, ss: dict, t_start: float) -> _Sess:
        s = _Sess(ss, t_start, self.client.new_pool(), self.loop)
        self.active.add(s)
        self.sessions_started += 1
        for rid, r in s.reqs.items():
            if s.indeg[rid] == 0:
                self._launch(s, r, t_start + (r.get("think_time") or 0.0))
        return s

    def _launch(self, s: _Sess, r: dict, t_intended: float) -> None:
        s.launched.add(r["id"])
        task = self.loop.create_task(self._request(s, r, t_intended))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _session_end(self, s: _Sess) -> None:
        if s in self.active:
            self.active.discard(s)
            self.sessions_done += 1
            self.client.release_pool(s.pool)
            s.conv.clear()
            if not s.fut.done():
                s.fut.set_result(None)
            if not self.active and self._idle is not None and not self._idle.done():
                self._idle.set_result(None)

    def _request_done(self, s: _Sess, rid: str, status: str, t_done: float) -> None:
        s.status[rid] = status
        s.t_done[rid] = t_done
        s.pending -= 1
        if not self.stopping:
            for c in s.children[rid]:
                s.indeg[c] -= 1
                if s.indeg[c] == 0:
                    r = s.reqs[c]
                    ps = r.get("parents") or []
                    bad = [p for p in ps if s.status.get(p) != STATUS_OK]
                    if bad:
                        self._record_unsent(s, c, STATUS_SKIPPED,
                                            f"parent request {bad[0]!r} did not succeed ({s.status.get(bad[0])})")
                        continue
                    t_ready = max(s.t_done[p] for p in ps)
                    self._launch(s, r, t_ready + (r.get("think_time") or 0.0))
        if s.pending == 0:
            self._session_end(s)

    def _record_unsent(self, s: _Sess, rid: str, status: str, error: str) -> None:
        r = s.reqs[rid]
        rec = self._base_record(s, r, status)
        rec["error"] = error
        rec["t_done"] = round(_mono() - self.clock.mono0, 7)
        s.recorded.add(rid)
        self.emit(rec)
        self._request_done(s, rid, status, _mono())

    def _base_record(self, s: _Sess, r: dict, status: str) -> dict:
        rec = new_response(self.cfg.run_id, s.sess["id"], r["id"], status, session_index=s.index,
                           warmup=s.warmup, worker=self.cfg.worker,
                           target_input_tokens=r.get("input_tokens"), target_output_tokens=r.get("output_tokens"),
                           target_prefix_tokens=r.get("prefix_tokens"))
        for k, v in s.extra.items():
            if k not in rec:
                rec[k] = v
        for k, v in r.items():
            if k not in _REQUEST_KNOWN and k not in rec:
                rec[k] = v
        if tasks.is_task_request(r):
            rec.update(tasks.record_fields(r))
        return rec

    # ---------------------------------------------------------------------------------------------------------
    def _conversation(self, s: _Sess, r: dict):
        """The content to send: history parent's full conversation, then this request's new content."""
        h = r.get("history")
        if self.completions:
            new = r.get("prompt")
            if new is None:  # chat content sent to a completions endpoint: join the message texts
                new = "\n".join(str(m.get("content", "")) for m in r.get("messages") or [])
            return (s.conv.get(h, "") + new) if h else new
        new = r.get("messages")
        if new is None:
            new = [{"role": "user", "content": r.get("prompt", "")}]
        return (s.conv.get(h, []) + new) if h else new

    def _body(self, r: dict, content) -> bytes:
        return self.adapter.body(r, content)

    async def _request(self, s: _Sess, r: dict, t_intended: float) -> None:
        try:
            await self._request_inner(s, r, t_intended)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a bug must cost one record, never hang the run
            rid = r["id"]
            if rid not in s.recorded:
                self._record_unsent(s, rid, STATUS_ERROR, f"vk-send internal error: {type(e).__name__}: {e}")
            elif rid not in s.status:
                self._request_done(s, rid, STATUS_ERROR, _mono())

    async def _request_inner(self, s: _Sess, r: dict, t_intended: float) -> None:
        if t_intended > _mono():
            try:
                await self.deadlines.sleep_until(t_intended)
            except asyncio.CancelledError:
                return  # recorded as not sent by _cancel_all
        t_dispatched = _mono()
        rid = r["id"]
        cfg = self.cfg
        head_prefix = getattr(self, "_head_prefix", b"")  # set only for the raw client
        if tasks.is_task_request(r):  # embeddings, rerank, images, speech: own path and body (vk.send.tasks)
            if not isinstance(self.client, RawClient):
                self._record_unsent(s, rid, STATUS_ERROR, f"not sent: {r['task']} requests go with the default "
                                                          "client (--client raw)")
                return
            content = ""
            body = tasks.request_body(r, cfg.model)
            head_prefix = tasks.head_prefix(head_prefix, cfg.path, tasks.request_path(cfg.path, r))
        else:
            content = self._conversation(s, r)
            body = self._body(r, content)
        xrid = f"vk-{self.run_short}-{s.index}-{s.pos[rid]}"
        # a signature or fresh token for this body (most styles: none; task requests go unsigned to their own path)
        signed = None if content == "" and tasks.is_task_request(r) else self.adapter.sign(body)
        ex = Exchange()
        self.inflight += 1
        try:
            if isinstance(self.client, RawClient):
                head = head_prefix + f"X-Request-Id: {xrid}\r\nContent-Length: {len(body)}\r\n".encode()
                if signed:
                    head += "".join(f"{k}: {v}\r\n" for k, v in signed.items()).encode("latin-1")
                await self.client.request(s.pool, ex, head + b"\r\n", body, cfg.first_byte_timeout, cfg.timeout)
            else:
                await self.client.request(s.pool, ex, xrid, body, cfg.first_byte_timeout, cfg.timeout,
                                          extra_headers=signed)
        except asyncio.CancelledError:
            ex.fail(STATUS_CANCELLED, "cancelled: the run was stopped while the request was in flight")
            if ex.t_done is None:
                ex.t_done = _mono()
        finally:
            self.inflight -= 1
        if self.deadlines.heap and not self.stopping:
            await self._quiet_moment()
        status, text = self._finish_record(s, r, ex, t_intended, t_dispatched, xrid)
        if rid in s.keep_conv and status == STATUS_OK:
            if self.completions:
                s.conv[rid] = content + text
            else:
                s.conv[rid] = content + [{"role": "assistant", "content": text}]
        self._request_done(s, rid, status, ex.t_done)

    async def _quiet_moment(self) -> None:
        """Wait until no dispatch is due within PARSE_GUARD, so that parsing a finished response (a few hundred
        microseconds for a long stream) never makes a scheduled request late; gives up after PARSE_WAIT_MAX."""
        heap = self.deadlines.heap
        give_up = _mono() + PARSE_WAIT_MAX
        while heap:
            d = heap[0][0]
            now = _mono()
            if d - now > PARSE_GUARD or now > give_up:
                return
            try:
                await self.deadlines.sleep_until(d + 1e-6)
            except asyncio.CancelledError:
                return

    def _finish_record(self, s: _Sess, r: dict, ex: Exchange, t_intended, t_dispatched, xrid) -> tuple[str, str]:
        mono0 = self.clock.mono0
        if tasks.is_task_request(r):
            verdict = tasks.interpret_answer(ex, r, self.clock)
        else:
            verdict = interpret(ex, self.cfg.stream, self.completions, self.clock, self.adapter)
        status = verdict["status"]
        error = verdict["error"]
        parsed = verdict["parsed"]
        text = parsed["text"] if parsed is not None else ""
        rec = self._base_record(s, r, status)
        rec["http_status"] = ex.status
        rec["error"] = error

        def rel(x):
            return None if x is None else round(x - mono0, 7)

        rec["t_intended"] = rel(t_intended)
        rec["t_dispatched"] = rel(t_dispatched)
        rec["t_sent"] = rel(ex.t_sent)
        rec["t_first_byte"] = rel(ex.t_first_byte)
        if parsed is not None:
            rec["t_first_token"] = rel(parsed["t_first_token"])
            rec["t_first_content"] = rel(parsed["t_first_content"])
            rec["t_last_token"] = rel(parsed["t_last_token"])
        else:
            rec["t_first_token"] = rec["t_first_content"] = rec["t_last_token"] = None
        rec["t_done"] = rel(ex.t_done)
        if parsed is not None:
            rec["events"] = parsed["events"]
            rec["usage"] = parsed["usage"]
            rec["finish_reason"] = parsed["finish_reason"]
        else:
            rec["events"] = {"t": [], "kind": ""}
            rec["usage"] = None
            rec["finish_reason"] = None
        rec["x_request_id"] = xrid
        if parsed is not None and parsed.get("fields"):  # a task's own figures (vk.send.tasks)
            rec.update(parsed["fields"])
        rec["attempts"] = ex.attempts or 1
        rec["protocol"] = ex.protocol
        if verdict["warning"]:
            rec["warning"] = verdict["warning"]
        # the server's own id: the response's id field (chatcmpl-...), else an x-request-id header not ours
        sid = parsed["server_id"] if parsed else None
        if sid is None:
            hid = ex.headers.get("x-request-id")
            sid = hid if hid and hid != xrid else None
        rec["server_request_id"] = sid
        if self.cfg.save_text:
            rec["text"] = text
            if parsed is not None and parsed.get("reasoning_text"):
                rec["reasoning_text"] = parsed["reasoning_text"]
        s.recorded.add(r["id"])
        self.emit(rec)
        return status, text


# ------------------------------------------------------------------------------------------------------------
# what runs: the client, its headers and TLS (public: the run header says the same)


def client_label(cfg: Config) -> str:
    """The client that actually runs: raw (http and https), aiohttp, or httpx (asked for, or for --http2)."""
    if cfg.http2 or cfg.client == "httpx":
        return "httpx"
    return cfg.client


def http_headers(cfg: Config, adapter=None) -> dict[str, str]:
    """The request headers: defaults, the API style's (authentication, version), then the user's (-H) replacing
    any of the same name, whatever its case (a user ``Host`` replaces the URL's host; ``Accept-Encoding: gzip``
    replaces ``identity``)."""
    adapter = adapter or adapter_for(cfg)
    h = {"Content-Type": "application/json", "User-Agent": f"vk-send/{__version__}",
         "Accept-Encoding": "identity"}
    if cfg.stream:
        h["Accept"] = adapter.media_type
    h.update(adapter.headers())
    canon = {k.lower(): k for k in h}
    for k, v in cfg.headers:
        old = canon.get(k.lower())
        if old is not None:
            del h[old]
        if k.lower() == "host":
            k = "Host"
        h[k] = v
        canon[k.lower()] = k
    return h


def tls_context(cfg: Config, label: str):
    """The ``SSLContext`` for https (None for http); ALPN http/1.1 except for httpx, which sets its own."""
    if cfg.scheme != "https":
        return None
    return make_context(cfg.cacert, cfg.insecure, alpn=None if label == "httpx" else ["http/1.1"])
