"""The configuration sections vk-gen reads (with the keys each may hold and errors naming the key), the prefix
groups of a workload, and the notes it says once on stderr."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from vk import records
from vk.gen.config import (
    Config,
)
from vk.gen.distributions import (
    ConfigError,
    IntervalDistribution,
    LengthDistribution,
    interval_distribution,
    length_distribution,
)

DEFAULT_COUNT = 100

GRAPH_TYPES = ("single_request", "linear", "branching")
_GRAPH_ALIASES = {"single": "single_request", "single_request": "single_request", "singlerequest": "single_request",
                  "linear": "linear", "multi_turn": "linear", "branching": "branching", "dag": "branching"}
OUTPUT_CONTROLS = records.OUTPUT_CONTROLS
FORMATS = ("chat", "completion")
INPUT_MODES = ("content", "templated")

_COMPONENTS = {"graph": 1, "input": 2, "output": 3, "content": 4, "prefix": 5, "think": 6, "groups": 7, "task": 8}


def component_rng(seed: int, component: str, index: int = 0) -> np.random.Generator:
    """The random stream of one component for one session (or setup step)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, _COMPONENTS[component], index])))


class _Section:
    """One mapping of the config: typed getters, unknown keys are errors naming the key path."""

    def __init__(self, cfg: Config, data: Any, path: str, allowed: tuple[str, ...]):
        self.cfg, self.path = cfg, path
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise cfg.error(path, f"expected a mapping, got {_tname(data)}")
        self.data = data
        for k in data:
            if k not in allowed:
                raise cfg.error(f"{path}.{k}" if path else str(k),
                                f"unknown key (expected one of: {', '.join(allowed)})")

    def key(self, k: str) -> str:
        return f"{self.path}.{k}" if self.path else k

    def has(self, k: str) -> bool:
        return self.data.get(k) is not None

    def get(self, k: str, default=None):
        v = self.data.get(k)
        return default if v is None else v

    def boolean(self, k: str, default: bool) -> bool:
        v = self.data.get(k)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise self.cfg.error(self.key(k), f"expected true or false, got {v!r}")
        return v

    def number(self, k: str, default: float, lo: float | None = None, hi: float | None = None) -> float:
        v = self.data.get(k)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self.cfg.error(self.key(k), f"expected a number, got {v!r}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise self.cfg.error(self.key(k), f"must be between {lo} and {hi}, got {v}")
        return float(v)

    def integer(self, k: str, default: int | None, lo: int = 0) -> int | None:
        v = self.data.get(k)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not float(v).is_integer():
            raise self.cfg.error(self.key(k), f"expected an integer, got {v!r}")
        if v < lo:
            raise self.cfg.error(self.key(k), f"must be >= {lo}, got {v}")
        return int(v)

    def choice(self, k: str, options: tuple[str, ...], default: str, aliases: dict | None = None) -> str:
        v = self.data.get(k)
        if v is None:
            return default
        if not isinstance(v, str):
            raise self.cfg.error(self.key(k), f"expected one of {', '.join(options)}, got {v!r}")
        v2 = (aliases or {}).get(v.lower(), v.lower())
        if v2 not in options:
            raise self.cfg.error(self.key(k), f"expected one of {', '.join(options)}, got {v!r}")
        return v2

    def length(self, k: str, default: Any, minimum: int = 1) -> LengthDistribution:
        try:
            return length_distribution(self.get(k, default), self.key(k), minimum=minimum,
                                       base_dir=self.cfg.base_dir)
        except ConfigError as e:
            self.cfg.reraise(e)
            raise

    def interval(self, k: str, default: Any = None) -> IntervalDistribution:
        try:
            return interval_distribution(self.get(k, default), self.key(k))
        except ConfigError as e:
            self.cfg.reraise(e)
            raise


def _tname(v) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(type(v), type(v).__name__)


class _Groups:
    """N prefix groups (distinct shared prefixes, e.g. system prompts) and how sessions pick one."""

    def __init__(self, sec: _Section, seed: int):
        n = sec.integer("num_groups", None, lo=1)
        lengths_list = sec.data.get("lengths")
        if lengths_list is not None:
            if sec.has("length_generator"):
                raise sec.cfg.error(sec.key("lengths"), "give either 'lengths' or 'length_generator', not both")
            if not isinstance(lengths_list, list) or not lengths_list:
                raise sec.cfg.error(sec.key("lengths"), "expected a non-empty list of token counts")
            for i, v in enumerate(lengths_list):
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise sec.cfg.error(f"{sec.key('lengths')}[{i}]", f"expected an integer >= 1, got {v!r}")
            if n is not None and n != len(lengths_list):
                raise sec.cfg.error(sec.key("num_groups"), f"is {n} but 'lengths' has {len(lengths_list)} values")
            self.lengths = [int(v) for v in lengths_list]
        else:
            if n is None:
                raise sec.cfg.error(sec.key("num_groups"), "missing (or give 'lengths')")
            dist = sec.length("length_generator", {"type": "fixed", "value": 1000})
            rng = component_rng(seed, "groups", 0)
            self.lengths = [dist.sample(rng) for _ in range(n)]
        n = len(self.lengths)
        self.n = n
        gd = sec.get("group_distribution", {"type": "uniform"})
        path = sec.key("group_distribution")
        if isinstance(gd, str):
            gd = {"type": gd}
        gs = _Section(sec.cfg, gd, path, ("type", "alpha", "weights"))
        t = gs.choice("type", ("uniform", "zipf", "weights"), "uniform")
        if t == "uniform":
            w = np.ones(n)
            if gs.has("alpha") or gs.has("weights"):
                raise sec.cfg.error(path, "type 'uniform' takes no parameters")
        elif t == "zipf":
            alpha = gs.number("alpha", 1.0, lo=0)
            w = 1.0 / np.arange(1, n + 1, dtype=float) ** alpha
        else:
            ws = gs.data.get("weights")
            if not isinstance(ws, list) or len(ws) != n:
                raise sec.cfg.error(f"{path}.weights", f"expected a list of {n} weights (one per group)")
            for i, x in enumerate(ws):
                if isinstance(x, bool) or not isinstance(x, (int, float)) or x < 0:
                    raise sec.cfg.error(f"{path}.weights[{i}]", f"expected a number >= 0, got {x!r}")
            w = np.asarray(ws, dtype=float)
            if w.sum() <= 0:
                raise sec.cfg.error(f"{path}.weights", "at least one weight must be > 0")
        self.cdf = np.cumsum(w) / w.sum()
        self.role = sec.choice("role", ("system", "user"), "system")

    def pick(self, rng) -> int:
        return int(min(np.searchsorted(self.cdf, rng.random(), side="right"), self.n - 1))


class Notes:
    """Counts of requests vk-gen could not make as asked, said once each on stderr at the end."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.first: dict[str, int] = {}

    def add(self, what: str, session: int) -> None:
        if what not in self.counts:
            self.counts[what] = 0
            self.first[what] = session
        self.counts[what] += 1

    def flush(self) -> None:
        for what, n in self.counts.items():
            print(f"vk-gen: warning: {n} {what} (first in session {self.first[what]})", file=sys.stderr)
        self.counts.clear()
