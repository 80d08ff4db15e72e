"""Length and interval distributions, built from config dicts by ``type:``.

Length distributions give integers (token counts, turn counts, layer widths)::

    fixed             value
    uniform           min, max                      both bounds inclusive
    normal            mean, std, [min, max]         truncated to [min, max] (redrawn, not clipped)
    lognormal         mean, std | mu, sigma, [min, max]   truncated to [min, max]
    zipf              min, max, alpha (alias theta), [scramble]   P(min + k) ~ 1 / (k + 1) ** alpha
    fixed_stair       values, [repeat_each, wrap]   cycles through values (no randomness)
    inverse_gaussian  mean, shape, [min, max]       truncated to [min, max]
    empirical         file, column | values, [min, max]   draws from a CSV/JSONL column or an inline list

Interval distributions give seconds (floats >= 0)::

    fixed        interval (alias value)
    exponential  rate | mean        (alias poisson with arrival_rate, as in the seed design)
    gamma        rate (alias arrival_rate) | mean, cv
    lognormal    mean, cv | mu, sigma

``length_distribution(cfg, where)`` and ``interval_distribution(cfg, where)`` validate every parameter and raise
``VkError`` naming the key (``where`` is the key path used in messages, e.g.
``session_generator.channels[0].body_length_generator``). Every object has ``sample(rng)`` and ``mean`` (None
where there is no closed form), and ``describe()`` for humans.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np

from vk.errors import VkError

INF = float("inf")
MAX_LENGTH = 10_000_000  # tokens: the ceiling of any number a length generator reads (man vk-gen: LIMITS)
_INF_WORDS = ("inf", "+inf", "infinity", "+infinity", ".inf", "+.inf")


class ConfigError(VkError):
    """A bad distribution or generator parameter; the message names the key."""


def _fail(where: str, key: str | None, msg: str):
    path = f"{where}.{key}" if key and where else (key or where or "config")
    raise ConfigError(f"{path}: {msg}")


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class _Params:
    """Typed access to a config dict; remembers the keys read so that leftovers are reported."""

    def __init__(self, cfg: dict, where: str, allowed: tuple[str, ...], kind: str, ceiling: float | None = None):
        self.cfg = cfg
        self.where = where
        self.kind = kind
        self.ceiling = ceiling  # every finite number read must be within +-ceiling (None: any finite number)
        unknown = [k for k in cfg if k != "type" and k not in allowed]
        if unknown:
            exp = ", ".join(allowed) if allowed else "no parameters"
            _fail(where, str(unknown[0]), f"unknown key for type '{kind}' (expected: {exp}; to change the type, "
                                          "give the whole generator, e.g. {type: uniform, min: 1, max: 200})")

    def has(self, key: str) -> bool:
        return key in self.cfg and self.cfg[key] is not None

    def num(self, key: str, default: Any = None, *, required=False, integer=False, minimum=None,
            exclusive_min=None, maximum=None) -> Any:
        if not self.has(key):
            if required:
                _fail(self.where, key, f"missing (required for type '{self.kind}')")
            return default
        v = self.cfg[key]
        if isinstance(v, str):
            # YAML 1.1 reads 1e12 and 1.0e12 (no sign in the exponent) as strings: parse them here, and bound them
            # like any number, since a string such as "1e400" parses to infinity
            try:
                v = INF if v.strip().lower() in _INF_WORDS else float(v)
            except ValueError:
                _fail(self.where, key, f"expected a number, got {v!r}")
            if v in (INF, -INF):
                _fail(self.where, key, f"{self.cfg[key]!r} is out of range (write inf for no bound)")
        if not _is_num(v) or v != v:
            _fail(self.where, key, f"expected a number, got {v!r}")
        if self.ceiling is not None and v != INF and abs(v) > self.ceiling:
            _fail(self.where, key, f"{float(v):g} is above the ceiling of {self.ceiling:,} tokens per length")
        if integer and v != INF:
            if not float(v).is_integer():
                _fail(self.where, key, f"expected an integer, got {v!r}")
            v = int(v)
        if minimum is not None and v < minimum:
            _fail(self.where, key, f"must be >= {minimum}, got {v}")
        if exclusive_min is not None and v <= exclusive_min:
            _fail(self.where, key, f"must be > {exclusive_min}, got {v}")
        if maximum is not None and v > maximum:
            _fail(self.where, key, f"must be <= {maximum}, got {v}")
        return v

    def boolean(self, key: str, default: bool) -> bool:
        if not self.has(key):
            return default
        v = self.cfg[key]
        if not isinstance(v, bool):
            _fail(self.where, key, f"expected true or false, got {v!r}")
        return v

    def string(self, key: str, default=None, *, required=False) -> str | None:
        if not self.has(key):
            if required:
                _fail(self.where, key, f"missing (required for type '{self.kind}')")
            return default
        v = self.cfg[key]
        if not isinstance(v, (str, int)) or isinstance(v, bool):
            _fail(self.where, key, f"expected a string, got {v!r}")
        return str(v)


def _bounds(p: _Params, lo_default=1, hi_default=INF, minimum=0):
    lo = p.num("min", lo_default, integer=True, minimum=minimum)
    hi = p.num("max", hi_default, integer=True, minimum=minimum)
    if hi < lo:
        _fail(p.where, "max", f"must be >= min ({lo}), got {hi}")
    return lo, hi


# --------------------------------------------------------------------------------------------------------------
# length distributions


class LengthDistribution:
    type = ""
    mean: float | None = None
    low: float = 0
    high: float = INF

    def sample(self, rng: np.random.Generator) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:
        return self.type


class Fixed(LengthDistribution):
    type = "fixed"

    def __init__(self, value: int):
        self.value = value
        self.mean = float(value)
        self.low = self.high = value

    def sample(self, rng):
        return self.value

    def describe(self):
        return f"fixed {self.value}"


class Uniform(LengthDistribution):
    type = "uniform"

    def __init__(self, lo: int, hi: int):
        self.low, self.high = lo, hi
        self.mean = (lo + hi) / 2

    def sample(self, rng):
        return int(rng.integers(self.low, self.high + 1))

    def describe(self):
        return f"uniform {self.low}..{self.high}"


class _Truncated(LengthDistribution):
    """A continuous distribution rounded to integers and truncated to [low, high] by redrawing."""

    def _draw(self, rng) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def sample(self, rng):
        for _ in range(1000):
            v = int(round(self._draw(rng)))
            if self.low <= v <= self.high:
                return v
        # the bounds hold almost none of the mass: clip (documented); a draw may overflow to inf when max is open
        return int(round(min(max(self._draw(rng), self.low), self.high, MAX_LENGTH)))


class Normal(_Truncated):
    type = "normal"

    def __init__(self, mu, sd, lo, hi):
        self.mu, self.sd, self.low, self.high = mu, sd, lo, hi
        # the mean of the truncated distribution is mu only when the bounds cut (almost) nothing
        self.mean = mu if lo <= mu - 5 * sd and hi >= mu + 5 * sd else None

    def _draw(self, rng):
        return rng.normal(self.mu, self.sd)

    def describe(self):
        return f"normal mean {self.mu} std {self.sd} in [{self.low}, {self.high}]"


class LogNormal(_Truncated):
    type = "lognormal"

    def __init__(self, mu, sigma, lo, hi):
        self.mu, self.sigma, self.low, self.high = mu, sigma, lo, hi
        self.mean = math.exp(mu + sigma * sigma / 2)

    def _draw(self, rng):
        return rng.lognormal(self.mu, self.sigma)

    def describe(self):
        return f"lognormal mu {self.mu:.4g} sigma {self.sigma:.4g} in [{self.low}, {self.high}]"


class InverseGaussian(_Truncated):
    type = "inverse_gaussian"

    def __init__(self, mean, shape, lo, hi):
        self.m, self.shape, self.low, self.high = mean, shape, lo, hi
        self.mean = mean

    def _draw(self, rng):
        return rng.wald(self.m, self.shape)

    def describe(self):
        return f"inverse_gaussian mean {self.m} shape {self.shape} in [{self.low}, {self.high}]"


class Zipf(LengthDistribution):
    """Bounded Zipf on [min, max]: P(min + k) proportional to 1 / (k + 1) ** alpha."""

    type = "zipf"

    def __init__(self, lo, hi, alpha, scramble=False):
        self.low, self.high, self.alpha = lo, hi, alpha
        n = hi - lo + 1
        if n > 10_000_000:
            raise VkError("zipf: max - min is too large (at most 10,000,000 values)")
        w = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** alpha
        self.cdf = np.cumsum(w)
        self.cdf /= self.cdf[-1]
        values = np.arange(lo, hi + 1, dtype=np.int64)
        if scramble:
            # a fixed permutation: ranks spread over the range instead of piling up at min
            values = np.random.default_rng(0x5EED).permutation(values)
        self.values = values
        self.mean = float(np.dot(np.diff(np.concatenate(([0.0], self.cdf))), values))

    def sample(self, rng):
        i = int(np.searchsorted(self.cdf, rng.random(), side="right"))
        return int(self.values[min(i, len(self.values) - 1)])

    def describe(self):
        return f"zipf alpha {self.alpha} in [{self.low}, {self.high}]"


class FixedStair(LengthDistribution):
    """values[0] repeat_each times, then values[1], ...; wraps around, or keeps the last value."""

    type = "fixed_stair"

    def __init__(self, values, repeat_each=1, wrap=True):
        self.values, self.repeat_each, self.wrap = list(values), repeat_each, wrap
        self.i = 0
        self.low, self.high = min(values), max(values)
        self.mean = float(sum(values)) / len(values) if wrap else None

    def sample(self, rng):
        k = self.i // self.repeat_each
        self.i += 1
        if k >= len(self.values):
            if self.wrap:
                k %= len(self.values)
            else:
                k = len(self.values) - 1
        return self.values[k]

    def describe(self):
        return f"fixed_stair {self.values} x{self.repeat_each}{' wrap' if self.wrap else ''}"


class Empirical(LengthDistribution):
    type = "empirical"

    def __init__(self, values: np.ndarray, label: str):
        self.values = values
        self.label = label
        self.low, self.high = int(values.min()), int(values.max())
        self.mean = float(values.mean())

    def sample(self, rng):
        return int(self.values[rng.integers(0, len(self.values))])

    def describe(self):
        return f"empirical {self.label} ({len(self.values)} values, mean {self.mean:.1f})"


def _read_column(path: Path, column: str, where: str) -> list:
    if not path.is_file():
        _fail(where, "file", f"no such file: {path}")
    out = []
    name = path.name.lower()
    try:
        if name.endswith((".jsonl", ".ndjson", ".json")):
            import orjson

            with open(path, "rb") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = orjson.loads(line)
                    except orjson.JSONDecodeError:
                        raise ConfigError(f"{path}:{n}: not valid JSON") from None
                    if not isinstance(obj, dict) or column not in obj:
                        raise ConfigError(f"{path}:{n}: {column}: missing (from {where}.column)")
                    out.append((n, obj[column]))
        else:
            with open(path, newline="", encoding="utf-8") as f:
                rd = csv.DictReader(f)
                if rd.fieldnames is None or column not in rd.fieldnames:
                    have = ", ".join(rd.fieldnames or [])
                    raise ConfigError(f"{path}: no column '{column}' (from {where}.column; columns: {have})")
                for n, row in enumerate(rd, 2):
                    out.append((n, row[column]))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    return [(n, v) for n, v in out]


def _empirical(p: _Params, base_dir: Path | None) -> Empirical:
    lo, hi = _bounds(p, lo_default=0)
    if p.has("values"):
        vals = p.cfg["values"]
        if p.has("file"):
            _fail(p.where, "values", "give either 'file' or 'values', not both")
        if not isinstance(vals, list) or not vals:
            _fail(p.where, "values", "expected a non-empty list of numbers")
        rows = list(enumerate(vals))
        label = "values"
        src = None
    else:
        f = p.string("file", required=True)
        column = p.string("column", required=True)
        path = Path(f).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        rows = _read_column(path, column, p.where)
        label = f"{path.name}:{column}"
        src = str(path)
    nums = []
    for n, v in rows:
        try:
            x = float(v)
        except (TypeError, ValueError):
            where = f"{src}:{n}: {p.cfg.get('column')}" if src else f"{p.where}.values[{n}]"
            raise ConfigError(f"{where}: expected a number, got {v!r}") from None
        if x != x:
            continue
        if abs(x) > MAX_LENGTH:
            where = f"{src}:{n}: {p.cfg.get('column')}" if src else f"{p.where}.values[{n}]"
            raise ConfigError(f"{where}: {x:g} is above the ceiling of {MAX_LENGTH:,} tokens per length")
        x = int(round(x))
        if lo <= x <= hi:
            nums.append(x)
    if not nums:
        _fail(p.where, "file" if src else "values", f"no numbers in [{lo}, {hi}]")
    return Empirical(np.asarray(nums, dtype=np.int64), label)


LENGTH_TYPES = ("fixed", "uniform", "normal", "lognormal", "zipf", "fixed_stair", "inverse_gaussian", "empirical",
                "floored_normal", "floored_uniform")
_LENGTH_ALIASES = {"stair": "fixed_stair", "inverse_gaussian": "inverse_gaussian", "invgauss": "inverse_gaussian",
                   "inversegaussian": "inverse_gaussian", "wald": "inverse_gaussian", "gaussian": "normal",
                   "log_normal": "lognormal", "constant": "fixed"}


def length_distribution(cfg: Any, where: str = "", *, minimum: int = 1, base_dir: Path | None = None
                        ) -> LengthDistribution:
    """Build a length distribution from ``{"type": ..., params}`` (a bare number means ``fixed``).

    ``minimum`` is the smallest value the caller accepts (1 for token counts; bounds below it are errors).
    """
    if _is_num(cfg):
        cfg = {"type": "fixed", "value": cfg}
    if not isinstance(cfg, dict):
        _fail(where, None, f"expected a length generator like {{type: uniform, min: 1, max: 10}}, got {cfg!r}")
    t = cfg.get("type")
    if not isinstance(t, str):
        _fail(where, "type", f"missing or not a string (one of: {', '.join(LENGTH_TYPES)})")
    t = _LENGTH_ALIASES.get(t.lower(), t.lower())
    if t == "fixed":
        p = _Params(cfg, where, ("value",), t, MAX_LENGTH)
        return Fixed(p.num("value", required=True, integer=True, minimum=minimum))
    if t == "uniform":
        p = _Params(cfg, where, ("min", "max"), t, MAX_LENGTH)
        lo = p.num("min", required=True, integer=True, minimum=minimum)
        hi = p.num("max", required=True, integer=True, minimum=minimum)
        if hi < lo:
            _fail(where, "max", f"must be >= min ({lo}), got {hi}")
        if hi == INF:
            _fail(where, "max", "must be finite")
        return Uniform(lo, hi)
    if t == "normal":
        p = _Params(cfg, where, ("mean", "std", "min", "max"), t, MAX_LENGTH)
        mu = p.num("mean", required=True)
        sd = p.num("std", required=True, minimum=0)
        lo, hi = _bounds(p, lo_default=minimum, minimum=minimum)
        _check_mass(where, lo, hi, mu, sd)
        return Normal(mu, sd, lo, hi)
    if t == "lognormal":
        p = _Params(cfg, where, ("mean", "std", "mu", "sigma", "min", "max"), t, MAX_LENGTH)
        mu, sigma = _lognormal_params(p)
        lo, hi = _bounds(p, lo_default=minimum, minimum=minimum)
        return LogNormal(mu, sigma, lo, hi)
    if t == "zipf":
        p = _Params(cfg, where, ("min", "max", "alpha", "theta", "scramble"), t, MAX_LENGTH)
        lo = p.num("min", required=True, integer=True, minimum=minimum)
        hi = p.num("max", required=True, integer=True, minimum=minimum)
        if hi < lo:
            _fail(where, "max", f"must be >= min ({lo}), got {hi}")
        if hi == INF:
            _fail(where, "max", "must be finite")
        if p.has("alpha") and p.has("theta"):
            _fail(where, "theta", "give either 'alpha' or 'theta' (its alias), not both")
        key = "theta" if p.has("theta") else "alpha"
        alpha = p.num(key, 1.0, exclusive_min=0)
        return Zipf(lo, hi, alpha, p.boolean("scramble", False))
    if t == "fixed_stair":
        p = _Params(cfg, where, ("values", "repeat_each", "wrap"), t, MAX_LENGTH)
        vals = cfg.get("values")
        if not isinstance(vals, list) or not vals:
            _fail(where, "values", "expected a non-empty list of integers")
        out = []
        for i, v in enumerate(vals):
            if not _is_num(v) or not float(v).is_integer() or not minimum <= v <= MAX_LENGTH:
                _fail(where, f"values[{i}]", f"expected an integer from {minimum} to {MAX_LENGTH:,}, got {v!r}")
            out.append(int(v))
        return FixedStair(out, p.num("repeat_each", 1, integer=True, minimum=1), p.boolean("wrap", True))
    if t == "inverse_gaussian":
        p = _Params(cfg, where, ("mean", "shape", "min", "max"), t, MAX_LENGTH)
        m = p.num("mean", required=True, exclusive_min=0)
        shape = p.num("shape", required=True, exclusive_min=0)
        lo, hi = _bounds(p, lo_default=minimum, minimum=minimum)
        return InverseGaussian(m, shape, lo, hi)
    if t == "empirical":
        p = _Params(cfg, where, ("file", "column", "values", "min", "max"), t, MAX_LENGTH)
        d = _empirical(p, base_dir)
        if d.low < minimum:
            _fail(where, "min", f"the data has values below {minimum}; set min: {minimum}")
        return d
    from vk.gen.scenarios import floored_length  # genai-bench's samplers, with its scenario strings

    d = floored_length(t, cfg, where, minimum)
    if d is not None:
        return d
    _fail(where, "type", f"unknown length generator type {t!r} (one of: {', '.join(LENGTH_TYPES)})")
    raise AssertionError  # unreachable


def _check_mass(where, lo, hi, mu, sd):
    if sd == 0:
        if not lo <= mu <= hi:
            _fail(where, "mean", f"{mu} is outside [{lo}, {hi}] and std is 0")
        return
    # at least a sliver of the mass inside the bounds, so that redrawing terminates quickly
    z_lo = (lo - 0.5 - mu) / sd
    z_hi = (hi + 0.5 - mu) / sd
    mass = 0.5 * (math.erf(z_hi / math.sqrt(2)) - math.erf(z_lo / math.sqrt(2)))
    if mass < 1e-3:
        _fail(where, "mean", f"almost none of normal(mean {mu}, std {sd}) lies in [{lo}, {hi}]")


def _lognormal_params(p: _Params) -> tuple[float, float]:
    if p.has("mu") or p.has("sigma"):
        if p.has("mean") or p.has("std") or p.has("cv"):
            _fail(p.where, "mu", "give either mu/sigma (of the underlying normal) or mean/std, not both")
        return p.num("mu", required=True), p.num("sigma", required=True, minimum=0)
    m = p.num("mean", required=True, exclusive_min=0)
    if p.has("cv"):
        cv = p.num("cv", required=True, minimum=0)
    else:
        cv = p.num("std", required=True, minimum=0) / m
    sigma2 = math.log(1 + cv * cv)
    return math.log(m) - sigma2 / 2, math.sqrt(sigma2)


# --------------------------------------------------------------------------------------------------------------
# interval distributions (seconds)


class IntervalDistribution:
    type = ""
    mean: float = 0.0

    def sample(self, rng: np.random.Generator) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:
        return self.type


class FixedInterval(IntervalDistribution):
    type = "fixed"

    def __init__(self, v):
        self.v = self.mean = float(v)

    def sample(self, rng):
        return self.v

    def describe(self):
        return f"fixed {self.v:g} s"


class Exponential(IntervalDistribution):
    type = "exponential"

    def __init__(self, mean):
        self.mean = mean

    def sample(self, rng):
        return float(rng.exponential(self.mean)) if self.mean > 0 else 0.0

    def describe(self):
        return f"exponential mean {self.mean:g} s"


class GammaInterval(IntervalDistribution):
    type = "gamma"

    def __init__(self, mean, cv):
        self.mean, self.cv = mean, cv
        self.k = 1.0 / (cv * cv)
        self.theta = mean / self.k

    def sample(self, rng):
        return float(rng.gamma(self.k, self.theta))

    def describe(self):
        return f"gamma mean {self.mean:g} s cv {self.cv:g}"


class LogNormalInterval(IntervalDistribution):
    type = "lognormal"

    def __init__(self, mu, sigma):
        self.mu, self.sigma = mu, sigma
        self.mean = math.exp(mu + sigma * sigma / 2)

    def sample(self, rng):
        return float(rng.lognormal(self.mu, self.sigma))

    def describe(self):
        return f"lognormal mean {self.mean:g} s sigma {self.sigma:g}"


INTERVAL_TYPES = ("fixed", "exponential", "gamma", "lognormal")
_INTERVAL_ALIASES = {"poisson": "exponential", "exp": "exponential", "constant": "fixed", "none": "fixed",
                     "log_normal": "lognormal"}


def _rate_or_mean(p: _Params) -> float:
    keys = [k for k in ("rate", "arrival_rate", "mean") if p.has(k)]
    if len(keys) > 1:
        _fail(p.where, keys[1], f"give one of rate, arrival_rate or mean, not both {keys[0]} and {keys[1]}")
    if not keys:
        _fail(p.where, "mean", f"missing (type '{p.kind}' needs mean (seconds) or rate (per second))")
    if keys[0] == "mean":
        return p.num("mean", minimum=0)
    return 1.0 / p.num(keys[0], exclusive_min=0)


def interval_distribution(cfg: Any, where: str = "") -> IntervalDistribution:
    """Build an interval distribution (seconds) from ``{"type": ..., params}``; a bare number means fixed."""
    if cfg is None:
        return FixedInterval(0.0)
    if _is_num(cfg):
        cfg = {"type": "fixed", "interval": cfg}
    if not isinstance(cfg, dict):
        _fail(where, None, f"expected an interval generator like {{type: exponential, mean: 1.0}}, got {cfg!r}")
    t = cfg.get("type")
    if not isinstance(t, str):
        _fail(where, "type", f"missing or not a string (one of: {', '.join(INTERVAL_TYPES)})")
    t = _INTERVAL_ALIASES.get(t.lower(), t.lower())
    if t == "fixed":
        p = _Params(cfg, where, ("interval", "value"), t)
        if p.has("interval") and p.has("value"):
            _fail(where, "value", "give 'interval' or its alias 'value', not both")
        key = "value" if p.has("value") else "interval"
        return FixedInterval(p.num(key, 0.0, minimum=0))
    if t == "exponential":
        p = _Params(cfg, where, ("rate", "arrival_rate", "mean"), t)
        return Exponential(_rate_or_mean(p))
    if t == "gamma":
        p = _Params(cfg, where, ("rate", "arrival_rate", "mean", "cv"), t)
        mean = _rate_or_mean(p)
        cv = p.num("cv", required=True, exclusive_min=0)
        if mean == 0:
            return FixedInterval(0.0)
        return GammaInterval(mean, cv)
    if t == "lognormal":
        p = _Params(cfg, where, ("mean", "cv", "std", "mu", "sigma"), t)
        mu, sigma = _lognormal_params(p)
        return LogNormalInterval(mu, sigma)
    _fail(where, "type", f"unknown interval generator type {t!r} (one of: {', '.join(INTERVAL_TYPES)})")
    raise AssertionError  # unreachable
