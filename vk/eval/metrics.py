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

from dataclasses import dataclass

import numpy as np

TOKEN_KIND_CODES = (ord("c"), ord("r"), ord("t"))


@dataclass
class Flat:
    """The events of all responses, flattened in request order; ``n_events`` per request."""

    n_events: np.ndarray  # per request
    t: np.ndarray  # per event
    kind: np.ndarray | None  # uint8 per event; None when t holds the token events only
    tokens: np.ndarray | None  # float per event, NaN where unknown; None: every event carries 1 token
    server_t: np.ndarray | None  # per event or None when no request has it

    @property
    def seg(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.n_events), dtype=np.int32), self.n_events)


@dataclass
class TokenEvents:
    """The events that carry tokens (content, reasoning, tool calls), in request order."""

    n: np.ndarray  # token events per request
    starts: np.ndarray  # index of each request's first token event
    t: np.ndarray
    k: np.ndarray | None  # tokens per event (1 where unknown), int64; None when every event counts one token
    known: np.ndarray | None  # per event: count from events.tokens; None when all are known
    n_unknown: np.ndarray  # per request: token events without a count
    server_t: np.ndarray | None = None  # per token event: the server's send time, when given
    err: np.ndarray | None = None  # per token event: t - server_t (vk.eval.data.Data keeps this, not server_t)

    @property
    def seg(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.n), dtype=np.int32), self.n)

    @property
    def all_one(self) -> bool:
        return self.k is None


def token_events(flat: Flat, n_tok: np.ndarray, tokens_null: np.ndarray,
                 sparse: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> TokenEvents:
    """Token events from the flat events.

    ``n_tok``: token events per request; ``tokens_null``: requests without events.tokens (every count unknown);
    ``sparse``: (request ordinal, rank among the request's token events, count or NaN) for the token events
    whose count is not 1, so that the common case never builds an events-sized count array.
    """
    n_tok = np.asarray(n_tok, dtype=np.int64)
    tokens_null = np.asarray(tokens_null, dtype=bool)
    if flat.kind is None or int(n_tok.sum()) == len(flat.t):  # already the token events only
        t = flat.t
        st = flat.server_t
    else:
        lut = np.zeros(256, dtype=bool)
        lut[list(TOKEN_KIND_CODES)] = True
        idx = np.flatnonzero(lut[flat.kind])
        t = flat.t[idx]
        st = None if flat.server_t is None else flat.server_t[idx]
        del idx
    starts = np.r_[0, np.cumsum(n_tok)[:-1]].astype(np.int64) if len(n_tok) else np.zeros(0, np.int64)
    n_unknown = np.where(tokens_null, n_tok, 0).astype(np.int64)
    k = known = None
    if sparse is not None and len(sparse[0]):
        ordinal, rank, vals = sparse
        pos = starts[ordinal] + rank
        unk = np.isnan(vals)
        np.add.at(n_unknown, ordinal[unk], 1)
        k = np.ones(len(t), dtype=np.int64)
        k[pos] = np.where(unk, 1, np.maximum(np.nan_to_num(vals, nan=1.0), 1)).astype(np.int64)
        if unk.any():
            known = np.ones(len(t), dtype=bool)
            known[pos[unk]] = False
        if (k == 1).all():
            k = None
    if tokens_null.any() and k is not None:  # per-event flags only matter next to per-event counts
        if known is None:
            known = np.ones(len(t), dtype=bool)
        known[np.repeat(tokens_null, n_tok)] = False
    return TokenEvents(n_tok, starts, t, k, known, n_unknown, st)


def diff_inplace(t: np.ndarray, block: int = 1 << 20) -> np.ndarray:
    """``np.diff(t)`` written over ``t`` itself (returned as a view of its first len - 1 entries): no second
    events-sized array. Block by block from the start, each block reading the first entry of the next one
    before that block is overwritten."""
    n = len(t) - 1
    for s in range(0, max(n, 0), block):
        e = min(s + block, n)
        np.subtract(t[s + 1:e + 1], t[s:e], out=t[s:e])
    return t[:max(n, 0)]


def per_request_events(n: int, te: TokenEvents, inplace: bool = False) -> dict[str, np.ndarray]:
    """Per-request figures from the token events: counts, max stall, gaps (pooled, in request order).

    ``inplace``: the gaps are written over the event times (``te.t`` is None afterwards), so compute whatever
    needs the times first."""
    n_tok = te.n
    sum_k = n_tok.astype(np.float64) if te.k is None else segment_sums(te.k, te.starts, n_tok).astype(np.float64)
    all_known = (te.n_unknown == 0) & (n_tok > 0)
    # gaps between consecutive token events, aligned with the token events from the second one on: gap j is
    # t[j+1] - t[j]; the slot across a request boundary is +inf (dropped by every statistic)
    if not len(te.t):
        gaps = np.zeros(0)
    elif inplace:
        gaps = diff_inplace(te.t)
        te.t = None
    else:
        gaps = np.diff(te.t)
    last = (te.starts + n_tok - 1)[(n_tok > 0)]
    last = last[last < len(gaps)]
    gaps[last] = np.nan
    n_gaps = np.maximum(n_tok - 1, 0)
    max_stall = np.full(n, np.nan)
    has = n_gaps > 0
    if has.any():
        with np.errstate(invalid="ignore"):
            max_stall[has] = np.fmax.reduceat(gaps, te.starts[has])
    # +inf marks the boundary slots from here on: inf sorts last, so statistics drop them without a NaN pass
    gaps[last] = np.inf
    keep_k = None if te.k is None else te.k[1:]
    first_k = np.where(n_tok > 0, 1, 0).astype(np.int64)
    if te.k is not None:
        first_k[n_tok > 0] = te.k[te.starts[n_tok > 0]]
    return {
        "n_token_events": n_tok,
        "event_tokens": sum_k,
        "all_tokens_known": all_known,
        "max_stall": max_stall,
        "gaps": gaps,
        "n_gaps": n_gaps,
        "gap_k": keep_k,  # None: every chunk carries one token
        "first_k": first_k,
    }


def take(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``values[mask]``, faster: numpy's boolean indexing is several times slower than an index gather."""
    return values[np.flatnonzero(mask)]


def segment_sums(values: np.ndarray, starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Sum of ``values[starts[i]:starts[i] + lens[i]]`` for every i (empty segments sum to 0)."""
    c = np.r_[0, np.cumsum(values, dtype=np.int64 if values.dtype.kind in "iub" else np.float64)]
    return c[starts + lens] - c[starts]


def gap_mask(pe: dict, req_mask: np.ndarray) -> np.ndarray | None:
    """Mask over the pooled gaps of the requests in ``req_mask`` (None when all requests are selected)."""
    if req_mask.all():
        return None
    return np.repeat(req_mask, pe["n_token_events"])[1:]


def fluidity(n: int, te: TokenEvents, t_start: np.ndarray, prefill_deadline: float, decode_deadline: float,
             chunk_rows: int = 1 << 16, block: int = 1 << 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Etalon/Metron fluidity-index per request (Agrawal et al. 2024, arXiv 2407.07000, Algorithm 1).

    Token i of a request (tokens of a multi-token chunk all arrive with the chunk) has a deadline: the first
    token ``t_start + D_p``, every later one ``D_d`` after the previous deadline, so a token that arrives early
    banks slack for the following tokens. A token that arrives late at ``a`` misses
    ``floor((a - deadline) / D_d) + 1`` deadlines and restarts the schedule: the next deadline is ``a + D_d``.
    The index is ``1 - missed / total`` where total counts the met tokens plus every missed deadline.

    Vectorised form: with ``e_i = a_i - i * D_d`` the deadline of token i is ``B + i * D_d`` where ``B`` is the
    running maximum of ``t_start + D_p`` and the ``e_j`` of earlier tokens (a miss at j sets ``B = e_j``, which is
    larger than the old B), so misses are where ``e_i`` exceeds the running maximum before it.

    Requests are taken in order of their token counts, in blocks (at most ``chunk_rows`` requests and about
    ``block`` tokens) laid out as 2-D arrays, token index by request, padded to the block's longest request:
    the running maximum is then one ``np.maximum.accumulate`` down the columns, exact.

    Returns (fluidity, missed, total) per request; NaN/0 where a request has no tokens.
    """
    missed = np.zeros(n)
    met = np.zeros(n)
    if te.t is None or len(te.t) == 0:
        return np.full(n, np.nan), missed, missed.copy()
    # tokens per request (multi-token chunks expanded) and where each request's tokens start
    if te.k is None:
        ntok = te.n
        arrivals = te.t
        tstart = te.starts
    else:
        ntok = segment_sums(te.k, te.starts, te.n)
        arrivals = np.repeat(te.t, te.k)
        tstart = np.r_[0, np.cumsum(ntok)[:-1]].astype(np.int64)
    base = t_start + prefill_deadline
    order = np.argsort(ntok, kind="stable")
    order = order[ntok[order] > 0]
    lens = ntok[order]
    i = 0
    m_all = len(order)
    while i < m_all:
        # the block: as many requests (in order of length) as fit in about `block` padded tokens
        j = min(m_all, i + chunk_rows, i + max(1, block // int(lens[i])))
        if int(lens[j - 1]) * (j - i) > block:  # padded size lens[j-1] * (j-i) grows with j: the largest that fits
            padded = lens[i:j] * np.arange(1, j - i + 1)
            j = i + max(1, int(np.searchsorted(padded, block, side="right")))
        L = int(lens[j - 1])
        m = j - i
        req = order[i:j]
        bl = lens[i:j]
        uniform = int(bl[0]) == L
        s0 = int(tstart[req[0]])
        if uniform and int(tstart[req[-1]]) - s0 == (m - 1) * L and (m == 1 or (np.diff(tstart[req]) == L).all()):
            src = arrivals[s0:s0 + m * L].reshape(m, L)  # consecutive requests of one length: a view
        else:
            cols = np.arange(L, dtype=np.int64)[None, :]
            if not uniform:
                cols = np.minimum(cols, (bl - 1)[:, None])
            src = np.take(arrivals, tstart[req][:, None] + cols)  # (m, L), contiguous reads
        rows = np.arange(L, dtype=np.int64)[:, None]
        x = np.empty((L, m))  # token index down, requests across
        np.subtract(src.T, rows * decode_deadline, out=x)
        del src
        x -= base[req][None, :]  # e_i - B_0
        if not uniform:
            x[rows >= bl[None, :]] = -np.inf  # padding: never a miss
        xs = np.maximum(x, 0.0)
        for r in range(1, L):  # B - B_0 after each token: a running maximum down the columns
            np.maximum(xs[r], xs[r - 1], out=xs[r])
        # a miss where e_i exceeds the running maximum before it (B_0 for the first token)
        miss = np.empty(x.shape, dtype=bool)
        np.greater(x[0], 1e-12, out=miss[0])
        np.greater(x[1:], xs[:-1] + 1e-12, out=miss[1:])
        nmiss = np.count_nonzero(miss, axis=0)
        hit = np.flatnonzero(miss)
        if len(hit):
            prev = np.zeros(x.shape)
            prev[1:] = xs[:-1]
            counts = np.zeros(x.shape)
            xf, pf = x.reshape(-1)[hit], prev.reshape(-1)[hit]
            counts.reshape(-1)[hit] = np.floor((xf - pf) / decode_deadline) + 1.0
            missed[req] = counts.sum(axis=0)
        met[req] = bl - nmiss
        i = j
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


def stats(values: np.ndarray, percentiles: list[float], weights_zero: int = 0, pooled: bool = False,
          inplace: bool = False) -> dict | None:
    """Summary statistics of a sample (NaN dropped); ``weights_zero`` extra zeros are pooled in.

    ``pooled``: a pooled gap array, whose missing slots are +inf (and never NaN): sorted as is, the infs cut off.
    ``inplace`` (with ``pooled``): sort ``values`` itself rather than a copy (its order is lost).

    Percentiles interpolate linearly between order statistics (numpy's and DuckDB's quantile_cont default);
    stddev is the population standard deviation.
    """
    if pooled:
        srt = values if inplace and not weights_zero else values.copy()
    elif values.dtype.kind == "f":
        nan = np.isnan(values)
        srt = values.copy() if not nan.any() else take(values, ~nan)  # a copy: sorted in place
        del nan
    else:
        srt = values.copy()
    if weights_zero:
        srt = np.concatenate([np.zeros(weights_zero), srt])
    srt.sort()  # a vectorised sort is faster than numpy's percentile (partition) on large samples
    if pooled:
        srt = srt[: int(np.searchsorted(srt, np.inf))]
    n = len(srt)
    if n == 0:
        return {"n": 0}
    mean = float(srt.sum()) / n
    if n > 1_000_000:  # no n-sized temporary: E[x^2] - mean^2 (fine for latencies)
        var = max(0.0, float(np.dot(srt, srt)) / n - mean * mean)
    else:
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
