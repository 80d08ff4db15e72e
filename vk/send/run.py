"""``send()``: run a schedule against an OpenAI-compatible API and write the run's records.

Layout of a run: the parent reads and validates the input, writes the ``run`` header, and either runs the engine
in-process (one worker) or forks ``workers`` processes, each with its own uvloop event loop, and shards sessions
to them by ``index % workers`` so a session stays on one worker and its keep-alive connection. All workers share
one start instant (CLOCK_MONOTONIC is system-wide). Response records come back through pipes and are written by
the parent, one flushed line each; the ``run_end`` footer carries totals, the dispatch-lag verdict and why the
run ended.
"""

from __future__ import annotations

import contextlib
import gc
import socket
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterable
from typing import Any

from vk import __version__
from vk import records as vkrecords
from vk.errors import VkError
from vk.jsonl import Writer, dumps
from vk.send.apis import adapter_class
from vk.send.clock import RunClock
from vk.send.collector import Collector, rewrite_lagged, round_lag, set_reason, tell
from vk.send.engine import Config, client_label
from vk.send.inprocess import InProcess
from vk.send.inputs import MAX_WAIT, first_due, read_input
from vk.send.options import (
    DEFAULT_FIRST_BYTE_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_LAG_THRESHOLD,
    DEFAULT_TIMEOUT,
    api_key_from_env,
    api_parts,
    check_seconds,
    check_workers,
    parse_headers,
    parse_max_errors,
    raise_nofile_limit,
    redact_argv,
    redact_url,
    resolve_model,
)
from vk.send.scrape import DEFAULT_SCRAPE_INTERVAL, Scraper
from vk.send.workers import run_workers, start_workers

_mono = time.monotonic

FAR_AHEAD = 10.0  # seconds: a first request due later than this is announced on stderr

__all__ = ["send", "DEFAULT_TIMEOUT", "DEFAULT_FIRST_BYTE_TIMEOUT", "DEFAULT_IDLE_TIMEOUT", "DEFAULT_LAG_THRESHOLD"]


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
    idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
    cacert: str | None = None,
    insecure: bool = False,
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
    reassign_lost: bool = False,
    total_sessions: int | None = None,
    peak_sessions: int | None = None,
    server: dict | None = None,
    scrape: str | None = None,
    scrape_interval: float = DEFAULT_SCRAPE_INTERVAL,
    scrape_buckets: bool = False,
    run_fields: dict | None = None,
    stop: threading.Event | None = None,
    ray: str | None = None,
    workers_per_node: int | None = None,
    api_style: str = "openai",
) -> dict:
    """Run the sessions of ``records`` against ``api``; write run, response... and run_end records.

    ``records``: an optional ``schedule`` header, then ``scheduled_session`` records; or plain ``session``
    records, which run as a closed loop of ``concurrency`` sessions (default 1: one after another).
    Returns the ``run_end`` record. Bad input met during the run (a pipe) stops the run cleanly and raises
    ``RecordError`` after the footer is written.

    ``reassign_lost``: hand a lost worker's sessions that are still due to the other workers.
    ``total_sessions``: how many sessions the input holds, when known (a file), so that the footer counts those
    a stopped run never read; ``peak_sessions``: the most sessions the schedule starts within 10 s (a file), for
    the open-file check before the run. ``server`` (vk.launch.Server.info()) goes into the run header.
    ``scrape`` (a URL; ``""`` for the API's origin + /metrics) writes the server's Prometheus samples every
    ``scrape_interval`` seconds as ``server_metric`` records (vk.send.scrape). ``run_fields`` are added to the
    run header (annotations, e.g. vk-sweep's ``{"sweep": {...}}``). Setting ``stop`` (a ``threading.Event``) from
    another thread ends the run as a signal would (requests in flight cancelled), with ``ended: "stopped"``.
    ``ray`` (``auto``, ``HOST:PORT`` or ``ray://HOST:10001``) runs the workers on that Ray cluster,
    ``workers_per_node`` on each node [default: its CPUs] (vk.send.ray_pool); a process already connected to Ray
    runs on that connection's cluster. ``api_style`` (vk.send.apis): the API's protocol, openai by default.
    """
    style = adapter_class(api_style, endpoint)
    if api_key is None:
        api_key = api_key_from_env(style.env_keys)
    hdrs = parse_headers(headers)
    me = parse_max_errors(max_errors)
    check_seconds("--timeout", timeout)
    check_seconds("--first-byte-timeout", first_byte_timeout)
    check_seconds("--idle-timeout", idle_timeout)
    check_seconds("--lag-threshold", lag_threshold)
    if endpoint == "invoke" and api_style != "bedrock":
        raise VkError("--endpoint invoke: only with --api-style bedrock (InvokeModelWithResponseStream)")
    scheme, host, port, path, _base = api_parts(api, endpoint)
    if api_style != "openai":
        if not stream and style.streams_only:
            raise VkError(f"--no-stream: not with --api-style {api_style} (streamed answers only)")
        if endpoint != "chat" and endpoint not in style.endpoints:
            raise VkError(f"--endpoint {endpoint}: not with --api-style {api_style}")
        path = style.request_path(_base, urllib.parse.urlsplit(api).query, model, endpoint, stream)
        if not style.exact_length and not quiet:
            print(f"vk-send: --api-style {api_style}: the API has no minimum output length, so a request's "
                  "output_tokens is sent as the maximum only (outputs may be shorter; ignore_eos is not available)",
                  file=sys.stderr)
    if client not in ("raw", "aiohttp", "httpx"):
        raise VkError(f"--client: expected raw, aiohttp or httpx, got {client!r}")
    if ray is not None:
        if workers is not None:
            raise VkError("--workers and --ray: on a cluster, say --workers-per-node")
        from vk.send.ray_pool import import_ray

        import_ray()  # Ray missing: one line before anything else
    workers = check_workers(workers)

    header, mode, conc, stream_in, first_session = read_input(records, validate, source, concurrency)
    if header is not None and header.get("start_at"):
        wait = float(header["start_at"]) - time.time()
        if wait > MAX_WAIT:
            raise VkError(f"{source}: schedule start_at is {wait / 86400:.1f} days from now (more than "
                          f"{MAX_WAIT / 86400:g}): refusing to wait that long")
    else:
        wait = 0.0
    due = first_due(first_session) if mode == "open" else None
    if not quiet and max(wait, 0.0) + (due or 0.0) > FAR_AHEAD:
        at = time.time() + max(wait, 0.0) + (due or 0.0)
        print(f"vk-send: the first request is due in {_span(max(wait, 0.0) + (due or 0.0))}, at "
              f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(at))}; waiting until then", file=sys.stderr)

    soft, hard = raise_nofile_limit()
    if mode == "closed":
        workers = max(1, min(workers, conc))
    need = conc if mode == "closed" else peak_sessions
    if need:
        per_worker = -(-need // workers) + 64  # a socket per request in flight, plus the process's own files
        if not quiet and 0 < soft < per_worker:
            what = (f"the closed loop keeps {need} requests in flight" if mode == "closed" else
                    f"the schedule starts up to {need} sessions within 10 s (in flight at once if requests take "
                    "that long)")
            print(f"vk-send: open-file limit is {soft} (hard limit {hard}) but {what}, {-(-need // workers)} per "
                  "worker: requests past the limit will fail with 'too many open files'; raise it with "
                  "'ulimit -n' or use more --workers", file=sys.stderr)
    elif not quiet and 0 < soft < 1024:
        print(f"vk-send: open-file limit is {soft} (hard limit {hard}): at most about {max(soft - 64, 0)} "
              "concurrent requests; raise it with 'ulimit -n'", file=sys.stderr)

    from vk.send import probe
    from vk.send.tls import make_context

    probe_tls = make_context(cacert, insecure, alpn=None) if scheme == "https" else None
    if model is None and not style.model_lookup:
        raise VkError(f"--model: required with --api-style {api_style}")
    style.preflight(api_key)
    if not style.model_lookup:
        pass  # no GET {api}/models on this API: its requests' records say what fails
    elif model is None:
        model = resolve_model(api, api_key, hdrs, ssl_context=probe_tls)
    else:
        probe.probe(api, api_key, hdrs, ssl_context=probe_tls, quiet=quiet)

    run_id = str(uuid.uuid4())
    cfg = Config(
        run_id=run_id, api=api, scheme=scheme, host=host, port=port, path=path, endpoint=endpoint, model=model,
        stream=stream, api_key=api_key, headers=hdrs, extra_body=extra_body, timeout=timeout or None,
        first_byte_timeout=first_byte_timeout or None, idle_timeout=idle_timeout or None, cacert=cacert,
        insecure=insecure, save_text=save_text, continuous_usage=continuous_usage,
        max_tokens_param=max_tokens_param, min_tokens_param=min_tokens_param, ignore_eos_param=ignore_eos_param,
        client=client, http2=http2, kernel_timestamps=kernel_timestamps, mode=mode, concurrency=conc,
        ramp_up=float((header or {}).get("ramp_up") or 0.0),
        rate_limit=(header or {}).get("rate_limit"), duration=(header or {}).get("duration"),
        workers=workers, api_style=api_style,
    )

    own_writer = not isinstance(output, Writer)
    writer = Writer(output) if own_writer else output
    pool = None
    try:
        if ray is not None:  # the workers on a Ray cluster (vk.send.ray_pool)
            from vk.send.ray_pool import RayPool

            pool = RayPool(ray, workers_per_node, quiet)
            workers = cfg.workers = pool.size if mode != "closed" else max(1, min(pool.size, conc))
        return _run(cfg, header, stream_in, writer, workers, argv, me, progress, lag_threshold, soft,
                    handle_signals, quiet, reassign_lost, total_sessions, server=server,
                    scraper=None if scrape is None else Scraper.for_api(api, scrape, scrape_interval, scrape_buckets,
                                                                        api_key),
                    run_fields=run_fields, stop=stop, pool=pool)
    finally:
        if own_writer:
            writer.close()
        if pool is not None:
            pool.close()



def _run(cfg: Config, header, stream_in, writer: Writer, workers: int, argv, max_errors, progress,
         lag_threshold, nofile, handle_signals, quiet, reassign_lost, total_sessions, server: dict | None = None,
         scraper: Scraper | None = None, run_fields: dict | None = None, stop=None, pool=None) -> dict:
    state = {"reason": None, "ended": None, "signals": 0}
    input_error: list[BaseException] = []

    procs: list = []
    inprocess = workers == 1 and pool is None
    if pool is not None:
        procs, pipes, stop_event = pool.start(cfg, workers, progress)
    if workers > 1 and pool is None:
        import multiprocessing as mp

        ctx = mp.get_context("fork")
        stop_event = ctx.Event()
        procs, pipes = start_workers(ctx, cfg, workers, stop_event, progress)
    if scraper is not None:
        scraper.start()  # before the start instant: its interpreter start-up is not the run's business
    collector = Collector(writer, max_errors, progress, None)
    if pool is not None:  # a Ray cluster's workers, shaped like local ones
        pool.attach(collector)
    clock = RunClock()
    if inprocess:
        inproc = InProcess(cfg, clock, collector, state, input_error, handle_signals)
    gc.collect()  # before the start instant: a full collection can take tens of milliseconds
    # the start instant: a little ahead, so that everything is ready by then; or the schedule's start_at (epoch)
    ahead = 0.1 if workers > 1 else 0.02
    if pool is not None:
        ahead = pool.ahead
    if header is not None and header.get("start_at") and float(header["start_at"]) - time.time() > ahead:
        clock.set_start_epoch(float(header["start_at"]))
    else:
        clock.set_start(_mono() + ahead)
    run_rec = vkrecords.new_run(
        cfg.run_id, round(clock.epoch0, 6), api=redact_url(cfg.api), model=cfg.model, endpoint=cfg.endpoint,
        vk_version=__version__, host=socket.gethostname(), argv=redact_argv(list(argv or []), [cfg.api_key]), schedule=header,
        workers=workers, api_style=cfg.api_style, client=client_label(cfg), http2=cfg.http2, tls=cfg.scheme == "https", stream=cfg.stream,
        lag_threshold=lag_threshold, open_files_limit=nofile,
        **({"server": server} if server else {}), **(run_fields or {}),
        **(pool.header_fields() if pool is not None else {}),
    )
    header_line = dumps(run_rec)
    header_pos = tell(writer)
    writer.write_raw(header_line)

    def on_broken() -> None:  # from the writer thread
        why = "the output was closed (broken pipe)" if collector.write_error is None else \
            f"cannot write the output ({collector.write_error})"
        set_reason(state, why, "output_closed")
        if inprocess:
            inproc.loop.call_soon_threadsafe(inproc.engine.request_stop, why)
        else:
            stop_event.set()

    collector.start_writer(on_broken)
    if scraper is not None:
        scraper.begin(clock.mono0, cfg.run_id, collector.q.put)
    finished = threading.Event()
    if stop is not None:
        def watch_stop() -> None:  # the caller's stop: as a signal, but from another thread
            while not finished.is_set():
                if stop.wait(0.1):
                    set_reason(state, "stopped by the caller", "stopped")
                    if inprocess:
                        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nothing to stop
                            inproc.loop.call_soon_threadsafe(inproc.engine.request_stop, "stopped by the caller")
                    else:
                        stop_event.set()
                    return

        threading.Thread(target=watch_stop, daemon=True, name="vk-send-stop").start()
    stats: dict[str, Any] = {}
    input_status = {"exhausted": False}
    try:
        if inprocess:
            stats = inproc.run(stream_in, input_status)
        else:
            stats = run_workers(cfg, clock, stream_in, collector, state, input_error, procs, pipes, stop_event,
                                handle_signals, input_status, reassign=reassign_lost, quiet=quiet)
    finally:
        finished.set()
        if scraper is not None:
            scraper.stop()  # its last scrape, after the last response, closes the counters' deltas
        collector.stop_writer()
    collector.close_bar()
    if collector.write_error is not None:
        if isinstance(collector.write_error, VkError):
            raise collector.write_error
        raise VkError(f"{writer.path}: cannot write ({collector.write_error})")

    lag = collector.lag_stats()
    lagged = lag["p99"] is not None and lag["p99"] > lag_threshold
    ended = state["ended"] or ("bad_input" if input_error else "complete")
    reason = state["reason"]
    if input_error and reason is None:
        reason = f"stopped at bad input: {input_error[0]}"
    if ended == "complete" and stats.get("duration_reached"):
        reason = "schedule duration reached"
    unreachable = collector.unreachable()
    if unreachable and ended == "complete":
        ended, reason = "unreachable", unreachable
    elif unreachable and ended == "max_errors":
        reason = f"{reason}; {unreachable}"
    input_complete = bool(input_status["exhausted"]) or total_sessions is not None
    unread = None
    if total_sessions is not None and not input_status["exhausted"]:
        unread = max(0, total_sessions - collector.ledger.read)
    sessions = collector.ledger.totals(unread)
    end = vkrecords.new_run_end(
        cfg.run_id,
        ended=ended,
        reason=reason or "all sessions done",
        requests=collector.n,
        statuses=dict(collector.counts),
        errors=collector.errors,
        retried=collector.retried,
        **sessions,
        input_complete=input_complete,
        reached_server=collector.counts["ok"] > 0 or collector.answered > 0,
        duration=round(collector.t_last_done, 6),
        dispatch_lag_p50=round_lag(lag["p50"]),
        dispatch_lag_p99=round_lag(lag["p99"]),
        dispatch_lag_max=round_lag(lag["max"]),
        lag_threshold=lag_threshold,
        lagged=lagged,
        kernel_timestamps=stats.get("kernel_timestamps"),
        workers=workers,
    )
    if state.get("lost"):
        end["workers_lost"] = state["lost"]
    if pool is not None:
        end.update(pool.footer_fields(lag_threshold))
    if collector.broken:
        raise BrokenPipeError("the output was closed")
    writer.write(end)
    writer.flush()
    if lagged:
        rewritten = rewrite_lagged(writer, header_line, header_pos)
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


def _span(sec: float) -> str:
    if sec < 120:
        return f"{sec:.0f} s"
    if sec < 7200:
        return f"{sec / 60:.0f} min"
    if sec < 172800:
        return f"{sec / 3600:.1f} h"
    return f"{sec / 86400:.1f} days"
