"""genai-bench's traffic scenario strings, as a shorthand for a vk-gen workload.

A scenario string stands for a few settings of a vk-gen config (``man vk-gen``: SCENARIOS shows each next to
its YAML)::

    N(mi,si)/(mo,so)   input  max(1, trunc(normal(mi, si)))        output max(2, trunc(normal(mo, so)))
    U(a,b)/(c,d)       input  max(1, trunc(uniform(a or 1, b)))    output max(2, trunc(uniform(c or 1, d)))
    U(b,d)             the same with a = c = 1
    D(i,o)             input  i, output o (no floors)
    E(d)               embeddings: documents of d tokens (task.documents per request, default 1)
    R(d,q)             rerank: a query of q tokens and documents of d tokens (genai-bench's order: d first)
    I(w,h) / I(w,h,n)  vision chat: n images (default 1) of w x h pixels with the text prompt
    P(p,s)/o           prefix repetition: every request starts with the same p tokens, then s of its own; o out

The floors and the truncation toward zero (Python's ``int``) are genai-bench's: its N and U samplers draw a
float, cut it to an integer and raise it to at least 1 input token and 2 output tokens; ``uniform(a, b)``
draws from [a, b), so b itself practically never comes out. ``floored_normal`` and ``floored_uniform`` are
those two samplers as vk-gen length generators, usable in any YAML config.

Several scenarios make one workload of labelled blocks, in the order given (genai-bench runs them one after
the other): ``--count`` sessions per scenario, each session carrying ``scenario: "<string>"``, which vk-send
copies into every response record, so that ``vk-eval --group-by scenario`` reports each one.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

from vk.errors import VkError
from vk.gen.distributions import LengthDistribution, _fail, _Params

# --------------------------------------------------------------------------------------------------------------
# genai-bench's samplers as length generators


class FlooredNormal(LengthDistribution):
    """``max(floor, trunc(normal(mean, std)))``: genai-bench's N scenario (not vk's truncated ``normal``)."""

    kind = "floored_normal"

    def __init__(self, mean: float, std: float, floor: int):
        self.mu, self.sd, self.floor = mean, std, floor
        self.mean = None  # the floor shifts the mean where the normal has mass below it: no short closed form

    def sample(self, rng):
        return max(self.floor, int(rng.normal(self.mu, self.sd)))

    def describe(self):
        return f"max({self.floor}, trunc(normal(mean={self.mu:g}, std={self.sd:g})))"


class FlooredUniform(LengthDistribution):
    """``max(floor, trunc(uniform(low, high)))`` with the float draw in [low, high): genai-bench's U scenario."""

    kind = "floored_uniform"

    def __init__(self, low: float, high: float, floor: int):
        self.low, self.high, self.floor = low, high, floor
        self.mean = None

    def sample(self, rng):
        return max(self.floor, int(rng.uniform(self.low, self.high)))

    def describe(self):
        return f"max({self.floor}, trunc(uniform[{self.low:g}, {self.high:g})))"


def floored_length(t: str, cfg: dict, where: str, minimum: int) -> LengthDistribution | None:
    """The generator for ``type: floored_normal`` / ``floored_uniform`` (None for other types)."""
    if t == "floored_normal":
        p = _Params(cfg, where, ("mean", "std", "floor"), t)
        mu = p.num("mean", required=True)
        sd = p.num("std", required=True, minimum=0)
        floor = p.num("floor", max(1, minimum), integer=True, minimum=max(1, minimum))
        return FlooredNormal(mu, sd, floor)
    if t == "floored_uniform":
        p = _Params(cfg, where, ("low", "high", "floor"), t)
        lo = p.num("low", required=True, minimum=0)
        hi = p.num("high", required=True, minimum=0)
        if hi < lo:
            _fail(where, "high", f"must be >= low ({lo:g}), got {hi:g}")
        floor = p.num("floor", max(1, minimum), integer=True, minimum=max(1, minimum))
        return FlooredUniform(lo, hi, floor)
    return None


FLOORED_TYPES = ("floored_normal", "floored_uniform")

# --------------------------------------------------------------------------------------------------------------
# scenario strings

_PATTERNS = {
    "N": re.compile(r"^N\((\d+),(\d+)\)/\((\d+),(\d+)\)$"),
    "U": re.compile(r"^U\((\d+),(\d+)\)(?:/\((\d+),(\d+)\))?$"),
    "D": re.compile(r"^D\((\d+),(\d+)\)$"),
    "E": re.compile(r"^E\((\d+)\)$"),
    "R": re.compile(r"^R\((\d+),(\d+)\)$"),
    "I": re.compile(r"^I\((\d+),(\d+)(?:,(\d+))?\)$"),
    "P": re.compile(r"^P\((\d+),(\d+)\)/(\d+)$"),
}
_FORMS = ("N(mean_in,std_in)/(mean_out,std_out), U(min_in,max_in)/(min_out,max_out), U(max_in,max_out), "
          "D(in,out), E(tokens_per_document), R(tokens_per_document,tokens_per_query), I(width,height[,images]), "
          "P(prefix,suffix)/out")

_INPUT = "input.length"
_OUTPUT = "output.length"


@dataclass(frozen=True)
class Scenario:
    """A parsed scenario string: its label (the string, spaces removed) and the config settings it stands for."""

    label: str
    kind: str  # N U D E R I
    settings: tuple  # ((dotted --set key, value), ...)

    @property
    def task(self) -> str:
        return {"E": "embeddings", "R": "rerank", "I": "vision"}.get(self.kind, "chat")


def parse_scenario(text: str, where: str = "--scenario") -> Scenario:
    """``"N(480,240)/(300,150)"`` -> Scenario; a bad string raises VkError naming the accepted forms."""
    if not isinstance(text, str):
        raise VkError(f"{where}: expected a scenario string like D(100,1000), got {text!r}")
    s = re.sub(r"\s+", "", text)
    pat = _PATTERNS.get(s[:1])
    m = pat.match(s) if pat else None
    if m is None:
        raise VkError(f"{where}: {text!r} is not a scenario string (expected one of: {_FORMS})")
    g = [int(x) if x is not None else None for x in m.groups()]
    k = s[0]
    if k == "N":
        settings = ((_INPUT, {"type": "floored_normal", "mean": g[0], "std": g[1], "floor": 1}),
                    (_OUTPUT, {"type": "floored_normal", "mean": g[2], "std": g[3], "floor": 2}))
    elif k == "U":
        if g[2] is None:  # U(max_in,max_out): both from 1
            lo_in, hi_in, lo_out, hi_out = 1, g[0], 1, g[1]
        else:  # a minimum of 0 means 1 in genai-bench (``min or 1``)
            lo_in, hi_in, lo_out, hi_out = g[0] or 1, g[1], g[2] or 1, g[3]
        for lo, hi, what in ((lo_in, hi_in, "input"), (lo_out, hi_out, "output")):
            if hi < lo:
                raise VkError(f"{where}: {text!r}: the {what} range ends ({hi}) below its start ({lo})")
        settings = ((_INPUT, {"type": "floored_uniform", "low": lo_in, "high": hi_in, "floor": 1}),
                    (_OUTPUT, {"type": "floored_uniform", "low": lo_out, "high": hi_out, "floor": 2}))
    elif k == "D":
        settings = ((_INPUT, {"type": "fixed", "value": g[0]}), (_OUTPUT, {"type": "fixed", "value": g[1]}))
    elif k == "E":
        settings = (("task.type", "embeddings"), ("task.document_length", g[0]))
    elif k == "R":
        settings = (("task.type", "rerank"), ("task.document_length", g[0]), ("task.query_length", g[1]))
    elif k == "P":  # one prefix shared by every request, at the start of the user message
        settings = (("prefix_groups", {"num_groups": 1, "lengths": [g[0]], "role": "user"}),
                    (_INPUT, {"type": "fixed", "value": g[1]}), (_OUTPUT, {"type": "fixed", "value": g[2]}))
    else:
        settings = (("task.type", "vision"), ("task.image_width", g[0]), ("task.image_height", g[1]),
                    ("task.images", g[2] if g[2] is not None else 1))
    if k in "DERIP" and any(x is not None and x < 1 for x in g):
        raise VkError(f"{where}: {text!r}: lengths, sizes and counts start at 1")
    return Scenario(s, k, settings)


def scenario_config(cfg, sc: Scenario):
    """A copy of the vk-gen Config with the scenario's settings applied (as ``--set`` would)."""
    from vk.gen.config import Config, apply_overrides

    out = Config(copy.deepcopy(cfg.data), cfg.source, dict(cfg.lines), cfg.base_dir)
    out.overridden = set(cfg.overridden)
    apply_overrides(out, [(k, copy.deepcopy(v)) for k, v in sc.settings])
    return out


def scenario_yaml(sc: Scenario) -> str:
    """The YAML a scenario stands for (what ``vk-gen --scenario S --explain`` would print; used by the docs test)."""
    import yaml

    from vk.gen.config import expand_key, split_path

    tree: dict = {}
    for key, v in sc.settings:
        node: dict | list = tree
        parts = split_path(expand_key(key))
        for p, nxt in zip(parts[:-1], parts[1:], strict=True):
            empty = [] if isinstance(nxt, int) else {}
            if isinstance(node, list):
                while len(node) <= p:
                    node.append(empty)
                node = node[p]
            else:
                node = node.setdefault(p, empty)
        node[parts[-1]] = v
    return yaml.safe_dump(tree, sort_keys=False, default_flow_style=None)
