"""vk-eval's options: percentiles, SLOs, goodput, steady window, grouping, fluidity deadlines."""

from __future__ import annotations

from vk.eval import metrics as M
from vk.eval.slo import Goodput, parse_duration, parse_fluidity, parse_goodput, parse_slo


class Options:
    def __init__(self, percentiles=None, slo=None, goodput=None, warmup=None, cooldown=None, group_by=None,
                 fluidity=None, timeseries_bins=120):
        self.percentiles = M.parse_percentiles(percentiles)
        self.slo = parse_slo(slo) if isinstance(slo, (str, type(None))) else slo
        self.goodput: Goodput | None = parse_goodput(goodput) if isinstance(goodput, (str, type(None))) else goodput
        self.warmup = parse_duration(warmup, "--warmup") if warmup is not None else None
        self.cooldown = parse_duration(cooldown, "--cooldown") if cooldown is not None else None
        if isinstance(group_by, str):
            group_by = [g.strip() for g in group_by.split(",") if g.strip()]
        self.group_by = list(group_by or [])
        self.fluidity = parse_fluidity(fluidity)
        self.timeseries_bins = timeseries_bins

    def to_dict(self) -> dict:
        return {
            "percentiles": self.percentiles,
            "slo": [c.spec for c in self.slo],
            "goodput": self.goodput.spec if self.goodput else None,
            "warmup": self.warmup,
            "cooldown": self.cooldown,
            "group_by": self.group_by,
            "fluidity": {"prefill_deadline": self.fluidity[0], "decode_deadline": self.fluidity[1]},
        }
