"""``vk-eval compare A B``: metrics side by side, B - A, and bootstrap confidence intervals of the difference."""

from __future__ import annotations

import csv
import io
from typing import Any

import numpy as np
import orjson

from vk.errors import VkError
from vk.eval import metrics as M

COMPARED = ("ttft", "ttfc", "tpot", "itl_chunk", "e2e", "normalized_latency", "ttft_from_intended",
            "e2e_from_intended")
MAX_BOOT_SAMPLE = 20000  # larger samples are subsampled (without replacement) for the bootstrap


def _samples(d) -> dict[str, np.ndarray]:
    a = d.a
    okm = a["ok"] & ~a["warmup"]
    out = {}
    for m in COMPARED:
        if m == "itl_chunk":
            gm = M.gap_mask(d.pe, okm)
            v = d.pe["gaps"] if gm is None else M.take(d.pe["gaps"], gm)
        else:
            v = a[m][okm]
        out[m] = v[np.isfinite(v)]
    return out


def _stat(v: np.ndarray, stat: str, axis=None):
    if stat == "mean":
        return v.mean(axis=axis)
    return np.percentile(v, float(stat[1:]), axis=axis)


def _boot(a: np.ndarray, b: np.ndarray, stat: str, n: int, conf: float, rng) -> tuple[float, float] | None:
    if len(a) < 10 or len(b) < 10 or n <= 0:
        return None
    if len(a) > MAX_BOOT_SAMPLE:
        a = rng.choice(a, MAX_BOOT_SAMPLE, replace=False)
    if len(b) > MAX_BOOT_SAMPLE:
        b = rng.choice(b, MAX_BOOT_SAMPLE, replace=False)
    diffs = np.empty(n)
    step = max(1, 2_000_000 // max(len(a), len(b)))  # resamples per batch, bounded memory
    for i in range(0, n, step):
        k = min(step, n - i)
        ra = a[rng.integers(0, len(a), (k, len(a)))]
        rb = b[rng.integers(0, len(b), (k, len(b)))]
        diffs[i:i + k] = _stat(rb, stat, axis=1) - _stat(ra, stat, axis=1)
    lo, hi = np.percentile(diffs, [(1 - conf) / 2 * 100, (1 + conf) / 2 * 100])
    return float(lo), float(hi)


def compare_runs(a: Any, b: Any, *, bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0,
                 percentiles=None, validate: str = "auto") -> dict:
    from vk.eval.core import Data, Options, evaluate_data

    if not isinstance(confidence, (int, float)) or not 0 < confidence < 1:  # nan fails too
        raise VkError(f"--confidence: expected a level between 0 and 1 (exclusive), e.g. 0.95, got {confidence}")
    if bootstrap < 0:
        raise VkError(f"--bootstrap: expected a number of resamples >= 0 (0: no intervals), got {bootstrap}")
    stats = ["mean"] + [M.pname(p) for p in (M.parse_percentiles(percentiles) if percentiles else [50, 90, 99])]
    res: dict[str, Any] = {"a": None, "b": None, "confidence": confidence, "bootstrap": bootstrap, "metrics": []}
    samples = []
    summaries = []
    for label, inp in (("a", a), ("b", b)):
        d = Data(inp, validate=validate)
        try:
            samples.append(_samples(d))
            summ = evaluate_data(d, Options())
            summaries.append(summ)
            res[label] = {"inputs": d.inputs.names, "runs": [r["run_id"] for r in d.runs]}
        finally:
            d.con.close()
            d.inputs.close()
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7]))
    for m in COMPARED:
        sa, sb = samples[0][m], samples[1][m]
        if len(sa) == 0 and len(sb) == 0:
            continue
        for st in stats:
            va = float(_stat(sa, st)) if len(sa) else None
            vb = float(_stat(sb, st)) if len(sb) else None
            diff = vb - va if va is not None and vb is not None else None
            ci = _boot(sa, sb, st, bootstrap, confidence, rng) if diff is not None else None
            res["metrics"].append({
                "metric": m, "stat": st, "unit": "s", "a": va, "b": vb, "diff": diff,
                "rel_diff": diff / va if diff is not None and va else None,
                "ci": list(ci) if ci else None,
                "significant": (ci[0] > 0 or ci[1] < 0) if ci else None,
            })
    for key, path in (("requests_per_s", ("throughput", "whole", "requests_per_s")),
                      ("output_tokens_per_s", ("throughput", "whole", "output_tokens_per_s")),
                      ("error_rate", ("counts", "error_rate"))):
        vals = []
        for s in summaries:
            cur: Any = s["overall"]
            for k in path:
                cur = cur.get(k) if isinstance(cur, dict) else None
            vals.append(cur)
        va, vb = vals
        diff = vb - va if va is not None and vb is not None else None
        res["metrics"].append({"metric": key, "stat": "value", "unit": "", "a": va, "b": vb, "diff": diff,
                               "rel_diff": diff / va if diff is not None and va else None, "ci": None,
                               "significant": None})
    return res


def format_compare(res: dict, fmt: str = "table") -> str:
    if fmt == "json":
        return orjson.dumps(res, option=orjson.OPT_INDENT_2).decode() + "\n"
    head = ["metric", "stat", "A", "B", "B-A", "B/A-1", f"{res['confidence']:.0%} CI of B-A", "beyond noise"]
    rows = []
    for r in res["metrics"]:
        ms = r["unit"] == "s"

        def f(v, ms=ms):
            if v is None:
                return "-"
            return f"{v * 1000:.2f}" if ms else f"{v:.4g}"

        ci = f"[{f(r['ci'][0])}, {f(r['ci'][1])}]" if r["ci"] else "-"
        rel = f"{r['rel_diff']:+.1%}" if r["rel_diff"] is not None else "-"
        sig = "-" if r["significant"] is None else ("yes" if r["significant"] else "no")
        rows.append([r["metric"] + (" (ms)" if ms else ""), r["stat"], f(r["a"]), f(r["b"]), f(r["diff"]), rel,
                     ci, sig])
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(head)
        w.writerows(rows)
        return buf.getvalue()
    title = f"A: {', '.join(res['a']['inputs'])}\nB: {', '.join(res['b']['inputs'])}\n\n"
    if fmt == "markdown":
        out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        return title + "\n".join(out) + "\n"
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=False)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) for r in rows]
    return title + "\n".join(out) + "\n"
