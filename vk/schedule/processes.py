"""Arrival processes: when open-loop sessions start.

Every process yields absolute start offsets (seconds from the run start) in blocks drawn from numpy, so that the
scheduler spends a few nanoseconds per session on them. Offsets are the cumulative sums of the gaps, starting at
0: the first session starts at the first gap (a stationary process observed from time 0), so a process of rate
``r`` run for ``D`` seconds holds ``r*D`` sessions on average (exactly ``floor(r*D)`` for ``constant``).

- ``poisson``: exponential gaps of mean 1/rate, never clipped or truncated.
- ``gamma``: gamma gaps with mean 1/rate and coefficient of variation ``cv``: shape k = 1/cv^2,
  scale theta = 1/(rate*k). cv = 1 is Poisson, cv < 1 more regular, cv > 1 bursty.
- ``constant``: gaps of exactly 1/rate.
- ``ramp``, ``stages``, ``onoff``: inhomogeneous Poisson processes with a piecewise-linear rate function
  lambda(t), drawn exactly by time-rescaling: if E_1 < E_2 < ... are the arrivals of a unit-rate Poisson process,
  t_i = Lambda^{-1}(E_i) with Lambda(t) = integral of lambda from 0 to t are the arrivals of the process of rate
  lambda(t). For ``onoff`` lambda(t) is itself random (a two-state Markov chain with exponential sojourns: a
  Markov-modulated Poisson process); its state path comes from a separate random stream.

Each random component draws from its own stream, seeded from (seed, component name) (see :func:`rng`).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

BLOCK = 8192  # sessions per block of draws; fixed so that output does not depend on anything but the seed
DECIMALS = 6  # start offsets are rounded to the microsecond


def rng(seed: int, component: str) -> np.random.Generator:
    """An independent random stream for one component of vk-schedule, seeded from (seed, component name)."""
    key = int.from_bytes(hashlib.sha256(f"vk-schedule/{component}".encode()).digest()[:8], "little")
    return np.random.default_rng(np.random.SeedSequence([int(seed), key]))


class Process:
    """Absolute arrival offsets in blocks; an empty block means the process has no more arrivals."""

    def next_block(self) -> list[float]:  # pragma: no cover - interface
        raise NotImplementedError


class Renewal(Process):
    """Arrivals whose gaps are independent and identically distributed."""

    def __init__(self, draw):
        self._draw = draw  # draw(n) -> ndarray of n gaps
        self._t = 0.0

    def next_block(self) -> list[float]:
        ts = np.cumsum(self._draw(BLOCK))
        ts += self._t
        self._t = float(ts[-1])
        return np.round(ts, DECIMALS).tolist()


def poisson(rate: float, seed: int) -> Renewal:
    g = rng(seed, "arrivals")
    scale = 1.0 / rate
    return Renewal(lambda n: g.exponential(scale, n))


def gamma(rate: float, cv: float, seed: int) -> Renewal:
    g = rng(seed, "arrivals")
    shape = 1.0 / (cv * cv)
    scale = 1.0 / (rate * shape)
    return Renewal(lambda n: g.gamma(shape, scale, n))


def constant(rate: float, seed: int) -> Renewal:
    gap = 1.0 / rate

    class _Constant(Process):
        def __init__(self):
            self._k = 0

        def next_block(self) -> list[float]:
            k = np.arange(self._k + 1, self._k + 1 + BLOCK, dtype=np.float64)
            self._k += BLOCK
            return np.round(k * gap, DECIMALS).tolist()  # k*gap, not a running sum: no drift

    return _Constant()


class TimeRescaled(Process):
    """An inhomogeneous Poisson process with a piecewise-linear rate, by time-rescaling a unit-rate process.

    ``segments`` yields blocks ``(length, r0, r1)`` of consecutive segments: the rate goes linearly from r0 to r1
    over ``length`` seconds. A segment of infinite length must have r0 == r1 and ends the supply.
    """

    def __init__(self, segments, seed: int):
        self._g = rng(seed, "arrivals")
        self._segments = iter(segments)
        self._e = 0.0  # last unit-rate arrival
        # segments not yet behind us: start time, length, r0, r1, Lambda at start
        self._t0 = np.zeros(0)
        self._len = np.zeros(0)
        self._r0 = np.zeros(0)
        self._r1 = np.zeros(0)
        self._lam0 = np.zeros(0)
        self._t_end = 0.0
        self._lam_end = 0.0
        self._supply_done = False
        self._done = False

    def _more(self) -> None:
        try:
            length, r0, r1 = (np.asarray(x, dtype=np.float64) for x in next(self._segments))
        except StopIteration:
            self._supply_done = True
            return
        with np.errstate(invalid="ignore"):
            inc = np.where(np.isinf(length), np.where(r0 > 0, np.inf, 0.0), 0.5 * (r0 + r1) * length)
        t0 = self._t_end + np.concatenate(([0.0], np.cumsum(length)[:-1]))
        lam0 = self._lam_end + np.concatenate(([0.0], np.cumsum(inc)[:-1]))
        self._t_end = float(t0[-1] + length[-1])
        self._lam_end = float(lam0[-1] + inc[-1])
        self._t0 = np.concatenate((self._t0, t0))
        self._len = np.concatenate((self._len, length))
        self._r0 = np.concatenate((self._r0, r0))
        self._r1 = np.concatenate((self._r1, r1))
        self._lam0 = np.concatenate((self._lam0, lam0))
        if np.isinf(length[-1]):
            self._supply_done = True

    def next_block(self) -> list[float]:
        if self._done:
            return []
        e = np.cumsum(self._g.exponential(1.0, BLOCK))
        e += self._e
        self._e = float(e[-1])
        while self._lam_end < self._e and not self._supply_done:
            self._more()
        if self._lam_end < self._e:  # the rate stays 0 from some point on: no arrivals after it
            e = e[e < self._lam_end]
            self._done = True
            if not len(e):
                return []
        k = np.searchsorted(self._lam0, e, side="right") - 1
        de = e - self._lam0[k]
        r0 = self._r0[k]
        r1 = self._r1[k]
        length = self._len[k]
        with np.errstate(divide="ignore", invalid="ignore"):
            flat = r0 == r1
            slope = np.where(flat, 0.0, (r1 - r0) / np.where(np.isinf(length), 1.0, length))
            # solve r0*tau + slope*tau^2/2 = de for tau >= 0 (stable form of the quadratic root)
            quad = 2.0 * de / (r0 + np.sqrt(np.maximum(r0 * r0 + 2.0 * slope * de, 0.0)))
            tau = np.where(flat, de / np.where(r0 > 0, r0, 1.0), quad)
        tau = np.minimum(tau, length)
        ts = self._t0[k] + tau
        # forget the segments behind us
        keep = int(k[-1])
        if keep > 0:
            self._t0, self._len, self._r0, self._r1, self._lam0 = (
                a[keep:] for a in (self._t0, self._len, self._r0, self._r1, self._lam0))
        return np.round(ts, DECIMALS).tolist()


def ramp_segments(rate_from: float, rate_to: float, seconds: float):
    """Linear ramp from rate_from to rate_to over seconds, then rate_to for ever."""
    yield [seconds, math.inf], [rate_from, rate_to], [rate_to, rate_to]


def stages_segments(stages: list[tuple[float, float]]):
    """Constant rate per stage ((rate, seconds), ...), then the last stage's rate for ever."""
    rates = [r for r, _ in stages]
    lengths = [s for _, s in stages]
    yield lengths + [math.inf], rates + [rates[-1]], rates + [rates[-1]]


def onoff_segments(rate_on: float, rate_off: float, mean_on: float, mean_off: float, seed: int):
    """A two-state Markov chain: exponential sojourns of mean mean_on (rate rate_on) and mean_off (rate rate_off).

    The first state is drawn from the stationary distribution (on with probability mean_on/(mean_on+mean_off)),
    so the process is stationary from time 0.
    """
    g = rng(seed, "onoff-states")
    on = bool(g.random() < mean_on / (mean_on + mean_off))
    n = 256
    while True:
        states = np.arange(n) % 2 == (0 if on else 1)  # True = on, alternating from the current state
        lengths = g.exponential(1.0, n) * np.where(states, mean_on, mean_off)
        rates = np.where(states, rate_on, rate_off)
        yield lengths, rates, rates
        # n is even: the next block starts in the same state as this one did


def ramp(rate_from: float, rate_to: float, seconds: float, seed: int) -> TimeRescaled:
    return TimeRescaled(ramp_segments(rate_from, rate_to, seconds), seed)


def stages(spec: list[tuple[float, float]], seed: int) -> TimeRescaled:
    return TimeRescaled(stages_segments(spec), seed)


def onoff(rate_on: float, rate_off: float, mean_on: float, mean_off: float, seed: int) -> TimeRescaled:
    return TimeRescaled(onoff_segments(rate_on, rate_off, mean_on, mean_off, seed), seed)


def expected_count(process: str, params: dict, t: float) -> float | None:
    """Lambda(t): the expected number of arrivals in [0, t) for a process given by its header params."""
    if process in ("poisson", "gamma", "constant"):
        return params["rate"] * t
    if process == "onoff":
        return params["mean_rate"] * t
    if process == "ramp":
        a, b, s = params["from"], params["to"], params["seconds"]
        if t <= s:
            return a * t + (b - a) * t * t / (2 * s)
        return (a + b) / 2 * s + b * (t - s)
    if process == "stages":
        total, t0 = 0.0, 0.0
        st = params["stages"]
        for i, (r, s) in enumerate(st):
            last = i == len(st) - 1
            span = (t - t0) if last else min(s, max(0.0, t - t0))
            total += r * max(0.0, span)
            t0 += s
        return total
    return None


def onoff_mean_rate(rate_on: float, rate_off: float, mean_on: float, mean_off: float) -> float:
    return (rate_on * mean_on + rate_off * mean_off) / (mean_on + mean_off)


def onoff_idc(rate_on: float, rate_off: float, mean_on: float, mean_off: float, window: float | None = None) -> float:
    """Index of dispersion of counts in windows of ``window`` seconds (None: infinite) of the on-off MMPP.

    The rate process has covariance s2*exp(-g*tau) with s2 = (l_on-l_off)^2 p_on p_off and g = 1/mean_on +
    1/mean_off, so Var N(t) = l*t + 2*s2*(t/g - (1-exp(-g*t))/g^2) and IDC(t) = Var N(t) / (l*t).
    """
    g = 1.0 / mean_on + 1.0 / mean_off
    p_on = mean_on / (mean_on + mean_off)
    s2 = (rate_on - rate_off) ** 2 * p_on * (1.0 - p_on)
    lam = onoff_mean_rate(rate_on, rate_off, mean_on, mean_off)
    if window is None:
        return 1.0 + 2.0 * s2 / (g * lam)
    t = window
    return 1.0 + 2.0 * s2 * (t / g - (1.0 - math.exp(-g * t)) / (g * g)) / (lam * t)
