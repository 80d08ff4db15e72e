"""SLO, goodput and fluidity specifications: parsing and checking.

    --slo "ttft:p90<500ms,tpot:p99<50ms,error_rate<1%"      aggregate objectives (checked by --check)
    --goodput "ttft<1s,tpot<60ms"                          per-request objectives (attainment, goodput)
    --fluidity "ttft=1s,tbt=50ms"                          Etalon fluidity-index deadlines
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from vk.errors import VkError
from vk.eval.result import TIME_METRICS

# Thresholds carry their unit: latencies in us, ms or s (a bare number is refused, so that a CI gate cannot pass
# by a unit slip; "m" and "min" are refused too: m reads as milli or minutes); shares as a fraction or in %;
# counts and rates (tokens, req/s, tok/s) as plain numbers.
_TIME_UNITS = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0}
_UNITS = {**_TIME_UNITS, "%": 0.01, "": 1.0}
_OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}
_NP_OPS = {"<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal}

# per-request metrics a goodput condition may name
REQUEST_METRICS = ("ttft", "ttfc", "tpot", "e2e", "normalized_latency", "max_stall", "ttft_from_intended",
                   "ttfc_from_intended", "e2e_from_intended", "queue_delay", "dispatch_lag")
# scalar figures an SLO may name without a statistic
SCALARS = {
    "error_rate": ("counts", "error_rate"),
    "attainment": ("goodput", "attainment"),
    "goodput": ("goodput", "requests_per_s"),
    "goodput_tokens": ("goodput", "output_tokens_per_s"),
    "fluidity": ("fluidity", "service_index"),
    "fluid_share": ("fluidity", "share_ge_0.9"),
    "rps": ("throughput", "steady", "requests_per_s"),
    "output_tps": ("throughput", "steady", "output_tokens_per_s"),
    "input_tps": ("throughput", "steady", "input_tokens_per_s"),
    "total_tps": ("throughput", "steady", "total_tokens_per_s"),
    "cached_share": ("caching", "cached_share"),
}
SHARE_SCALARS = ("error_rate", "attainment", "fluidity", "fluid_share", "cached_share")
COUNT_STAT_METRICS = ("input_tokens", "output_tokens", "reasoning_tokens")  # per-request counts: in tokens


def threshold_kind(metric: str, stat: str | None) -> str:
    """What a threshold of this figure is: ``time``, ``share`` or ``count`` (see parse_value)."""
    if stat is None:
        return "share" if metric in SHARE_SCALARS else "count"
    if metric in TIME_METRICS:
        return "time"
    if metric == "fluidity":
        return "share"
    return "count"


_VALUE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*([a-zµ%]*)\s*", re.I)


def parse_value(text: str, what: str, kind: str = "any") -> float:
    """A threshold with its unit, in seconds for times. ``kind``: ``time`` (a unit is required: us, ms, s),
    ``share`` (a fraction, or %), ``count`` (a plain number), ``any`` (durations of options: a bare number is
    seconds)."""
    m = _VALUE.fullmatch(text)
    if not m:
        raise VkError(f"{what}: {text.strip()!r} is not a number with a unit (e.g. 50ms, 0.05s, 1%)")
    num, unit = float(m.group(1)), m.group(2).lower()
    if unit in ("m", "min"):
        raise VkError(f"{what}: {text.strip()!r}: {unit!r} is not a unit here (m could be milli or minutes); write "
                      f"{m.group(1)}ms or {num * 60:g}s")
    if unit not in _UNITS:
        raise VkError(f"{what}: {text.strip()!r}: unknown unit {m.group(2)!r} (us, ms, s for times; % for shares)")
    if kind == "time":
        if not unit:
            raise VkError(f"{what}: {text.strip()!r} has no unit: write {m.group(1)}ms or {num / 1000:g}s")
        if unit == "%":
            raise VkError(f"{what}: {text.strip()!r}: a latency takes a time unit (us, ms, s), not %")
    elif unit in _TIME_UNITS and kind in ("share", "count"):
        raise VkError(f"{what}: {text.strip()!r}: this figure is not a time; give a plain number"
                      + (" or %" if kind == "share" else ""))
    elif unit == "%" and kind == "count":
        raise VkError(f"{what}: {text.strip()!r}: this figure is a count or rate, not a share; give a plain number")
    return num * _UNITS[unit]


def parse_duration(value: Any, what: str) -> float:
    if isinstance(value, (int, float)):
        v = float(value)
    else:
        v = parse_value(str(value), what)
    if v < 0:
        raise VkError(f"{what}: must not be negative")
    return v


@dataclass
class SLO:
    spec: str
    metric: str
    stat: str | None
    op: str
    threshold: float
    kind: str = "count"  # of the threshold: time (seconds), share (0..1) or count


@dataclass
class Condition:
    spec: str
    metric: str
    op: str
    threshold: float

    def holds(self, v: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            return _NP_OPS[self.op](v, self.threshold)


@dataclass
class Goodput:
    spec: str
    conditions: list[Condition]


_ITEM = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?::\s*([A-Za-z0-9_.]+))?\s*(<=|>=|<|>)\s*(.+?)\s*$")


def parse_slo(spec: str | None) -> list[SLO]:
    if not spec:
        return []
    out = []
    for item in spec.split(","):
        if not item.strip():
            continue
        m = _ITEM.match(item)
        if not m:
            raise VkError(f"--slo: cannot parse {item.strip()!r} (expected METRIC:STAT<VALUE, e.g. ttft:p90<500ms)")
        metric, stat, op, val = m.groups()
        metric = metric.lower()
        if stat is None and metric not in SCALARS:
            raise VkError(f"--slo: {item.strip()!r} needs a statistic (e.g. {metric}:p99<...) or a scalar "
                          f"({', '.join(SCALARS)})")
        if stat is not None:
            stat = stat.lower()
            ok = re.fullmatch(r"p([0-9]+(?:\.[0-9]+)?)|mean|min|max|stddev", stat)
            if not ok or (ok.group(1) is not None and not 0 <= float(ok.group(1)) <= 100):
                raise VkError(f"--slo: {item.strip()!r}: {stat!r} is not a statistic (p0..p100 such as p50, p99, "
                              "p99.9; mean, min, max, stddev)")
            if metric not in TIME_METRICS and metric not in COUNT_STAT_METRICS and metric != "fluidity":
                raise VkError(f"--slo: {item.strip()!r}: unknown metric {metric!r} (a latency such as ttft, tpot, "
                              f"e2e; input_tokens, output_tokens, fluidity; or a scalar: {', '.join(SCALARS)})")
        kind = threshold_kind(metric, stat)
        out.append(SLO(item.strip(), metric, stat, op, parse_value(val, f"--slo {item.strip()!r}", kind), kind))
    return out


def parse_goodput(spec: str | None) -> Goodput | None:
    if not spec:
        return None
    conds = []
    for item in spec.split(","):
        if not item.strip():
            continue
        m = _ITEM.match(item)
        if not m or m.group(2):
            raise VkError(f"--goodput: cannot parse {item.strip()!r} (expected METRIC<VALUE, e.g. ttft<1s)")
        metric, _, op, val = m.groups()
        metric = metric.lower()
        if metric not in REQUEST_METRICS:
            raise VkError(f"--goodput: {metric!r} is not a per-request metric ({', '.join(REQUEST_METRICS)})")
        conds.append(Condition(item.strip(), metric, op, parse_value(val, f"--goodput {item.strip()!r}", "time")))
    return Goodput(spec, conds)


def parse_fluidity(spec: Any) -> tuple[float, float]:
    """``"ttft=1s,tbt=50ms"`` (or a (prefill, decode) pair) -> deadlines in seconds. Default 1 s and 50 ms."""
    if spec is None:
        return (1.0, 0.05)
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        return (float(spec[0]), float(spec[1]))
    p, d = 1.0, 0.05
    for item in str(spec).split(","):
        if not item.strip():
            continue
        k, sep, v = item.partition("=")
        k = k.strip().lower()
        if not sep:
            raise VkError(f"--fluidity: cannot parse {item!r} (expected ttft=1s,tbt=50ms)")
        if k in ("ttft", "prefill", "dp"):
            p = parse_value(v, "--fluidity", "time")
        elif k in ("tbt", "decode", "dd", "tpot", "itl"):
            d = parse_value(v, "--fluidity", "time")
        else:
            raise VkError(f"--fluidity: unknown deadline {k!r} (ttft, tbt)")
    if d <= 0:
        raise VkError("--fluidity: the decode deadline must be positive")
    return (p, d)


def _lookup(summary: dict, slo: SLO) -> Any:
    if slo.stat is None:
        cur: Any = summary
        for k in SCALARS[slo.metric]:
            if not isinstance(cur, dict) or k not in cur:
                return None
            cur = cur[k]
        return cur
    for section in ("latency", "tokens"):
        if slo.metric in summary.get(section, {}):
            return (summary[section][slo.metric] or {}).get(slo.stat)
    if slo.metric == "fluidity":
        return (summary["fluidity"]["index"] or {}).get(slo.stat)
    raise VkError(f"--slo: unknown metric {slo.metric!r}")


UNIT_OF_KIND = {"time": "s", "share": "fraction", "count": "as measured"}


def check_slos(slos: list[SLO], result: dict) -> list[dict]:
    """Check each SLO on the overall summary and on every group; a missing value is a miss."""
    out = []
    targets = [("overall", result["overall"])] + [(g["label"], g["summary"]) for g in result["groups"]]
    for slo in slos:
        for label, summ in targets:
            v = _lookup(summ, slo)
            ok = v is not None and bool(_OPS[slo.op](v, slo.threshold))
            out.append({"slo": slo.spec, "group": label, "metric": slo.metric, "stat": slo.stat, "op": slo.op,
                        "threshold": slo.threshold, "unit": UNIT_OF_KIND[slo.kind], "value": v, "ok": ok})
    return out
