"""The schedule summary: sessions, duration, achieved rate, inter-arrival CV and index of dispersion vs asked.

Computed in one streaming pass with flat memory (chunked Welford for the gaps, counts in fixed windows for the
index of dispersion), from the header and the start offsets alone, so the same code serves ``vk-schedule``'s
summary and :func:`schedule_stats` over any schedule file.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from vk.schedule import processes

BLOCK = 8192
WINDOW_SESSIONS = 50  # the index of dispersion counts sessions in windows holding about this many each
MIN_WINDOWS = 10


def _shard_n(header: dict) -> int:
    sh = header.get("shard")
    return int(sh["n"]) if isinstance(sh, dict) and sh.get("n") else 1


def asked(header: dict, end: float | None = None, window: float | None = None) -> dict:
    """What the header asked for: mean rate (over [0, end) for time-varying rates), gap CV, index of dispersion.

    Values are for the shard when the header has one (every N-th session of the schedule). None: no simple
    target (trace replay, time-varying rates). The index of dispersion is for counts in windows of ``window``
    seconds where it depends on the window (onoff), else its large-window limit.
    """
    proc = header.get("process")
    p = header.get("params") or {}
    n = _shard_n(header)
    out = {"rate": None, "cv": None, "idc": None}
    if header.get("mode") != "open":
        return out
    if proc in ("poisson", "gamma", "constant"):
        cv = {"poisson": 1.0, "constant": 0.0}.get(proc, p.get("cv"))
        out["rate"] = p["rate"] / n
        out["cv"] = cv / math.sqrt(n)  # every n-th point of a renewal process: the sum of n gaps
        out["idc"] = cv * cv / n  # asymptotic index of dispersion of a renewal process = CV^2
    elif proc in ("ramp", "stages"):
        if end:
            lam = processes.expected_count(proc, p, end)
            out["rate"] = lam / end / n
    elif proc == "onoff":
        out["rate"] = p["mean_rate"] / n
        if n == 1:
            out["idc"] = processes.onoff_idc(p["rate_on"], p["rate_off"], p["mean_on"], p["mean_off"], window)
    elif proc == "replay":
        r = p.get("target_rate") or p.get("natural_rate")
        if r:
            out["rate"] = r / n
    return out


class StatsAcc:
    """Accumulates start offsets (in order) in blocks; :meth:`result` gives the summary dict."""

    def __init__(self, header: dict):
        self.header = header
        self.open = header.get("mode") == "open"
        self.n = 0
        self.tok_in = 0  # prompt tokens of the scheduled sessions (add_tokens)
        self.tok_cached = 0  # of which an infinite prefix cache would serve
        self.warmup = 0
        self.first = None
        self.last = None
        # gaps: count, mean, M2 (Chan et al. pairwise combination of chunk moments)
        self.g_n = 0
        self.g_mean = 0.0
        self.g_m2 = 0.0
        self.g_max = 0.0
        # windows for the index of dispersion
        self.window = None
        self._buf: list[float] = []  # starts not yet folded in (processed in blocks: numpy per call is not free)
        self._pending: list[float] = []
        self.w_cur = 0
        self.w_cnt = 0
        self.c_n = 0
        self.c_s1 = 0.0
        self.c_s2 = 0.0
        a = asked(header)
        self._rate_hint = a["rate"]
        expect = None
        dur = header.get("duration")
        if self._rate_hint and dur:
            expect = self._rate_hint * dur
        if header.get("max_sessions"):
            m = header["max_sessions"] / _shard_n(header)
            expect = m if expect is None else min(expect, m)
        self._expect = expect
        if self._rate_hint and expect:
            self._set_window(self._rate_hint, expect)

    def _set_window(self, rate: float, expect: float | None) -> None:
        per = WINDOW_SESSIONS
        if expect:
            per = min(per, max(expect / (2 * MIN_WINDOWS), 1.0))
        self.window = per / rate

    def add_tokens(self, input_tokens: int, cached_tokens: int) -> None:
        """Add one scheduled session's prompt tokens and the part an infinite prefix cache would serve."""
        self.tok_in += input_tokens
        self.tok_cached += cached_tokens

    def add(self, starts: list[float], warmup: int = 0) -> None:
        """Add the start offsets of consecutive sessions (None in a closed loop)."""
        self.warmup += warmup
        if not self.open:
            self.n += len(starts)
            return
        self._buf.extend(starts)
        if len(self._buf) >= BLOCK:
            self._process()

    def _process(self) -> None:
        if not self._buf:
            return
        t = np.asarray(self._buf, dtype=np.float64)
        self._buf = []
        prev = self.last
        self.n += len(t)
        if self.first is None:
            self.first = float(t[0])
        self.last = float(t[-1])
        g = np.diff(t) if prev is None else np.diff(t, prepend=prev)
        if len(g):
            nb = len(g)
            mb = float(g.mean())
            m2b = float(((g - mb) ** 2).sum())
            delta = mb - self.g_mean
            tot = self.g_n + nb
            self.g_mean += delta * nb / tot
            self.g_m2 += m2b + delta * delta * self.g_n * nb / tot
            self.g_n = tot
            self.g_max = max(self.g_max, float(g.max()))
        if self.window is None:
            self._pending.extend(t.tolist())
            if len(self._pending) >= 1000:
                self._flush_pending()
            return
        self._count(t)

    def _flush_pending(self, final: bool = False) -> None:
        """Choose the window once 1000 starts (or all of them) are known, then count the buffered starts."""
        pend = self._pending
        self._pending = []
        if len(pend) >= 2 and pend[-1] > 0:
            rate = self._rate_hint or len(pend) / pend[-1]
            expect = self._expect or (len(pend) if final else None)
            self._set_window(rate, expect)
            self._count(np.asarray(pend))

    def _count(self, t: np.ndarray) -> None:
        w = np.floor(t / self.window).astype(np.int64)
        ids, cnt = np.unique(w, return_counts=True)
        for i, c in zip(ids.tolist(), cnt.tolist(), strict=True):
            if i == self.w_cur:
                self.w_cnt += c
                continue
            self._close_windows(i)
            self.w_cnt = c

    def _close_windows(self, upto: int) -> None:
        """Close the current window and the empty ones before window ``upto``."""
        self.c_n += 1
        self.c_s1 += self.w_cnt
        self.c_s2 += self.w_cnt * self.w_cnt
        self.c_n += max(0, upto - self.w_cur - 1)  # empty windows
        self.w_cur = upto
        self.w_cnt = 0

    def result(self, stop: str | None = None) -> dict:
        self._process()
        h = self.header
        out: dict = {"sessions": self.n, "warmup": self.warmup, "mode": h.get("mode"), "process": h.get("process")}
        if h.get("shard"):
            out["shard"] = f"{h['shard']['k']}/{h['shard']['n']}"
        if stop:
            out["stopped_by"] = stop
        if self.tok_in:
            out["input_tokens"] = self.tok_in
            out["predicted_cached_tokens"] = self.tok_cached
            out["cache_share"] = self.tok_cached / self.tok_in
            out["identical_copies"] = bool(h.get("identical_copies"))
        if not self.open:
            out["concurrency"] = h.get("concurrency")
            return out
        if self.window is None and self._pending:
            self._flush_pending(final=True)
        # the schedule's span: --duration, unless the input ran out (or --max-sessions hit) before it
        end = h.get("duration") or self.last or 0.0
        if stop in ("end of input", "--max-sessions") and self.last is not None:
            end = self.last
        out["duration"] = end
        if h.get("duration"):
            out["scheduled_duration"] = h["duration"]
        out["first_start"] = self.first
        out["last_start"] = self.last
        out["rate"] = self.n / end if end else None
        out["gap_mean"] = self.g_mean if self.g_n else None
        out["gap_max"] = self.g_max if self.g_n else None
        out["cv"] = math.sqrt(self.g_m2 / self.g_n) / self.g_mean if self.g_n and self.g_mean > 0 else None
        out["idc"] = None
        out["idc_windows"] = 0
        out["idc_window_s"] = self.window
        if self.window and end:
            full = int(math.floor(end / self.window))  # windows entirely inside [0, end)
            n_, s1, s2 = self.c_n, self.c_s1, self.c_s2
            if self.w_cur < full:  # the open window, and empty windows after it, up to the end
                n_ += 1 + (full - self.w_cur - 1)
                s1 += self.w_cnt
                s2 += self.w_cnt * self.w_cnt
            n_ = min(n_, full)
            if n_ >= MIN_WINDOWS and s1 > 0:
                mean = s1 / n_
                var = max(s2 / n_ - mean * mean, 0.0) * n_ / (n_ - 1)
                out["idc"] = var / mean
                out["idc_windows"] = n_
        a = asked(h, end, self.window)
        out["asked_rate"] = a["rate"]
        out["asked_cv"] = a["cv"]
        out["asked_idc"] = a["idc"]
        return out


def schedule_stats(records: Iterable[dict]) -> dict:
    """The summary of a schedule given as records (header first, then scheduled_session records)."""
    acc = None
    buf: list = []
    warm = 0
    for rec in records:
        kind = rec.get("kind")
        if kind == "schedule":
            acc = StatsAcc(rec)
            continue
        if kind != "scheduled_session":
            continue
        if acc is None:
            raise ValueError("schedule_stats: the schedule header must come first")
        buf.append(rec.get("start"))
        warm += 1 if rec.get("warmup") else 0
        if len(buf) >= 8192:
            acc.add(buf, warm)
            buf, warm = [], 0
    if acc is None:
        raise ValueError("schedule_stats: no schedule header")
    acc.add(buf, warm)
    return acc.result()


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}g}"


def _cache_line(s: dict) -> str | None:
    if s.get("cache_share") is None:
        return None
    line = (f"  {'cache share':<16}{s['cache_share'] * 100:>9.1f}%   {s['predicted_cached_tokens']:,} of "
            f"{s['input_tokens']:,} prompt tokens (infinite prefix cache")
    if s.get("identical_copies"):
        line += "; copies identical: served from cache)"
    else:
        line += "; copies are new requests)"
    if s.get("copies_unchanged"):
        line += f"; {s['copies_unchanged']} copied requests could not be made new"
    return line


def format_summary(s: dict) -> str:
    """The human summary printed on stderr."""
    head = f"{s['sessions']} sessions"
    if s.get("warmup"):
        head += f" ({s['warmup']} warm-up)"
    if s.get("shard"):
        head += f" in shard {s['shard']}"
    if s["mode"] != "open":
        lines = [f"vk-schedule: {head}, closed loop, concurrency {s.get('concurrency')}"]
        if s.get("stopped_by"):
            lines.append(f"  stopped by      {s['stopped_by']}")
        if _cache_line(s):
            lines.append(_cache_line(s))
        return "\n".join(lines)
    lines = [f"vk-schedule: {head} over {_fmt(s['duration'], 6)} s ({s['process']})"]

    def row(name, got, want, unit=""):
        line = f"  {name:<16}{_fmt(got):>10}{unit}"
        if want is not None:
            line += f"   asked {_fmt(want)}{unit}"
            if got is not None and want:
                line += f" ({(got - want) / want * 100:+.2f}%)"
        return line

    lines.append(row("rate", s["rate"], s["asked_rate"], " /s"))
    lines.append(row("gap CV", s["cv"], s["asked_cv"]))
    idc = row("dispersion", s["idc"], s["asked_idc"])
    if s["idc"] is not None:
        idc += f"   [{s['idc_windows']} windows of {_fmt(s['idc_window_s'])} s]"
    lines.append(idc)
    if s.get("gap_max") is not None:
        lines.append(f"  {'longest gap':<16}{_fmt(s['gap_max']):>10} s")
    if s.get("stopped_by"):
        why = s["stopped_by"]
        if why == "end of input" and s.get("scheduled_duration") and s["duration"] < s["scheduled_duration"]:
            why += f" before --duration {s['scheduled_duration']:g} s (--cycle reuses the sessions)"
        lines.append(f"  {'stopped by':<16}{why}")
    if _cache_line(s):
        lines.append(_cache_line(s))
    return "\n".join(lines)
