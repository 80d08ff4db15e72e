"""Per-request and pooled metrics computed from the raw events with numpy.

Every metric has one unambiguous name (see man/vk-eval.1 for the mapping to other tools' names):

    ttft                 t_first_token - t_sent (first token of any kind: content, reasoning, tool call)
    ttfc                 t_first_content - t_sent (first content token; reasoning excluded)
    tpot                 (t_last_token - t_first_token) / (output_tokens - 1); null for one-token outputs
    e2e                  t_done - t_sent
    normalized_latency   e2e / output_tokens
    max_stall            largest gap between consecutive token events of a request
    *_from_intended      the same latency measured from t_intended (the client's own queueing included)
    itl_chunk            gaps between consecutive token events, pooled over all requests
    itl_token            the same, a chunk of k tokens split evenly into k gaps of gap/k
    itl_token_zeros      one gap per chunk followed by k-1 zero gaps (the first chunk adds k-1 zeros)
    fluidity             the Etalon/Metron fluidity-index of a request (share of token deadlines met)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

TOKEN_KIND_CODES = (ord("c"), ord("r"), ord("t"))


@dataclass
class Flat:
    """The events of all responses, flattened: ``seg[i]`` is the request (row) of event ``i``."""

    n_events: np.ndarray  # per request
    t: np.ndarray  # per event
    kind: np.ndarray  # uint8 per event
    tokens: np.ndarray  # float per event, NaN where unknown
    server_t: np.ndarray | None  # per event or None when no request has it

    seg: np.ndarray = field(init=False)

    def __post_init__(self):
        self.seg = np.repeat(np.arange(len(self.n_events), dtype=np.int64), self.n_events)


@dataclass
class TokenEvents:
    seg: np.ndarray
    t: np.ndarray
    k: np.ndarray  # tokens per event (known or 1), int64
    known: np.ndarray  # bool: k from events.tokens


def token_events(flat: Flat) -> TokenEvents:
    lut = np.zeros(256, dtype=bool)
    lut[list(TOKEN_KIND_CODES)] = True
    mask = lut[flat.kind]
    k = flat.tokens[mask]
    known = ~np.isnan(k)
    kk = np.where(known, k, 1.0)
    kk = np.maximum(kk, 1.0).astype(np.int64)  # a token event carries at least one token
    return TokenEvents(flat.seg[mask], flat.t[mask], kk, known)


def per_request_events(n: int, te: TokenEvents) -> dict[str, np.ndarray]:
    """Per-request figures from the token events: counts, max stall, gaps."""
    n_tok_events = np.bincount(te.seg, minlength=n)
    sum_k = np.bincount(te.seg, weights=te.k, minlength=n)
    n_unknown = np.bincount(te.seg, weights=~te.known, minlength=n)
    same = te.seg[1:] == te.seg[:-1]
    gaps = (te.t[1:] - te.t[:-1])[same]
    gap_seg = te.seg[1:][same]
    gap_k = te.k[1:][same]
    max_stall = np.full(n, np.nan)
    if len(gaps):
        starts = np.flatnonzero(np.r_[True, gap_seg[1:] != gap_seg[:-1]])
        max_stall[gap_seg[starts]] = np.maximum.reduceat(gaps, starts)
    # k of each request's first token event (its extra tokens arrive with the first token)
    first = np.flatnonzero(np.r_[True, te.seg[1:] != te.seg[:-1]]) if len(te.seg) else np.array([], np.int64)
    first_k = np.zeros(n, dtype=np.int64)
    first_k[te.seg[first]] = te.k[first]
    return {
        "n_token_events": n_tok_events,
        "event_tokens": sum_k,
        "all_tokens_known": (n_unknown == 0) & (n_tok_events > 0),
        "max_stall": max_stall,
        "gaps": gaps,
        "gap_seg": gap_seg,
        "gap_k": gap_k,
        "first_k": first_k,
    }


def fluidity(n: int, te: TokenEvents, t_start: np.ndarray, prefill_deadline: float, decode_deadline: float,
             chunk_rows: int = 16384) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Etalon/Metron fluidity-index per request (Agrawal et al. 2024, arXiv 2407.07000, Algorithm 1).

    Token i of a request (tokens of a multi-token chunk all arrive with the chunk) has a deadline: the first
    token ``t_start + D_p``, every later one ``D_d`` after the previous deadline, so a token that arrives early
    banks slack for the following tokens. A token that arrives late at ``a`` misses
    ``floor((a - deadline) / D_d) + 1`` deadlines and restarts the schedule: the next deadline is ``a + D_d``.
    The index is ``1 - missed / total`` where total counts the met tokens plus every missed deadline.

    Vectorised form: with ``e_i = a_i - i * D_d`` the deadline of token i is ``B + i * D_d`` where ``B`` is the
    running maximum of ``t_start + D_p`` and the ``e_j`` of earlier tokens (a miss at j sets ``B = e_j``, which is
    larger than the old B), so misses are where ``e_i`` exceeds the segmented running maximum before it.

    Returns (fluidity, missed, total) per request; NaN/0 where a request has no tokens.
    """
    missed = np.zeros(n)
    total = np.zeros(n)
    if len(te.seg) == 0:
        return np.full(n, np.nan), missed, total
    # expand multi-token chunks into tokens
    if (te.k == 1).all():
        seg, a = te.seg, te.t
    else:
        seg = np.repeat(te.seg, te.k)
        a = np.repeat(te.t, te.k)
    starts = np.flatnonzero(np.r_[True, seg[1:] != seg[:-1]])
    lens = np.diff(np.r_[starts, len(seg)])
    idx = np.arange(len(seg)) - np.repeat(starts, lens)
    x = a - idx * decode_deadline - (t_start[seg] + prefill_deadline)  # e_i - B_0
    del a, idx
    # segmented running max of max(x, 0), done in blocks of requests to keep float offsets small
    prev = np.empty_like(x)
    nseg = len(starts)
    for b0 in range(0, nseg, chunk_rows):
        b1 = min(nseg, b0 + chunk_rows)
        lo = starts[b0]
        hi = starts[b1] if b1 < nseg else len(seg)
        xs = np.maximum(x[lo:hi], 0.0)
        span = float(xs.max()) + 1.0 if len(xs) else 1.0
        local = np.repeat(np.arange(b1 - b0, dtype=np.float64), lens[b0:b1]) * span
        cm = np.maximum.accumulate(xs + local) - local
        # exclusive: shift by one within each request; the first token compares with 0 (B_0)
        p = np.empty_like(cm)
        p[1:] = cm[:-1]
        p[starts[b0:b1] - lo] = 0.0
        prev[lo:hi] = p
    miss = x > prev + 1e-12
    counts = np.where(miss, np.floor((x - prev) / decode_deadline) + 1.0, 0.0)
    missed = np.bincount(seg, weights=counts, minlength=n)
    met = np.bincount(seg, weights=~miss, minlength=n)
    total = missed + met
    with np.errstate(invalid="ignore", divide="ignore"):
        fi = np.where(total > 0, 1.0 - missed / np.where(total > 0, total, 1), np.nan)
    return fi, missed, total


def fluidity_reference(arrivals: list[float], t_start: float, prefill_deadline: float,
                       decode_deadline: float) -> tuple[float, int, int]:
    """The paper's sequential algorithm, token by token (used by the tests to check the vectorised form)."""
    total = missed = 0
    slack = 0.0
    prev = t_start
    for i, a in enumerate(arrivals):
        gap = a - prev
        prev = a
        d = prefill_deadline if i == 0 else decode_deadline
        if gap <= d + slack + 1e-12:
            slack += d - gap
            total += 1
        else:
            m = int((gap - slack - d) // decode_deadline) + 1
            missed += m
            total += m
            slack = 0.0
    return (1.0 - missed / total if total else float("nan")), missed, total


def stats(values: np.ndarray, percentiles: list[float], weights_zero: int = 0) -> dict | None:
    """Summary statistics of a sample (NaN dropped); ``weights_zero`` extra zeros are pooled in.

    Percentiles interpolate linearly between order statistics (numpy's and DuckDB's quantile_cont default);
    stddev is the population standard deviation.
    """
    v = values[~np.isnan(values)] if values.dtype.kind == "f" else values
    if weights_zero:
        v = np.concatenate([np.zeros(weights_zero), v])
    n = len(v)
    if n == 0:
        return {"n": 0}
    srt = np.sort(v)  # a vectorised sort is faster than numpy's percentile (partition) on large samples
    mean = float(srt.sum()) / n
    d = srt - mean
    var = float(np.dot(d, d)) / n
    out = {"n": int(n), "mean": mean, "stddev": var ** 0.5, "min": float(srt[0]), "max": float(srt[-1])}
    for p in percentiles:
        pos = p / 100.0 * (n - 1)
        lo = int(np.floor(pos))
        hi = min(lo + 1, n - 1)
        out[pname(p)] = float(srt[lo] + (srt[hi] - srt[lo]) * (pos - lo))
    return out


def pname(p: float) -> str:
    """50 -> 'p50', 99.9 -> 'p99.9'."""
    return "p" + (f"{p:g}")


def parse_percentiles(spec: str | list | None) -> list[float]:
    from vk.errors import VkError

    if spec is None:
        return [50.0, 90.0, 95.0, 99.0, 99.9]
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for it in items:
        s = str(it).strip().lower().lstrip("p")
        if not s:
            continue
        try:
            p = float(s)
        except ValueError:
            raise VkError(f"--percentiles: {it!r} is not a percentile (e.g. p50,p99,p99.9)") from None
        if not 0 <= p <= 100:
            raise VkError(f"--percentiles: {it!r} is outside 0..100")
        out.append(p)
    return out
