"""``vk-eval trace``: a run as a Chrome trace-event / Perfetto timeline (JSON object format).

One process per run, one track per session (or per vk-send worker), a complete slice (``ph: X``, category
``request``) per request from ``t_intended`` to ``t_done``, with its phases nested inside it (category
``phase``: queued = t_intended..t_sent, waiting for first token = t_sent..t_first_token (or t_done when none
came), decoding = t_first_token..t_done) and instant markers (``ph: i``) for the first byte, the first content
token when it comes after a reasoning phase, a retried connection, the failure of a request, and the run's end.
Requests of one session that overlap in time (parallel children of an agentic session) go on extra lanes of
that session ("s1 #2"), since a trace viewer nests the slices of one track by time. Times are microseconds
from the run's start (the trace format's unit). Streams: one response record in memory at a time (plus the
lanes' busy intervals), one event written per line.
"""

from __future__ import annotations

import bisect
import os
from typing import IO

import orjson

from vk.errors import VkError
from vk.jsonl import read_records

US = 1e6
BY = ("session", "worker")


def _us(t: float) -> float:
    return round(t * US, 3)


def _dur(t0: float, t1: float) -> float:
    """The duration between two rounded instants, so that a phase never ends after its request."""
    return round(_us(t1) - _us(t0), 3)


class _Lanes:
    """Track ids: one per session (or worker); a request overlapping another of the same key gets another lane."""

    def __init__(self) -> None:
        self.next_tid = 1
        # per key: lanes of (tid, starts, ends), each lane's intervals disjoint and sorted
        self.lanes: dict[str, list[tuple[int, list[float], list[float]]]] = {}

    def tid(self, key: str, t0: float, t1: float) -> tuple[int, str | None]:
        """(track id, its name when the track is new)."""
        lanes = self.lanes.setdefault(key, [])
        for tid, starts, ends in lanes:
            i = bisect.bisect_right(starts, t0)
            if (i == 0 or ends[i - 1] <= t0) and (i == len(starts) or starts[i] >= t1):
                starts.insert(i, t0)
                ends.insert(i, t1)
                return tid, None
        tid = self.next_tid
        self.next_tid += 1
        lanes.append((tid, [t0], [t1]))
        return tid, key if len(lanes) == 1 else f"{key} #{len(lanes)}"


def _phases(r: dict) -> list[tuple[str, float, float]]:
    """(name, start, end) of the request's phases that happened, in order."""
    t_int, t_sent, t_ft, t_done = r.get("t_intended"), r.get("t_sent"), r.get("t_first_token"), r.get("t_done")
    out = []
    if t_int is not None and t_sent is not None:
        out.append(("queued", t_int, t_sent))
    if t_sent is not None:
        end = t_ft if t_ft is not None else t_done
        if end is not None:
            out.append(("waiting for first token", t_sent, end))
    if t_ft is not None and t_done is not None:
        out.append(("decoding", t_ft, t_done))
    return [(n, a, b) for n, a, b in out if b >= a]


def _args(r: dict) -> dict:
    u = r.get("usage") or {}
    out = {k: r.get(k) for k in ("run_id", "session_id", "request_id", "status", "worker", "session_index",
                                 "http_status", "x_request_id", "server_request_id", "finish_reason")
           if r.get(k) is not None}
    out.update({k: u.get(k) for k in ("prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens")
                if u.get(k) is not None})
    for k in ("target_input_tokens", "target_output_tokens"):
        if r.get(k) is not None:
            out[k] = r[k]
    if r.get("error"):
        out["error"] = r["error"]
    return out


def write_trace(inputs: list[str], out: IO[bytes], *, by: str = "session") -> dict:
    """Write the trace of the runs in ``inputs`` to ``out``; returns counts (requests, slices, instants)."""
    if by not in BY:
        raise VkError(f"--by {by}: choose {' or '.join(BY)}")
    counts = {"requests": 0, "phases": 0, "instants": 0}
    pids: dict[str, int] = {}
    lanes: dict[str, _Lanes] = {}
    first = True

    def emit(ev: dict) -> None:
        nonlocal first
        out.write((b"" if first else b",\n") + orjson.dumps(ev))
        first = False

    out.write(b'{"displayTimeUnit": "ms", "otherData": {"generator": "vk-eval trace"}, "traceEvents": [\n')
    for src, line, rec in read_records(inputs, ("run", "response", "server_metric", "run_end")):
        kind = rec["kind"]
        run_id = str(rec.get("run_id"))
        if kind == "run":
            pid = pids.setdefault(run_id, len(pids) + 1)
            lanes[run_id] = _Lanes()
            emit({"ph": "M", "name": "process_name", "pid": pid, "tid": 0,
                  "args": {"name": f"run {run_id} ({rec.get('model')} at {rec.get('api')})"}})
            continue
        if kind == "server_metric":
            continue
        if run_id not in pids:
            raise VkError(f"{src}:{line}: a {kind} record of run {run_id} before its run header")
        pid = pids[run_id]
        if kind == "run_end":
            t = rec.get("duration")
            emit({"ph": "i", "s": "p", "name": f"run ended: {rec.get('ended')}", "pid": pid, "tid": 0,
                  "ts": _us(t or 0.0), "args": {k: rec.get(k) for k in ("ended", "reason", "requests", "errors",
                                                                          "lagged") if k in rec}})
            counts["instants"] += 1
            continue
        counts["requests"] += 1
        t0 = rec.get("t_intended")
        if t0 is None:
            t0 = rec.get("t_dispatched") if rec.get("t_dispatched") is not None else rec.get("t_done")
        t1 = rec.get("t_done")
        if t0 is None:
            t0 = t1 if t1 is not None else 0.0
        if t1 is None or t1 < t0:
            t1 = t0
        key = (f"session {rec.get('session_id')}" if by == "session"
               else f"worker {rec.get('worker') if rec.get('worker') is not None else '?'}")
        tid, name = lanes[run_id].tid(key, t0, t1)
        if name is not None:
            emit({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": name}})
            emit({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid, "args": {"sort_index": tid}})
        label = f"{rec.get('request_id')}" + ("" if rec.get("status") == "ok" else f" ({rec.get('status')})")
        emit({"ph": "X", "cat": "request", "name": label, "pid": pid, "tid": tid, "ts": _us(t0),
              "dur": _dur(t0, t1), "args": _args(rec)})
        for pname, a, b in _phases(rec):
            emit({"ph": "X", "cat": "phase", "name": pname, "pid": pid, "tid": tid, "ts": _us(a), "dur": _dur(a, b),
                  "args": {"request_id": rec.get("request_id")}})
            counts["phases"] += 1
        marks = []
        if rec.get("t_first_byte") is not None:
            marks.append(("first byte", rec["t_first_byte"], {}))
        tfc, tft = rec.get("t_first_content"), rec.get("t_first_token")
        if tfc is not None and tft is not None and tfc > tft:
            marks.append(("first content token", tfc, {}))
        if (rec.get("attempts") or 1) > 1:
            marks.append(("retried on a new connection", rec.get("t_sent") or t0, {"attempts": rec["attempts"]}))
        if rec.get("status") != "ok":
            marks.append((f"{rec.get('status')}", t1, {"error": rec.get("error"), "http_status": rec.get("http_status")}))
        for mname, t, extra in marks:
            emit({"ph": "i", "s": "t", "cat": "event", "name": mname, "pid": pid, "tid": tid, "ts": _us(t),
                  "args": {"request_id": rec.get("request_id"), **extra}})
            counts["instants"] += 1
    out.write(b"\n]}\n")
    return counts


def trace_file(inputs: list[str], output: str, *, by: str = "session") -> dict:
    """``vk-eval trace``: write the trace to ``output`` (``-``: stdout); a half-written file is removed."""
    import sys

    from vk.eval.outputs import writing

    if output == "-":
        with writing("<stdout>"):
            res = write_trace(inputs, sys.stdout.buffer, by=by)
            sys.stdout.buffer.flush()
        return res
    tmp = output + ".part"
    try:
        with writing(output), open(tmp, "wb") as f:
            res = write_trace(inputs, f, by=by)
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return res


__all__ = ["write_trace", "trace_file"]
