"""vk-schedule's arrival processes, checked statistically over large samples (fixed seeds: deterministic).

Tolerances are several standard errors of each estimate, so a correct process passes for any seed and a wrong
one (clipped tail, wrong scale, off-by-one rate, ...) fails.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from vk.schedule import processes as P
from vk.schedule.stats import StatsAcc


def take(proc, n=None, until=None):
    out: list[float] = []
    while True:
        b = proc.next_block()
        if not b:
            break
        out.extend(b)
        if n is not None and len(out) >= n:
            return np.array(out[:n])
        if until is not None and out[-1] >= until:
            a = np.array(out)
            return a[a < until]
    return np.array(out)


def ks_exponential(x: np.ndarray, rate: float) -> float:
    """Kolmogorov-Smirnov distance between the sample and Exp(rate)."""
    x = np.sort(x)
    n = len(x)
    cdf = 1.0 - np.exp(-rate * x)
    i = np.arange(1, n + 1)
    return float(max((i / n - cdf).max(), (cdf - (i - 1) / n).max()))


KS_CRIT_001 = 1.63  # sqrt(n) * D above this: rejected at the 1% level


@pytest.mark.parametrize("seed", [0, 1])
def test_poisson_gaps_are_exponential_and_unclipped(seed):
    rate, n = 50.0, 200_000
    t = take(P.poisson(rate, seed), n)
    gaps = np.diff(np.concatenate(([0.0], t)))
    assert (gaps >= 0).all()
    assert abs(n / t[-1] - rate) / rate < 0.01  # standard error 0.22%
    cv = gaps.std() / gaps.mean()
    assert abs(cv - 1.0) < 0.015
    # exponential, tested as such (the microsecond rounding is far below the KS resolution)
    assert math.sqrt(n) * ks_exponential(gaps, rate) < KS_CRIT_001
    # the tail is not clipped: the longest of n exponential gaps is about (ln n + 0.577)/rate
    assert (math.log(n) - 2) / rate < gaps.max() < (math.log(n) + 6) / rate
    # and the share of gaps longer than 5 mean gaps matches e^-5
    share = (gaps > 5 / rate).mean()
    assert abs(share - math.exp(-5)) < 5 * math.sqrt(math.exp(-5) / n)


@pytest.mark.parametrize("cv", [0.5, 3.0])
def test_gamma_rate_and_cv(cv):
    rate, n = 20.0, 400_000
    t = take(P.gamma(rate, cv, 3), n)
    gaps = np.diff(np.concatenate(([0.0], t)))
    # mean of n gamma gaps has relative standard error cv/sqrt(n)
    assert abs(gaps.mean() * rate - 1.0) < 5 * cv / math.sqrt(n)
    assert abs(gaps.std() / gaps.mean() - cv) / cv < 0.05
    # shape k = 1/cv^2: P(gap > 4 mean) is far from the exponential's e^-4 when cv != 1 (a real gamma, not Poisson)
    tail = (gaps > 4 / rate).mean()
    assert abs(tail - math.exp(-4)) > 0.005


def test_constant_is_exact():
    t = take(P.constant(8.0, 0), until=100.0)
    assert len(t) == 799  # k/8 for k = 1..799 are < 100
    assert np.allclose(np.diff(t), 0.125, atol=2e-6)
    assert t[0] == 0.125


def unit_poisson_check(t: np.ndarray, lam):
    """Time-rescaling theorem: Lambda(t_i) of an inhomogeneous Poisson process is a unit-rate Poisson process."""
    e = np.array([lam(x) for x in t])
    gaps = np.diff(np.concatenate(([0.0], e)))
    n = len(gaps)
    assert math.sqrt(n) * ks_exponential(gaps, 1.0) < KS_CRIT_001
    assert abs(gaps.mean() - 1.0) < 5 / math.sqrt(n)


@pytest.mark.parametrize("a,b", [(0.0, 400.0), (300.0, 20.0)])
def test_ramp_is_an_exact_inhomogeneous_poisson_process(a, b):
    secs = 200.0
    params = {"from": a, "to": b, "seconds": secs}
    t = take(P.ramp(a, b, secs, 5), until=secs)
    expect = P.expected_count("ramp", params, secs)
    assert abs(len(t) - expect) < 4 * math.sqrt(expect)
    # counts in each quarter of the ramp match the integral of the rate
    for lo, hi in ((0, 50), (50, 100), (100, 150), (150, 200)):
        want = P.expected_count("ramp", params, hi) - P.expected_count("ramp", params, lo)
        got = ((t >= lo) & (t < hi)).sum()
        assert abs(got - want) < 4 * math.sqrt(want) + 1
    unit_poisson_check(t, lambda x: P.expected_count("ramp", params, x))


def test_ramp_to_zero_ends_and_holds_after():
    t = take(P.ramp(50.0, 0.0, 10.0, 1))  # the rate stays 0 after the ramp: the process ends
    assert len(t) > 0 and t[-1] < 10.0
    t = take(P.ramp(0.0, 10.0, 10.0, 1), until=1000.0)  # then holds 10/s
    assert abs(((t >= 10) & (t < 1000)).sum() - 9900) < 4 * math.sqrt(9900)


def test_stages_rates_and_silent_stage():
    spec = [(100.0, 60.0), (0.0, 30.0), (400.0, 60.0)]
    params = {"stages": [list(s) for s in spec]}
    t = take(P.stages(spec, 2), until=150.0)
    assert not ((t >= 60) & (t < 90)).any()  # rate 0: nothing
    for lo, hi, rate in ((0, 60, 100), (90, 150, 400)):
        got = ((t >= lo) & (t < hi)).sum()
        assert abs(got - rate * (hi - lo)) < 4 * math.sqrt(rate * (hi - lo))
    unit_poisson_check(t[t >= 0], lambda x: P.expected_count("stages", params, x))


def test_onoff_mean_rate_and_burstiness():
    on, off, mon, moff = 40.0, 2.0, 5.0, 20.0
    horizon = 60_000.0
    t = take(P.onoff(on, off, mon, moff, 4), until=horizon)
    mean_rate = P.onoff_mean_rate(on, off, mon, moff)
    idc_inf = P.onoff_idc(on, off, mon, moff)
    # the count's variance is idc * mean: relative standard error sqrt(idc / (rate * T)) ~ 1.8%
    assert abs(len(t) / horizon - mean_rate) / mean_rate < 4 * math.sqrt(idc_inf / (mean_rate * horizon))
    # index of dispersion of counts in 10 s windows against the MMPP formula
    w = 10.0
    counts = np.bincount((t // w).astype(int), minlength=int(horizon // w))
    idc = counts.var(ddof=1) / counts.mean()
    want = P.onoff_idc(on, off, mon, moff, w)
    assert abs(idc - want) / want < 0.2
    assert idc > 20  # far from Poisson's 1
    # the same count statistics, streamed through the summary accumulator
    acc = StatsAcc({"mode": "open", "process": "onoff", "duration": horizon,
                    "params": {"rate_on": on, "rate_off": off, "mean_on": mon, "mean_off": moff,
                               "mean_rate": mean_rate}})
    for i in range(0, len(t), 5000):
        acc.add(t[i:i + 5000].tolist())
    res = acc.result()
    assert abs(res["idc"] - res["asked_idc"]) / res["asked_idc"] < 0.2


def test_separate_streams_and_reproducible():
    a = take(P.poisson(10, 7), 1000)
    b = take(P.poisson(10, 7), 1000)
    c = take(P.poisson(10, 8), 1000)
    assert (a == b).all() and not (a == c).all()
    # the on-off state path and the arrivals have separate streams: changing the rates keeps the state path
    g1, g2 = P.rng(1, "arrivals"), P.rng(1, "onoff-states")
    assert g1.random() != g2.random()


@pytest.mark.parametrize("proc,params,n_cv", [("poisson", {"rate": 5.0}, 1.0), ("constant", {"rate": 5.0}, 0.0),
                                              ("gamma", {"rate": 5.0, "cv": 2.0}, 2.0)])
def test_summary_accumulator_matches_numpy(proc, params, n_cv):
    make = {"poisson": lambda: P.poisson(5.0, 1), "constant": lambda: P.constant(5.0, 1),
            "gamma": lambda: P.gamma(5.0, 2.0, 1)}[proc]
    t = take(make(), 50_000)
    acc = StatsAcc({"mode": "open", "process": proc, "params": params})
    for i in range(0, len(t), 777):
        acc.add(t[i:i + 777].tolist())
    r = acc.result()
    g = np.diff(t)
    assert r["sessions"] == len(t)
    assert r["cv"] == pytest.approx(g.std() / g.mean(), rel=1e-6, abs=1e-9)
    assert r["rate"] == pytest.approx(len(t) / t[-1])
    assert r["asked_cv"] == n_cv
    assert abs(r["cv"] - n_cv) < 0.05 * max(n_cv, 1)
    assert abs(r["idc"] - n_cv ** 2) < 0.25 * max(n_cv ** 2, 1)
