"""Which probes to run: every value of a grid, or a capacity search.

The search grows the value geometrically (``--start``, times ``--growth``) until a probe fails (or, when the
first fails, shrinks it until one passes), then bisects between the last passing and the first failing value
(geometric midpoint for rates, integer midpoint for concurrency) until they are within ``--tolerance`` of each
other (relative) or ``--max-probes`` probes have run. A probe whose verdict is uncertain (the confidence interval
of a deciding check contains its threshold) is run again, up to ``--extend`` times, within the same probe budget;
the runs at one value are scored together (more requests, a narrower interval), and that verdict decides.
"""

from __future__ import annotations

import math

from vk.errors import VkError
from vk.sweep.probe import Context, run_probe
from vk.sweep.spec import round_value


class Budget(Exception):
    """No probe left in --max-probes."""


def _probe(ctx: Context, value: float, results: dict) -> dict:
    """The final verdict at ``value``: the probe, extended while uncertain and the budget allows."""
    plan = ctx.plan
    value = round_value(value, plan.integer)
    if value in results:
        return results[value]
    attempt = 0
    while True:
        if plan.mode == "search" and len(ctx.probes) >= plan.max_probes:
            raise Budget
        rec = run_probe(ctx, value, attempt, len(ctx.probes))
        ctx.probes.append(rec)
        if ctx.on_probe is not None:
            ctx.on_probe(rec)
        if not rec.get("uncertain") or attempt >= plan.extend:
            break
        attempt += 1
    results[value] = rec
    if plan.mode == "search" and rec.get("no_data"):
        raise VkError(f"{rec['probe']}: no request was measured, so there is no verdict: lengthen --duration or "
                      "lower --warmup")
    return rec


def run_grid(ctx: Context) -> None:
    results: dict = {}
    for v in ctx.plan.values:
        _probe(ctx, v, results)


def run_search(ctx: Context) -> str:
    """Run the capacity search; returns why it stopped."""
    plan = ctx.plan
    results: dict = {}
    grow = (lambda v: max(v + 1, math.ceil(v * plan.growth))) if plan.integer else (lambda v: v * plan.growth)
    shrink = (lambda v: max(1, math.floor(v / plan.growth))) if plan.integer else (lambda v: v / plan.growth)
    try:
        v = plan.start
        rec = _probe(ctx, v, results)
        if rec["verdict"] == "pass":
            while rec["verdict"] == "pass":
                nv = grow(v)
                if plan.max_value is not None and v >= plan.max_value:
                    return "every probe up to --max-value passed"
                v = min(nv, plan.max_value) if plan.max_value is not None else nv
                rec = _probe(ctx, v, results)
        else:
            while rec["verdict"] == "fail":
                if plan.integer and v <= 1:
                    return "the smallest value failed"
                v = shrink(v)
                rec = _probe(ctx, v, results)
        while True:
            lo, hi = bracket(results)
            if lo is None or hi is None:
                return "no bracket"
            if hi / lo - 1 <= plan.tolerance or (plan.integer and hi - lo <= 1):
                return "tolerance reached"
            mid = round_value(math.sqrt(lo * hi) if not plan.integer else (lo + hi) // 2, plan.integer)
            if mid in results or not lo < mid < hi:
                return "tolerance reached (values are rounded to 4 significant digits)"
            _probe(ctx, mid, results)
    except Budget:
        return "--max-probes reached"


def final_verdicts(probes: list[dict]) -> dict[float, dict]:
    """Value -> the probe that decides it (the last attempt, scored with the runs before it)."""
    out: dict[float, dict] = {}
    for p in probes:
        cur = out.get(p["value"])
        if cur is None or p.get("attempt", 0) >= cur.get("attempt", 0):
            out[p["value"]] = p
    return out


def bracket(results: dict[float, dict]) -> tuple[float | None, float | None]:
    """(last passing value below the first failing one, first failing value)."""
    fails = [v for v, r in results.items() if r.get("verdict") == "fail"]
    hi = min(fails) if fails else None
    passes = [v for v, r in results.items() if r.get("verdict") == "pass" and (hi is None or v < hi)]
    return (max(passes) if passes else None), hi


def answer(probes: list[dict], tolerance: float | None = None) -> dict | None:
    """The capacity as an interval (last passing, first failing) with the confidence that holds for both
    verdicts together (Bonferroni: 1 - the two error chances); None without objectives (no probe has checks: a
    saturated probe fails without them, but a failure alone does not bound a capacity)."""
    final = final_verdicts(probes)
    if not any(p.get("verdict") for p in final.values()) or not any(p.get("checks") for p in final.values()):
        return None
    lo, hi = bracket(final)
    c_lo = final[lo].get("confidence") if lo is not None else None
    c_hi = final[hi].get("confidence") if hi is not None else None
    conf = None
    if c_lo is not None and c_hi is not None:
        conf = round(max(0.0, 1.0 - (1.0 - c_lo) - (1.0 - c_hi)), 4)
    above = sorted(v for v, p in final.items() if p.get("verdict") == "pass" and hi is not None and v > hi)
    out = {"last_pass": lo, "first_fail": hi, "confidence": conf,
           "relative_width": round(hi / lo - 1, 6) if lo and hi else None}
    if tolerance is not None:
        out["tolerance_met"] = out["relative_width"] is not None and out["relative_width"] <= tolerance
    if above:
        out["passes_above_first_fail"] = above  # not monotonic: noise, or a server that recovers
    return out
