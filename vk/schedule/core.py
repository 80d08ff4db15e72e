"""vk-schedule's engine: sessions in, a schedule header and scheduled_session records out.

The engine works on raw JSON lines. Each input line is parsed once with orjson to check it (kind, v, id,
requests; ``validate=True`` runs the full session validator) and the ORIGINAL bytes of the session are spliced
into the output line, so a session is never re-encoded unless its id has to change (copies). Input is read in
chunks of whatever the pipe has (``read1``); each chunk's output is written and flushed at once, so output
never waits on input that has not arrived yet, and memory stays flat.

Multi-pass modes (``cycle``, replay with ``target_rate``) re-read the input: a single regular file is re-opened,
anything else (stdin, several files, Python iterables) is spooled to a temporary file on the first pass.
"""

from __future__ import annotations

import heapq
import math
import os
import stat
import sys
import tempfile
from collections.abc import Iterable, Iterator
from itertools import islice

import orjson

from vk import records
from vk.errors import RecordError, VkError
from vk.jsonl import dumps, open_input, source_name
from vk.schedule import processes
from vk.schedule.options import OPEN_PROCESSES, Config, make_config, make_process  # noqa: F401 - re-exported
from vk.schedule.stats import StatsAcc, schedule_stats  # noqa: F401 - re-exported

CHUNK = 1 << 16  # bytes read at a time

_HEAD = b'{"kind":"scheduled_session","v":1,"index":%d,"start":%r,"session":'
# Sessions that mark themselves as warm-up (e.g. vk-gen's rag flavor) stay warm-up: a byte search is enough,
# since inside a JSON string a quote is always escaped.
_WARM_KEY = b'"warmup":true'
_HEAD_WARM = b'{"kind":"scheduled_session","v":1,"index":%d,"start":%r,"warmup":true,"session":'
_HEAD_CLOSED = b'{"kind":"scheduled_session","v":1,"index":%d,"start":null,"session":'
_HEAD_CLOSED_WARM = b'{"kind":"scheduled_session","v":1,"index":%d,"start":null,"warmup":true,"session":'
_TAIL = b"}\n"



# --------------------------------------------------------------------------------------------------------------
# input


def _read_chunks(fh) -> Iterator[list[bytes]]:
    """Lists of complete lines (trailing newline optional), for a regular file in blocks of about 256 KiB, for a
    pipe or terminal one list per read of whatever is available (so output never waits for input that has not
    arrived yet)."""
    try:
        regular = stat.S_ISREG(os.fstat(fh.fileno()).st_mode)
    except (AttributeError, OSError, ValueError):
        regular = False
    if regular and hasattr(fh, "readlines"):
        readlines = fh.readlines
        while True:
            lines = readlines(CHUNK)
            if not lines:
                return
            yield lines
    read = fh.read1 if hasattr(fh, "read1") else fh.read
    carry = b""
    while True:
        chunk = read(CHUNK)
        if not chunk:
            break
        data = carry + chunk if carry else chunk
        lines = data.split(b"\n")
        carry = lines.pop()
        if lines:
            yield lines
    if carry:
        yield [carry]


def _bad_session(src: str, n: int, obj) -> None:
    """Raise the precise error for a line that failed the quick check (or return if it is a valid session)."""
    if not isinstance(obj, dict):
        raise RecordError(src, n, None, f"expected a JSON object, got {records._type_name(obj)}")
    records.validate_session(obj, src, n)


class Input:
    """The sessions to schedule: JSONL files (``-`` is stdin) or an iterable of session dicts.

    :meth:`first_pass` yields checked sessions as raw lines; :meth:`rewind` returns a path to re-read them
    (spooled to a temporary file when they do not come from one regular file).
    """

    def __init__(self, paths: list[str] | None = None, sessions: Iterable[dict] | None = None, *,
                 validate: bool = False, keep: bool = False):
        self.paths = list(paths) if paths is not None else None
        self.sessions = sessions
        self.validate = validate
        self.count = 0  # sessions read on the first pass
        self.last_tokens: list = []  # (input, cached) tokens of the sessions of the chunk yielded last
        self.exhausted = False
        self._spool = None
        self._path = None
        if keep:
            if self.paths is not None and len(self.paths) == 1 and self.paths[0] != "-" \
                    and os.path.isfile(self.paths[0]):
                self._path = self.paths[0]
            else:
                fd, self._path = tempfile.mkstemp(prefix="vk-schedule-", suffix=".jsonl")
                self._spool = os.fdopen(fd, "wb")

    def _raw_chunks(self) -> Iterator[tuple[str, list[bytes]]]:
        if self.sessions is not None:
            it = iter(self.sessions)
            while True:
                block = list(islice(it, 256))
                if not block:
                    return
                lines = []
                for s in block:
                    if not isinstance(s, dict):
                        raise VkError(f"<sessions>: expected session dicts, got {type(s).__name__}")
                    lines.append(orjson.dumps(s))
                yield "<sessions>", lines
            return
        for path in self.paths or ["-"]:
            src = source_name(path)
            fh = open_input(path)
            try:
                for lines in _read_chunks(fh):
                    yield src, lines
            finally:
                if fh is not sys.stdin.buffer:
                    fh.close()

    def first_pass(self, with_time: bool = False) -> Iterator[list]:
        """Checked sessions, a list per chunk: raw lines, or (line, trace_time, raw) with ``with_time``."""
        loads = orjson.loads
        decode_error = orjson.JSONDecodeError
        full = self.validate
        spool = self._spool
        src_prev, n = None, 0
        for src, lines in self._raw_chunks():
            if src != src_prev:
                src_prev, n = src, 0
            out = []
            toks: list = []
            self.last_tokens = toks  # (input, cached) of each session of the chunk yielded last
            for line in lines:
                n += 1
                raw = line.rstrip()
                if not raw:
                    continue
                try:
                    obj = loads(raw)
                except decode_error as e:
                    raise RecordError(src, n, None, f"not valid JSON ({e})") from None
                if (type(obj) is not dict or obj.get("kind") != "session" or obj.get("v") != 1
                        or type(obj.get("id")) is not str or type(obj.get("requests")) is not list
                        or not obj["requests"]):
                    _bad_session(src, n, obj)
                if full:
                    records.validate_session(obj, src, n)
                if with_time:
                    tt = obj.get("trace_time")
                    if isinstance(tt, bool) or not isinstance(tt, (int, float)) or not math.isfinite(tt):
                        why = "missing" if tt is None else f"expected a number, got {records._type_name(tt)}"
                        raise RecordError(src, n, "trace_time", f"{why} (--replay needs sessions from a trace)")
                    out.append((n, src, tt, raw))
                else:
                    out.append(raw)
                    toks.append(_request_tokens(obj))
            if out:
                self.count += len(out)
                if spool is not None:
                    spool.write(b"\n".join(x[3] for x in out) if with_time else b"\n".join(out))
                    spool.write(b"\n")
                yield out
        self.exhausted = True

    def rewind(self) -> str:
        """A path holding every session read by the first pass (call after it is exhausted)."""
        if self._spool is not None and not self._spool.closed:
            self._spool.close()
        assert self._path is not None
        return self._path

    def close(self) -> None:
        if self._spool is not None:
            if not self._spool.closed:
                self._spool.close()
            try:
                os.unlink(self._path)
            except OSError:
                pass


def _copy(raw: bytes, n: int, identical: bool = False, counts: dict | None = None) -> bytes:
    """Copy ``n`` (>= 2) of a session: its id gains ``#n`` and ``copy_of`` names the original. Unless
    ``identical``, its prompts are made new requests to the server (vk.gen.copies.retext: the first word of every
    conversation is swapped for another of one token), so that a copy does not hit the prefix cache its original
    filled; ``counts["unchanged"]`` counts requests that could not be changed."""
    obj = orjson.loads(raw)
    sid = obj["id"]
    if not identical:
        from vk.gen.copies import retext

        obj, unchanged = retext(obj, n)
        if counts is not None and unchanged:
            counts["unchanged"] = counts.get("unchanged", 0) + unchanged
    obj["id"] = f"{sid}#{n}"
    obj["copy_of"] = sid
    return orjson.dumps(obj)


def _request_tokens(obj: dict, identical_copy: bool = False) -> tuple[int, int]:
    """(prompt tokens, tokens an infinite prefix cache serves) of a parsed session, from its targets.

    A request that continues a conversation (``history``: a parent) is sent with that parent's whole prompt and
    output before its own new content (man vk-formats: history), so its prompt is the parent's prompt plus the
    parent's ``output_tokens`` plus its own ``input_tokens``, and the cache serves the history plus the declared
    shared prefix of the new content: the rule of vk-eval's "ideal cache share" (vk.eval.summary._caching:
    history plus min(prefix_tokens, new content)), here from the targets instead of the measured prompt_tokens.
    An identical copy is served whole (its original came first)."""
    reqs = {r.get("id"): r for r in obj.get("requests") or () if type(r) is dict}
    prompt: dict = {}

    def prompt_len(rid, depth: int = 0) -> int:
        if rid in prompt:
            return prompt[rid]
        r = reqs.get(rid)
        n = r.get("input_tokens") if r is not None else None
        n = n if type(n) is int else 0
        h = r.get("history") if r is not None else None
        if h is not None and h in reqs and depth < len(reqs):  # depth: a (refused elsewhere) cycle cannot loop
            out = reqs[h].get("output_tokens")
            n += prompt_len(h, depth + 1) + (out if type(out) is int else 0)
        prompt[rid] = n
        return n

    inp = cached = 0
    for rid, r in reqs.items():
        n = r.get("input_tokens")
        if type(n) is not int:
            continue
        total = prompt_len(rid)
        p = r.get("prefix_tokens")
        inp += total
        cached += total if identical_copy else (total - n) + (min(max(p, 0), n) if type(p) is int else 0)
    return inp, cached


def _cache_tokens(raw: bytes, identical_copy: bool) -> tuple[int, int]:
    return _request_tokens(orjson.loads(raw), identical_copy)


def _reread(path: str) -> Iterator[list[bytes]]:
    with open(path, "rb") as fh:
        for lines in _read_chunks(fh):
            out = [x for x in (ln.rstrip() for ln in lines) if x]
            if out:
                yield out


# --------------------------------------------------------------------------------------------------------------
# the scheduler


class Scheduler:
    """Runs one schedule: ``for chunk in Scheduler(cfg, inp).run()`` gives output bytes (header line first)."""

    def __init__(self, cfg: Config, inp: Input):
        self.cfg = cfg
        self.inp = inp
        self.stop = None  # why the schedule ended
        self.header: dict | None = None
        self.stats: StatsAcc | None = None
        self.copy_counts: dict = {}

    def summary(self) -> dict:
        assert self.stats is not None
        out = self.stats.result(self.stop)
        out["copies_unchanged"] = self.copy_counts.get("unchanged", 0)
        return out

    def run(self) -> Iterator[bytes]:
        cfg = self.cfg
        try:
            if cfg.process == "replay":
                items = self._replay_items()  # runs the pre-pass before the header when it needs one
                first = next(items, None)
                self.header = cfg.header()
                self.stats = StatsAcc(self.header)
                yield dumps(self.header)
                if first is not None:
                    yield from self._emit_replay(first, items)
                elif self.stop is None:
                    self.stop = "end of input"
            else:
                self.header = cfg.header()
                self.stats = StatsAcc(self.header)
                yield dumps(self.header)
                yield from self._emit(self._sessions())
        finally:
            self.inp.close()

    # ---- sessions for open (non-replay) and closed loops

    def _sessions(self) -> Iterator[tuple[list[bytes], list | None]]:
        """(raw sessions, their (input, cached) tokens or None: to be read from the raws) per chunk."""
        inp = self.inp
        for raws in inp.first_pass():
            yield raws, inp.last_tokens
        if not self.cfg.cycle or self.inp.count == 0:
            return
        path = self.inp.rewind()
        p = 2
        while True:
            for raws in _reread(path):
                yield [_copy(r, p, self.cfg.identical_copies, self.copy_counts) for r in raws], None
            p += 1

    def _emit(self, batches: Iterator[tuple[list[bytes], list | None]]) -> Iterator[bytes]:
        cfg = self.cfg
        closed = cfg.mode == "closed"
        proc = None if closed else make_process(cfg)
        dur = math.inf if cfg.duration is None or closed else cfg.duration
        maxn = math.inf if cfg.max_sessions is None else cfg.max_sessions
        warm = cfg.warmup
        sk, sn = (cfg.shard[0] - 1, cfg.shard[1]) if cfg.shard else (0, 1)
        head, head_w = (_HEAD_CLOSED, _HEAD_CLOSED_WARM) if closed else (_HEAD, _HEAD_WARM)
        stats = self.stats
        ident = cfg.identical_copies  # sessions without token counts are the copies
        times: list[float] = []
        j = 0
        idx = 0
        stop = None
        for raws, toks in batches:
            out: list[bytes] = []
            ts: list = []
            nwarm = 0
            append = out.append
            for i, raw in enumerate(raws):
                if closed:
                    t = None
                else:
                    if j >= len(times):
                        times = proc.next_block()
                        j = 0
                        if not times:
                            stop = "end of the arrival process"
                            break
                    t = times[j]
                    j += 1
                    if t >= dur:
                        stop = "--duration"
                        break
                if idx % sn == sk:
                    if idx < warm or _WARM_KEY in raw:
                        append((head_w % (idx, t)) if t is not None else (head_w % idx))
                        nwarm += 1
                    else:
                        append((head % (idx, t)) if t is not None else (head % idx))
                    stats.add_tokens(*(toks[i] if toks is not None else _cache_tokens(raw, ident)))
                    append(raw)
                    append(_TAIL)
                    ts.append(t)
                idx += 1
                if idx >= maxn:
                    stop = "--max-sessions"
                    break
            if out:
                yield b"".join(out)
                stats.add(ts, nwarm)
            if stop:
                break
        self.stop = stop or "end of input"

    # ---- trace replay

    def _advance(self, tau: float, tprev: float | None, tt: float, src: str, n: int) -> float:
        if tprev is None:
            return 0.0
        gap = tt - tprev
        if gap < 0:
            raise RecordError(src, n, "trace_time",
                              f"goes back in time ({tt} after {tprev}); sort the sessions by trace_time")
        gap /= self._speedup
        if self._max_idle is not None and gap > self._max_idle:
            gap = self._max_idle
        return tau + gap

    def _replay_items(self) -> Iterator[tuple[float, int, bytes]]:
        """(start, copy number, raw) in start order, before duration/max-sessions/shard."""
        p = self.cfg.params
        self._speedup = p["speedup"]
        self._max_idle = p.get("max_idle")
        target = p.get("target_rate")
        if target is None:
            # stream the first pass as it comes
            tau, tprev, n_read = 0.0, None, 0
            yielded_first = False
            for items in self.inp.first_pass(with_time=True):
                for n, src, tt, raw in items:
                    tau = self._advance(tau, tprev, tt, src, n)
                    tprev = tt
                    n_read += 1
                    yielded_first = True
                    yield round(tau, processes.DECIMALS), 1, raw
            if not self.cfg.cycle or not yielded_first:
                return
            period = self._period(n_read, tau)
            path = self.inp.rewind()
            yield from self._copies(path, period, [0.0], start_pass=2)
            return
        # pre-pass: count the sessions and measure the trace, so the rate factor is known before the header
        tau, tprev, n_read = 0.0, None, 0
        for items in self.inp.first_pass(with_time=True):
            for n, src, tt, _raw in items:
                tau = self._advance(tau, tprev, tt, src, n)
                tprev = tt
                n_read += 1
        if n_read == 0:
            return
        period = self._period(n_read, tau)
        natural = n_read / period
        factor = target / natural
        m = max(1, math.ceil(factor - 1e-9))
        # copies 1..m-1 are kept whole, the last one is thinned to the fraction left (all of it when f is whole)
        keep = factor - (m - 1)
        if keep > 1.0 - 1e-9:
            keep = 1.0
        g = processes.rng(self.cfg.seed, "replay-shift")
        shifts = [0.0] + g.uniform(0.0, period, m - 1).tolist()
        p.update({"natural_rate": natural, "period": period, "trace_sessions": n_read, "factor": factor,
                  "copies": m, "keep": keep})
        path = self.inp.rewind()
        merged = self._copies(path, period, shifts, start_pass=1)
        if keep >= 1.0:
            yield from merged
            return
        thin = processes.rng(self.cfg.seed, "replay-thin")
        u: list[float] = []
        j = 0
        for item in merged:
            if (item[1] - 1) % m + 1 < m:  # not the last copy of its pass: kept whole
                yield item
                continue
            if j >= len(u):
                u = thin.random(processes.BLOCK).tolist()
                j = 0
            x = u[j]
            j += 1
            if x < keep:
                yield item

    def _period(self, n_read: int, tau_last: float) -> float:
        if n_read < 2 or tau_last <= 0:
            raise VkError("--replay with --cycle or --target-rate needs a trace of at least two sessions "
                          "at different trace_time values")
        return tau_last * n_read / (n_read - 1)  # span plus one mean gap: the trace's period when repeated

    def _copies(self, path: str, period: float, shifts: list[float], start_pass: int):
        """Passes over the trace from ``start_pass`` on (for ever with cycle): each pass superposes one copy of
        the trace per shift, copy j circularly shifted by shifts[j] within the period."""
        m = len(shifts)
        starts = self._wraps(path, [period - s for s in shifts])
        p = start_pass
        while True:
            readers = [self._reader(path, starts[j], shifts[j], period, (p - 1) * period, (p - 1) * m + j + 1)
                       for j in range(m)]
            if m == 1:
                yield from readers[0]
            else:
                yield from heapq.merge(*readers, key=lambda x: x[0])
            if not self.cfg.cycle:
                return
            p += 1

    def _wraps(self, path: str, thresholds: list[float]) -> list[tuple[int, float, float | None]]:
        """For each threshold, (byte offset, tau, trace_time) of the first session with tau >= threshold."""
        order = sorted(range(len(thresholds)), key=lambda j: thresholds[j])
        res: list = [None] * len(thresholds)
        k = 0
        off = 0
        tau, tprev = 0.0, None
        with open(path, "rb") as fh:
            for n, line in enumerate(fh, 1):
                raw = line.rstrip()
                if raw:
                    tt = orjson.loads(raw)["trace_time"]
                    tau = self._advance(tau, tprev, tt, path, n)
                    while k < len(order) and tau >= thresholds[order[k]]:
                        res[order[k]] = (off, tau, tt)
                        k += 1
                    tprev = tt
                    if k == len(order):
                        break
                off += len(line)
            else:
                off = fh.tell()
        for j in range(len(res)):
            if res[j] is None:
                res[j] = (off, None, None)  # wraps at the end: the whole trace shifted
        return res

    def _reader(self, path: str, start, shift: float, period: float, base: float, copy_n: int):
        """One copy of the trace: from the wrap point to the end (time tau + shift - period), then from the
        start up to the wrap point (time tau + shift); ``base`` is added to every time (cycle passes)."""
        off0, tau0, tt0 = start
        dec = processes.DECIMALS
        with open(path, "rb") as fh:
            if tau0 is not None:
                fh.seek(off0)
                tau, tprev = tau0, None
                for line in fh:
                    raw = line.rstrip()
                    if not raw:
                        continue
                    tt = orjson.loads(raw)["trace_time"]
                    tau = tau0 if tprev is None else self._advance(tau, tprev, tt, path, 0)
                    tprev = tt
                    yield round(base + tau + shift - period, dec), copy_n, raw
                fh.seek(0)
            tau, tprev = 0.0, None
            pos = 0
            for line in fh:
                if pos >= off0:
                    break
                pos += len(line)
                raw = line.rstrip()
                if not raw:
                    continue
                tt = orjson.loads(raw)["trace_time"]
                tau = self._advance(tau, tprev, tt, path, 0)
                tprev = tt
                yield round(base + tau + shift, dec), copy_n, raw

    def _emit_replay(self, first, items) -> Iterator[bytes]:
        cfg = self.cfg
        dur = math.inf if cfg.duration is None else cfg.duration
        maxn = math.inf if cfg.max_sessions is None else cfg.max_sessions
        warm = cfg.warmup
        sk, sn = (cfg.shard[0] - 1, cfg.shard[1]) if cfg.shard else (0, 1)
        idx = 0
        stop = None
        out: list[bytes] = []
        ts: list[float] = []
        nwarm = 0

        def chain():
            yield first
            yield from items

        for t, copy_n, raw in chain():
            if t >= dur:
                stop = "--duration"
                break
            if idx % sn == sk:
                if copy_n > 1:
                    raw = _copy(raw, copy_n, cfg.identical_copies, self.copy_counts)
                self.stats.add_tokens(*_cache_tokens(raw, copy_n > 1 and cfg.identical_copies))
                if idx < warm or _WARM_KEY in raw:
                    out.append(_HEAD_WARM % (idx, t))
                    nwarm += 1
                else:
                    out.append(_HEAD % (idx, t))
                out.append(raw)
                out.append(_TAIL)
                ts.append(t)
                if len(ts) >= 256:
                    yield b"".join(out)
                    self.stats.add(ts, nwarm)
                    out, ts, nwarm = [], [], 0
            idx += 1
            if idx >= maxn:
                stop = "--max-sessions"
                break
        if out:
            yield b"".join(out)
            self.stats.add(ts, nwarm)
        self.stop = stop or "end of input"


# --------------------------------------------------------------------------------------------------------------
# Python API


def schedule(
    sessions: Iterable[dict],
    *,
    seed=0,
    poisson=None,
    gamma=None,
    cv=None,
    constant=None,
    ramp=None,
    stages=None,
    onoff=None,
    replay=False,
    speedup=1.0,
    max_idle=None,
    target_rate=None,
    concurrency=None,
    ramp_up=None,
    rate_limit=None,
    duration=None,
    max_sessions=None,
    cycle=False,
    identical_copies=False,
    warmup=0,
    shard=None,
    start_at=None,
    validate=False,
) -> Iterator[dict]:
    """Schedule sessions: yields the schedule header, then one scheduled_session record per session.

    Same options as the ``vk-schedule`` command (``ramp="FROM:TO:SECONDS"``, ``stages="10:60,20:60"`` or
    ``[(10, 60), (20, 60)]``, ``onoff="ON:OFF:MEAN_ON:MEAN_OFF"``, ``shard="K/N"`` or ``(K, N)``). Lazy: sessions
    are read as records are taken. Options are checked before the generator is returned (VkError).
    """
    cfg = make_config(seed=seed, poisson=poisson, gamma=gamma, cv=cv, constant=constant, ramp=ramp, stages=stages,
                      onoff=onoff, replay=replay, speedup=speedup, max_idle=max_idle, target_rate=target_rate,
                      concurrency=concurrency, ramp_up=ramp_up, rate_limit=rate_limit, duration=duration,
                      max_sessions=max_sessions, cycle=cycle, identical_copies=identical_copies, warmup=warmup,
                      shard=shard, start_at=start_at,
                      validate=validate)
    return _records(cfg, sessions)


def needs_rewind(cfg: Config) -> bool:
    return cfg.cycle or (cfg.process == "replay" and cfg.params.get("target_rate") is not None)


def _records(cfg: Config, sessions: Iterable[dict]) -> Iterator[dict]:
    sch = Scheduler(cfg, Input(sessions=sessions, validate=cfg.validate, keep=needs_rewind(cfg)))
    loads = orjson.loads
    for chunk in sch.run():
        for line in chunk.split(b"\n"):
            if line:
                yield loads(line)
