"""vk-eval's engine: evaluate the loaded data (vk.eval.data) into one JSON-able result, overall and per group.

The parts live in their own modules: data (loading, arrays, views), options, summary (the figures of a group),
timeseries, progress. The names below are re-exported for the callers of vk.eval.core."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from vk.errors import VkError
from vk.eval.data import LATENCY_METRICS, MAX_GROUPS, STAT_DEFINITIONS, VIEWS_SQL, Data  # noqa: F401
from vk.eval.options import Options
from vk.eval.progress import progress, tick  # noqa: F401
from vk.eval.summary import summarize
from vk.eval.timeseries import timeseries


def evaluate_data(d: Data, opts: Options | None = None, consume: bool = False) -> dict:
    """The whole evaluation as a JSON-able dict. ``opts``: those ``d`` was made with (the default); others
    must agree on the fluidity deadlines and the steady window. ``consume``: ``d``'s pooled arrays may be
    reordered (when nothing reads ``d`` afterwards)."""
    if opts is None:
        opts = d.opts
    elif (opts.fluidity, opts.warmup, opts.cooldown) != (d.opts.fluidity, d.opts.warmup, d.opts.cooldown):
        raise VkError("internal error: evaluate_data with fluidity or window options other than the data's")
    w0, w1, how = d.windows
    fl = d.fl
    tick("start")
    group_by = opts.group_by
    if not group_by and len(d.axes) > 1:  # several runs, each on its own time axis (shards share one)
        group_by = ["run"]
    everything = np.ones(d.n, dtype=bool)
    overall = summarize(d, opts, everything, w0, w1, how, fl, last=consume and not group_by)
    tick("summary")
    groups = []
    if group_by:
        keys = d.group_keys(group_by)
        ngroups = len(set(keys.tolist()))
        if ngroups > MAX_GROUPS:
            raise VkError(f"--group-by {','.join(group_by)}: {ngroups} groups (at most {MAX_GROUPS}); group by a "
                          "coarser field, or use vk-eval sql for per-value figures")
        order = {r["run_id"]: i for i, r in enumerate(d.runs)} if group_by == ["run"] else None
        for k in sorted(set(keys.tolist()), key=lambda x: (order[x],) if order else natural_key(str(x))):
            gm = keys == k
            groups.append({"key": dict(zip(group_by, str(k).split(", ") if len(group_by) > 1 else [k], strict=False)),
                           "label": str(k), "summary": summarize(d, opts, gm, w0, w1, how, fl)})
    result = {
        "vk_eval": 1,
        "inputs": d.inputs.names,
        "runs": [_run_info(r, overall["accuracy"]) for r in d.runs],
        "warnings": d.warnings,
        "time_axes": [{k: ax[k] for k in ("run_ids", "shards", "offsets")} for ax in d.axes],
        "options": {**opts.to_dict(), "group_by": group_by},
        "definitions": {**LATENCY_METRICS, **STAT_DEFINITIONS},
        "overall": overall,
        "groups": groups,
        "timeseries": timeseries(d, opts.timeseries_bins),
    }
    from vk.eval.slo import check_slos

    tick("groups, time series")
    result = clean(result)
    from vk.eval.server_metrics import server_section

    server = server_section(d.inputs.paths, d.con)  # vk-send --scrape: the server's own metrics, per run
    if server is not None:
        result["server"] = clean(server)
        result["overall"]["accuracy"]["flags"] += [w if re.match(r"[A-Z][A-Z ]*:", w) else "SERVER: " + w
                                                   for s in server for w in s["warnings"]]  # a kind for the headline
    result["slo"] = check_slos(opts.slo, result)
    return result


def natural_key(text: str) -> tuple:
    """Sort key that orders the numbers inside labels as numbers: 64-127 before 128-255 before 1024-2047; labels
    with no number ("unknown", "(none)") last."""
    parts = re.split(r"(\d+(?:\.\d+)?)", text)
    key = tuple((0, float(x), "") if i % 2 else (1, 0.0, x) for i, x in enumerate(parts) if x != "")
    return (not any(i % 2 for i, x in enumerate(parts) if x != ""), key)


def clean(obj: Any) -> Any:
    """numpy scalars to Python numbers, NaN/inf to None: a JSON-able result with stable types."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    return obj


def _run_info(r: dict, accuracy: dict) -> dict:
    keep = ("run_id", "file", "model", "api", "endpoint", "start_epoch", "vk_version", "host", "server", "ray")
    out = {k: r.get(k) for k in keep}
    out["lagged"] = r["run_id"] in accuracy.get("lagged_runs", ())  # vk-eval's verdict (vk.eval.lag)
    out["vk_send_lagged"] = bool(r.get("lagged"))
    sch = r.get("schedule")
    if isinstance(sch, dict):
        out["schedule"] = {k: sch.get(k) for k in ("mode", "process", "params", "concurrency", "seed") if k in sch}
    if r.get("run_end"):
        out["run_end"] = r["run_end"]
    return out
