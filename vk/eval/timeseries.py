"""vk-eval's time series: per run, time bins of concurrency, completions, output tokens/s and TTFT."""

from __future__ import annotations

import math

import numpy as np

from vk.eval.data import Data


def _spread(t0: np.ndarray, t1: np.ndarray, w: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Per bin: the sum of each request's ``w`` spread evenly over [t0, t1] (a point mass when t0 == t1).

    Per-request spreads instead of per-event counts keep the time series O(requests), not O(events).
    """
    ok = np.isfinite(t0) & np.isfinite(t1) & np.isfinite(w)
    t0, t1, w = t0[ok], t1[ok], w[ok]
    nb = len(edges) - 1
    out = np.zeros(nb)
    point = t1 <= t0
    if point.any():
        out += np.histogram(t0[point], edges, weights=w[point])[0]
    t0, t1, w = t0[~point], t1[~point], w[~point]
    if len(t0):
        rate = w / (t1 - t0)
        o0 = np.argsort(t0)
        o1 = np.argsort(t1)
        s0, r0 = t0[o0], rate[o0]
        s1, r1 = t1[o1], rate[o1]
        c0 = np.r_[0, np.cumsum(r0)]
        c0x = np.r_[0, np.cumsum(r0 * s0)]
        c1 = np.r_[0, np.cumsum(r1)]
        c1x = np.r_[0, np.cumsum(r1 * s1)]
        i = np.searchsorted(s0, edges, side="right")
        j = np.searchsorted(s1, edges, side="right")
        integral = (edges * c0[i] - c0x[i]) - (edges * c1[j] - c1x[j])
        out += np.diff(integral)
    return out


def timeseries(d: Data, bins: int = 120) -> dict:
    """Per run: time bins with in-flight concurrency, completions/s, output tokens/s and TTFT p50 of sends."""
    a = d.a
    out = {}
    for r, info in enumerate(d.runs):
        m = (a["run"] == r) & np.isfinite(a["t_sent"]) & np.isfinite(a["t_done"])
        if not m.any():
            continue
        s = a["t_sent"][m]
        e = a["t_done"][m]
        t0 = 0.0
        t1 = float(e.max())
        if t1 <= t0:
            t1 = t0 + 1e-3
        nb = max(1, min(bins, int(math.ceil(t1 - t0)) * 4 if t1 - t0 < bins / 4 else bins))
        edges = np.linspace(t0, t1, nb + 1)
        ss = np.sort(s)
        es = np.sort(e)
        cs = np.r_[0, np.cumsum(ss)]
        ce = np.r_[0, np.cumsum(es)]

        def integral(T, ss=ss, es=es, cs=cs, ce=ce):
            i = np.searchsorted(ss, T, side="right")
            j = np.searchsorted(es, T, side="right")
            return (T * i - cs[i]) - (T * j - ce[j])

        I = integral(edges)  # noqa: E741
        width = np.diff(edges)
        conc = np.diff(I) / width
        okm = m & a["ok"]
        bw = (t1 - t0) / nb

        def binned(times, weights=None, t0=t0, bw=bw, nb=nb):
            b = np.clip(((times - t0) / bw).astype(np.int64), 0, nb - 1)
            return np.bincount(b, weights=weights, minlength=nb)[:nb]

        done = binned(a["t_done"][okm]) / width
        toks = _spread(a["t_first_token"][okm], a["t_last_token"][okm], a["output_tokens"][okm], edges) / width
        ttft = a["ttft"][okm]
        sent = a["t_sent"][okm]
        idx = np.clip(np.searchsorted(edges, sent, side="right") - 1, 0, nb - 1)
        o = np.argsort(idx, kind="stable")  # per-bin medians: bins contiguous after one integer sort
        sv, si = ttft[o], idx[o]
        med = []
        for b in range(nb):
            lo, hi = np.searchsorted(si, b), np.searchsorted(si, b, side="right")
            seg = sv[lo:hi]
            seg = seg[np.isfinite(seg)]
            med.append(float(np.median(seg)) if len(seg) else None)
        out[info["run_id"]] = {
            "t": ((edges[:-1] + edges[1:]) / 2).round(6).tolist(),
            "concurrency": conc.round(4).tolist(),
            "completed_per_s": done.round(4).tolist(),
            "output_tokens_per_s": toks.round(3).tolist(),
            "ttft_p50": med,
        }
    return out
