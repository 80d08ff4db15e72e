"""``vk-gen --trace FILE --stats``: the shape of a trace before anyone runs it.

Figures, over the sessions the config selects (head, window, sample, flavor filters; one pass, no wrap, no
shuffle), each request counted once:

- ``requests``, ``sessions``, ``rows`` read and rows dropped by filters (with the reason);
- ``duration_s``: last request arrival minus the first (trace timestamps; absent when the trace has none);
- ``rate_rps``: requests / duration; ``session_rate``: sessions / duration;
- ``interarrival_cv``: standard deviation / mean of the gaps between consecutive request arrivals, sorted
  (population standard deviation; 1 for a Poisson process);
- length percentiles (p50, p90, p99, mean, min, max; numpy's linear interpolation): ``input`` = the prompt a
  server sees (for multi-turn sessions: history + new content, i.e. previous prompt + previous output + new),
  ``new_input`` = the request's new content, ``output`` = output tokens;
- for hash-id traces: ``blocks``, ``unique_blocks`` and ``cache_share``: the share of prompt tokens an infinite
  prefix cache would serve, replaying the requests in order, where a block is served if it and every block before
  it in the request were seen in an earlier request (the block's own size in this request counts, a partial last
  block included);
- ``warnings``: adjustments the conversion would make (clipped lengths, ...).
"""

from __future__ import annotations

from array import array

import numpy as np

from vk.gen.traces.engine import (
    Builder,
    CacheSim,
    Scanner,
    TraceConfig,
    block_sizes,
    iter_units,
    resolve_tokenizer,
)

PCTS = (50, 90, 99)


def _dist(values) -> dict | None:
    a = np.asarray(values, dtype=np.float64) if not isinstance(values, array) else \
        np.frombuffer(values, dtype=np.int64 if values.typecode == "q" else np.float64).astype(np.float64)
    if a.size == 0:
        return None
    d = {f"p{p}": float(np.percentile(a, p)) for p in PCTS}
    d.update(mean=float(a.mean()), min=float(a.min()), max=float(a.max()), sum=float(a.sum()))
    return d


def stats_dict(config: dict, tokenizer=None, *, seed: int = 0) -> dict:
    """The trace's shape as a dict (see the module docstring for every figure)."""
    cfg = TraceConfig(config)
    cfg.wrap = False
    cfg.shuffle = False
    sc = Scanner(cfg, seed)
    try:
        fl = sc.flavor
        if fl.has_text or tokenizer is not None:
            tokenizer = resolve_tokenizer(tokenizer, config)
        b = Builder(cfg, fl, seed, tokenizer, sc.warn)
        cache = CacheSim() if fl.hash_ids else None
        # 8 bytes a request per figure: a million-request trace needs ~32 MB here
        arrivals = array("d")
        new_in = array("q")
        full_in = array("q")
        outs = array("q")
        sessions = 0
        warmups = 0
        turns_per = array("q")
        served = 0
        blocks = 0
        uniq = CacheSim() if fl.hash_ids else None
        n_unique = 0
        for u in iter_units(cfg, sc, seed):
            if u.warmup:
                warmups += 1
                continue
            sessions += 1
            turns_per.append(len(u.turns))
            plan = b.plan(u.turns)
            full_of: dict[str, int] = {}
            out_of: dict[str, int] = {}
            for tu, p in zip(u.turns, plan, strict=True):
                if tu.text is not None:
                    n_new = tokenizer.count(tu.text) + (tokenizer.count(tu.system) if tu.system else 0)
                else:
                    n_new = p["new"]
                n_out = b.output_tokens(tu)
                h = p["history"]
                full = n_new + (full_of[h] + out_of[h] if h is not None else 0)
                full_of[p["id"]] = full
                out_of[p["id"]] = n_out
                new_in.append(n_new)
                full_in.append(full)
                outs.append(n_out)
                if tu.t is not None and sc.origin is not None:
                    arrivals.append(tu.t - sc.origin - cfg.window_start)
                if cache is not None:
                    sizes = block_sizes(len(tu.ids), tu.inp, fl.block_size)
                    served += cache.serve(tu.ids, sizes)
                    blocks += len(tu.ids)
                    for x in tu.ids:
                        if not uniq._seen(x):
                            n_unique += 1
                            uniq._add(x)
        d: dict = {"file": sc.src.src, "format": sc.src.kind, **fl.describe(), "rows": sc.rows,
                   "dropped": dict(sc.dropped), "sessions": sessions, "requests": len(outs)}
        if warmups:
            d["warmup_sessions"] = warmups
        if any(n > 1 for n in turns_per):
            d["turns_per_session"] = _dist(turns_per)
        if len(arrivals) >= 1:
            a = np.sort(np.frombuffer(arrivals, dtype=np.float64))
            dur = float(a[-1] - a[0])
            d["duration_s"] = dur
            if dur > 0:
                d["rate_rps"] = len(outs) / dur
                d["session_rate"] = sessions / dur
            gaps = np.diff(a)
            if gaps.size >= 1 and gaps.mean() > 0:
                d["interarrival_cv"] = float(gaps.std() / gaps.mean())
        d["input"] = _dist(full_in)
        if full_in.tobytes() != new_in.tobytes():
            d["new_input"] = _dist(new_in)
        d["output"] = _dist(outs)
        if cache is not None:
            total = int(np.frombuffer(new_in, dtype=np.int64).sum()) if len(new_in) else 0
            d["blocks"] = blocks
            d["unique_blocks"] = n_unique
            d["cached_tokens"] = served
            d["cache_share"] = served / total if total else 0.0
        d["warnings"] = sc.warn.lines()
        return d
    finally:
        sc.close()


def _fmt_dist(d: dict | None) -> str:
    if d is None:
        return "-"
    return (f"p50 {d['p50']:.0f}  p90 {d['p90']:.0f}  p99 {d['p99']:.0f}  mean {d['mean']:.1f}  "
            f"min {d['min']:.0f}  max {d['max']:.0f}")


def stats(config: dict, tokenizer=None, *, seed: int = 0) -> str:
    """The human-readable report of ``vk-gen --trace FILE --stats``."""
    d = stats_dict(config, tokenizer, seed=seed)
    lines = [f"trace         {d['file']} ({d['format']}, flavor {d['flavor']})"]
    extra = [f"{k} {v}" for k, v in d.items() if k in ("lengths", "block_size", "page_size", "num_documents",
                                                       "failed", "models", "log_types")]
    if extra:
        lines.append("semantics     " + ", ".join(extra))
    dropped = ", ".join(f"{n} {why}" for why, n in d["dropped"].items() if n)
    lines.append(f"rows          {d['rows']}" + (f" (dropped: {dropped})" if dropped else ""))
    lines.append(f"sessions      {d['sessions']}" + (f" (+ {d['warmup_sessions']} warm-up sessions first: "
                                                     f"vk-schedule --warmup {d['warmup_sessions']})"
                                                     if d.get("warmup_sessions") else ""))
    lines.append(f"requests      {d['requests']}")
    if "turns_per_session" in d:
        lines.append(f"turns/session {_fmt_dist(d['turns_per_session'])}")
    if "duration_s" in d:
        lines.append(f"duration      {d['duration_s']:.3f} s")
        if "rate_rps" in d:
            lines.append(f"rate          {d['rate_rps']:.3f} requests/s ({d['session_rate']:.3f} sessions/s)")
        if "interarrival_cv" in d:
            lines.append(f"arrival CV    {d['interarrival_cv']:.3f} (inter-arrival std/mean; 1 = Poisson)")
    else:
        lines.append("duration      - (the trace has no timestamps)")
    lines.append(f"input tokens  {_fmt_dist(d['input'])}")
    if "new_input" in d:
        lines.append(f"new input     {_fmt_dist(d['new_input'])}")
    lines.append(f"output tokens {_fmt_dist(d['output'])}")
    if "cache_share" in d:
        lines.append(f"prefix cache  {100 * d['cache_share']:.2f}% of prompt tokens served by an infinite prefix "
                     f"cache ({d['cached_tokens']} tokens; {d['blocks']} blocks, {d['unique_blocks']} unique)")
    for w in d["warnings"]:
        lines.append(f"warning       {w}")
    return "\n".join(lines) + "\n"
