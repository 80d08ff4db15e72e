"""vk-gen distributions: statistics over many samples, bounds, and errors that name the key."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from vk.errors import VkError
from vk.gen.distributions import interval_distribution, length_distribution

DATA = Path(__file__).parent / "data" / "gen"
N = 20_000


def draws(d, n=N, seed=1):
    rng = np.random.default_rng(seed)
    return np.array([d.sample(rng) for _ in range(n)])


def test_fixed():
    d = length_distribution({"type": "fixed", "value": 7})
    assert set(draws(d, 100)) == {7}
    assert length_distribution(5).sample(None) == 5  # a bare number is fixed


def test_uniform_inclusive_bounds_and_mean():
    x = draws(length_distribution({"type": "uniform", "min": 3, "max": 9}))
    assert x.min() == 3 and x.max() == 9  # both bounds are reached: inclusive
    assert abs(x.mean() - 6) < 0.05
    # every value about equally likely
    counts = np.bincount(x)[3:10]
    assert counts.min() > N / 7 * 0.9


def test_normal_truncated():
    x = draws(length_distribution({"type": "normal", "mean": 100, "std": 20}))
    assert abs(x.mean() - 100) < 1 and abs(x.std() - 20) < 1
    t = draws(length_distribution({"type": "normal", "mean": 100, "std": 50, "min": 80, "max": 120}))
    assert t.min() >= 80 and t.max() <= 120
    assert abs(t.mean() - 100) < 1  # symmetric truncation keeps the mean


def test_lognormal_mean_std_and_bounds():
    x = draws(length_distribution({"type": "lognormal", "mean": 500, "std": 200}))
    assert abs(x.mean() - 500) / 500 < 0.03
    assert abs(x.std() - 200) / 200 < 0.08
    t = draws(length_distribution({"type": "lognormal", "mean": 500, "std": 400, "min": 100, "max": 900}))
    assert t.min() >= 100 and t.max() <= 900
    m = draws(length_distribution({"type": "lognormal", "mu": math.log(300), "sigma": 0.1}))
    assert abs(np.median(m) - 300) < 5


def test_zipf_bounds_and_shape():
    d = length_distribution({"type": "zipf", "min": 10, "max": 1000, "alpha": 1.5})
    x = draws(d)
    assert x.min() == 10 and x.max() <= 1000
    # P(min) = 1 / H(991, 1.5)
    h = sum(1 / k ** 1.5 for k in range(1, 992))
    assert abs((x == 10).mean() - 1 / h) < 0.02
    assert abs(x.mean() - d.mean) / d.mean < 0.1
    # theta is an alias of alpha (the seed design's name)
    assert length_distribution({"type": "zipf", "min": 1, "max": 5, "theta": 2}).alpha == 2
    s = draws(length_distribution({"type": "zipf", "min": 10, "max": 1000, "alpha": 1.5, "scramble": True}))
    assert (s == 10).mean() < 0.05 and s.min() >= 10 and s.max() <= 1000


def test_fixed_stair_cycles_and_wraps():
    d = length_distribution({"type": "fixed_stair", "values": [128, 256, 512], "repeat_each": 2, "wrap": True})
    assert [d.sample(None) for _ in range(8)] == [128, 128, 256, 256, 512, 512, 128, 128]
    d = length_distribution({"type": "fixed_stair", "values": [1, 2], "wrap": False})
    assert [d.sample(None) for _ in range(4)] == [1, 2, 2, 2]


def test_inverse_gaussian():
    x = draws(length_distribution({"type": "inverse_gaussian", "mean": 200, "shape": 400}))
    assert abs(x.mean() - 200) / 200 < 0.03
    assert abs(x.var() - 200 ** 3 / 400) / (200 ** 3 / 400) < 0.1
    t = draws(length_distribution({"type": "inverse_gaussian", "mean": 200, "shape": 50, "min": 50, "max": 300}))
    assert t.min() >= 50 and t.max() <= 300


def test_empirical_from_csv_jsonl_and_values():
    x = draws(length_distribution({"type": "empirical", "file": str(DATA / "lengths.csv"), "column": "input_length"}))
    assert set(x) == {100, 200, 300, 400} and abs(x.mean() - 250) < 5
    j = draws(length_distribution({"type": "empirical", "file": "lengths.jsonl", "column": "output_length"},
                                  base_dir=DATA))
    assert set(j) == {10, 20, 30}
    v = draws(length_distribution({"type": "empirical", "values": [5, 6, 1000], "max": 100}))
    assert set(v) == {5, 6}


def test_empirical_errors_name_file_line_and_column():
    with pytest.raises(VkError, match=r"lengths-bad.csv:5: input_length: expected a number"):
        length_distribution({"type": "empirical", "file": str(DATA / "lengths-bad.csv"), "column": "input_length"})
    with pytest.raises(VkError, match=r"no column 'nope'"):
        length_distribution({"type": "empirical", "file": str(DATA / "lengths.csv"), "column": "nope"})
    with pytest.raises(VkError, match=r"x\.file: no such file"):
        length_distribution({"type": "empirical", "file": "/nonexistent.csv", "column": "a"}, "x")


def test_intervals():
    x = draws(interval_distribution({"type": "exponential", "mean": 2.0}))
    assert abs(x.mean() - 2) < 0.06 and x.min() >= 0
    p = draws(interval_distribution({"type": "poisson", "arrival_rate": 4.0}))  # the seed design's name
    assert abs(p.mean() - 0.25) < 0.01
    g = draws(interval_distribution({"type": "gamma", "rate": 2.0, "cv": 3.0}))
    assert abs(g.mean() - 0.5) < 0.04 and abs(g.std() / g.mean() - 3) < 0.3
    ln = draws(interval_distribution({"type": "lognormal", "mean": 1.5, "cv": 0.5}))
    assert abs(ln.mean() - 1.5) < 0.03 and abs(ln.std() / ln.mean() - 0.5) < 0.03
    assert interval_distribution({"type": "fixed", "interval": 0.3}).sample(None) == 0.3
    assert interval_distribution(None).sample(None) == 0.0


@pytest.mark.parametrize("cfg, match", [
    ({"type": "uniform", "min": 5}, r"where\.max: missing"),
    ({"type": "uniform", "min": 5, "max": 2}, r"where\.max: must be >= min"),
    ({"type": "uniform", "min": 0, "max": 2}, r"where\.min: must be >= 1"),
    ({"type": "uniform", "min": 1, "max": 2, "mean": 3}, r"where\.mean: unknown key for type 'uniform'"),
    ({"type": "fixed", "value": "lots"}, r"where\.value: expected a number"),
    ({"type": "fixed", "value": 2.5}, r"where\.value: expected an integer"),
    ({"type": "zipf", "min": 1, "max": 9, "alpha": 0}, r"where\.alpha: must be > 0"),
    ({"type": "fixed_stair", "values": []}, r"where\.values: expected a non-empty list"),
    ({"type": "fixed_stair", "values": [1, -2]}, r"where\.values\[1\]"),
    ({"type": "normal", "mean": 10, "std": 1, "min": 1000, "max": 2000}, r"where\.mean: almost none"),
    ({"type": "lognormal", "mean": 10}, r"where\.std: missing"),
    ({"type": "inverse_gaussian", "mean": 10, "shape": -1}, r"where\.shape: must be > 0"),
    ({"type": "pareto", "min": 1}, r"where\.type: unknown length generator type 'pareto'"),
    ({"min": 1}, r"where\.type: missing"),
    ("ten", r"where: expected a length generator"),
])
def test_length_errors_name_the_key(cfg, match):
    with pytest.raises(VkError, match=match):
        length_distribution(cfg, "where")


@pytest.mark.parametrize("cfg, match", [
    ({"type": "exponential"}, r"w\.mean: missing"),
    ({"type": "exponential", "rate": 0}, r"w\.rate: must be > 0"),
    ({"type": "exponential", "rate": 1, "mean": 1}, r"not both"),
    ({"type": "gamma", "rate": 1}, r"w\.cv: missing"),
    ({"type": "fixed", "interval": -1}, r"w\.interval: must be >= 0"),
    ({"type": "weibull"}, r"w\.type: unknown interval generator type"),
])
def test_interval_errors_name_the_key(cfg, match):
    with pytest.raises(VkError, match=match):
        interval_distribution(cfg, "w")
