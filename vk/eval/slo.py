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

_UNITS = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "min": 60.0, "%": 0.01, "": 1.0}
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


def parse_value(text: str, what: str) -> float:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*(us|µs|ms|min|s|m|%)?\s*", text, re.I)
    if not m:
        raise VkError(f"{what}: {text!r} is not a number with an optional unit (us, ms, s, %)")
    return float(m.group(1)) * _UNITS[(m.group(2) or "").lower()]


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
            if not re.fullmatch(r"p[0-9.]+|mean|min|max|stddev", stat):
                raise VkError(f"--slo: {stat!r} is not a statistic (p50, p99, p99.9, mean, min, max, stddev)")
        out.append(SLO(item.strip(), metric, stat, op, parse_value(val, "--slo")))
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
        conds.append(Condition(item.strip(), metric, op, parse_value(val, "--goodput")))
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
            p = parse_value(v, "--fluidity")
        elif k in ("tbt", "decode", "dd", "tpot", "itl"):
            d = parse_value(v, "--fluidity")
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


def check_slos(slos: list[SLO], result: dict) -> list[dict]:
    """Check each SLO on the overall summary and on every group; a missing value is a miss."""
    out = []
    targets = [("overall", result["overall"])] + [(g["label"], g["summary"]) for g in result["groups"]]
    for slo in slos:
        for label, summ in targets:
            v = _lookup(summ, slo)
            ok = v is not None and bool(_OPS[slo.op](v, slo.threshold))
            out.append({"slo": slo.spec, "group": label, "metric": slo.metric, "stat": slo.stat, "op": slo.op,
                        "threshold": slo.threshold, "value": v, "ok": ok})
    return out
