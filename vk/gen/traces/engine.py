"""From trace rows to session records: selection (window, head, sample), grouping, shuffle, wrap, content.

Two modes, chosen from the config:

- streaming: single-request sessions read front to back in one pass, one row in memory at a time;
- indexed: a first pass validates every row and keeps its byte offset, line number, session and time (with the
  shuffle permutation, under 100 bytes a row); a second pass reads sessions back by offset, in order of their
  start time. Used when rows must be grouped into multi-turn sessions, for shuffle and wrap, and for rag's
  document frequencies.

Both modes select the same sessions from a time-ordered trace: the time window and the sample draw are decided
per session, in order of the session's first row, before anything else.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterator
from typing import Any

import numpy as np

from vk import records
from vk.errors import VkError
from vk.gen.traces.builder import Builder
from vk.gen.traces.common import CacheSim, Warnings, block_sizes, component_rng  # noqa: F401 - re-exported
from vk.gen.traces.flavors import FLAVORS, Flavor, Turn
from vk.gen.traces.options import Options
from vk.gen.traces.readers import FORMATS, open_source

REQUEST_FORMATS = ("chat", "completion")
WINDOW_REASON = "sessions outside the time window"
SAMPLE_REASON = "sessions not drawn by sample"


def resolve_tokenizer(tokenizer, config: dict | None = None):
    """A Tokenizer from an object, a name/path, or the config's top-level ``tokenizer`` (default qwen2.5)."""
    if tokenizer is not None and not isinstance(tokenizer, str):
        return tokenizer
    from vk.tokenizer import load_tokenizer

    if tokenizer is None and isinstance(config, dict) and isinstance(config.get("tokenizer"), str):
        tokenizer = config["tokenizer"]
    return load_tokenizer(tokenizer)


# --------------------------------------------------------------------------------------------------------------
# configuration


class TraceConfig:
    """Everything under ``session_generator`` for ``type: trace``, checked."""

    def __init__(self, config: dict):
        if not isinstance(config, dict):
            raise VkError("config: expected a mapping")
        sg = config.get("session_generator", config)
        o = Options(sg, "session_generator")
        typ = o.str("type", "trace")
        if typ != "trace":
            o.fail("type", f"expected 'trace' for a trace conversion, got {typ!r}")
        self.trace_file = o.str("trace_file", required=True)
        self.file_format = o.str("file_format", "auto", choices=FORMATS)
        fl = o.raw("flavor", None)
        if fl is None:
            o.fail("flavor", f"missing (one of: {', '.join(FLAVORS)})")
        if isinstance(fl, str):
            fl = {"type": fl}
        self.flavor_opts = Options(fl, "session_generator.flavor")
        self.flavor_name = self.flavor_opts.str("type", required=True, choices=tuple(FLAVORS))
        fmt = o.str("format", "chat")
        fmt = {"completions": "completion", "chat_completions": "chat"}.get(fmt, fmt)
        if fmt not in REQUEST_FORMATS:
            o.fail("format", f"expected chat or completion, got {fmt!r}")
        self.request_format = fmt
        oc = o.str("output_control", None, choices=records.OUTPUT_CONTROLS)
        # the synthetic generator's place for it (vk-gen --set output.control=...) works too
        spec = Options(o.mapping("output_spec"), "session_generator.output_spec")
        text = Options(spec.mapping("text"), "session_generator.output_spec.text")
        oc2 = text.str("output_control", None, choices=records.OUTPUT_CONTROLS)
        text.done()
        spec.done()
        self.output_control = oc or oc2 or "exact"
        self.params = o.mapping("request_params")
        self.shuffle = o.bool("shuffle", False)
        self.sample = o.float("sample", 1.0, minimum=0.0, maximum=1.0, exclusive_min=True)
        self.max_rows = o.int("max_rows", None, minimum=1)
        w = Options(o.mapping("window"), "session_generator.window")
        self.window_start = w.float("start", 0.0, minimum=0.0)
        self.window_end = w.float("end", None, minimum=0.0)
        w.done()
        if self.window_end is not None and self.window_end <= self.window_start:
            raise VkError(f"session_generator.window.end: must be after window.start ({self.window_start:g}), "
                          f"got {self.window_end:g}")
        self.wrap = o.bool("wrap_mode", False)
        self.wrap_share_cache = o.bool("wrap_share_cache", False)
        self.id_prefix = o.str("id_prefix", None)
        self.corpus_file = o.str("corpus_file", None)
        o.done()

    @property
    def windowed(self) -> bool:
        return self.window_start > 0 or self.window_end is not None

    def make_flavor(self, src) -> Flavor:
        cls = FLAVORS[self.flavor_name]
        f = cls(self.flavor_opts, src)
        self.flavor_opts.done(("type",))
        return f


# --------------------------------------------------------------------------------------------------------------
# row scanning with selection


class Scanner:
    """Reads rows, applies the head limit, the time origin, the window and the per-session sample draw."""

    def __init__(self, cfg: TraceConfig, seed: int):
        self.cfg = cfg
        self.seed = seed
        self.src, self._spool = open_source(cfg.trace_file, cfg.file_format)
        self.flavor = cfg.make_flavor(self.src)
        self.flavor.start()
        self.origin: float | None = None
        self.timed: bool | None = None
        self.rows = 0  # data rows read
        self.dropped: dict[str, int] = {}
        self.warn = Warnings()
        self._sample_rng = component_rng(seed, "vk.gen.traces.sample")
        self.progress = None
        self.lenient = False  # the indexed mode accepts rows out of time order (it sorts sessions)
        self.prev_rel: float | None = None  # the previous row's time (streaming mode: rows must not go back)
        self._prime()

    def _prime(self) -> None:
        """JSON rows name their columns themselves: resolve them (and the grouping) from the first row."""
        if self.src.columns is None and not isinstance(self.flavor, FLAVORS["conversations"]):
            for line, _off, obj in self.src.scan():
                self.flavor.resolve(obj.keys(), line)
                break

    def close(self) -> None:
        self.src.close()
        if self._spool is not None:
            self._spool.close()

    def _tcol(self) -> str:
        fl = self.flavor
        c = (fl._resolved or {}).get("timestamp") or getattr(fl, "timestamp_key", None)
        if c is None and "timestamp" in fl.fields:
            c = fl.fields["timestamp"].candidates[0]
        return c or "timestamp"

    def time_of(self, tu: Turn) -> float | None:
        """The row's time relative to the trace origin (the first row); checks every row is timed alike."""
        t = tu.t
        if self.timed is None:
            self.timed = t is not None
            if t is not None:
                self.origin = t
        if t is None:
            if self.timed:
                raise self.src.error(tu.line, self._tcol(), "missing timestamp (earlier rows have one)")
            return None
        if not self.timed:
            return None
        rel = t - self.origin
        if not self.lenient:
            if rel < -1e-9:
                raise self.src.error(tu.line, self._tcol(),
                                     f"earlier than the first row by {-rel:.6g} s: single-request traces are read "
                                     f"in one pass, in time order (sort the file by time, or set shuffle)")
            if self.prev_rel is not None and rel < self.prev_rel - 1e-9:
                # vk-schedule --replay would refuse the sessions ("goes back in time"): say it here, at the row
                raise self.src.error(tu.line, self._tcol(),
                                     f"earlier than the previous row by {self.prev_rel - rel:.6g} s: "
                                     f"single-request traces are read in one pass, in time order (sort the file "
                                     f"by time, or set shuffle)")
            self.prev_rel = rel
        return rel if self.lenient else max(rel, 0.0)

    def admit(self, rel: float | None) -> bool:
        """Decide once per session (at its first row): inside the window, and drawn by the sample fraction."""
        cfg = self.cfg
        if rel is None and cfg.windowed:
            self.no_window()
        if rel is not None and cfg.windowed:
            if rel < cfg.window_start or (cfg.window_end is not None and rel >= cfg.window_end):
                self._left_out(WINDOW_REASON, 1)
                return False
        if cfg.sample < 1.0:
            drawn = bool(self._sample_rng.random() < cfg.sample)
            if not drawn:
                self._left_out(SAMPLE_REASON, 1)
            return drawn
        return True

    def _left_out(self, why: str, n: int) -> None:
        if n:
            self.dropped[why] = self.dropped.get(why, 0) + n

    def admit_all(self, rel: np.ndarray) -> np.ndarray:
        """``admit`` for every session at once (times relative to the trace start; NaN = untimed), drawing the
        sample in the same order as ``admit`` would, so both modes select the same sessions."""
        cfg = self.cfg
        keep = np.ones(len(rel), bool)
        if cfg.windowed:
            if len(rel) and np.isnan(rel).any():
                self.no_window()
            keep &= rel >= cfg.window_start
            if cfg.window_end is not None:
                keep &= rel < cfg.window_end
            self._left_out(WINDOW_REASON, int(len(keep) - keep.sum()))
        if cfg.sample < 1.0:
            ix = np.flatnonzero(keep)
            keep[ix] = self._sample_rng.random(len(ix)) < cfg.sample
            self._left_out(SAMPLE_REASON, int(len(ix) - keep[ix].sum()))
        return keep

    def no_window(self):
        raise VkError(f"session_generator.window: {self.src.src} has no timestamps to take a time window of "
                      f"(use max_rows or sample instead)")

    def rows_iter(self) -> Iterator[tuple[int, int, list[Turn]]]:
        """(line, offset, turns) for every data row within the head limit (turns may carry ``drop``)."""
        limit = self.cfg.max_rows
        bar = self.progress
        last = 0
        for line, off, obj in self.src.scan():
            self.rows += 1
            if limit is not None and self.rows > limit:
                self.rows -= 1
                break
            if bar is not None and off - last > (1 << 20):
                bar.update(off - last)
                last = off
            yield line, off, self.flavor.parse(obj, line)
        if bar is not None:
            bar.update(max(0, self.src.size - last))

    def rel_window(self, rel: float | None) -> float | None:
        if rel is None:
            return None
        return round(rel - self.cfg.window_start, 6)

    def drop(self, turns: list[Turn]) -> bool:
        d = turns[0].drop
        if d is None:
            return False
        self.dropped[d] = self.dropped.get(d, 0) + 1
        return True


# --------------------------------------------------------------------------------------------------------------
# the index (indexed mode)


class Index:
    """Per row: offset, line, session number; per session: start time, first line; then the selection.

    Sessions come out in order of their start time (ties: file order), so a trace grouped by session rather
    than sorted by time replays correctly; the trace's start is its earliest timestamp.
    """

    def __init__(self, sc: Scanner):
        fl = sc.flavor
        sc.lenient = True
        offs = array("q")
        lines = array("q")
        sidx = array("q")
        s_time = array("d")
        s_line = array("q")
        keys: dict[Any, int] = {}
        doc_of = array("q")
        doc_ids: dict[Any, int] = {}
        grouped = fl.grouped
        is_rag = fl.name == "rag"
        hashed = fl.hash_ids
        max_id = -1
        nan = math.nan
        t_first = 0.0  # the earliest timestamp of any row, dropped ones included
        for line, off, turns in sc.rows_iter():
            tu = turns[0]
            rel = sc.time_of(tu)
            if rel is not None and rel < t_first:
                t_first = rel
            if sc.drop(turns):
                continue
            if hashed:
                for x in tu.ids:
                    if isinstance(x, int) and x > max_id:
                        max_id = x
            if grouped:
                i = keys.get(tu.key)
                if i is None:
                    i = len(s_time)
                    keys[tu.key] = i
                    s_time.append(nan if rel is None else rel)
                    s_line.append(line)
                sidx.append(i)
            else:
                s_time.append(nan if rel is None else rel)
                if is_rag:
                    d = doc_ids.get(tu.doc)
                    if d is None:
                        d = doc_ids[tu.doc] = len(doc_ids)
                    doc_of.append(d)
            offs.append(off)
            lines.append(line)
        del keys
        self.max_int_id = max_id if max_id >= 0 else None
        self.n_sessions_seen = len(s_time)
        times = np.frombuffer(s_time, dtype=np.float64).copy() if len(s_time) else np.zeros(0)
        del s_time
        # the trace starts at its earliest timestamp (the first row's, for a time-ordered file)
        if sc.timed and t_first < 0:
            times -= t_first
            sc.origin += t_first
        keep = sc.admit_all(times)
        self.docs: list[tuple[Any, int, int]] = []
        if is_rag and len(doc_ids):
            docs_arr = np.frombuffer(doc_of, dtype=np.int64)
            counts = np.bincount(docs_arr[keep], minlength=len(doc_ids))
            # most frequent first; ties by first appearance
            order = np.lexsort((np.arange(len(counts)), -counts))
            top = [int(d) for d in order[: fl.num_documents] if counts[d] > 0]
            top_mask = np.zeros(len(counts), bool)
            top_mask[top] = True
            sc.dropped["not a top document"] = int((keep & ~top_mask[docs_arr]).sum())
            keep &= top_mask[docs_arr]
        kept = np.flatnonzero(keep)
        if len(kept) and sc.timed:
            kept = kept[np.argsort(times[kept], kind="stable")]  # by start time, file order among equals
        self.times = times[kept]
        del times
        offs_a = np.frombuffer(offs, dtype=np.int64) if len(offs) else np.zeros(0, np.int64)
        lines_a = np.frombuffer(lines, dtype=np.int64) if len(lines) else np.zeros(0, np.int64)
        if not grouped:
            self.offs = offs_a[kept]
            self.lines = lines_a[kept]
            self.first_line = self.lines
            self.row_end = None  # one row per session: session k is row k
        else:
            self.first_line = np.frombuffer(s_line, dtype=np.int64)[kept] if len(s_line) else np.zeros(0, np.int64)
            sid = np.frombuffer(sidx, dtype=np.int64) if len(sidx) else np.zeros(0, np.int64)
            order = np.argsort(sid, kind="stable")  # rows grouped by session, file order within a session
            sid_sorted = sid[order]
            start = np.searchsorted(sid_sorted, kept, side="left")
            end = np.searchsorted(sid_sorted, kept, side="right")
            # keep only the kept sessions' rows, laid out in output order
            lens = end - start
            take = np.concatenate([order[a:b] for a, b in zip(start, end, strict=True)]) if len(kept) else \
                np.zeros(0, np.int64)
            self.offs = offs_a[take]
            self.lines = lines_a[take]
            self.row_end = np.cumsum(lens)
            self.row_start = self.row_end - lens
        if is_rag and len(doc_ids):
            kd = np.frombuffer(doc_of, dtype=np.int64)[kept]
            inv = {v: k for k, v in doc_ids.items()}
            # (document, rows, the first kept session of the document): warm-up sessions, most frequent first
            self.docs = [(inv[d], int(counts[d]), int(np.flatnonzero(kd == d)[0])) for d in top]
        self.timed = bool(sc.timed and len(self.times) > 0 and not np.isnan(self.times).all())

    def __len__(self) -> int:
        return len(self.times)

    def read(self, sc: Scanner, k: int) -> list[Turn]:
        """The turns of the k-th kept session (parsed again from the file)."""
        out: list[Turn] = []
        if self.row_end is None:
            j = k
            return sc.flavor.parse(sc.src.read_at(int(self.offs[j]), int(self.lines[j])), int(self.lines[j]))
        for j in range(int(self.row_start[k]), int(self.row_end[k])):
            out.extend(sc.flavor.parse(sc.src.read_at(int(self.offs[j]), int(self.lines[j])), int(self.lines[j])))
        return out

    def period(self) -> float:
        """How far each wrapped copy of the trace is shifted in time: its span plus one mean gap."""
        if not self.timed or len(self.times) == 0:
            return 0.0
        span = float(np.nanmax(self.times) - np.nanmin(self.times))
        n = len(self.times)
        if n < 2 or span <= 0:
            return max(span, 1.0)
        return span + span / (n - 1)


# --------------------------------------------------------------------------------------------------------------
# the driver


class Unit:
    """One session to build: its turns and where it goes in the output."""

    __slots__ = ("turns", "epoch", "trace_time", "first_line", "warmup", "rank")

    def __init__(self, turns, epoch, trace_time, first_line, warmup=False):
        self.rank = 0  # warm-ups: 1 for the most frequent document, ...
        self.turns = turns
        self.epoch = epoch
        self.trace_time = trace_time
        self.first_line = first_line
        self.warmup = warmup


def iter_units(cfg: TraceConfig, sc: Scanner, seed: int, *, count: int | None = None,
               progress_factory=None, on_index=None) -> Iterator[Unit]:
    """Sessions in output order (warm-ups first), after every filter, shuffle and wrap of the config."""
    fl = sc.flavor
    indexed = fl.grouped or fl.needs_index or cfg.shuffle or cfg.wrap
    n = 0
    if not indexed:
        for line, _off, turns in sc.rows_iter():
            rel = sc.time_of(turns[0])
            if sc.drop(turns) or not sc.admit(rel):
                continue
            yield Unit(turns, 0, sc.rel_window(rel), line)
            n += 1
            if count is not None and n >= count:
                return
        if n == 0:
            raise VkError(f"{sc.src.src}: no sessions left after the filters ({_dropped_text(sc)})")
        return
    idx = Index(sc)
    if len(idx) == 0:
        raise VkError(f"{sc.src.src}: no sessions left after the filters ({_dropped_text(sc)})")
    if on_index is not None:
        on_index(idx)
    bar = progress_factory(count if count is not None else (len(idx) if not cfg.wrap else None)) \
        if progress_factory else None
    try:
        if fl.name == "rag" and fl.warmup:
            for k, (_doc, _cnt, first) in enumerate(idx.docs):
                u = Unit(idx.read(sc, first), 0, 0.0 if idx.timed else None, int(idx.first_line[first]), True)
                u.rank = k + 1
                yield u
        period = idx.period()
        epoch = 0
        while True:
            shuffled = cfg.shuffle or epoch > 0
            if shuffled:
                order = component_rng(seed, "vk.gen.traces.shuffle", epoch).permutation(len(idx))
                slot_times = np.sort(idx.times) if idx.timed else None
            else:
                order = range(len(idx))
                slot_times = None
            for slot, k in enumerate(order):
                k = int(k)
                if idx.timed:
                    t = float(slot_times[slot] if shuffled else idx.times[k])
                    tt = None if math.isnan(t) else round(t - cfg.window_start + epoch * period, 6)
                else:
                    tt = None
                yield Unit(idx.read(sc, k), epoch, tt, int(idx.first_line[k]))
                if bar is not None:
                    bar.update(1)
                n += 1
                if count is not None and n >= count:
                    return
            if not cfg.wrap:
                return
            epoch += 1
    finally:
        if bar is not None:
            bar.close()


def generate(config: dict, *, seed: int, count: int | None = None, tokenizer=None, progress: bool = False,
             warnings: list | None = None) -> Iterator[dict]:
    """Session records from a trace. ``warnings`` (a list) receives adjustment notes at the end; without it
    they are printed on stderr."""
    cfg = TraceConfig(config)
    if count is not None and count <= 0:
        return
    sc = Scanner(cfg, seed)
    bar = None
    try:
        fl = sc.flavor
        tokenizer = resolve_tokenizer(tokenizer, config)
        factory = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=sc.src.size, unit="B", unit_scale=True, desc=f"vk-gen {fl.name} (reading)",
                       leave=False, dynamic_ncols=True)
            sc.progress = bar

            def factory(total):
                bar.close()
                return tqdm(total=total, unit="session", desc=f"vk-gen {fl.name}", leave=False, dynamic_ncols=True)

        holder = {}
        units = iter_units(cfg, sc, seed, count=count, progress_factory=factory,
                           on_index=lambda idx: holder.setdefault("idx", idx))
        b = None
        for u in units:
            if b is None:
                idx = holder.get("idx")
                max_id = idx.max_int_id if idx is not None and fl.hash_ids and cfg.wrap else None
                b = Builder(cfg, fl, seed, tokenizer, sc.warn, max_id)
            yield b.session(u.turns, epoch=u.epoch, trace_time=u.trace_time, first_line=u.first_line,
                            warmup=u.warmup, ordinal=u.rank)
    finally:
        if bar is not None:
            bar.close()
        sc.close()
        if getattr(sc.flavor, "empty_user", 0):
            sc.warn.add("empty user messages left out of their conversations (with their replies)",
                        sc.flavor.empty_first, sc.flavor.empty_user)
        notes = sc.warn.lines()
        if warnings is not None:
            warnings.extend(notes)
        else:
            import sys

            for x in notes:
                print(f"vk-gen: warning: {sc.src.src}: {x}", file=sys.stderr)


def _dropped_text(sc: Scanner) -> str:
    parts = [f"{sc.rows} rows read"]
    parts += [f"{n} dropped: {why}" for why, n in sc.dropped.items()]
    return ", ".join(parts)
