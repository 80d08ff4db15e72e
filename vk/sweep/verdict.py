"""A probe's verdict: vk-eval's SLO checks, each with a bootstrap confidence interval of the quantity it tests.

The point estimates and pass/fail are vk-eval's own (``vk.eval.evaluate(..., slo=...)``). The intervals resample
the probe's measured requests (from ``vk.eval.sql`` over the ``requests`` view, the same definitions): for a
percentile, mean or spread of a per-request latency; for ``error_rate`` and ``attainment`` (--min-goodput), the
share of requests failing or meeting the per-request objectives. Figures that are not per request (throughput,
goodput per second) get no interval and count as certain.

For each check, ``support`` is the share of bootstrap replicates on the passing side of the threshold. A probe
passes when every check passes; its confidence is ``1 - sum(1 - support)`` over the checks (Bonferroni: all must
be right). A failing probe's confidence is the best ``1 - support`` among its failing checks (one is enough).
A verdict is *uncertain* when the interval of a deciding check contains its threshold.
"""

from __future__ import annotations

import operator

import numpy as np

from vk.errors import VkError
from vk.eval.data import counted

_OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}
_NP_OPS = {"<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal}
# per-request columns of vk-eval's requests view that an interval can be computed for
SAMPLED = ("ttft", "ttfc", "tpot", "e2e", "ttft_from_intended", "e2e_from_intended", "dispatch_lag", "queue_delay",
           "normalized_latency")
MAX_SAMPLE = 20000  # larger samples are subsampled for the bootstrap (memory stays bounded)


def request_columns(run_path) -> dict[str, np.ndarray]:
    """Per measured request (warm-up excluded): the latency columns, ``ok``, ``counted`` (vk-eval's rule,
    vk.eval.data.counted: not cancelled by the run's stop; skipped requests count, as failures) and ``warmup``."""
    from vk.eval import sql

    # normalized_latency as vk-eval defines it: e2e per output token
    cols = ", ".join(SAMPLED[:-1]) + ", e2e / nullif(output_tokens, 0) AS normalized_latency"
    try:
        names, rows = sql(f"SELECT {cols}, status = 'ok' AS ok, status, coalesce(warmup, false) AS warmup "
                          "FROM requests",
                          run_path, columns=True)
    except VkError:  # no response carries a warm-up mark, so the column does not exist
        names, rows = sql(f"SELECT {cols}, status = 'ok' AS ok, status, false AS warmup FROM requests",
                          run_path,
                          columns=True)
    out = {}
    for i, n in enumerate(names):
        if n in ("ok", "warmup"):
            out[n] = np.array([bool(r[i]) for r in rows], dtype=bool)
        elif n == "status":
            out["counted"] = counted(np.array([r[i] for r in rows], dtype=object))
        else:
            out[n] = np.array([np.nan if r[i] is None else float(r[i]) for r in rows], dtype=float)
    keep = ~out["warmup"]
    return {k: v[keep] for k, v in out.items()}


def _stat(x: np.ndarray, stat: str, axis=None):
    if stat.startswith("p"):
        return np.percentile(x, float(stat[1:]), axis=axis)
    if stat == "mean":
        return x.mean(axis=axis)
    if stat == "min":
        return x.min(axis=axis)
    if stat == "max":
        return x.max(axis=axis)
    if stat == "stddev":
        return x.std(axis=axis, ddof=1)
    raise VkError(f"unknown statistic {stat!r}")


def _good(cols: dict, conditions) -> np.ndarray:
    good = cols["ok"].copy()
    for c in conditions:
        v = cols.get(c.metric)
        if v is None:
            raise VkError(f"--min-goodput: no interval for per-request metric {c.metric!r}")
        with np.errstate(invalid="ignore"):
            held = _NP_OPS[c.op](v, c.threshold)
        good &= (np.isnan(v) | held) if c.metric == "tpot" else (np.isfinite(v) & held)
    return good


def sample_for(check: dict, cols: dict, goodput_spec: str | None) -> tuple[np.ndarray, str] | None:
    """The per-request sample and the statistic that gives ``check``'s value, or None (no interval)."""
    metric, stat = check["metric"], check["stat"]
    if stat is not None and metric in SAMPLED:
        v = cols[metric][cols["ok"]]
        return v[np.isfinite(v)], stat
    # shares over the requests the run's stop did not cancel, skipped ones failed (vk.eval.data.counted)
    srv = cols["counted"] if "counted" in cols else np.ones(len(cols["ok"]), bool)
    if stat is None and metric == "error_rate":
        return (~cols["ok"][srv]).astype(float), "mean"
    if stat is None and metric == "attainment" and goodput_spec:
        from vk.eval.slo import parse_goodput

        return _good(cols, parse_goodput(goodput_spec).conditions)[srv].astype(float), "mean"
    return None


def score(eval_dict: dict, cols: dict | None, *, goodput_spec: str | None, confidence: float, bootstrap: int,
          seed: int) -> dict:
    """Checks (overall only) with intervals and support; the verdict, its confidence and whether it is
    uncertain. ``verdict`` is None when there are no objectives."""
    rng = np.random.default_rng(seed)
    checks = []
    for c in eval_dict.get("slo", []):
        if c.get("group") != "overall":
            continue
        out = {"slo": c["slo"], "metric": c["metric"], "stat": c["stat"], "op": c["op"],
               "threshold": c["threshold"], "value": c["value"], "ok": bool(c["ok"]), "ci": None,
               "support": 1.0 if c["ok"] else 0.0, "n": None}
        got = sample_for(c, cols, goodput_spec) if cols is not None else None
        if got is not None and c["value"] is not None:
            x, stat = got
            out["n"] = int(len(x))
            if len(x) >= 5 and bootstrap > 0:
                reps = _replicates(x, stat, bootstrap, rng)
                lo, hi = np.percentile(reps, [(1 - confidence) / 2 * 100, (1 + confidence) / 2 * 100])
                out["ci"] = [float(lo), float(hi)]
                out["support"] = float(_NP_OPS[c["op"]](reps, c["threshold"]).mean())
        checks.append(out)
    return {"checks": checks, **decide(checks)}


def by_rule(scored: dict, saturation: dict | None, measured: int | None) -> dict:
    """The rules above the statistics: a saturated probe fails (confidence 1); a probe that measured nothing
    (shorter than its warm-up) has no verdict."""
    if saturation is not None:
        scored.update(verdict="fail", confidence=1.0, uncertain=False)
    elif scored["verdict"] is not None and not measured:
        scored.update(verdict=None, confidence=None, uncertain=False, no_data=True)
    return scored


def decide(checks: list[dict]) -> dict:
    if not checks:
        return {"verdict": None, "confidence": None, "uncertain": False}

    def straddles(c) -> bool:
        return c["ci"] is not None and c["ci"][0] <= c["threshold"] <= c["ci"][1]

    failing = [c for c in checks if not c["ok"]]
    if failing:
        conf = max(1.0 - c["support"] for c in failing)
        uncertain = all(straddles(c) for c in failing)
        return {"verdict": "fail", "confidence": round(conf, 4), "uncertain": uncertain}
    conf = max(0.0, 1.0 - sum(1.0 - c["support"] for c in checks))
    return {"verdict": "pass", "confidence": round(conf, 4), "uncertain": any(straddles(c) for c in checks)}


def _replicates(x: np.ndarray, stat: str, n: int, rng) -> np.ndarray:
    if len(x) > MAX_SAMPLE:
        x = rng.choice(x, MAX_SAMPLE, replace=False)
    reps = np.empty(n)
    step = max(1, 2_000_000 // len(x))  # replicates per batch, bounded memory
    for i in range(0, n, step):
        k = min(step, n - i)
        reps[i:i + k] = _stat(x[rng.integers(0, len(x), (k, len(x)))], stat, axis=1)
    return reps
