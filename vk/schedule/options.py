"""vk-schedule's options: the checked configuration of one schedule (``make_config``) and its arrival process."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from vk import records
from vk.errors import VkError
from vk.schedule import processes

# vk-send refuses a start_at further ahead than this (vk.send.inputs.MAX_WAIT, man vk-send): refused here first
MAX_START_AHEAD = 7 * 86400.0

OPEN_PROCESSES = ("poisson", "gamma", "constant", "ramp", "stages", "onoff")


# --------------------------------------------------------------------------------------------------------------
# options


@dataclass
class Config:
    mode: str  # open | closed
    process: str  # poisson gamma constant ramp stages onoff replay closed
    params: dict
    seed: int
    duration: float | None = None
    max_sessions: int | None = None
    cycle: bool = False
    identical_copies: bool = False  # copies byte-identical to their original (default: new requests)
    warmup: int = 0
    shard: tuple[int, int] | None = None  # (k, n), k in 1..n
    start_at: float | None = None
    concurrency: int | None = None
    ramp_up: float | None = None
    rate_limit: float | None = None
    validate: bool = False
    extra: dict = field(default_factory=dict)

    def header(self) -> dict:
        extra: dict = {}
        if self.duration is not None:
            extra["duration"] = self.duration
        if self.max_sessions is not None:
            extra["max_sessions"] = self.max_sessions
        if self.cycle:
            extra["cycle"] = True
        if self.identical_copies:
            extra["identical_copies"] = True
        if self.warmup:
            extra["warmup"] = self.warmup
        if self.shard is not None:
            extra["shard"] = {"k": self.shard[0], "n": self.shard[1]}
        if self.ramp_up is not None:
            extra["ramp_up"] = self.ramp_up
        if self.rate_limit is not None:
            extra["rate_limit"] = self.rate_limit
        if self.start_at is not None:
            extra["start_at"] = self.start_at
        extra.update(self.extra)
        return records.new_schedule(self.mode, self.process, seed=self.seed, params=self.params,
                                    concurrency=self.concurrency, **extra)


def _num(value, option: str, *, minimum: float | None = None, positive: bool = False) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise VkError(f"{option}: expected a number, got {value!r}") from None
    if not math.isfinite(x):
        raise VkError(f"{option}: expected a finite number, got {value!r}")
    if positive and x <= 0:
        raise VkError(f"{option}: must be > 0, got {value!r}")
    if minimum is not None and x < minimum:
        raise VkError(f"{option}: must be >= {minimum:g}, got {value!r}")
    return x


def _int(value, option: str, *, minimum: int = 0) -> int:
    if isinstance(value, bool):
        raise VkError(f"{option}: expected an integer, got {value!r}")
    try:
        x = int(value) if not isinstance(value, float) or value.is_integer() else None
    except (TypeError, ValueError):
        x = None
    if x is None:
        raise VkError(f"{option}: expected an integer, got {value!r}")
    if x < minimum:
        raise VkError(f"{option}: must be >= {minimum}, got {value!r}")
    return x


def _fields(spec, n: int, option: str, form: str) -> list:
    if isinstance(spec, str):
        parts = spec.split(":")
    else:
        parts = list(spec)
    if len(parts) != n:
        raise VkError(f"{option}: expected {form}, got {spec!r}")
    return parts


def _parse_stages(spec) -> list[tuple[float, float]]:
    form = "RATE:SECONDS[,RATE:SECONDS...]"
    items = [s for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec)
    if not items:
        raise VkError(f"--stages: expected {form}, got {spec!r}")
    out = []
    for i, it in enumerate(items):
        r, s = _fields(it.strip() if isinstance(it, str) else it, 2, "--stages", form)
        out.append((_num(r, f"--stages (stage {i + 1} rate)", minimum=0),
                    _num(s, f"--stages (stage {i + 1} seconds)", positive=True)))
    if not any(r > 0 for r, _ in out):
        raise VkError("--stages: at least one stage needs a rate > 0")
    return out


def _parse_shard(spec) -> tuple[int, int]:
    parts = spec.split("/") if isinstance(spec, str) else list(spec)
    if len(parts) != 2:
        raise VkError(f"--shard: expected K/N (e.g. 1/4), got {spec!r}")
    n = _int(parts[1], "--shard N", minimum=1)
    k = _int(parts[0], "--shard K", minimum=1)
    if k > n:
        raise VkError(f"--shard: K must be between 1 and N, got {spec!r}")
    return k, n


def make_config(
    *,
    seed=0,
    poisson=None,
    gamma=None,
    cv=None,
    constant=None,
    ramp=None,
    stages=None,
    onoff=None,
    replay=False,
    speedup=1.0,
    max_idle=None,
    target_rate=None,
    concurrency=None,
    ramp_up=None,
    rate_limit=None,
    duration=None,
    max_sessions=None,
    cycle=False,
    identical_copies=False,
    warmup=0,
    shard=None,
    start_at=None,
    validate=False,
) -> Config:
    """Check the options (one clear VkError naming the option) and build the Config."""
    chosen = [name for name, v in (("--poisson", poisson), ("--gamma", gamma), ("--constant", constant),
                                   ("--ramp", ramp), ("--stages", stages), ("--onoff", onoff),
                                   ("--replay", replay or None), ("--concurrency", concurrency)) if v is not None]
    if not chosen:
        raise VkError("choose how sessions start: --poisson RATE, --gamma RATE --cv CV, --constant RATE, "
                      "--ramp FROM:TO:SECONDS, --stages RATE:SECONDS,..., --onoff ON:OFF:MEAN_ON:MEAN_OFF, "
                      "--replay or --concurrency N")
    if len(chosen) > 1:
        raise VkError(f"choose one way to start sessions, got {' and '.join(chosen)}")
    if cv is not None and gamma is None:
        raise VkError("--cv goes with --gamma RATE")
    if not replay:
        for name, v, default in (("--speedup", speedup, 1.0), ("--max-idle", max_idle, None),
                                 ("--target-rate", target_rate, None)):
            if v != default and v is not None:
                raise VkError(f"{name} goes with --replay")
    if concurrency is None:
        for name, v in (("--ramp-up", ramp_up), ("--rate-limit", rate_limit)):
            if v is not None:
                raise VkError(f"{name} goes with --concurrency N")

    seed_i = _int(seed, "--seed", minimum=0)
    dur = None if duration is None else _num(duration, "--duration", positive=True)
    maxn = None if max_sessions is None else _int(max_sessions, "--max-sessions", minimum=1)
    warm = _int(warmup or 0, "--warmup", minimum=0)
    sh = None if shard is None else _parse_shard(shard)
    st_at = None if start_at is None else _num(start_at, "--start-at", minimum=0)
    if st_at is not None and st_at - time.time() > MAX_START_AHEAD:
        raise VkError(f"--start-at: {st_at:g} is {(st_at - time.time()) / 86400:.1f} days from now (more than "
                      f"{MAX_START_AHEAD / 86400:g}; vk-send would refuse to wait that long)")

    mode, params, process = "open", {}, chosen[0][2:]
    conc = None
    if poisson is not None:
        params = {"rate": _num(poisson, "--poisson", positive=True)}
    elif gamma is not None:
        if cv is None:
            raise VkError("--gamma RATE needs --cv CV (the coefficient of variation of the gaps)")
        rate = _num(gamma, "--gamma", positive=True)
        c = _num(cv, "--cv", positive=True)
        shape = 1.0 / (c * c)
        params = {"rate": rate, "cv": c, "shape": shape, "scale": 1.0 / (rate * shape)}
    elif constant is not None:
        params = {"rate": _num(constant, "--constant", positive=True)}
    elif ramp is not None:
        a, b, s = _fields(ramp, 3, "--ramp", "FROM:TO:SECONDS")
        a = _num(a, "--ramp FROM", minimum=0)
        b = _num(b, "--ramp TO", minimum=0)
        s = _num(s, "--ramp SECONDS", positive=True)
        if a == 0 and b == 0:
            raise VkError("--ramp: FROM and TO cannot both be 0")
        params = {"from": a, "to": b, "seconds": s}
        if dur is None and maxn is None:
            dur = s
    elif stages is not None:
        st = _parse_stages(stages)
        params = {"stages": [[r, s] for r, s in st]}
        if dur is None and maxn is None:
            dur = sum(s for _, s in st)
    elif onoff is not None:
        f = _fields(onoff, 4, "--onoff", "RATE_ON:RATE_OFF:MEAN_ON_SECONDS:MEAN_OFF_SECONDS")
        on = _num(f[0], "--onoff RATE_ON", minimum=0)
        off = _num(f[1], "--onoff RATE_OFF", minimum=0)
        mon = _num(f[2], "--onoff MEAN_ON_SECONDS", positive=True)
        moff = _num(f[3], "--onoff MEAN_OFF_SECONDS", positive=True)
        if on == 0 and off == 0:
            raise VkError("--onoff: RATE_ON and RATE_OFF cannot both be 0")
        params = {"rate_on": on, "rate_off": off, "mean_on": mon, "mean_off": moff,
                  "mean_rate": processes.onoff_mean_rate(on, off, mon, moff)}
    elif replay:
        params = {"speedup": _num(speedup, "--speedup", positive=True)}
        if max_idle is not None:
            params["max_idle"] = _num(max_idle, "--max-idle", minimum=0)
        if target_rate is not None:
            params["target_rate"] = _num(target_rate, "--target-rate", positive=True)
    else:
        mode, process = "closed", "closed"
        conc = _int(concurrency, "--concurrency", minimum=1)
        if ramp_up is not None:
            ramp_up = _num(ramp_up, "--ramp-up", minimum=0)
        if rate_limit is not None:
            rate_limit = _num(rate_limit, "--rate-limit", positive=True)
        if cycle and maxn is None:
            raise VkError("--cycle in a closed loop needs --max-sessions N "
                          "(how many sessions a duration holds is not known in advance)")
    if cycle and mode == "open" and dur is None and maxn is None:
        raise VkError("--cycle needs --duration SECONDS or --max-sessions N to know when to stop")
    return Config(mode=mode, process=process, params=params, seed=seed_i, duration=dur, max_sessions=maxn,
                  cycle=bool(cycle), warmup=warm, shard=sh, start_at=st_at, concurrency=conc, ramp_up=ramp_up,
                  rate_limit=rate_limit, validate=bool(validate), identical_copies=bool(identical_copies))


def make_process(cfg: Config) -> processes.Process:
    p, s = cfg.params, cfg.seed
    if cfg.process == "poisson":
        return processes.poisson(p["rate"], s)
    if cfg.process == "gamma":
        return processes.gamma(p["rate"], p["cv"], s)
    if cfg.process == "constant":
        return processes.constant(p["rate"], s)
    if cfg.process == "ramp":
        return processes.ramp(p["from"], p["to"], p["seconds"], s)
    if cfg.process == "stages":
        return processes.stages([tuple(x) for x in p["stages"]], s)
    if cfg.process == "onoff":
        return processes.onoff(p["rate_on"], p["rate_off"], p["mean_on"], p["mean_off"], s)
    raise ValueError(cfg.process)
