"""``send()``: run a schedule against an OpenAI-compatible API and write the run's records.

Layout of a run: the parent reads and validates the input, writes the ``run`` header, and either runs the engine
in-process (one worker) or forks ``workers`` processes, each with its own uvloop event loop, and shards sessions
to them by ``index % workers`` so a session stays on one worker and its keep-alive connection. All workers share
one start instant (CLOCK_MONOTONIC is system-wide). Response records come back through pipes and are written by
the parent, one flushed line each; the ``run_end`` footer carries totals, the dispatch-lag verdict and why the
run ended.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import gc
import io
import os
import queue
import signal
import socket
import stat
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from array import array
from collections.abc import Iterable, Iterator
from typing import Any

import orjson

from vk import __version__
from vk import records as vkrecords
from vk.errors import RecordError, VkError
from vk.jsonl import Writer, dumps
from vk.send.clock import RunClock
from vk.send.engine import Config, Engine

DEFAULT_TIMEOUT = 600.0
DEFAULT_FIRST_BYTE_TIMEOUT = 120.0
DEFAULT_LAG_THRESHOLD = 0.001
SWITCH_INTERVAL = 0.0002  # seconds: GIL hand-over between the event loop and the input reader thread
QUEUE_AHEAD = 512  # sessions read ahead of the engine per worker (memory stays flat)

_mono = time.monotonic


# ------------------------------------------------------------------------------------------------------------
# input


def _prepare(it: Iterator[dict], validate: bool, source: str, line0: int) -> Iterator[dict]:
    """Yield scheduled_session records (plain sessions wrapped, index = their position)."""
    n = 0
    line = line0
    for rec in it:
        line += 1
        kind = rec.get("kind") if isinstance(rec, dict) else None
        if kind == "schedule":
            raise RecordError(source, line, "kind", "a schedule header may only be the first record")
        if validate:
            vkrecords.validate(rec, source, line, ("scheduled_session", "session"))
        elif kind not in ("scheduled_session", "session"):
            raise RecordError(source, line, "kind", f"expected 'scheduled_session' or 'session', got {kind!r}")
        if kind == "session":
            rec = {"kind": "scheduled_session", "v": 1, "index": n, "start": None, "session": rec}
        n += 1
        yield rec


def _check_start(it: Iterator[dict], mode: str) -> Iterator[dict]:
    for rec in it:
        if mode == "open" and rec.get("start") is None:
            raise RecordError("<input>", None, "start",
                              f"session {rec['session'].get('id')!r} has no start offset, but the schedule is "
                              "open loop (a closed-loop or plain-session input needs no start)")
        yield rec


# ------------------------------------------------------------------------------------------------------------
# helpers


def redact_argv(argv: list[str]) -> list[str]:
    """The command line with secrets removed (API keys, credential headers)."""
    out = []
    skip = None
    secret_words = ("auth", "key", "token", "secret", "cookie", "password")
    for a in argv:
        if skip == "value":
            out.append("***")
            skip = None
            continue
        if skip == "header":
            name = a.split(":", 1)[0]
            out.append(f"{name}: ***" if any(w in name.lower() for w in secret_words) else a)
            skip = None
            continue
        if a == "--api-key":
            out.append(a)
            skip = "value"
        elif a.startswith("--api-key="):
            out.append("--api-key=***")
        elif a in ("--header", "-H"):
            out.append(a)
            skip = "header"
        elif a.startswith("--header="):
            name = a[len("--header="):].split(":", 1)[0]
            out.append(f"--header={name}: ***" if any(w in name.lower() for w in secret_words) else a)
        else:
            out.append(a)
    return out


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft open-file limit to the hard limit; returns (soft, hard) after."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        if soft < target:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
            except (ValueError, OSError):
                pass
        return soft, hard
    except ImportError:  # pragma: no cover - not on Linux
        return -1, -1


def _api_parts(api: str, endpoint: str) -> tuple[str, str, int, str, str]:
    u = urllib.parse.urlsplit(api)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise VkError(f"--api: expected a URL like http://127.0.0.1:8000/v1, got {api!r}")
    port = u.port or (443 if u.scheme == "https" else 80)
    base = u.path.rstrip("/")
    if endpoint not in ("chat", "completions"):
        raise VkError(f"--endpoint: expected chat or completions, got {endpoint!r}")
    path = base + ("/chat/completions" if endpoint == "chat" else "/completions")
    return u.scheme, u.hostname, port, path, base


def resolve_model(api: str, api_key: str | None, headers: list, timeout: float = 10.0) -> str:
    """The first model id from GET {api}/models."""
    url = api.rstrip("/") + "/models"
    req = urllib.request.Request(url)
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    for k, v in headers:
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            obj = orjson.loads(r.read())
        data = obj.get("data") if isinstance(obj, dict) else None
        if not data:
            raise VkError(f"{url} lists no models; pass --model NAME")
        return str(data[0]["id"])
    except VkError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure becomes one line
        reason = getattr(e, "reason", None) or e
        raise VkError(f"cannot get the model list from {url} ({reason}); pass --model NAME") from None


def parse_headers(headers: Iterable) -> list[tuple[str, str]]:
    out = []
    for h in headers or ():
        if isinstance(h, (tuple, list)):
            k, v = h
        else:
            k, sep, v = str(h).partition(":")
            if not sep or not k.strip():
                raise VkError(f"--header: expected 'Name: value', got {h!r}")
        out.append((str(k).strip(), str(v).strip()))
    return out


def parse_max_errors(v) -> float | None:
    if v is None or v == "":
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise VkError(f"--max-errors: expected a count (10) or a fraction (0.2), got {v!r}") from None
    if x <= 0 or (x >= 1 and not float(x).is_integer()):
        raise VkError(f"--max-errors: expected a count >= 1 or a fraction between 0 and 1, got {v!r}")
    return x


# ------------------------------------------------------------------------------------------------------------
# collecting records


class Collector:
    """Writes records, counts statuses, tracks dispatch lag, applies --max-errors, drives the progress bar."""

    def __init__(self, writer: Writer, max_errors: float | None, progress: bool, on_stop):
        self.writer = writer
        self.max_errors = max_errors
        self.on_stop = on_stop
        self.counts: collections.Counter = collections.Counter()
        self.lags = array("d")
        self.lags_warm = array("d")
        self.n = 0
        self.errors = 0
        self.t_last_done = 0.0
        self.broken = False
        self.write_error: BaseException | None = None
        self.thread: threading.Thread | None = None
        self.lock: threading.Lock | None = None
        self.q = None
        self.on_broken = None
        self.inflight = 0
        self.sessions_done = 0
        self.bar = None
        self.t_bar = 0.0
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(unit="req", file=sys.stderr, dynamic_ncols=True, mininterval=0.5, smoothing=0.1)

    # -- output: a writer thread, so that a slow disk never stalls the event loop -------------------------------
    def start_writer(self, on_broken) -> None:
        """From here on records are written by a thread (one write and flush per record, in order)."""
        self.on_broken = on_broken
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._write_loop, daemon=True, name="vk-send-writer")
        self.thread.start()

    def _write_loop(self) -> None:
        q = self.q
        while True:
            line = q.get()
            if line is None:
                return
            if self.broken:
                continue
            with self.lock:
                try:
                    self.writer.write_raw(line)
                except BrokenPipeError:
                    # the reader went away (vk-send ... | head): stop sending, nothing more can be recorded
                    self.broken = True
                    self.on_broken()
                except (OSError, ValueError) as e:
                    self.broken = True
                    self.write_error = e
                    self.on_broken()

    def stop_writer(self) -> None:
        """Wait until every record handed over is written."""
        if self.thread is not None:
            self.q.put(None)
            self.thread.join()
            self.thread = None

    def exit_now(self) -> None:
        """A second signal: leave at once, but never in the middle of a line."""
        if self.lock is not None:
            self.lock.acquire(timeout=2.0)
        try:
            self.writer.flush()
        finally:
            os._exit(130)

    def add(self, rec: dict, line: bytes | None = None) -> None:
        self.q.put(line if line is not None else dumps(rec))
        self.n += 1
        st = rec.get("status")
        self.counts[st] += 1
        td = rec.get("t_dispatched")
        ti = rec.get("t_intended")
        if td is not None and ti is not None:
            (self.lags_warm if rec.get("warmup") else self.lags).append(td - ti)
        t_done = rec.get("t_done")
        if t_done is not None and t_done > self.t_last_done:
            self.t_last_done = t_done
        if st in ("error", "timeout"):
            self.errors += 1
            me = self.max_errors
            if me is not None:
                if me >= 1 and self.errors >= me:
                    self.on_stop(f"max-errors: {self.errors} requests failed (--max-errors {me:g})", "max_errors")
                else:
                    tried = self.n - self.counts["skipped"] - self.counts["cancelled"]
                    if me < 1 and tried >= 20 and self.errors / tried > me:
                        self.on_stop(f"max-errors: {self.errors} of {tried} requests failed, more than {me:g}",
                                     "max_errors")
        if self.bar is not None:
            now = _mono()
            if now - self.t_bar > 0.25:
                self.refresh_bar()

    def refresh_bar(self) -> None:
        if self.bar is None:
            return
        self.t_bar = _mono()
        self.bar.n = self.n
        p99 = self.lag_stats()["p99"]
        self.bar.set_postfix_str(f"sessions={self.sessions_done} errors={self.errors} in_flight={self.inflight} "
                                 f"lag_p99={'-' if p99 is None else f'{p99 * 1e3:.2f}ms'}", refresh=False)
        self.bar.refresh()

    def lag_stats(self) -> dict:
        lags = self.lags if len(self.lags) else self.lags_warm
        if not len(lags):
            return {"p50": None, "p99": None, "max": None, "n": 0}
        s = sorted(lags)
        n = len(s)

        def q(p):
            return s[min(n - 1, int(p * (n - 1) + 0.5))]

        return {"p50": q(0.5), "p99": q(0.99), "max": s[-1], "n": n}

    def close_bar(self) -> None:
        if self.bar is not None:
            self.refresh_bar()
            self.bar.close()


# ------------------------------------------------------------------------------------------------------------
# feeding sessions to an event loop from a thread (reading input must never block the loop)


class ThreadFeed:
    """A bounded hand-over from a reader thread to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, ahead: int = QUEUE_AHEAD):
        self.loop = loop
        self.q: asyncio.Queue = asyncio.Queue()
        self.slots = threading.Semaphore(ahead)
        self.stop = threading.Event()

    def put(self, item) -> bool:
        """From the thread; False when the run stopped."""
        while not self.slots.acquire(timeout=0.2):
            if self.stop.is_set():
                return False
        if self.stop.is_set():
            return False
        try:
            self.loop.call_soon_threadsafe(self.q.put_nowait, item)
        except RuntimeError:  # loop closed
            return False
        return True

    def end(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self.q.put_nowait, None)
        except RuntimeError:
            pass

    async def get(self):
        item = await self.q.get()
        self.slots.release()
        return item

    def get_nowait_put_back(self, item) -> None:
        self.q.put_nowait(item)


class _QueueView:
    """What the engine sees: ``get()`` and ``put_nowait`` (to repeat the end marker)."""

    def __init__(self, feed: ThreadFeed):
        self.feed = feed

    async def get(self):
        return await self.feed.get()

    def put_nowait(self, item) -> None:
        self.feed.slots.acquire(blocking=False)
        self.feed.q.put_nowait(item)

    def empty(self) -> bool:
        return self.feed.q.empty()


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover
        return asyncio.new_event_loop()


# ------------------------------------------------------------------------------------------------------------
# worker processes


def _worker_main(cfg: Config, in_conn, out_conn, stop_event, progress: bool) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    loop = _new_loop()
    asyncio.set_event_loop(loop)
    lock = threading.Lock()

    def emit(rec: dict) -> None:
        line = dumps(rec)
        with lock:
            out_conn.send_bytes(line)

    clock = RunClock()
    engine = Engine(cfg, clock, loop, emit)
    feed = ThreadFeed(loop)
    out_conn.send_bytes(b"#ready")
    msg = in_conn.recv_bytes()  # b"start MONO0 EPOCH0"
    _, m0, _e0 = msg.split()
    clock.set_start(float(m0))

    def reader() -> None:
        try:
            while True:
                b = in_conn.recv_bytes()
                if not b:
                    break
                if not feed.put(orjson.loads(b)):
                    return
        except (EOFError, OSError):
            pass
        feed.end()

    threading.Thread(target=reader, daemon=True, name="vk-send-reader").start()

    async def watch_stop() -> None:
        while True:
            await asyncio.sleep(0.02)
            if stop_event.is_set():
                engine.request_stop("stopped")
                return
            if progress:
                with lock:
                    out_conn.send_bytes(b"#inflight %d %d" % (engine.inflight, engine.sessions_done))

    async def main() -> None:
        w = loop.create_task(watch_stop())
        try:
            await engine.run(_QueueView(feed))
        finally:
            w.cancel()

    gc.collect()
    gc.freeze()
    gc.disable()
    sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        loop.run_until_complete(main())
    finally:
        feed.stop.set()
        stats = {"sessions_started": engine.sessions_started, "sessions_done": engine.sessions_done,
                 "sessions_not_started": engine.sessions_not_started,
                 "duration_reached": engine.duration_reached,
                 "kernel_timestamps": getattr(engine.client, "kts_ok", None)}
        with lock:
            out_conn.send_bytes(b"#done " + orjson.dumps(stats))
        out_conn.close()


# ------------------------------------------------------------------------------------------------------------
# the public entry point


def send(
    records: Iterable[dict],
    *,
    api: str,
    output: str | Writer = "-",
    model: str | None = None,
    endpoint: str = "chat",
    stream: bool = True,
    workers: int | None = None,
    api_key: str | None = None,
    headers: Iterable = (),
    extra_body: dict | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,
    first_byte_timeout: float | None = DEFAULT_FIRST_BYTE_TIMEOUT,
    max_errors: float | int | str | None = None,
    save_text: bool = False,
    progress: bool = False,
    argv: list[str] | None = None,
    continuous_usage: bool = False,
    max_tokens_param: str = "max_tokens",
    min_tokens_param: str = "min_tokens",
    ignore_eos_param: str = "ignore_eos",
    client: str = "raw",
    http2: bool = False,
    kernel_timestamps: bool = True,
    lag_threshold: float = DEFAULT_LAG_THRESHOLD,
    concurrency: int | None = None,
    validate: bool = True,
    source: str = "<input>",
    handle_signals: bool = True,
    quiet: bool = False,
    run_fields: dict | None = None,
    stop: threading.Event | None = None,
) -> dict:
    """Run the sessions of ``records`` against ``api``; write run, response... and run_end records.

    ``records``: an optional ``schedule`` header, then ``scheduled_session`` records; or plain ``session``
    records, which run as a closed loop of ``concurrency`` sessions (default 1: one after another).
    Returns the ``run_end`` record. Bad input met during the run (a pipe) stops the run cleanly and raises
    ``RecordError`` after the footer is written. ``run_fields`` are added to the run header (annotations, e.g.
    vk-sweep's ``{"sweep": {...}}``). Setting ``stop`` (a ``threading.Event``) from another thread ends the run
    as a signal would (requests in flight cancelled), with ``ended: "stopped"``.
    """
    if api_key is None:
        api_key = os.environ.get("OPENAI_API_KEY") or None
    hdrs = parse_headers(headers)
    me = parse_max_errors(max_errors)
    scheme, host, port, path, _base = _api_parts(api, endpoint)
    if client not in ("raw", "aiohttp", "httpx"):
        raise VkError(f"--client: expected raw, aiohttp or httpx, got {client!r}")
    if workers is None:
        workers = os.cpu_count() or 1
    workers = max(1, int(workers))

    # the first record decides the mode
    it = iter(records)
    header = None
    first = None
    line0 = 0
    for rec in it:
        if isinstance(rec, dict) and rec.get("kind") == "schedule":
            if validate:
                vkrecords.validate_schedule(rec, source, 1)
            header = rec
            line0 = 1
        else:
            first = rec
        break
    rest: Iterator[dict] = it if first is None else _chain1(first, it)
    if header is not None:
        mode = header["mode"]
        conc = int(header.get("concurrency") or 1)
    else:
        mode = None
        conc = int(concurrency or 1)
    if concurrency is not None and header is not None and mode == "closed":
        conc = int(concurrency)
    stream_in = _prepare(rest, validate, source, line0)
    if mode is None:
        # no header: scheduled sessions with start offsets run open loop; plain sessions a closed loop
        peek = next(stream_in, None)
        if peek is None:
            stream_in = iter(())
            mode = "closed"
        else:
            mode = "open" if (first.get("kind") == "scheduled_session" and peek.get("start") is not None) \
                else "closed"
            stream_in = _chain1(peek, stream_in)
    stream_in = _check_start(stream_in, mode)
    # The run's clock starts only once the first session is here: in a pipe, the upstream stages' own start-up
    # (vk-gen loading a tokenizer) is not the client lagging behind its schedule.
    first_session = next(stream_in, None)
    if first_session is not None:
        stream_in = _chain1(first_session, stream_in)

    soft, hard = raise_nofile_limit()
    if not quiet and 0 < soft < max(1024, 2 * conc + 64):
        print(f"vk-send: open-file limit is {soft} (hard limit {hard}): at most about {max(soft - 64, 0)} "
              "concurrent requests; raise it with 'ulimit -n'", file=sys.stderr)

    if model is None:
        model = resolve_model(api, api_key, hdrs)

    run_id = str(uuid.uuid4())
    cfg = Config(
        run_id=run_id, api=api, scheme=scheme, host=host, port=port, path=path, endpoint=endpoint, model=model,
        stream=stream, api_key=api_key, headers=hdrs, extra_body=extra_body, timeout=timeout or None,
        first_byte_timeout=first_byte_timeout or None, save_text=save_text, continuous_usage=continuous_usage,
        max_tokens_param=max_tokens_param, min_tokens_param=min_tokens_param, ignore_eos_param=ignore_eos_param,
        client=client, http2=http2, kernel_timestamps=kernel_timestamps, mode=mode, concurrency=conc,
        ramp_up=float((header or {}).get("ramp_up") or 0.0),
        rate_limit=(header or {}).get("rate_limit"), duration=(header or {}).get("duration"),
        workers=workers,
    )
    if mode == "closed":
        workers = max(1, min(workers, conc))
        cfg.workers = workers

    own_writer = not isinstance(output, Writer)
    writer = Writer(output) if own_writer else output
    try:
        return _run(cfg, header, stream_in, writer, workers, argv, me, progress, lag_threshold, soft,
                    handle_signals, quiet, run_fields, stop)
    finally:
        if own_writer:
            writer.close()


def _chain1(first, it):
    yield first
    yield from it


def _run(cfg: Config, header, stream_in, writer: Writer, workers: int, argv, max_errors, progress,
         lag_threshold, nofile, handle_signals, quiet, run_fields=None, stop=None) -> dict:
    state = {"reason": None, "ended": None, "signals": 0}
    input_error: list[BaseException] = []

    procs = []
    if workers > 1:
        import multiprocessing as mp

        ctx = mp.get_context("fork")
        stop_event = ctx.Event()
        pipes = []
        for w in range(workers):
            wcfg = Config(**{**cfg.__dict__, "worker": w,
                             "concurrency": cfg.concurrency // workers + (1 if w < cfg.concurrency % workers else 0)})
            in_r, in_w = ctx.Pipe(duplex=False)
            out_r, out_w = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_worker_main, args=(wcfg, in_r, out_w, stop_event, progress), daemon=True,
                            name=f"vk-send-worker-{w}")
            p.start()
            in_r.close()
            out_w.close()
            procs.append(p)
            pipes.append((in_w, out_r))
        for _, out_r in pipes:
            if out_r.recv_bytes() != b"#ready":
                raise VkError("a worker process failed to start")
    collector = Collector(writer, max_errors, progress, None)
    clock = RunClock()
    if workers == 1:
        inproc = _InProcess(cfg, clock, collector, state, input_error, handle_signals)
    gc.collect()  # before the start instant: a full collection can take tens of milliseconds
    # the start instant: a little ahead, so that everything is ready by then; or the schedule's start_at (epoch)
    ahead = 0.1 if workers > 1 else 0.02
    if header is not None and header.get("start_at"):
        ahead = max(ahead, float(header["start_at"]) - time.time())
    clock.set_start(_mono() + ahead)
    run_rec = vkrecords.new_run(
        cfg.run_id, round(clock.epoch0, 6), api=cfg.api, model=cfg.model, endpoint=cfg.endpoint,
        vk_version=__version__, host=socket.gethostname(), argv=redact_argv(list(argv or [])), schedule=header,
        workers=workers, client=cfg.client if not cfg.http2 else "httpx-http2", stream=cfg.stream,
        lag_threshold=lag_threshold, open_files_limit=nofile, **(run_fields or {}),
    )
    header_line = dumps(run_rec)
    header_pos = _tell(writer)
    writer.write_raw(header_line)

    def on_broken() -> None:  # from the writer thread
        why = "the output was closed (broken pipe)" if collector.write_error is None else \
            f"cannot write the output ({collector.write_error})"
        _set_reason(state, why, "output_closed")
        if workers == 1:
            inproc.loop.call_soon_threadsafe(inproc.engine.request_stop, why)
        else:
            stop_event.set()

    collector.start_writer(on_broken)
    finished = threading.Event()
    if stop is not None:
        def watch_stop() -> None:  # the caller's stop: as a signal, but from another thread
            while not finished.is_set():
                if stop.wait(0.1):
                    _set_reason(state, "stopped by the caller", "stopped")
                    if workers == 1:
                        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nothing to stop
                            inproc.loop.call_soon_threadsafe(inproc.engine.request_stop, "stopped by the caller")
                    else:
                        stop_event.set()
                    return

        threading.Thread(target=watch_stop, daemon=True, name="vk-send-stop").start()
    stats: dict[str, Any] = {}
    try:
        if workers == 1:
            stats = inproc.run(stream_in)
        else:
            stats = _run_workers(cfg, clock, stream_in, collector, state, input_error, procs, pipes, stop_event,
                                 handle_signals)
    finally:
        finished.set()
        collector.stop_writer()
    collector.close_bar()
    if collector.write_error is not None:
        raise VkError(f"{writer.path}: cannot write ({collector.write_error})")

    lag = collector.lag_stats()
    lagged = lag["p99"] is not None and lag["p99"] > lag_threshold
    ended = state["ended"] or ("bad_input" if input_error else "complete")
    reason = state["reason"]
    if input_error and reason is None:
        reason = f"stopped at bad input: {input_error[0]}"
    if ended == "complete" and stats.get("duration_reached"):
        reason = "schedule duration reached"
    end = vkrecords.new_run_end(
        cfg.run_id,
        ended=ended,
        reason=reason or "all sessions done",
        requests=collector.n,
        statuses=dict(collector.counts),
        errors=collector.errors,
        sessions_started=stats.get("sessions_started", 0),
        sessions_done=stats.get("sessions_done", 0),
        sessions_not_started=stats.get("sessions_not_started", 0),
        duration=round(collector.t_last_done, 6),
        dispatch_lag_p50=_r(lag["p50"]),
        dispatch_lag_p99=_r(lag["p99"]),
        dispatch_lag_max=_r(lag["max"]),
        lag_threshold=lag_threshold,
        lagged=lagged,
        kernel_timestamps=stats.get("kernel_timestamps"),
        workers=workers,
    )
    if collector.broken:
        raise BrokenPipeError("the output was closed")
    writer.write(end)
    writer.flush()
    if lagged:
        rewritten = _rewrite_lagged(writer, header_line, header_pos)
        if not quiet:
            print(f"vk-send: WARNING: THE CLIENT LAGGED: p99 dispatch lag {lag['p99'] * 1e3:.2f} ms exceeds "
                  f"{lag_threshold * 1e3:g} ms; requests left later than the schedule said, so this run measures "
                  f"the load generator as well as the server (use more --workers or a lower rate)"
                  + (f"; with {collector.n} requests the p99 is nearly their maximum, so one late request is "
                     "enough" if collector.n < 100 else "")
                  + ("; run header marked lagged" if rewritten else ""), file=sys.stderr)
    if input_error:
        raise input_error[0]
    return end


def _r(x):
    return None if x is None else round(x, 7)


def _tell(writer: Writer) -> int | None:
    """Where the next write lands, when the output is a regular file (a path, or stdout redirected to one)."""
    try:
        fd = writer.fh.fileno()
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        writer.fh.flush()
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND:
            return os.fstat(fd).st_size  # appending: the next write lands at the end
        return os.lseek(fd, 0, os.SEEK_CUR)
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return None


def _rewrite_lagged(writer: Writer, header_line: bytes, pos: int | None) -> bool:
    """Rewrite the header's ``"lagged":false`` to ``"lagged":true `` in place (same length)."""
    if pos is None:
        return False
    old = b'"lagged":false'
    i = header_line.rfind(old)
    if i < 0:
        return False
    try:
        writer.fh.flush()
        # a fresh read-write descriptor: stdout may be write-only, and pwrite on O_APPEND appends on Linux
        fd = os.open(f"/proc/self/fd/{writer.fh.fileno()}", os.O_RDWR)
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return False
    try:
        if os.pread(fd, len(header_line), pos) != header_line:
            return False
        os.pwrite(fd, b'"lagged":true ', pos + i)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _feeder(stream_in, put, end, input_error: list, on_bad) -> None:
    try:
        for rec in stream_in:
            if not put(rec):
                return
    except VkError as e:
        input_error.append(e)
        on_bad(e)
    except Exception as e:  # noqa: BLE001 - report as one line
        input_error.append(VkError(f"cannot read the input: {e}"))
        on_bad(e)
    finally:
        end()


class _InProcess:
    """One worker in this process: the loop and engine are built before the start instant is fixed."""

    def __init__(self, cfg, clock, collector, state, input_error, handle_signals):
        self.loop = loop = _new_loop()
        self.engine = engine = Engine(cfg, clock, loop, collector.add)
        self.feed = ThreadFeed(loop)
        self.collector = collector
        self.state = state
        self.input_error = input_error
        self.handle_signals = handle_signals
        collector.on_stop = lambda reason, ended: (_set_reason(state, reason, ended), engine.request_stop(reason))

    def on_signal(self, signame: str) -> None:
        state = self.state
        state["signals"] += 1
        if state["signals"] >= 2:
            self.collector.exit_now()
            return
        print(f"\nvk-send: {signame}: stopping (cancelling requests in flight; again to exit at once)",
              file=sys.stderr)
        _set_reason(state, f"interrupted by {signame}", "interrupted")
        self.engine.request_stop(f"interrupted by {signame}")

    def run(self, stream_in) -> dict:
        loop, engine, feed, collector = self.loop, self.engine, self.feed, self.collector
        installed = []
        if self.handle_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    loop.add_signal_handler(sig, self.on_signal, sig.name)
                    installed.append(sig)
                except (NotImplementedError, RuntimeError, ValueError):
                    pass
        th = threading.Thread(target=_feeder, args=(stream_in, feed.put, feed.end, self.input_error,
                                                    lambda e: None), daemon=True, name="vk-send-feeder")

        async def main() -> None:
            prog = loop.create_task(_progress_task(engine, collector)) if collector.bar is not None else None
            th.start()
            try:
                await engine.run(_QueueView(feed))
            finally:
                if prog is not None:
                    prog.cancel()

        gc.freeze()
        was_enabled = gc.isenabled()
        gc.disable()
        # the reader thread must not hold the GIL for the default 5 ms while a deadline passes
        switch = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL)
        try:
            loop.run_until_complete(main())
        finally:
            sys.setswitchinterval(switch)
            feed.stop.set()
            for sig in installed:
                loop.remove_signal_handler(sig)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            if was_enabled:
                gc.enable()
            gc.unfreeze()
        return {"sessions_started": engine.sessions_started, "sessions_done": engine.sessions_done,
                "sessions_not_started": engine.sessions_not_started, "duration_reached": engine.duration_reached,
                "kernel_timestamps": getattr(engine.client, "kts_ok", None)}


def _set_reason(state, reason, ended) -> None:
    if state["reason"] is None:
        state["reason"] = reason
        state["ended"] = ended


async def _progress_task(engine, collector) -> None:
    while True:
        await asyncio.sleep(0.5)
        collector.inflight = engine.inflight
        collector.sessions_done = engine.sessions_done
        collector.refresh_bar()


def _run_workers(cfg, clock, stream_in, collector, state, input_error, procs, pipes, stop_event,
                 handle_signals) -> dict:
    from multiprocessing.connection import wait

    workers = len(procs)
    collector.on_stop = lambda reason, ended: (_set_reason(state, reason, ended), stop_event.set())
    start_msg = b"start %r %r" % (clock.mono0, clock.epoch0)
    for in_w, _ in pipes:
        in_w.send_bytes(start_msg)
    feed_stop = threading.Event()

    def put(rec) -> bool:
        if feed_stop.is_set():
            return False
        w = rec.get("index", 0) % workers
        try:
            pipes[w][0].send_bytes(orjson.dumps(rec))
        except (OSError, ValueError):
            return False
        return True

    def end() -> None:
        for in_w, _ in pipes:
            try:
                in_w.send_bytes(b"")
            except (OSError, ValueError):
                pass

    old = {}
    if handle_signals and threading.current_thread() is threading.main_thread():
        def on_signal(signum, _frame):
            state["signals"] += 1
            name = signal.Signals(signum).name
            if state["signals"] >= 2:
                for p in procs:
                    if p.is_alive():
                        p.kill()
                collector.exit_now()
            print(f"\nvk-send: {name}: stopping (cancelling requests in flight; again to exit at once)",
                  file=sys.stderr)
            _set_reason(state, f"interrupted by {name}", "interrupted")
            feed_stop.set()
            stop_event.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, on_signal)

    th = threading.Thread(target=_feeder, args=(stream_in, put, end, input_error, lambda e: None), daemon=True,
                          name="vk-send-feeder")
    th.start()
    alive = {out_r: i for i, (_, out_r) in enumerate(pipes)}
    stats = {"sessions_started": 0, "sessions_done": 0, "sessions_not_started": 0, "duration_reached": False,
             "kernel_timestamps": None}
    inflight = [0] * workers
    sessions = [0] * workers
    try:
        while alive:
            for c in wait(list(alive), timeout=0.25):
                try:
                    msg = c.recv_bytes()
                except (EOFError, OSError):
                    alive.pop(c, None)
                    continue
                if msg[:1] == b"{":
                    collector.add(orjson.loads(msg), msg)
                elif msg.startswith(b"#inflight"):
                    _, a, b = msg.split()
                    inflight[alive[c]] = int(a)
                    sessions[alive[c]] = int(b)
                    collector.inflight = sum(inflight)
                    collector.sessions_done = sum(sessions)
                elif msg.startswith(b"#done"):
                    st = orjson.loads(msg[6:])
                    for k in ("sessions_started", "sessions_done", "sessions_not_started"):
                        stats[k] += st.get(k, 0)
                    stats["duration_reached"] |= bool(st.get("duration_reached"))
                    if st.get("kernel_timestamps") is not None:
                        stats["kernel_timestamps"] = st["kernel_timestamps"]
            if state["ended"] is not None:
                feed_stop.set()
            if collector.bar is not None and _mono() - collector.t_bar > 0.5:
                collector.refresh_bar()
    finally:
        feed_stop.set()
        for in_w, _ in pipes:
            try:
                in_w.close()
            except OSError:
                pass
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
        for sig, h in old.items():
            signal.signal(sig, h)
    return stats
