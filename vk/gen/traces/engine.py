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

import hashlib
import math
import zlib
from array import array
from collections.abc import Iterator
from typing import Any

import numpy as np

from vk import records
from vk.errors import VkError
from vk.gen.traces.flavors import FLAVORS, Flavor, Turn
from vk.gen.traces.options import Options
from vk.gen.traces.readers import FORMATS, open_source

REQUEST_FORMATS = ("chat", "completion")


def component_rng(seed: int, name: str, *more: int) -> np.random.Generator:
    """A random stream for (seed, component name, ...), independent of every other component's."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF,
                                                         zlib.crc32(name.encode()), *more]))


def resolve_tokenizer(tokenizer, config: dict | None = None):
    """A Tokenizer from an object, a name/path, or the config's top-level ``tokenizer`` (default qwen2.5)."""
    if tokenizer is not None and not isinstance(tokenizer, str):
        return tokenizer
    from vk.tokenizer import load_tokenizer

    if tokenizer is None and isinstance(config, dict) and isinstance(config.get("tokenizer"), str):
        tokenizer = config["tokenizer"]
    return load_tokenizer(tokenizer)


class Warnings:
    """Counts of things the conversion had to adjust, reported by --stats and on stderr."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.first_line: dict[str, int] = {}

    def add(self, what: str, line: int, n: int = 1) -> None:
        if what not in self.counts:
            self.counts[what] = 0
            self.first_line[what] = line
        self.counts[what] += n

    def lines(self) -> list[str]:
        return [f"{n} {what} (first at row line {self.first_line[what]})" for what, n in self.counts.items()]


class CacheSim:
    """An infinite prefix cache over hash-id blocks: a block is served if it and every block before it were seen."""

    def __init__(self):
        self.bits = bytearray()
        self.other: set = set()

    def _seen(self, x) -> bool:
        if isinstance(x, int) and 0 <= x < (1 << 40):
            return (x >> 3) < len(self.bits) and bool(self.bits[x >> 3] & (1 << (x & 7)))
        return x in self.other

    def _add(self, x) -> None:
        if isinstance(x, int) and 0 <= x < (1 << 40):
            i = x >> 3
            if i >= len(self.bits):
                self.bits.extend(bytes(max(i + 1 - len(self.bits), len(self.bits) // 2 + 1024)))
            self.bits[i] |= 1 << (x & 7)
        else:
            self.other.add(x)

    def serve(self, ids: list, sizes: list[int]) -> int:
        """Tokens served from cache for a request with these blocks; then the blocks are cached."""
        served = 0
        hit = True
        for x, n in zip(ids, sizes, strict=False):
            if hit and self._seen(x):
                served += n
            else:
                hit = False
            self._add(x)
        return served


def block_sizes(n_ids: int, input_len: int, block_size: int) -> list[int]:
    sizes = [block_size] * n_ids
    sizes[-1] = input_len - block_size * (n_ids - 1)
    return sizes


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
        if rel < -1e-9 and not self.lenient:
            raise self.src.error(tu.line, self._tcol(),
                                 f"earlier than the first row by {-rel:.6g} s: single-request traces are read "
                                 f"in one pass, in time order (sort the file by time, or set shuffle)")
        return rel if self.lenient else max(rel, 0.0)

    def admit(self, rel: float | None) -> bool:
        """Decide once per session (at its first row): inside the window, and drawn by the sample fraction."""
        cfg = self.cfg
        if rel is None and cfg.windowed:
            self.no_window()
        if rel is not None and cfg.windowed:
            if rel < cfg.window_start or (cfg.window_end is not None and rel >= cfg.window_end):
                return False
        if cfg.sample < 1.0:
            return bool(self._sample_rng.random() < cfg.sample)
        return True

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
        if cfg.sample < 1.0:
            ix = np.flatnonzero(keep)
            keep[ix] = self._sample_rng.random(len(ix)) < cfg.sample
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
# sessions


_TEXT_SOURCES: dict = {}  # (tokenizer, corpus) -> TextSource, built once per process


class Builder:
    """Turns of one session -> a session record with exact-length or verbatim content."""

    def __init__(self, cfg: TraceConfig, flavor: Flavor, seed: int, tokenizer, warn: Warnings,
                 max_int_id: int | None = None):
        self.cfg = cfg
        self.fl = flavor
        self.seed = int(seed)
        self.tok = tokenizer
        self.warn = warn
        self.prefix = cfg.id_prefix if cfg.id_prefix is not None else flavor.name
        self.source_file = cfg.trace_file
        self.generator = f"trace:{flavor.name}"
        self._text = None
        self.cache = CacheSim() if flavor.hash_ids else None
        self.stride = (max_int_id + 1) if max_int_id is not None else None
        self._salt_len: dict[str, int] = {}
        self._salt_const: int | None | bool = False  # not checked yet
        self._instr: dict[int, tuple[str, int]] = {}
        # salts start with the seed's digits: runs with other seeds do not share a block's first tokens either
        self.seed_tag = f"{self.seed % 10**6:06d}"

    @property
    def text(self):
        if self._text is None:
            from vk.gen.content import TextSource

            corpus = getattr(self.fl, "corpus_file", None) or self.cfg.corpus_file
            key = (id(self.tok), corpus)
            ts = _TEXT_SOURCES.get(key)
            if ts is None or ts.tokenizer is not self.tok:
                ts = _TEXT_SOURCES[key] = TextSource(self.tok, corpus)
            self._text = ts
        return self._text

    # -- content ------------------------------------------------------------------------------------------------
    def fresh(self, n: int, rng: np.random.Generator, salt_key: tuple | None) -> str:
        """n tokens of new text. With a salt key, the text starts with a salt: a 12-digit number hashed from
        (seed, key), so that sessions (and runs with other seeds) never share a prompt's first tokens."""
        if salt_key is not None:
            h = int.from_bytes(hashlib.blake2b(repr((self.seed, *salt_key)).encode(), digest_size=8).digest(),
                               "little") % 10**12
            salt = self.text.unique_salt(f"{self.seed_tag}{h:012d}")
            c = self.salt_const
            if c is None:
                c = self.tok.count(salt)
            if n > c:
                return salt + self.text.sample(n - c, rng)
        return self.text.sample(n, rng)

    @property
    def salt_const(self) -> int | None:
        """The token count of every salt (seed tag + 12 digits), when the tokenizer gives them all the same count
        (checked on a sample; digit-splitting tokenizers do), else None (each salt is counted)."""
        if self._salt_const is False:
            rng = np.random.default_rng(7)
            tag = self.seed_tag
            labels = [f"{tag}{int(x):012d}" for x in rng.integers(0, 10**12, size=200)] + \
                     [f"{tag}{x:012d}" for x in (0, 1, 9, 10, 99, 100, 999, 1000, 4095, 65536, 10**6, 10**11)]
            counts = {len(e) for e in self.tok.encode_batch([self.text.unique_salt(x) for x in labels])}
            self._salt_const = counts.pop() if len(counts) == 1 else None
        return self._salt_const

    def instruction(self, out_tokens: int) -> tuple[str, int]:
        """``output_control: prompt``: the sentence asking for the output length, and its token count."""
        r = self._instr.get(out_tokens)
        if r is None:
            text = f" Please write a reply of about {max(1, round(out_tokens * 0.75))} words."
            r = self._instr[out_tokens] = (text, self.tok.count(text))
        return r

    def block_key(self, x, epoch: int):
        if epoch and not self.cfg.wrap_share_cache and x not in self.fl.keep_set:
            if isinstance(x, int) and self.stride is not None and x >= 0:
                return x + epoch * self.stride
            return f"{x}@{epoch}"
        return x

    def hashed(self, ids: list, inp: int, epoch: int) -> tuple[str, int]:
        """The prompt of a hash-id request: one block of text per id, ``block_size`` tokens (the last may be
        partial). A block starts with a salt naming its id, so that different ids never give the same tokens
        (corpus blocks alone can collide), then deterministic corpus text for (seed, id)."""
        sizes = block_sizes(len(ids), inp, self.fl.block_size)
        keys = [self.block_key(x, epoch) for x in ids]
        served = self.cache.serve(keys, sizes)
        text = self.text
        s = self.seed
        salts = self._salt_len
        parts = []
        const = self.salt_const
        for k, n in zip(keys, sizes, strict=True):
            if const is not None and isinstance(k, int) and 0 <= k < 10**12:
                salt = text.unique_salt(f"{self.seed_tag}{k:012d}")
                c = const
            else:
                salt = text.unique_salt(f"{self.seed_tag}:{k!r}")
                c = salts.get(salt)
                if c is None:
                    if len(salts) > 100_000:
                        salts.clear()
                    c = salts[salt] = self.tok.count(salt)
            if n > c:
                parts.append(salt)
                parts.append(text.block(f"h{s}:{k!r}", n - c))
            else:  # a tiny last block: corpus text only
                parts.append(text.block(f"h{s}:{k!r}", n))
        return "".join(parts), served

    # -- requests -----------------------------------------------------------------------------------------------
    def plan(self, turns: list[Turn]) -> list[dict]:
        """Ids, parents, history, think time and new-content length of each turn."""
        fl = self.fl
        src = fl.src
        cumulative = fl.lengths == "cumulative"
        first_history = getattr(fl, "history_mode", "first_parent") == "first_parent"
        col = fl._resolved or {}
        seen: dict[str, int] = {}
        out: list[dict] = []
        t0 = turns[0].t
        for k, tu in enumerate(turns):
            rid = tu.rid if tu.rid is not None else f"r{k}"
            if rid in seen:
                raise src.error(tu.line, col.get("rid") or "request_id", f"duplicate request id {rid!r} in the session")
            if tu.parents is not None:
                parents = tu.parents
                for p in parents:
                    if p not in seen:
                        raise src.error(tu.line, col.get("parents") or "parents",
                                        f"parent {p!r} is not an earlier request of this session")
            else:
                parents = [out[-1]["id"]] if out else []
            if tu.history is not None:
                if tu.history not in parents:
                    raise src.error(tu.line, col.get("history") or "history",
                                    f"history parent {tu.history!r} is not among the parents {parents}")
                history = tu.history
            else:
                history = parents[0] if parents and first_history else None
            # think time: explicit, or the gap between arrivals (latest parent's, or the session start for roots)
            if tu.think is not None:
                think = tu.think
            elif tu.t is not None and t0 is not None:
                ref = max((turns[seen[p]].t for p in parents if turns[seen[p]].t is not None), default=t0)
                think = tu.t - ref
                if think < 0:
                    self.warn.add("turns arriving before their parent (think time set to 0)", tu.line)
                    think = 0.0
            else:
                think = 0.0
            new = None
            if tu.text is None:
                if tu.new is not None:
                    new = tu.new
                elif cumulative and history is not None:
                    h = turns[seen[history]]
                    new = tu.inp - (h.inp + max(h.out or 0, 0))
                else:
                    new = tu.inp
                if new < 1:
                    if cumulative and history is not None and tu.new is None:
                        self.warn.add("turns whose cumulative input is not longer than the previous input + "
                                      "output (new content clipped to 1 token)", tu.line)
                    else:
                        self.warn.add("requests with an input length of 0 (set to 1 token)", tu.line)
                    new = 1
            seen[rid] = k
            out.append({"id": rid, "parents": list(parents), "history": history, "think": round(think, 6),
                        "new": new})
        return out

    def output_tokens(self, tu: Turn) -> int:
        if tu.reply is not None:
            n = self.tok.count(tu.reply)
        else:
            n = tu.out
        if n is None or n < 1:
            self.warn.add("requests with an output length of 0 (set to 1 token)", tu.line)
            return 1
        return int(n)

    def session(self, turns: list[Turn], *, epoch: int, trace_time: float | None, first_line: int,
                warmup: bool = False, ordinal: int = 0) -> dict:
        cfg = self.cfg
        fl = self.fl
        sid = f"{self.prefix}-warmup-{ordinal}" if warmup else \
            f"{self.prefix}-{first_line}" + (f"-w{epoch}" if epoch else "")
        plan = self.plan(turns)
        rng = None
        reqs = []
        chat = cfg.request_format == "chat"
        instr_mode = cfg.output_control == "prompt"
        for k, (tu, p) in enumerate(zip(turns, plan, strict=True)):
            prefix_tokens = 0
            system = tu.system
            out_tokens = fl.warmup_output_tokens if warmup else self.output_tokens(tu)
            if tu.text is not None:
                text = tu.text
                n_in = self.tok.count(text) + (self.tok.count(system) if system else 0)
            elif tu.ids is not None:
                text, prefix_tokens = self.hashed(tu.ids, p["new"], epoch)
                n_in = p["new"]
            else:
                if rng is None:
                    rng = component_rng(self.seed, "vk.gen.traces.content", epoch, first_line)
                n_gen = p["new"]
                if instr_mode:  # the instruction comes out of the target: the total stays the trace's length
                    n_gen = max(1, n_gen - self.instruction(out_tokens)[1])
                text = self.fresh(n_gen, rng, (epoch, first_line, self.prefix) if k == 0 else None)
                n_in = n_gen
            if instr_mode:
                instr, n_instr = self.instruction(out_tokens)
                text += instr
                n_in += n_instr
            if chat:
                msgs = ([{"role": "system", "content": system}] if system else []) + \
                       [{"role": "user", "content": text}]
                body = {"messages": msgs}
            else:
                body = {"prompt": (system + "\n\n" + text) if system else text}
                if system:
                    n_in = self.tok.count(body["prompt"])
            extra = tu.extra or {}
            reqs.append(records.new_request(
                p["id"], parents=p["parents"], history=p["history"], think_time=p["think"],
                input_tokens=n_in, prefix_tokens=prefix_tokens, output_tokens=out_tokens,
                output_control=cfg.output_control, params=dict(cfg.params) if cfg.params else None,
                **body, **extra))
        source = {"generator": self.generator, "seed": self.seed, "file": self.source_file,
                  "row": first_line}
        if len(turns) > 1:
            rows = sorted({tu.line for tu in turns})
            if len(rows) > 1:
                source["rows"] = rows
        if turns[0].key is not None:
            source["session"] = turns[0].key  # the trace's own session (or conversation) id
        if epoch:
            source["epoch"] = epoch
        extra = {"warmup": True} if warmup else {}
        if warmup and fl.name == "rag":
            source["doc_id"] = turns[0].doc
        return records.new_session(sid, reqs, source=source, trace_time=trace_time, **extra)


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
