"""What the client's own delay did to the figures: vk-eval's lag verdict, per run (per shard of a sharded run).

vk-send flags a run when its dispatch lag (t_dispatched - t_intended) passes a threshold (1 ms by default); on a
small machine that is most runs, although the latencies people quote start at t_sent and do not see that lag.
vk-eval asks instead what the lag changed:

* the arrival process: the scheduled and the achieved send times, as rates (achieved / intended) and as the
  distance between the two distributions of inter-arrival gaps (Wasserstein-1, as a share of the mean scheduled
  gap: 0 when every gap was kept, 1 when the gaps are off by a whole mean gap). The server saw the load that was
  planned when the rates agree to ARRIVAL_TOLERANCE and the gaps to within ARRIVAL_TOLERANCE of the mean gap;
* the ``*_from_intended`` figures (ttft, ttfc, e2e measured from t_intended): the amount the client's delay adds to
  each reported statistic (the figure from t_intended minus the same figure from t_sent), against that
  statistic's own noise: for a percentile, half the width of its distribution-free 95% confidence interval (order
  statistics, binomial ranks); for the mean, 1.96 standard errors. Only an addition beyond the noise, beyond
  MATERIAL_SHARE of the figure and beyond MATERIAL_SECONDS is reported.

A run is LAGGED when either changed a figure; the verdict names the figure, its value and by how much.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from vk.eval import metrics as M

ARRIVAL_TOLERANCE = 0.05  # rate ratio off by 5%, or inter-arrival gaps off by 5% of the mean gap
# an addition is material when it is at least 2% of the figure and 1 ms (vk-send's default lag threshold): the
# client's baseline overhead between t_intended and t_sent (about 0.1 ms to build and write a request) is beyond
# the noise of a large sample's median, but it changes no figure anyone quotes
MATERIAL_SHARE = 0.02
MATERIAL_SECONDS = 0.001
FROM_INTENDED = (("ttft_from_intended", "ttft"), ("ttfc_from_intended", "ttfc"), ("e2e_from_intended", "e2e"))


def quantile_noise(srt: np.ndarray, p: float, z: float = 1.96) -> float:
    """Half the width of the distribution-free confidence interval of the p-th percentile of a sorted sample: the
    order statistics at ranks n*q -/+ z*sqrt(n*q*(1-q)), clipped to the sample."""
    n = len(srt)
    if n < 2:
        return math.inf
    q = p / 100.0
    half = z * math.sqrt(n * q * (1 - q))
    lo = int(min(max(math.floor(n * q - half), 0), n - 1))
    hi = int(min(max(math.ceil(n * q + half), 0), n - 1))
    if n * q + half > n - 1 or n * q - half < 0:  # the interval runs past the sample: its whole observed width
        return float(srt[hi] - srt[lo])
    return float(srt[hi] - srt[lo]) / 2


def wasserstein_share(a: np.ndarray, b: np.ndarray) -> float | None:
    """W1 distance between two samples of gaps (equal sizes: the mean absolute difference of their order
    statistics), divided by the mean of ``a``."""
    if len(a) == 0 or len(a) != len(b):
        return None
    mean = float(a.mean())
    if mean <= 0:
        return None
    return float(np.abs(np.sort(a) - np.sort(b)).mean()) / mean


def material(added: float, noise: float, figure: float) -> bool:
    return added > noise and added >= MATERIAL_SHARE * abs(figure) and added >= MATERIAL_SECONDS


def run_verdict(d, r: int, measured: np.ndarray, okm: np.ndarray, percentiles: list[float]) -> dict[str, Any]:
    """The lag verdict of run ``r`` over the requests in ``measured`` (ok ones in ``okm``)."""
    a = d.a
    info = d.runs[r]
    m = measured & (a["run"] == r)
    ok = okm & (a["run"] == r)
    end = info.get("run_end") or {}
    out: dict[str, Any] = {"run_id": info["run_id"], "requests": int(m.sum())}
    sch = info.get("schedule") if isinstance(info.get("schedule"), dict) else {}
    if isinstance(sch.get("shard"), dict):
        out["shard"] = f"{sch['shard'].get('k')}/{sch['shard'].get('n')}"
    out["vk_send_lagged"] = bool(info.get("lagged"))
    if isinstance(end.get("lag_threshold"), (int, float)):
        out["vk_send_lag_threshold"] = end["lag_threshold"]
    lag = a["dispatch_lag"][m]
    lag = lag[np.isfinite(lag)]
    out["dispatch_lag"] = M.stats(lag, [50, 99]) if len(lag) else {"n": 0}
    findings: list[str] = []
    # the arrival process
    both = m & np.isfinite(a["t_intended"]) & np.isfinite(a["t_sent"])
    arr: dict[str, Any] = {}
    if both.sum() > 2:
        ti = np.sort(a["t_intended"][both])
        ts = np.sort(a["t_sent"][both])
        gi, gs = np.diff(ti), np.diff(ts)
        if ti[-1] > ti[0] and ts[-1] > ts[0]:
            arr["intended_per_s"] = (len(ti) - 1) / float(ti[-1] - ti[0])
            arr["achieved_per_s"] = (len(ts) - 1) / float(ts[-1] - ts[0])
            arr["achieved_over_intended"] = arr["achieved_per_s"] / arr["intended_per_s"]
            arr["mean_gap"] = float(gi.mean())
            qd = a["queue_delay"][both]
            arr["queue_delay_p99_share_of_gap"] = float(np.percentile(qd, 99)) / arr["mean_gap"]
            arr["gap_distance_share"] = wasserstein_share(gi, gs)
            arr["tolerance"] = ARRIVAL_TOLERANCE
            off_rate = abs(arr["achieved_over_intended"] - 1) > ARRIVAL_TOLERANCE
            off_gaps = (arr["gap_distance_share"] or 0) > ARRIVAL_TOLERANCE
            arr["distorted"] = bool(off_rate or off_gaps)
            if off_rate:
                findings.append(f"sent {arr['achieved_per_s']:.4g} req/s against the scheduled "
                                f"{arr['intended_per_s']:.4g} ({arr['achieved_over_intended']:.1%})")
            if off_gaps:
                findings.append(f"the gaps between sends differ from the scheduled gaps by "
                                f"{arr['gap_distance_share']:.0%} of the mean gap ({arr['mean_gap'] * 1000:.3g} ms)")
    out["arrivals"] = arr
    # what the delay adds to the figures measured from t_intended
    added = []
    out["from_intended_added"] = adds = {}  # every addition, material or not: what the lag did to each figure
    # no reasoning or tool calls before the content: ttfc_from_intended is ttft_from_intended's sample, named once
    # (as the latency tables do)
    same_ttfc = np.array_equal(a["ttfc_from_intended"][ok], a["ttft_from_intended"][ok], equal_nan=True)
    for name, base in FROM_INTENDED:
        x = a[name][ok]
        y = a[base][ok]
        sel = np.isfinite(x) & np.isfinite(y)
        if sel.sum() < 2:
            continue
        xs, ys = np.sort(x[sel]), np.sort(y[sel])
        for p in percentiles:
            fx = float(np.percentile(xs, p))
            fy = float(np.percentile(ys, p))
            noise = quantile_noise(xs, p)
            plus = fx - fy
            adds.setdefault(name, {})[M.pname(p)] = plus
            if material(plus, noise, fx) and not (same_ttfc and name == "ttfc_from_intended"):
                added.append({"metric": name, "stat": M.pname(p), "value": fx, "from_t_sent": fy, "added": plus,
                              "noise": noise})
        fx, fy = float(xs.mean()), float(ys.mean())
        noise = 1.96 * float(xs.std()) / math.sqrt(len(xs))
        adds.setdefault(name, {})["mean"] = fx - fy
        if material(fx - fy, noise, fx) and not (same_ttfc and name == "ttfc_from_intended"):
            added.append({"metric": name, "stat": "mean", "value": fx, "from_t_sent": fy, "added": fx - fy,
                          "noise": noise})
    out["from_intended_changed"] = added
    for c in added[:3]:
        also = "; ttfc_from_intended the same" if same_ttfc and c["metric"] == "ttft_from_intended" else ""
        findings.append(f"{c['metric']} {c['stat']} is {c['value'] * 1000:.4g} ms, {c['added'] * 1000:.3g} ms above "
                        f"{c['metric'].replace('_from_intended', '')} {c['stat']} "
                        f"(noise +/-{c['noise'] * 1000:.2g} ms{also})")
    if len(added) > 3:
        findings.append(f"and {len(added) - 3} more *_from_intended figures")
    out["lagged"] = bool(findings)
    out["findings"] = findings
    return out


def verdicts(d, gmask: np.ndarray, measured: np.ndarray, okm: np.ndarray, percentiles: list[float]
             ) -> tuple[list[dict], list[str], list[str]]:
    """Per run in ``gmask``: (verdicts, warning flags for lagged runs, notes for runs vk-send flagged that
    vk-eval does not)."""
    out, flags, notes = [], [], []
    for r in np.unique(d.a["run"][gmask]):
        v = run_verdict(d, int(r), measured, okm, percentiles)
        out.append(v)
        who = f"run {v['run_id']}" + (f" (shard {v['shard']})" if "shard" in v else "")
        p99 = (v["dispatch_lag"] or {}).get("p99")
        lag_txt = f"dispatch lag p99 {p99 * 1000:.3g} ms" if p99 is not None else "dispatch lag"
        if v["lagged"]:
            flags.append(f"LAGGED: {who}: the client's own delay ({lag_txt}) changed reported figures: "
                         + "; ".join(v["findings"]))
        elif v["vk_send_lagged"]:
            notes.append(f"{who}: vk-send flagged its {lag_txt} (threshold "
                         f"{(v.get('vk_send_lag_threshold') or 0) * 1000:g} ms), but no reported figure moved beyond "
                         "its noise: the arrivals kept the schedule and the *_from_intended figures match")
    return out, flags, notes
