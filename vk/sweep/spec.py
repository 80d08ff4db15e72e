"""What a sweep does: the knob and its values (a grid) or a capacity search, the objectives, the probe length.

Options are checked here, once, and every mistake is one ``VkError`` naming the option.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

from vk.errors import VkError

# knob -> (vk.schedule.schedule keyword, command-line option)
KNOBS = {
    "poisson": ("poisson", "--poisson"),
    "gamma": ("gamma", "--gamma"),
    "concurrency": ("concurrency", "--concurrency"),
    "target_rate": ("target_rate", "--target-rate"),
}
SEARCHES = ("rate", "concurrency")


@dataclass
class Plan:
    knob: str
    mode: str  # grid | search
    values: list[float] = field(default_factory=list)  # the grid
    cv: float | None = None  # gamma's coefficient of variation
    # capacity search
    start: float = 1.0
    growth: float = 2.0
    tolerance: float = 0.1
    max_probes: int = 12
    max_value: float | None = None
    # objectives
    slo: str | None = None
    goodput: str | None = None
    min_goodput: float | None = None
    confidence: float = 0.95
    bootstrap: int = 1000
    extend: int = 1  # extensions of a probe whose verdict is uncertain
    # each probe
    duration: float | None = None
    max_sessions: int | None = None
    warmup: int = 0
    seed: int = 0
    # saturation stop and what happens between probes
    saturation: bool = True
    saturation_min: float = 2.0
    cooldown: float = 0.0
    between_cmd: str | None = None
    drain_timeout: float = 60.0

    @property
    def integer(self) -> bool:
        return self.knob == "concurrency"

    def objectives(self) -> str | None:
        """The SLO spec vk-eval checks: --slo plus --min-goodput as ``attainment>=X``."""
        items = [self.slo] if self.slo else []
        if self.min_goodput is not None:
            items.append(f"attainment>={self.min_goodput:g}")
        return ",".join(items) or None

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["objectives"] = self.objectives()
        return d


def parse_list(spec, option: str, *, integer: bool = False) -> list[float]:
    """``"1,2,4"`` (or a list) -> positive numbers, in the order given."""
    items = [x.strip() for x in spec.split(",")] if isinstance(spec, str) else list(spec)
    out = []
    for x in items:
        if x == "":
            continue
        try:
            v = float(x)
        except (TypeError, ValueError):
            raise VkError(f"{option}: {x!r} is not a number (expected a list such as 1,2,4,8)") from None
        if not math.isfinite(v) or v <= 0:
            raise VkError(f"{option}: values must be > 0, got {x!r}")
        if integer:
            if not v.is_integer():
                raise VkError(f"{option}: values must be whole numbers, got {x!r}")
            v = int(v)
        out.append(v)
    if not out:
        raise VkError(f"{option}: expected a list of values, e.g. 1,2,4,8")
    if len(set(out)) != len(out):
        raise VkError(f"{option}: a value is listed twice")
    return out


def round_value(v: float, integer: bool) -> float:
    """Probe values are kept to 4 significant digits (stable probe names, so a re-run finds them)."""
    if integer:
        return int(max(1, round(v)))
    return float(f"{v:.4g}")


def value_text(v: float) -> str:
    return f"{v:g}"


def probe_name(knob: str, value: float, attempt: int) -> str:
    """``poisson-4``, ``concurrency-16``; an extended probe (twice as long) ``poisson-4-x2``."""
    return f"{knob}-{value_text(value)}" + (f"-x{2 ** attempt}" if attempt else "")


def probe_seed(sweep_seed: int, knob: str, value: float, attempt: int) -> int:
    """A probe's own seed, from the sweep's seed and the probe alone: every probe is reproducible by itself."""
    h = hashlib.sha256(f"vk-sweep:{sweep_seed}:{knob}:{value_text(value)}:{attempt}".encode()).digest()
    return int.from_bytes(h[:4], "big") & 0x7FFFFFFF


def make_plan(*, poisson=None, gamma=None, cv=None, concurrency=None, target_rate=None, search=None, start=None,
              growth=2.0, tolerance=0.1, max_probes=12, max_value=None, slo=None, goodput=None, min_goodput=None,
              confidence=0.95, bootstrap=1000, extend=1, duration=None, max_sessions=None, warmup=0, seed=0,
              saturation=True, saturation_min=2.0, cooldown=0.0, between_cmd=None, drain_timeout=60.0) -> Plan:
    grids = {k: v for k, v in (("poisson", poisson), ("gamma", gamma), ("concurrency", concurrency),
                               ("target_rate", target_rate)) if v is not None}
    if search is not None:
        if search not in SEARCHES:
            raise VkError(f"--search: expected rate or concurrency, got {search!r}")
        if grids:
            raise VkError(f"--search {search} finds the values itself: drop {KNOBS[next(iter(grids))][1]}")
        knob = "concurrency" if search == "concurrency" else ("gamma" if cv is not None else "poisson")
        mode, values = "search", []
        if not slo and min_goodput is None:
            raise VkError("--search needs objectives: --slo 'ttft:p90<500ms,...' and/or --min-goodput SHARE")
    else:
        if not grids:
            raise VkError("choose what to sweep: --poisson LIST, --gamma LIST --cv CV, --concurrency LIST, "
                          "--target-rate LIST, or a capacity search with --search rate|concurrency --slo SPEC")
        if len(grids) > 1:
            raise VkError(f"sweep one knob at a time, got {' and '.join(KNOBS[k][1] for k in grids)}")
        knob = next(iter(grids))
        mode = "grid"
        values = parse_list(grids[knob], KNOBS[knob][1], integer=knob == "concurrency")
    if knob == "gamma" and cv is None:
        raise VkError("--gamma needs --cv CV (the coefficient of variation of the gaps)")
    if cv is not None and knob not in ("gamma",):
        raise VkError("--cv goes with --gamma (or --search rate)")
    if cv is not None and not cv > 0:
        raise VkError("--cv must be > 0")
    if duration is None and max_sessions is None:
        raise VkError("give each probe a length: --duration SECONDS and/or --max-sessions N")
    if duration is not None and not duration > 0:
        raise VkError("--duration must be > 0")
    if max_sessions is not None and max_sessions < 1:
        raise VkError("--max-sessions must be >= 1")
    if not growth > 1:
        raise VkError("--growth must be > 1")
    if not tolerance > 0:
        raise VkError("--tolerance must be > 0 (a relative width, e.g. 0.1)")
    if max_probes < 2:
        raise VkError("--max-probes must be >= 2")
    if not 0 < confidence < 1:
        raise VkError("--confidence must be between 0 and 1 (e.g. 0.95)")
    if min_goodput is not None and not 0 < min_goodput <= 1:
        raise VkError("--min-goodput must be a share between 0 and 1 (e.g. 0.9)")
    if extend < 0:
        raise VkError("--extend must be >= 0")
    if cooldown < 0 or drain_timeout < 0:
        raise VkError("--cooldown and --drain-timeout must be >= 0")
    if bootstrap < 0:
        raise VkError("--bootstrap must be >= 0")
    if start is None:
        start = 1.0
    if not start > 0:
        raise VkError("--start must be > 0")
    if max_value is not None and not max_value >= start:
        raise VkError("--max-value must be >= --start")
    # the objectives are vk-eval's: parse them now, so a typo fails before any traffic
    from vk.eval.slo import parse_goodput, parse_slo

    parse_slo(slo)
    parse_goodput(goodput)
    return Plan(knob=knob, mode=mode, values=values, cv=cv, start=round_value(start, knob == "concurrency"),
                growth=float(growth), tolerance=float(tolerance), max_probes=int(max_probes), max_value=max_value,
                slo=slo or None, goodput=goodput or None, min_goodput=min_goodput, confidence=float(confidence),
                bootstrap=int(bootstrap), extend=int(extend), duration=duration, max_sessions=max_sessions,
                warmup=int(warmup or 0), seed=int(seed), saturation=bool(saturation),
                saturation_min=float(saturation_min), cooldown=float(cooldown), between_cmd=between_cmd or None,
                drain_timeout=float(drain_timeout))


def per_request_goodput(plan: Plan) -> str | None:
    """The per-request objectives behind --min-goodput: --goodput, else one per latency SLO (ttft:p90<500ms ->
    ttft<0.5s), as the issue's 'share of requests meeting per-request objectives'."""
    if plan.goodput:
        return plan.goodput
    if plan.min_goodput is None:
        return None
    from vk.eval.slo import REQUEST_METRICS, parse_slo

    conds = [f"{s.metric}{s.op}{s.threshold:g}s" for s in parse_slo(plan.slo)
             if s.stat is not None and s.metric in REQUEST_METRICS]
    if not conds:
        raise VkError("--min-goodput needs per-request objectives: --goodput 'ttft<1s,tpot<60ms' or a latency "
                      "--slo (ttft:p90<500ms gives ttft<500ms per request)")
    return ",".join(conds)
