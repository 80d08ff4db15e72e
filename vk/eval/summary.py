"""vk-eval's summary of a group of requests: counts, latency, tokens, throughput, concurrency, sessions,
run accuracy, caching, fluidity and goodput."""

from __future__ import annotations

from typing import Any

import numpy as np

from vk.eval import metrics as M
from vk.eval.data import (
    COUNT_METRICS,
    FAILURES,
    LATENCY_METRICS,
    OUTPUT_SOURCES,
    STATUSES,
    STOPPED_BY_RUN,
    Data,
    counted,
)
from vk.eval.lag import verdicts
from vk.eval.load import CLOCK_SLACK
from vk.eval.options import Options
from vk.eval.progress import tick
from vk.eval.slo import Goodput


def summarize(d: Data, opts: Options, gmask: np.ndarray, w0: np.ndarray, w1: np.ndarray,
              window_how: str, fl: tuple[np.ndarray, np.ndarray, np.ndarray], last: bool = False) -> dict:
    """The summary of the requests in ``gmask``. ``last``: no later summary reads ``d`` (its pooled gaps may
    be reordered)."""
    a = d.a
    P = opts.percentiles
    run = a["axis"]  # the figures of time are per time axis (runs that overlap or are shards share one)
    steady_given = opts.warmup is not None or opts.cooldown is not None
    in_window = (a["t_sent"] >= w0[run]) & (a["t_sent"] <= w1[run]) if steady_given else np.ones(d.n, bool)
    measured = gmask & ~a["warmup"] & in_window
    okm = measured & a["ok"]
    out: dict[str, Any] = {}

    # counts
    counts = {"requests": int(gmask.sum()), "measured": int(measured.sum())}
    for s in STATUSES:
        counts[s] = int((measured & (a["status_code"] == STATUSES.index(s))).sum())
    # sessions of the same population as counts["requests"] (warm-up included; the sessions section leaves it out)
    counts["sessions"] = int(len(np.unique(d.sessions()["code"][gmask])))
    counts["warmup_excluded"] = int((gmask & a["warmup"]).sum())
    counts["outside_window"] = int((gmask & ~a["warmup"] & ~in_window).sum())
    # vk.eval.data's rule: requests the run's stop cancelled (Ctrl-C, --duration, --max-errors) are left out;
    # requests skipped after a failed turn of their session are failures (their user got no answer)
    counts["counted"] = counts["measured"] - sum(counts[k] for k in STOPPED_BY_RUN)
    counts["failed"] = sum(counts[k] for k in FAILURES)
    counts["error_rate"] = counts["failed"] / counts["counted"] if counts["counted"] else None
    # how the answers came (vk-send's attempts and warning fields): a retry on a new connection (the keep-alive one
    # proved closed before any byte was written) and an ok answer with a malformed SSE line skipped
    counts["retried"] = int((measured & a["retried"]).sum())
    counts["ok_with_warning"] = int((okm & a["warned"]).sum())
    nsrc = np.bincount(a["output_tokens_source_code"][okm], minlength=len(OUTPUT_SOURCES))
    counts["output_tokens_source"] = {k: int(nsrc[i]) for i, k in enumerate(OUTPUT_SOURCES) if nsrc[i]}
    out["counts"] = counts

    # latencies
    lat: dict[str, Any] = {}
    gm = M.gap_mask(d.pe, okm)
    gaps = d.pe["gaps"] if gm is None else M.take(d.pe["gaps"], gm)
    gk = d.pe["gap_k"]
    if gk is not None and gm is not None:
        gk = M.take(gk, gm)
    # what needs the gaps in request order first: the gaps are then sorted in place when they are a copy, or
    # when nothing reads them afterwards
    itl_token = None if gk is None or (gk == 1).all() else M.stats(np.repeat(gaps / gk, gk), P, pooled=True)
    zeros = int((0 if gk is None else (gk[np.isfinite(gaps)] - 1).sum()) + (d.pe["first_k"][okm] - 1).clip(0).sum())
    for name in LATENCY_METRICS:
        if name == "itl_chunk":
            s = M.stats(gaps, P, pooled=True, inplace=gm is not None or last)
        elif name == "itl_token":
            s = lat["itl_chunk"] if itl_token is None else itl_token
        elif name == "itl_token_zeros":
            s = lat["itl_chunk"] if zeros == 0 else M.stats(gaps, P, weights_zero=zeros, pooled=True)
        elif name in ("queue_delay", "dispatch_lag"):
            s = M.stats(a[name][measured], P)
        elif name in ("ttfc", "ttfc_from_intended") and np.array_equal(a[name][okm], a["ttft" + name[4:]][okm],
                                                                        equal_nan=True):
            s = lat["ttft" + name[4:]]  # no reasoning or tool calls before the content: the same sample
        else:
            s = M.stats(a[name][okm], P)
        lat[name] = s
    out["latency"] = lat
    tick("  latency stats")
    out["tokens"] = {k: M.stats(a[k][okm], P) for k in COUNT_METRICS}

    # throughput: whole run (first request sent -> last response done, per time axis, summed) and steady window
    runs_in = np.unique(run[gmask])
    dur = 0.0
    sdur = 0.0
    for r in runs_in:
        m = gmask & (run == r)
        s0 = np.nanmin(a["t_sent"][m]) if np.isfinite(a["t_sent"][m]).any() else np.nan
        s1 = np.nanmax(a["t_done"][m]) if np.isfinite(a["t_done"][m]).any() else np.nan
        if np.isfinite(s0) and np.isfinite(s1):
            dur += max(0.0, s1 - s0)
            lo = max(w0[r], s0)
            hi = min(w1[r], s1)
            sdur += max(0.0, hi - lo)
    okg = gmask & a["ok"]
    tin = float(np.nansum(a["input_tokens"][okg]))
    tout = float(np.nansum(a["output_tokens"][okg]))

    def rate(x, t):
        return x / t if t > 0 else None

    whole = {"duration": dur, "requests": int(okg.sum()), "requests_per_s": rate(okg.sum(), dur),
             "input_tokens_per_s": rate(tin, dur), "output_tokens_per_s": rate(tout, dur),
             "total_tokens_per_s": rate(tin + tout, dur)}
    # steady: completions, prefills and token arrivals inside the window (tokens counted per request by Data)
    tok_in_win = float(a["tokens_in_window"][okg].sum())
    ev_total = float(d.pe["event_tokens"][okg].sum())
    done_in = okg & (a["t_done"] >= w0[run]) & (a["t_done"] <= w1[run])
    pre_in = okg & (a["t_first_token"] >= w0[run]) & (a["t_first_token"] <= w1[run])
    sin = float(np.nansum(a["input_tokens"][pre_in]))
    # scale event-counted tokens to usage counts when events under-count (no per-chunk usage)
    if ev_total > 0 and tout > 0:
        tok_in_win *= tout / ev_total
    steady = {"window": window_how, "duration": sdur, "requests": int(done_in.sum()),
              "requests_per_s": rate(done_in.sum(), sdur), "input_tokens_per_s": rate(sin, sdur),
              "output_tokens_per_s": rate(tok_in_win, sdur), "total_tokens_per_s": rate(sin + tok_in_win, sdur),
              "windows": {d.axes[r]["label"]: [float(w0[r]), float(w1[r]) if np.isfinite(w1[r]) else None]
                          for r in runs_in}}
    out["throughput"] = {"whole": whole, "steady": steady}
    from vk.eval.tasks import task_summary  # embeddings, rerank: documents/s, request latency

    tasks = task_summary(d, okg & measured, P, dur)
    if tasks:
        out["tasks"] = tasks
    tick("  throughput")

    # concurrency (requests in flight between t_sent and t_done)
    busy = gmask & np.isfinite(a["t_sent"]) & np.isfinite(a["t_done"])
    mx = 0
    for r in runs_in:
        m = busy & (run == r)
        if m.any():
            # the most in flight is reached as a request enters: requests sent so far (ties included) minus
            # those done by then (at equal times, leave before entering)
            st = np.sort(a["t_sent"][m])
            en = np.sort(a["t_done"][m])
            mx = max(mx, int((np.searchsorted(st, st, side="right") - np.searchsorted(en, st, side="right")).max()))
    out["concurrency"] = {"mean": rate(float(np.sum(a["t_done"][busy] - a["t_sent"][busy])), dur), "max": mx}

    tick("  concurrency")
    out["sessions"] = _sessions(d, gmask & ~a["warmup"], P)
    tick("  sessions")
    out["accuracy"] = _accuracy(d, gmask, measured, okm, P)
    tick("  accuracy")
    out["caching"] = _caching(d, okm)
    fi, missed, total = fl
    fsel = okm & np.isfinite(fi)
    tot = float(total[fsel].sum())
    out["fluidity"] = {
        "prefill_deadline": opts.fluidity[0], "decode_deadline": opts.fluidity[1],
        "index": M.stats(fi[fsel], P),
        "service_index": 1.0 - float(missed[fsel].sum()) / tot if tot else None,
        "share_ge_0.9": float((fi[fsel] >= 0.9).mean()) if fsel.any() else None,
    }
    if opts.goodput is not None:
        # over the steady window when there is one (--warmup/--cooldown or warm-up marks), else the whole run
        # requests the run's stop cancelled are not the server's misses; skipped ones are (vk.eval.data's rule)
        stopped = _stopped_by_run(a)
        out["goodput"] = _goodput(d, opts.goodput, measured & ~stopped, sdur if window_how != "whole run" else dur)
        out["goodput"]["not_counted_stopped"] = int((measured & stopped).sum())
    return out


def _sessions(d: Data, gmask: np.ndarray, P) -> dict:
    s = d.sessions()
    a = d.a
    codes = s["code"][gmask]
    if len(codes) == 0:
        return {"sessions": 0}
    t0 = np.where(np.isnan(a["t_intended"]), a["t_sent"], a["t_intended"])[gmask]
    t1 = a["t_done"][gmask]
    if s.get("single"):  # one request per session
        nsess = len(codes)
        turns = np.ones(nsess)
        with np.errstate(invalid="ignore"):
            durs = np.where(np.isfinite(t0) & np.isfinite(t1), t1 - t0, np.nan)
    else:
        uniq, inv = np.unique(codes, return_inverse=True)
        nsess = len(uniq)
        turns = np.bincount(inv).astype(float)
        smin = np.full(len(uniq), np.inf)
        smax = np.full(len(uniq), -np.inf)
        np.minimum.at(smin, inv, np.where(np.isnan(t0), np.inf, t0))
        np.maximum.at(smax, inv, np.where(np.isnan(t1), -np.inf, t1))
        durs = np.where(np.isfinite(smin) & np.isfinite(smax), smax - smin, np.nan)
    out = {"sessions": int(nsess), "turns": M.stats(turns, P), "duration": M.stats(durs, P)}
    think = s["think"][gmask]
    out["think_time"] = M.stats(think[np.isfinite(think)], P)
    turn = s["turn"][gmask]
    okm = a["ok"][gmask]
    ttft = a["ttft"][gmask]
    inp = a["input_tokens"][gmask]
    by = {}
    if turn.max() > 1:
        for t in range(1, min(int(turn.max()), 8) + 1):
            m = okm & ((turn == t) if t < 8 else (turn >= 8))
            if m.any():
                st = M.stats(ttft[m], [50, 90])
                by[str(t) if t < 8 else "8+"] = {"n": st["n"], "ttft_p50": st.get("p50"), "ttft_p90": st.get("p90"),
                                                 "input_tokens_mean": float(np.nanmean(inp[m]))
                                                 if np.isfinite(inp[m]).any() else None}
    out["ttft_by_turn"] = by
    return out


def _accuracy(d: Data, gmask, measured, okm, P) -> dict:
    a = d.a
    flags: list[str] = []
    out: dict[str, Any] = {}
    # per run (per shard): what the client's own delay changed (vk.eval.lag)
    lag_verdicts, lag_flags, lag_notes = verdicts(d, gmask, measured, okm, P)
    out["lag"] = lag_verdicts
    out["lagged_runs"] = [v["run_id"] for v in lag_verdicts if v["lagged"]]
    out["notes"] = lag_notes
    flags += lag_flags
    clock = _ray_clock(d, gmask)
    if clock:
        out["ray_clock"] = clock
    # prompt tokens against the plan, like with like: target_input_tokens counts a request's new content only,
    # while usage.prompt_tokens is the whole prompt (history and chat template included). First turns have no
    # history: their difference is the template. A later turn is compared by its growth over the previous turn of
    # its session (that turn's prompt and answer), which is the new content plus the template's per-turn part.
    pm = okm & np.isfinite(a["prompt_tokens"]) & np.isfinite(a["target_input_tokens"])
    if pm.any():
        sess = d.sessions()
        first = pm & (sess["turn"] == 1)
        pv: dict[str, Any] = {}
        if first.any():
            pv["first_turns"] = _diff_stats(a["prompt_tokens"][first] - a["target_input_tokens"][first])
        if not sess.get("single"):
            growth = _prompt_growth(d, sess)
            later = pm & (sess["turn"] > 1) & np.isfinite(growth)
            if later.any():
                pv["later_turns"] = _diff_stats(growth[later] - a["target_input_tokens"][later])
        out["prompt_vs_target"] = pv
    # output tokens against targets
    om = okm & np.isfinite(a["completion_tokens"]) & np.isfinite(a["target_output_tokens"])
    if om.any():
        c = a["completion_tokens"][om]
        t = a["target_output_tokens"][om]
        share_short = float((c < t).mean())
        out["output_vs_target"] = {"n": int(om.sum()), "share_exact": float((c == t).mean()),
                                   "share_stopped_early": share_short, "share_longer": float((c > t).mean()),
                                   "mean_ratio": float((c / np.maximum(t, 1)).mean())}
        if share_short > 0.01:
            flags.append(f"LENGTH: {share_short:.1%} of requests stopped before their target output length "
                         "(TPOT and throughput are measured on shorter outputs than planned)")
        if float((c > t).mean()) > 0.01:
            flags.append(f"LENGTH: {float((c > t).mean()):.1%} of requests produced more tokens than their target")
    elif (okm & np.isfinite(a["target_output_tokens"])).any():
        m = okm & np.isfinite(a["target_output_tokens"])
        c = a["output_tokens"][m]
        t = a["target_output_tokens"][m]
        out["output_vs_target"] = {"n": int(m.sum()), "counted_by": "events (no usage)",
                                   "share_exact": float((c == t).mean()),
                                   "share_stopped_early": float((c < t).mean()),
                                   "share_longer": float((c > t).mean())}
    # client-side token counts against server usage
    um = okm & np.isfinite(a["completion_tokens"])
    if um.any():
        known = d.pe["all_tokens_known"][um]
        evt = d.pe["event_tokens"][um]
        cnt = d.pe["n_token_events"][um]
        comp = a["completion_tokens"][um]
        out["events_vs_usage"] = {
            "n": int(um.sum()),
            "share_per_event_counts": float(known.mean()),
            "share_mismatch": float((evt[known] != comp[known]).mean()) if known.any() else None,
            "tokens_per_token_event": float(comp.sum() / cnt.sum()) if cnt.sum() else None,
        }
        if known.any() and float((evt[known] != comp[known]).mean()) > 0.01:
            flags.append("TOKENS: per-event token counts disagree with usage.completion_tokens for "
                         f"{float((evt[known] != comp[known]).mean()):.1%} of requests")
    # reasoning
    rm = okm & np.isfinite(a["reasoning_tokens"])
    if rm.any() and a["reasoning_tokens"][rm].sum() > 0:
        out["reasoning_tokens"] = M.stats(a["reasoning_tokens"][rm], [50, 99])
    # chunk-size histogram (tokens per token event)
    te = d.te
    unknown = int(te.n_unknown[okm].sum())
    if te.k is None:
        k = None
        ones = int(te.n[okm].sum()) - unknown
    else:
        em = np.repeat(okm, te.n)
        kn = em if te.known is None else em & te.known
        k = M.take(te.k, kn)
    hist = {}
    for lo, hi, lab in () if k is None else ((1, 1, "1"), (2, 2, "2"), (3, 3, "3"), (4, 4, "4"), (5, 8, "5-8"), (9, 16, "9-16"),
                        (17, 1 << 62, "17+")):
        c = int(((k >= lo) & (k <= hi)).sum())
        if c:
            hist[lab] = c
    if k is None and ones:
        hist["1"] = ones
    if unknown:
        hist["unknown"] = unknown
    out["chunk_tokens_histogram"] = hist
    # dispatch lag and rates
    out["dispatch_lag"] = M.stats(a["dispatch_lag"][measured], P)
    ti = a["t_intended"][measured]
    ts = a["t_sent"][measured]
    ti = ti[np.isfinite(ti)]
    ts = ts[np.isfinite(ts)]
    rates = {}
    if len(ti) > 1 and ti.max() > ti.min():
        rates["intended_per_s"] = (len(ti) - 1) / float(ti.max() - ti.min())
    if len(ts) > 1 and ts.max() > ts.min():
        rates["achieved_per_s"] = (len(ts) - 1) / float(ts.max() - ts.min())
    if "intended_per_s" in rates and "achieved_per_s" in rates:  # the verdict on them is in out["lag"]
        rates["achieved_over_intended"] = rates["achieved_per_s"] / rates["intended_per_s"]
    out["rate"] = rates
    # timestamp error against the server's ground truth
    if d.te.err is not None:  # over the token events
        sel_ev = np.repeat(gmask, d.te.n) & np.isfinite(d.te.err)
        err = M.take(d.te.err, sel_ev)
        if len(err):
            e = M.stats(err, [50, 90, 99])
            e["spread_p99_minus_p50"] = e["p99"] - e["p50"]
            out["timestamp_error"] = e
    bw = gmask & (a["backwards_by"] > 0)
    if bw.any():
        first = int(np.flatnonzero(bw)[0])
        flags.append(f"TIMES: {int(bw.sum())} requests got their first token or ended before they were sent (by at "
                     f"most {float(a['backwards_by'][bw].max()) * 1000:.3g} ms, within the {CLOCK_SLACK * 1000:g} ms "
                     f"allowed for clocks converted onto the run's; e.g. request {d.request_name(first)}); those "
                     "latencies are taken as 0")
    stopped = _stopped_by_run(a)
    fm = measured & ~a["ok"] & ~stopped
    n_counted = int((measured & ~stopped).sum())
    if n_counted and fm.any():
        sk = int((fm & (a["status_code"] == STATUSES.index("skipped"))).sum())
        flags.append(f"FAILED: {int(fm.sum())} of {n_counted} requests failed ({int(fm.sum()) / n_counted:.1%}: "
                     f"{int(fm.sum()) - sk} error or timeout"
                     + (f", {sk} skipped after a failed turn of their session" if sk else "")
                     + "); they count as SLO violations and are never good")
    if (measured & stopped).any():
        flags.append(f"STOPPED: {int((measured & stopped).sum())} requests were cancelled by the run's stop (sent or "
                     "not); they are not counted as the server's failures (error rate, goodput)")
    out["flags"] = flags
    return out


def _stopped_by_run(a: dict) -> np.ndarray:
    """Per request: cancelled by the run's stop (vk.eval.data.counted is False)."""
    return ~counted(a["status"])


def _ray_clock(d: Data, gmask) -> list[dict]:
    """Per ``vk-send --ray`` run in the group: each node's clock (the header's ray.nodes: offset to the driver and
    its uncertainty; the footer's ray_nodes: drift over the run) and vk-send's lag verdict per node, with the
    residual error bound of its times on the run's axis (clock_uncertainty + |clock_drift|) and the run's (the
    largest over its nodes)."""
    out = []
    for r in np.unique(d.a["run"][gmask]):
        info = d.runs[int(r)]
        ray = info.get("ray")
        if not isinstance(ray, dict) or not isinstance(ray.get("nodes"), list):
            continue
        end = info.get("run_end") or {}
        feet = {n.get("node"): n for n in end.get("ray_nodes") or [] if isinstance(n, dict)}
        nodes = []
        for n in ray["nodes"]:
            f = feet.get(n.get("node"), {})
            unc, drift = n.get("clock_uncertainty"), f.get("clock_drift")
            nodes.append({"node": n.get("node"), "host": n.get("host"), "workers": n.get("workers"),
                          "clock_offset": n.get("clock_offset"), "clock_uncertainty": unc, "clock_drift": drift,
                          # without a drift (a node lost before the end) the bound holds only early in the run
                          "error_bound": None if unc is None else unc + abs(drift or 0.0),
                          "drift_measured": drift is not None,
                          "dispatch_lag_p99": f.get("dispatch_lag_p99"), "lagged": f.get("lagged"),
                          "workers_lost": f.get("workers_lost") or []})
        bounds = [n["error_bound"] for n in nodes if n["error_bound"] is not None]
        out.append({"run_id": info["run_id"], "nodes": nodes, "error_bound": max(bounds) if bounds else None,
                    "lagged_nodes": [n["node"] for n in nodes if n["lagged"]]})
    return out


def _diff_stats(diff: np.ndarray) -> dict:
    return {"n": int(len(diff)), "share_exact": float((diff == 0).mean()), "mean_diff": float(diff.mean()),
            "max_abs_diff": float(np.abs(diff).max())}


def _prompt_growth(d: Data, sess: dict) -> np.ndarray:
    """Per request: prompt_tokens minus the previous turn's prompt_tokens and completion_tokens (NaN for first
    turns and where usage is missing); turns in session order by intended time."""
    a = d.a
    order = np.lexsort((sess["turn"], sess["code"]))
    out = np.full(d.n, np.nan)
    same = sess["code"][order][1:] == sess["code"][order][:-1]
    cur, prev = order[1:][same], order[:-1][same]
    out[cur] = a["prompt_tokens"][cur] - a["prompt_tokens"][prev] - a["completion_tokens"][prev]
    return out


def _caching(d: Data, okm) -> dict:
    a = d.a
    m = okm & np.isfinite(a["prompt_tokens"])
    out: dict[str, Any] = {"n": int(m.sum())}
    cm = m & np.isfinite(a["cached_tokens"])
    out["n_reporting_cached"] = int(cm.sum())
    pt = float(a["prompt_tokens"][cm].sum())
    out["cached_share"] = float(a["cached_tokens"][cm].sum()) / pt if pt else None
    im = m & np.isfinite(a["target_input_tokens"])
    if im.any():
        p = a["prompt_tokens"][im]
        new = np.minimum(a["target_input_tokens"][im], p)
        hist = np.clip(p - new, 0, None)
        pref = np.nan_to_num(a["prefix"][im], nan=0.0)
        ideal = np.minimum(hist + np.clip(pref, 0, new), p)
        out["ideal_share"] = float(ideal.sum() / p.sum()) if p.sum() else None
        out["ideal_definition"] = ("history (prompt_tokens - target_input_tokens) plus the declared shared prefix "
                                   "(prefix_tokens), as a share of prompt tokens")
    else:
        out["ideal_share"] = None
    return out


def _goodput(d: Data, g: Goodput, measured, duration: float) -> dict:
    a = d.a
    good = measured & a["ok"]
    per = {}
    for c in g.conditions:
        v = a[c.metric]
        if c.metric == "tpot":
            passed = np.isnan(v) | c.holds(v)  # one-token outputs have no TPOT: not a violation
        else:
            passed = np.isfinite(v) & c.holds(v)
        per[c.spec] = float((passed & measured & a["ok"]).sum() / measured.sum()) if measured.any() else None
        good &= passed
    n = int(measured.sum())
    ng = int(good.sum())
    tok = float(np.nansum(a["output_tokens"][good]))
    return {"spec": g.spec, "requests": n, "good": ng, "attainment": ng / n if n else None,
            "per_condition": per,
            "requests_per_s": ng / duration if duration > 0 else None,
            "output_tokens_per_s": tok / duration if duration > 0 else None}
