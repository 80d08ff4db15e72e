"""The record contract: every kind of record that flows between vk's stages.

Each line of a vk stream is one JSON object with ``kind`` and ``v`` (the format version of that kind)::

    vk-gen       -> session
    vk-schedule  -> schedule (header), scheduled_session ...
    vk-send      -> run (header), response ..., server_metric ..., run_end (footer)
    vk-sweep     -> sweep (header), sweep_probe ..., sweep_end (footer)

Stages meet only through these records. ``man/vk-formats.5`` documents every field, its unit and its meaning;
this module is the executable version of that page: the constructors used by the stages that write records, and
the validators used by the stages that read them. Validation checks the fields vk relies on and leaves every
other field alone, so users can annotate records and later stages pass the annotations through untouched.

All times in a run are seconds (float). Times in ``response`` records are relative to the run's start
(``run.start_epoch``) and measured with a monotonic clock; only ``start_epoch`` is wall-clock.
"""

from __future__ import annotations

from typing import Any

from vk.errors import RecordError
from vk.record_checks import _bool, _Ctx, _num, _obj, _req, _str, _type_name  # noqa: F401 - used by the validators

# Current format version of each kind. A reader accepts versions up to its own.
VERSIONS = {
    "session": 1,
    "schedule": 1,
    "scheduled_session": 1,
    "run": 1,
    "response": 1,
    "run_end": 1,
    "server_metric": 1,
    "sweep": 1,
    "sweep_probe": 1,
    "sweep_end": 1,
}

KINDS = tuple(VERSIONS)

# Response status values.
STATUS_OK = "ok"
STATUS_ERROR = "error"  # HTTP error, connection error, malformed stream, ...
STATUS_TIMEOUT = "timeout"  # first-byte or total timeout
STATUS_CANCELLED = "cancelled"  # stopped by a signal or --max-errors, or lost with its worker process
STATUS_SKIPPED = "skipped"  # not sent because a parent failed
STATUSES = (STATUS_OK, STATUS_ERROR, STATUS_TIMEOUT, STATUS_CANCELLED, STATUS_SKIPPED)

# How a run ended (run_end field ``ended``).
ENDED = ("complete", "interrupted", "max_errors", "bad_input", "worker_lost", "unreachable", "output_closed",
         "stopped")

# How a request's output target is enforced (request field ``output_control``).
#   exact       max_tokens = min_tokens = target (vLLM, SGLang)
#   ignore_eos  max_tokens = target and ignore_eos = true
#   max         max_tokens = target only (the model may stop earlier)
#   prompt      max_tokens = target; the prompt itself asks for the length (servers without min_tokens)
#   none        no length parameter at all
OUTPUT_CONTROLS = ("exact", "ignore_eos", "max", "prompt", "none")

# What a request asks of the server (request field ``task``; absent: chat, or completions with ``prompt``).
#   chat        messages (or prompt) -> generated text, streamed
#   vision      chat whose messages hold image_url parts
#   embeddings  documents -> one vector each (POST {base}/embeddings)
#   rerank      query + documents -> a relevance score each (POST {base}/rerank, or /v2/rerank: endpoint)
#   image_generation  prompt -> images (POST {base}/images/generations)
#   speech      prompt -> audio bytes, streamed (POST {base}/audio/speech)
TASKS = ("chat", "vision", "embeddings", "rerank", "image_generation", "speech")
DOCUMENT_TASKS = ("embeddings", "rerank")
BYTE_TASKS = ("image_generation", "speech")  # answered with bytes (images, audio), not tokens

# Event kinds in response.events.kind (one character per event).
EVENT_CONTENT = "c"  # delta.content (or completions text)
EVENT_REASONING = "r"  # delta.reasoning_content / delta.reasoning
EVENT_TOOL = "t"  # delta.tool_calls
EVENT_EMPTY = "e"  # a chunk with choices but no text (role prelude, finish_reason only)
EVENT_USAGE = "u"  # a usage-only chunk (no choices)
TOKEN_EVENT_KINDS = (EVENT_CONTENT, EVENT_REASONING, EVENT_TOOL)

TIME_FIELDS = (
    "t_intended",  # when the request was meant to be sent (session start + parents done + think time)
    "t_dispatched",  # when the sender's loop picked it up to send
    "t_sent",  # when the request bytes were written to the socket
    "t_first_byte",  # first byte of the response (headers)
    "t_first_token",  # first event carrying any token: content, reasoning or tool call
    "t_first_content",  # first event carrying content (not reasoning)
    "t_last_token",  # last event carrying a token
    "t_done",  # response complete (or failed)
)


# --------------------------------------------------------------------------------------------------------------
# record headers (the field checkers are in vk.record_checks)


def _header(ctx: _Ctx, rec: Any, kind: str) -> None:
    if not isinstance(rec, dict):
        ctx.fail(None, f"expected a JSON object, got {_type_name(rec)}")
    k = rec.get("kind")
    if k != kind:
        ctx.fail("kind", f"expected '{kind}', got {k!r}")
    v = rec.get("v")
    if isinstance(v, bool) or not isinstance(v, int):
        ctx.fail("v", f"expected an integer format version, got {_type_name(v)}")
    if v > VERSIONS[kind] or v < 1:
        ctx.fail("v", f"format version {v} of '{kind}' is not supported (this vk reads up to {VERSIONS[kind]})")


# --------------------------------------------------------------------------------------------------------------
# session (vk-gen)


def new_session(
    session_id: str,
    requests: list[dict],
    *,
    source: dict | None = None,
    trace_time: float | None = None,
    **extra: Any,
) -> dict:
    """A session record: a DAG of requests that vk-send runs as one unit.

    ``source`` is provenance: ``{"generator": ..., "seed": ..., "file": ..., "row": ...}``.
    ``trace_time`` is the session's arrival time in the source trace, seconds from the trace's start (replay).
    """
    rec = {"kind": "session", "v": VERSIONS["session"], "id": session_id, "requests": requests}
    if source is not None:
        rec["source"] = source
    if trace_time is not None:
        rec["trace_time"] = trace_time
    rec.update(extra)
    return rec


def new_request(
    request_id: str,
    *,
    messages: list[dict] | None = None,
    prompt: str | None = None,
    parents: list[str] | None = None,
    history: str | None = None,
    think_time: float = 0.0,
    input_tokens: int | None = None,
    prefix_tokens: int = 0,
    output_tokens: int | None = None,
    output_control: str = "exact",
    params: dict | None = None,
    **extra: Any,
) -> dict:
    """One request of a session.

    Exactly one of ``messages`` (chat) or ``prompt`` (completions) carries the request's *new* content; when
    ``history`` names a parent, vk-send sends that parent's conversation (its own history, its content and the
    text the server returned) before this new content.
    """
    req: dict[str, Any] = {"id": request_id, "parents": list(parents or [])}
    if history is not None:
        req["history"] = history
    if think_time:
        req["think_time"] = think_time
    if messages is not None:
        req["messages"] = messages
    if prompt is not None:
        req["prompt"] = prompt
    if input_tokens is not None:
        req["input_tokens"] = input_tokens
    if prefix_tokens:
        req["prefix_tokens"] = prefix_tokens
    if output_tokens is not None:
        req["output_tokens"] = output_tokens
    if output_control != "exact":
        req["output_control"] = output_control
    if params:
        req["params"] = params
    req.update(extra)
    return req


def validate_session(rec: Any, source: str = "<session>", line: int | None = None) -> dict:
    """Check a session record; raise RecordError naming the field. Returns the record."""
    ctx = _Ctx(source, line)
    _header(ctx, rec, "session")
    sid = _req(ctx, rec, "id")
    if not isinstance(sid, (str, int)) or isinstance(sid, bool):
        ctx.fail("id", f"expected a string, got {_type_name(sid)}")
    reqs = _req(ctx, rec, "requests")
    if not isinstance(reqs, list) or not reqs:
        ctx.fail("requests", "expected a non-empty list of requests")
    ids: dict[str, int] = {}
    for i, r in enumerate(reqs):
        p = f"requests[{i}]."
        if not isinstance(r, dict):
            ctx.fail(f"requests[{i}]", f"expected an object, got {_type_name(r)}")
        rid = _str(ctx, r, "id", p)
        if rid in ids:
            ctx.fail(p + "id", f"duplicate request id {rid!r}")
        ids[rid] = i
    for i, r in enumerate(reqs):
        p = f"requests[{i}]."
        parents = r.get("parents", [])
        if not isinstance(parents, list) or not all(isinstance(x, str) for x in parents):
            ctx.fail(p + "parents", "expected a list of request ids")
        for x in parents:
            if x not in ids:
                ctx.fail(p + "parents", f"unknown request id {x!r}")
            if x == r["id"]:
                ctx.fail(p + "parents", "a request cannot depend on itself")
        hist = _str(ctx, r, "history", p, required=False, nullable=True)
        if hist is not None and hist not in parents:
            ctx.fail(p + "history", f"history parent {hist!r} is not among the parents")
        _num(ctx, r, "think_time", p, required=False, minimum=0)
        task = r.get("task", "chat")
        if task not in TASKS:
            ctx.fail(p + "task", f"expected one of {', '.join(TASKS)}, got {task!r}")
        if task in DOCUMENT_TASKS:
            _validate_document_request(ctx, r, p, task)
            continue
        if task in BYTE_TASKS:
            _str(ctx, r, "prompt", p)
            if r.get("history") is not None:
                ctx.fail(p + "history", f"a {task} request has no conversation to continue")
            for f in ("image_width", "image_height", "images"):
                _num(ctx, r, f, p, required=False, nullable=True, minimum=1, integer=True)
            _obj(ctx, r, "params", p)
            continue
        has_m = "messages" in r and r["messages"] is not None
        has_p = "prompt" in r and r["prompt"] is not None
        if has_m == has_p:
            ctx.fail(p + "messages", "exactly one of 'messages' or 'prompt' is required")
        if has_m:
            msgs = r["messages"]
            if not isinstance(msgs, list):
                ctx.fail(p + "messages", f"expected a list of messages, got {_type_name(msgs)}")
            for j, m in enumerate(msgs):
                if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
                    ctx.fail(f"{p}messages[{j}]", "expected an object with 'role' and 'content'")
        else:
            _str(ctx, r, "prompt", p)
        _num(ctx, r, "input_tokens", p, required=False, nullable=True, minimum=0, integer=True)
        _num(ctx, r, "prefix_tokens", p, required=False, nullable=True, minimum=0, integer=True)
        _num(ctx, r, "output_tokens", p, required=False, nullable=True, minimum=1, integer=True)
        oc = r.get("output_control", "exact")
        if oc not in OUTPUT_CONTROLS:
            ctx.fail(p + "output_control", f"expected one of {', '.join(OUTPUT_CONTROLS)}, got {oc!r}")
        _obj(ctx, r, "params", p)
    _check_acyclic(ctx, reqs)
    _obj(ctx, rec, "source")
    _num(ctx, rec, "trace_time", required=False, nullable=True)
    return rec


def _validate_document_request(ctx: _Ctx, r: dict, p: str, task: str) -> None:
    docs = r.get("documents")
    if not isinstance(docs, list) or not docs or not all(isinstance(d, str) for d in docs):
        ctx.fail(p + "documents", f"a {task} request needs a non-empty list of document strings")
    if task == "rerank":
        _str(ctx, r, "query", p)
    if r.get("history") is not None:
        ctx.fail(p + "history", f"a {task} request has no conversation to continue")
    for f in ("input_tokens", "document_tokens", "query_tokens"):
        _num(ctx, r, f, p, required=False, nullable=True, minimum=0, integer=True)
    _str(ctx, r, "endpoint", p, required=False, nullable=True)
    _obj(ctx, r, "params", p)


def _check_acyclic(ctx: _Ctx, reqs: list[dict]) -> None:
    children: dict[str, list[str]] = {r["id"]: [] for r in reqs}
    indeg = {r["id"]: len(r.get("parents", [])) for r in reqs}
    for r in reqs:
        for x in r.get("parents", []):
            children[x].append(r["id"])
    ready = [k for k, d in indeg.items() if d == 0]
    seen = 0
    while ready:
        k = ready.pop()
        seen += 1
        for c in children[k]:
            indeg[c] -= 1
            if indeg[c] == 0:
                ready.append(c)
    if seen != len(reqs):
        cyc = sorted(k for k, d in indeg.items() if d > 0)
        ctx.fail("requests", f"the request graph has a cycle through {', '.join(cyc[:5])}")


def topological_order(session: dict) -> list[dict]:
    """The session's requests, parents before children (stable: file order among ready requests)."""
    reqs = session["requests"]
    pos = {r["id"]: i for i, r in enumerate(reqs)}
    indeg = {r["id"]: len(r.get("parents", [])) for r in reqs}
    children: dict[str, list[str]] = {r["id"]: [] for r in reqs}
    for r in reqs:
        for x in r.get("parents", []):
            children[x].append(r["id"])
    import heapq

    heap = [pos[k] for k, d in indeg.items() if d == 0]
    heapq.heapify(heap)
    out = []
    while heap:
        i = heapq.heappop(heap)
        r = reqs[i]
        out.append(r)
        for c in children[r["id"]]:
            indeg[c] -= 1
            if indeg[c] == 0:
                heapq.heappush(heap, pos[c])
    return out


# --------------------------------------------------------------------------------------------------------------
# schedule header and scheduled sessions (vk-schedule)

SCHEDULE_MODES = ("open", "closed")


def new_schedule(
    mode: str,
    process: str,
    *,
    seed: int | None,
    params: dict | None = None,
    concurrency: int | None = None,
    **extra: Any,
) -> dict:
    """The schedule header: the first line of vk-schedule's output.

    ``mode`` is ``open`` (each session starts at its own offset) or ``closed`` (vk-send keeps ``concurrency``
    sessions active). ``process`` names the arrival process (poisson, gamma, constant, ramp, stages, onoff,
    replay, closed) and ``params`` holds its parameters.
    """
    rec = {
        "kind": "schedule",
        "v": VERSIONS["schedule"],
        "mode": mode,
        "process": process,
        "params": params or {},
        "seed": seed,
    }
    if concurrency is not None:
        rec["concurrency"] = concurrency
    rec.update(extra)
    return rec


def validate_schedule(rec: Any, source: str = "<schedule>", line: int | None = None) -> dict:
    ctx = _Ctx(source, line)
    _header(ctx, rec, "schedule")
    mode = _str(ctx, rec, "mode")
    if mode not in SCHEDULE_MODES:
        ctx.fail("mode", f"expected 'open' or 'closed', got {mode!r}")
    _str(ctx, rec, "process")
    _obj(ctx, rec, "params")
    _num(ctx, rec, "seed", required=False, nullable=True, integer=True)
    if mode == "closed":
        _num(ctx, rec, "concurrency", minimum=1, integer=True)
    _num(ctx, rec, "start_at", required=False, nullable=True, minimum=0)
    # optional fields written by vk-schedule (vk-send reads duration, ramp_up, rate_limit)
    _num(ctx, rec, "duration", required=False, nullable=True, minimum=0)
    _num(ctx, rec, "max_sessions", required=False, nullable=True, minimum=1, integer=True)
    _num(ctx, rec, "warmup", required=False, nullable=True, minimum=0, integer=True)
    _num(ctx, rec, "ramp_up", required=False, nullable=True, minimum=0)
    _num(ctx, rec, "rate_limit", required=False, nullable=True, minimum=0)
    return rec


def new_scheduled_session(session: dict, start: float | None, index: int, *, warmup: bool = False, **extra) -> dict:
    """A session with its intended start offset (seconds from the run start; null in a closed loop)."""
    rec = {"kind": "scheduled_session", "v": VERSIONS["scheduled_session"], "index": index, "start": start}
    if warmup:
        rec["warmup"] = True
    rec.update(extra)
    rec["session"] = session
    return rec


def validate_scheduled_session(rec: Any, source: str = "<schedule>", line: int | None = None) -> dict:
    ctx = _Ctx(source, line)
    _header(ctx, rec, "scheduled_session")
    _num(ctx, rec, "index", minimum=0, integer=True)
    _num(ctx, rec, "start", nullable=True, minimum=0)
    _bool(ctx, rec, "warmup")
    sess = _req(ctx, rec, "session")
    try:
        validate_session(sess, source, line)
    except RecordError as e:
        ctx.fail("session." + e.field if e.field else "session", e.reason)
    return rec


# --------------------------------------------------------------------------------------------------------------
# run header, responses and run footer (vk-send)


# the APIs vk-send speaks (vk-send --api-style; vk.send.apis): the run header's api_style
API_STYLES = ("openai", "azure", "anthropic", "bedrock", "vertex", "oci", "cohere")


def new_run(
    run_id: str,
    start_epoch: float,
    *,
    api: str,
    model: str | None,
    endpoint: str,
    vk_version: str,
    host: str,
    argv: list[str],
    schedule: dict | None = None,
    **extra: Any,
) -> dict:
    """The run header: the first line of vk-send's output. ``argv`` has secrets removed.

    ``lagged`` is rewritten in place to ``true `` (same length) when the client lagged and the output is a
    regular file; the ``run_end`` footer always carries the verdict.
    """
    rec = {
        "kind": "run",
        "v": VERSIONS["run"],
        "run_id": run_id,
        "start_epoch": start_epoch,
        "api": api,
        "model": model,
        "endpoint": endpoint,
        "vk_version": vk_version,
        "host": host,
        "argv": argv,
        "schedule": schedule,
    }
    rec.update(extra)
    rec["lagged"] = False  # last, so that the in-place rewrite is easy to find
    return rec


def validate_run(rec: Any, source: str = "<run>", line: int | None = None) -> dict:
    ctx = _Ctx(source, line)
    _header(ctx, rec, "run")
    _str(ctx, rec, "run_id")
    _num(ctx, rec, "start_epoch", minimum=0)
    _str(ctx, rec, "api")
    _str(ctx, rec, "model", nullable=True)
    _str(ctx, rec, "endpoint")
    style = _str(ctx, rec, "api_style", required=False)  # absent in runs before vk-send --api-style: openai
    if style is not None and style not in API_STYLES:
        ctx.fail("api_style", f"expected one of {', '.join(API_STYLES)}, got {style!r}")
    _bool(ctx, rec, "lagged")
    _obj(ctx, rec, "schedule")
    server = _obj(ctx, rec, "server")
    if server is not None:
        validate_server_info(server, ctx, "server.")
    ray = _obj(ctx, rec, "ray")
    if ray is not None:
        validate_ray_info(ray, ctx, "ray.")
    return rec


def validate_ray_info(info: dict, ctx: _Ctx, prefix: str = "") -> dict:
    """The ``ray`` object of a run header (vk-send --ray): the cluster's nodes that ran workers, each with its
    clock offset to the driver (node minus driver, seconds) and the offset's uncertainty (half the tightest round
    trip); ``workers`` lists the workers (the responses' ``worker``) placed on it. Responses carry ``node``."""
    _str(ctx, info, "address", prefix)
    _num(ctx, info, "workers_per_node", prefix, required=False, nullable=True, integer=True, minimum=1)
    nodes = info.get("nodes")
    if not isinstance(nodes, list) or not nodes:
        ctx.fail(prefix + "nodes", "expected a list of nodes")
    for i, n in enumerate(nodes):
        p = f"{prefix}nodes[{i}]."
        if not isinstance(n, dict):
            ctx.fail(p[:-1], "expected an object")
        _num(ctx, n, "node", p, integer=True, minimum=0)
        _str(ctx, n, "host", p)
        _num(ctx, n, "clock_offset", p)
        _num(ctx, n, "clock_uncertainty", p, minimum=0)
        _num(ctx, n, "clock_rtt", p, required=False, minimum=0)
        _num(ctx, n, "clock_samples", p, required=False, integer=True, minimum=1)
        w = n.get("workers")
        if not isinstance(w, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in w):
            ctx.fail(p + "workers", "expected a list of worker numbers")
    return info


def validate_server_info(info: dict, ctx: _Ctx, prefix: str = "") -> dict:
    """The ``server`` object of a run header: the server command vk started (vk.launch.Server.info())."""
    _str(ctx, info, "cmd", prefix)
    _num(ctx, info, "pid", prefix, required=False, nullable=True, integer=True, minimum=0)
    _str(ctx, info, "api", prefix, required=False, nullable=True)
    _str(ctx, info, "log", prefix, required=False, nullable=True)
    _num(ctx, info, "start_epoch", prefix, required=False, nullable=True, minimum=0)
    _num(ctx, info, "ready_s", prefix, required=False, nullable=True, minimum=0)
    _obj(ctx, info, "params", prefix)
    models = info.get("models")
    if models is not None and (not isinstance(models, list) or not all(isinstance(m, str) for m in models)):
        ctx.fail(prefix + "models", "expected a list of model ids")
    return info


def new_response(
    run_id: str,
    session_id: str,
    request_id: str,
    status: str,
    **fields: Any,
) -> dict:
    """One response record per request. See TIME_FIELDS and man/vk-formats.5 for every field."""
    rec = {
        "kind": "response",
        "v": VERSIONS["response"],
        "run_id": run_id,
        "session_id": session_id,
        "request_id": request_id,
        "status": status,
    }
    rec.update(fields)
    return rec


def validate_response(rec: Any, source: str = "<response>", line: int | None = None) -> dict:
    ctx = _Ctx(source, line)
    _header(ctx, rec, "response")
    _str(ctx, rec, "run_id")
    _req(ctx, rec, "session_id")
    _str(ctx, rec, "request_id")
    st = _str(ctx, rec, "status")
    if st not in STATUSES:
        ctx.fail("status", f"expected one of {', '.join(STATUSES)}, got {st!r}")
    _num(ctx, rec, "http_status", required=False, nullable=True, integer=True)
    _str(ctx, rec, "error", required=False, nullable=True)
    _str(ctx, rec, "warning", required=False, nullable=True)
    _num(ctx, rec, "attempts", required=False, nullable=True, integer=True, minimum=1)
    _str(ctx, rec, "protocol", required=False, nullable=True)
    for f in TIME_FIELDS:
        _num(ctx, rec, f, required=False, nullable=True)
    ev = _obj(ctx, rec, "events")
    if ev is not None:
        t = ev.get("t")
        if not isinstance(t, list):
            ctx.fail("events.t", "expected a list of times")
        kinds = ev.get("kind", "")
        if not isinstance(kinds, str) or len(kinds) != len(t):
            ctx.fail("events.kind", "expected a string with one character per event")
        for name in ("tokens", "server_t"):
            col = ev.get(name)
            if col is not None and (not isinstance(col, list) or len(col) != len(t)):
                ctx.fail("events." + name, "expected a list with one entry per event")
    usage = _obj(ctx, rec, "usage")
    if usage is not None:
        for f in ("prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens"):
            _num(ctx, usage, f, "usage.", required=False, nullable=True, minimum=0, integer=True)
    return rec


def new_run_end(run_id: str, **fields: Any) -> dict:
    """The run footer: totals, the dispatch-lag verdict and why the run ended."""
    rec = {"kind": "run_end", "v": VERSIONS["run_end"], "run_id": run_id}
    rec.update(fields)
    return rec


def validate_run_end(rec: Any, source: str = "<run>", line: int | None = None) -> dict:
    ctx = _Ctx(source, line)
    _header(ctx, rec, "run_end")
    _str(ctx, rec, "run_id")
    ended = _str(ctx, rec, "ended", required=False, nullable=True)
    if ended is not None and ended not in ENDED:
        ctx.fail("ended", f"expected one of {', '.join(ENDED)}, got {ended!r}")
    for f in ("requests", "sessions_started", "sessions_done", "sessions_not_started", "sessions_scheduled"):
        _num(ctx, rec, f, required=False, nullable=True, minimum=0, integer=True)
    for f in ("input_complete", "reached_server"):
        _bool(ctx, rec, f)
    return rec


# --------------------------------------------------------------------------------------------------------------
# server metrics (vk-send --scrape)

METRIC_TYPES = ("counter", "gauge", "histogram", "summary", "gaugehistogram", "info", "stateset", "unknown")


def new_server_metric(run_id: str, t: float, name: str | None, value: float | None, *,
                      labels: dict | None = None, type: str | None = None, error: str | None = None,
                      **extra: Any) -> dict:
    """One sample of the server's Prometheus exposition, scraped at ``t`` (seconds on the run's clock).

    ``name`` is the sample's name as exposed (counters keep their ``_total``, histograms give ``_sum`` and
    ``_count``); ``value`` is raw (counters are not turned into rates) and null where the exposition said NaN or
    an infinity. A scrape that failed is one record with ``name`` null and ``error`` saying why.
    """
    rec: dict[str, Any] = {"kind": "server_metric", "v": VERSIONS["server_metric"], "run_id": run_id, "t": t,
                           "name": name}
    if labels:
        rec["labels"] = labels
    if type is not None:
        rec["type"] = type
    rec["value"] = value
    if error is not None:
        rec["error"] = error
    rec.update(extra)
    return rec


def validate_server_metric(rec: Any, source: str = "<run>", line: int | None = None) -> dict:
    ctx = _Ctx(source, line)
    _header(ctx, rec, "server_metric")
    _str(ctx, rec, "run_id")
    _num(ctx, rec, "t")
    name = _str(ctx, rec, "name", nullable=True)
    err = _str(ctx, rec, "error", required=False, nullable=True)
    if name is None and err is None:
        ctx.fail("name", "missing (only a failed scrape, with 'error', has no name)")
    _num(ctx, rec, "value", required=name is not None, nullable=True)
    labels = _obj(ctx, rec, "labels")
    if labels is not None and not all(isinstance(v, str) for v in labels.values()):
        ctx.fail("labels", "expected an object of strings")
    typ = rec.get("type")
    if typ is not None and typ not in METRIC_TYPES:
        ctx.fail("type", f"expected one of {', '.join(METRIC_TYPES)}, got {typ!r}")
    return rec


# --------------------------------------------------------------------------------------------------------------
# sweep header, probe summaries and sweep footer (vk-sweep)

SWEEP_KNOBS = ("poisson", "gamma", "concurrency", "target_rate")
SWEEP_MODES = ("grid", "search")
PROBE_VERDICTS = ("pass", "fail")


def new_sweep(sweep_id: str, mode: str, knob: str, **fields: Any) -> dict:
    """The sweep header: the first line of ``DIR/sweep.jsonl`` (the sweep's options, its objectives, its input)."""
    rec = {"kind": "sweep", "v": VERSIONS["sweep"], "sweep_id": sweep_id, "mode": mode, "knob": knob}
    rec.update(fields)
    return rec


def validate_sweep(rec: Any, source: str = "<sweep>", line: int | None = None) -> dict:
    ctx = _Ctx(source, line)
    _header(ctx, rec, "sweep")
    _str(ctx, rec, "sweep_id")
    if _str(ctx, rec, "mode") not in SWEEP_MODES:
        ctx.fail("mode", f"expected one of {', '.join(SWEEP_MODES)}, got {rec['mode']!r}")
    if _str(ctx, rec, "knob") not in SWEEP_KNOBS:
        ctx.fail("knob", f"expected one of {', '.join(SWEEP_KNOBS)}, got {rec['knob']!r}")
    _num(ctx, rec, "seed", required=False, nullable=True, integer=True)
    _str(ctx, rec, "slo", required=False, nullable=True)
    _str(ctx, rec, "goodput", required=False, nullable=True)
    _num(ctx, rec, "min_goodput", required=False, nullable=True, minimum=0)
    return rec


def new_sweep_probe(sweep_id: str, probe: str, index: int, knob: str, value: float, **fields: Any) -> dict:
    """One line per probe: what was offered, what the server did, and the verdict with its confidence."""
    rec = {"kind": "sweep_probe", "v": VERSIONS["sweep_probe"], "sweep_id": sweep_id, "probe": probe,
           "index": index, "knob": knob, "value": value}
    rec.update(fields)
    return rec


def validate_sweep_probe(rec: Any, source: str = "<sweep>", line: int | None = None) -> dict:
    ctx = _Ctx(source, line)
    _header(ctx, rec, "sweep_probe")
    _str(ctx, rec, "sweep_id")
    _str(ctx, rec, "probe")
    _num(ctx, rec, "index", minimum=0, integer=True)
    if _str(ctx, rec, "knob") not in SWEEP_KNOBS:
        ctx.fail("knob", f"expected one of {', '.join(SWEEP_KNOBS)}, got {rec['knob']!r}")
    _num(ctx, rec, "value", minimum=0)
    _num(ctx, rec, "seed", required=False, nullable=True, integer=True)
    v = _str(ctx, rec, "verdict", required=False, nullable=True)
    if v is not None and v not in PROBE_VERDICTS:
        ctx.fail("verdict", f"expected 'pass', 'fail' or null, got {v!r}")
    conf = _num(ctx, rec, "confidence", required=False, nullable=True, minimum=0)
    if conf is not None and conf > 1:
        ctx.fail("confidence", f"must be <= 1, got {conf}")
    _bool(ctx, rec, "uncertain")
    _obj(ctx, rec, "saturation")
    checks = rec.get("checks")
    if checks is not None:
        if not isinstance(checks, list):
            ctx.fail("checks", f"expected a list, got {_type_name(checks)}")
        for i, c in enumerate(checks):
            if not isinstance(c, dict):
                ctx.fail(f"checks[{i}]", f"expected an object, got {_type_name(c)}")
            _str(ctx, c, "slo", f"checks[{i}].")
            _num(ctx, c, "value", f"checks[{i}].", nullable=True)
            _num(ctx, c, "threshold", f"checks[{i}].")
            _bool(ctx, c, "ok", f"checks[{i}].", required=True)
    return rec


def new_sweep_end(sweep_id: str, **fields: Any) -> dict:
    """The sweep footer: the answer (an interval with its confidence, for a search), probe count and time."""
    rec = {"kind": "sweep_end", "v": VERSIONS["sweep_end"], "sweep_id": sweep_id}
    rec.update(fields)
    return rec


def validate_sweep_end(rec: Any, source: str = "<sweep>", line: int | None = None) -> dict:
    ctx = _Ctx(source, line)
    _header(ctx, rec, "sweep_end")
    _str(ctx, rec, "sweep_id")
    ans = _obj(ctx, rec, "answer")
    if ans is not None:
        lo = _num(ctx, ans, "last_pass", "answer.", nullable=True)
        hi = _num(ctx, ans, "first_fail", "answer.", nullable=True)
        if lo is not None and hi is not None and lo >= hi:
            ctx.fail("answer", f"last_pass ({lo}) must be below first_fail ({hi})")
    return rec


VALIDATORS = {
    "session": validate_session,
    "schedule": validate_schedule,
    "scheduled_session": validate_scheduled_session,
    "run": validate_run,
    "response": validate_response,
    "run_end": validate_run_end,
    "server_metric": validate_server_metric,
    "sweep": validate_sweep,
    "sweep_probe": validate_sweep_probe,
    "sweep_end": validate_sweep_end,
}


def validate(rec: Any, source: str = "<record>", line: int | None = None, kinds: tuple[str, ...] | None = None):
    """Validate a record of any kind (or of one of ``kinds``)."""
    if not isinstance(rec, dict):
        raise RecordError(source, line, None, f"expected a JSON object, got {_type_name(rec)}")
    kind = rec.get("kind")
    if kinds is not None and kind not in kinds:
        raise RecordError(source, line, "kind", f"expected {' or '.join(repr(k) for k in kinds)}, got {kind!r}")
    fn = VALIDATORS.get(kind)
    if fn is None:
        raise RecordError(source, line, "kind", f"unknown record kind {kind!r}")
    return fn(rec, source, line)
