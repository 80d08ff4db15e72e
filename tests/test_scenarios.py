"""genai-bench scenario strings in vk-gen: exact semantics (floors, truncation, [low, high) draws), every string
of genai-bench's default sets, several labelled scenarios, and the YAML each one stands for."""

from __future__ import annotations

import base64
import io
import math

import numpy as np
import orjson
import pytest
import yaml
from conftest import run_vk

from vk.errors import VkError
from vk.gen import generate
from vk.gen.distributions import length_distribution
from vk.gen.scenarios import parse_scenario, scenario_yaml
from vk.records import validate_session
from vk.tokenizer import load_tokenizer

N = 20_000

# genai-bench's default scenario sets (genai_bench/cli/validation.py), per task
CHAT = ["N(480,240)/(300,150)", "D(100,100)", "D(100,1000)", "D(2000,200)", "D(7800,200)"]
VISION = ["I(512,512)", "I(1024,512)", "I(2048,2048)"]
EMBEDDINGS = ["E(64)", "E(128)", "E(256)", "E(512)", "E(1024)"]
RERANK = ["R(64,100)", "R(128,100)", "R(256,100)", "R(512,100)", "R(1024,100)", "R(2096,100)", "R(4096,100)"]


def draws(d, n=N, seed=1):
    rng = np.random.default_rng(seed)
    return np.array([d.sample(rng) for _ in range(n)])


def phi(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def floored_normal_pmf(mu, sd, floor, k):
    """P(max(floor, trunc(X)) = k), X ~ normal(mu, sd): trunc(X) <= floor iff X < floor + 1."""
    if k == floor:
        return phi((floor + 1 - mu) / sd)
    return phi((k + 1 - mu) / sd) - phi((k - mu) / sd)


def lengths(sc: str):
    s = parse_scenario(sc)
    d = dict(s.settings)
    return length_distribution(d["input.length"]), length_distribution(d["output.length"])


# -- N: max(1, trunc(normal)) in, max(2, trunc(normal)) out ------------------------------------------------------

def test_normal_scenario_matches_genai_bench_sampler():
    din, dout = lengths("N(480,240)/(300,150)")
    x, y = draws(din), draws(dout, seed=2)
    assert x.min() == 1 and y.min() == 2  # the floors are reached (480 - 2 sd is still above 0)
    for data, mu, sd, floor in ((x, 480, 240, 1), (y, 300, 150, 2)):
        mean = sum(k * floored_normal_pmf(mu, sd, floor, k) for k in range(floor, mu + 12 * sd))
        # standard error of the mean is sd / sqrt(N) ~ 1.7 tokens for the input
        assert abs(data.mean() - mean) < 4 * sd / math.sqrt(N), (data.mean(), mean)
        p_floor = floored_normal_pmf(mu, sd, floor, floor)
        assert abs((data == floor).mean() - p_floor) < 4 * math.sqrt(p_floor / N) + 1e-4
    # truncation toward zero, not rounding: with mean 10.9 and a tiny std every draw is 10
    d = length_distribution({"type": "floored_normal", "mean": 10.9, "std": 0.01, "floor": 1})
    assert set(draws(d, 500)) == {10}


def test_floored_normal_floor_catches_the_negative_side():
    d = length_distribution({"type": "floored_normal", "mean": 0, "std": 10, "floor": 2})
    x = draws(d)
    assert x.min() == 2
    # P(out = 2) = P(X < 3)
    assert abs((x == 2).mean() - phi(0.3)) < 0.015


# -- U: max(1, trunc(uniform[a or 1, b))) -------------------------------------------------------------------------

def test_uniform_scenario_is_half_open_and_floored():
    din, dout = lengths("U(100,200)/(0,10)")
    x, y = draws(din), draws(dout, seed=3)
    assert x.min() == 100 and x.max() == 199  # [100, 200): 200 itself is never drawn
    counts = np.bincount(x)[100:200]
    assert counts.min() > N / 100 * 0.7
    # output: uniform[1, 10) (a minimum of 0 means 1), then max(2, .): P(2) = P(draw < 3) = 2/9
    assert y.min() == 2 and y.max() == 9
    assert abs((y == 2).mean() - 2 / 9) < 0.015
    assert abs((y == 5).mean() - 1 / 9) < 0.012


def test_uniform_short_form_starts_at_one():
    s = parse_scenario("U(1000,100)")
    d = dict(s.settings)
    assert d["input.length"] == {"type": "floored_uniform", "low": 1, "high": 1000, "floor": 1}
    assert d["output.length"] == {"type": "floored_uniform", "low": 1, "high": 100, "floor": 2}
    x = draws(length_distribution(d["input.length"]))
    assert x.min() == 1 and x.max() == 999 and abs(x.mean() - 500) < 6


def test_deterministic_has_no_floor():
    din, dout = lengths("D(100,1)")
    assert set(draws(din, 50)) == {100} and set(draws(dout, 50)) == {1}


@pytest.mark.parametrize("bad", ["N(1,2)", "U(1,2,3)", "D(1)", "E(1,2)", "R(1)", "I(1)", "I(1,2,3,4)", "X(1,2)",
                                 "D(0,10)", "E(0)", "I(0,10)", "U(10,5)/(1,2)", "D(-1,5)", ""])
def test_bad_strings_name_the_forms(bad):
    with pytest.raises(VkError) as e:
        parse_scenario(bad)
    assert "--scenario" in str(e.value)


def test_spaces_are_ignored_and_the_label_is_the_string():
    assert parse_scenario(" N(480, 240) / (300,150)").label == "N(480,240)/(300,150)"


# -- genai-bench's default sets: every string parses and gives the lengths its definitions give ------------------

@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def sessions(scenarios, count, **kw):
    out = list(generate(None, scenarios=scenarios, count=count, **kw))
    for s in out:
        validate_session(orjson.loads(orjson.dumps(s)))
    return out


def test_default_chat_set(tok):
    out = sessions(CHAT, 40)
    assert len(out) == 200 and len({s["id"] for s in out}) == 200
    for s in out:
        r = s["requests"][0]
        assert tok.count(r["messages"][0]["content"]) == r["input_tokens"]
        sc = s["scenario"]
        if sc.startswith("D"):
            i, o = map(int, sc[2:-1].split(","))
            assert (r["input_tokens"], r["output_tokens"]) == (i, o)
        else:
            assert r["input_tokens"] >= 1 and r["output_tokens"] >= 2
    assert [s["scenario"] for s in out[::40]] == CHAT  # blocks in the order given


def test_default_embeddings_set(tok):
    out = sessions(EMBEDDINGS, 3, overrides=["task.documents=4"])
    for s in out:
        r = s["requests"][0]
        d = int(s["scenario"][2:-1])
        assert r["task"] == "embeddings" and r["document_tokens"] == d and len(r["documents"]) == 4
        assert [tok.count(x) for x in r["documents"]] == [d] * 4
        assert r["input_tokens"] == 4 * d
        assert len(set(r["documents"])) == 4  # different documents in one batch


def test_default_rerank_set(tok):
    out = sessions(RERANK, 2, overrides=["task.documents=3"])
    for s in out:
        r = s["requests"][0]
        d, q = map(int, s["scenario"][2:-1].split(","))
        assert r["task"] == "rerank" and r["document_tokens"] == d and r["query_tokens"] == q
        assert tok.count(r["query"]) == q
        assert [tok.count(x) for x in r["documents"]] == [d] * 3
        assert r["input_tokens"] == 3 * d + q


def test_default_vision_set_and_image_count(tok):
    from PIL import Image

    out = sessions(VISION + ["I(64,32,3)"], 1)
    for s in out:
        r = s["requests"][0]
        nums = list(map(int, s["scenario"][2:-1].split(",")))
        w, h, n = (nums + [1])[:3]
        parts = r["messages"][-1]["content"]
        assert parts[0]["type"] == "text" and tok.count(parts[0]["text"]) == r["input_tokens"]
        imgs = [p for p in parts if p["type"] == "image_url"]
        assert len(imgs) == n and r["image_sizes"] == [[w, h]] * n
        for p in imgs:
            url = p["image_url"]["url"]
            assert url.startswith("data:image/png;base64,")
            im = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
            assert im.format == "PNG" and im.size == (w, h)
        assert r["output_tokens"] == 128  # the config's output length: I(...) says nothing of the output


def test_same_seed_same_bytes_and_blocks_differ():
    a = list(generate(None, scenarios=["N(480,240)/(300,150)", "E(64)"], count=5, seed=3))
    b = list(generate(None, scenarios=["N(480,240)/(300,150)", "E(64)"], count=5, seed=3))
    assert orjson.dumps(a) == orjson.dumps(b)
    assert [s["id"] for s in a] == [f"s3-{i}" for i in range(10)]


# -- the YAML a scenario stands for gives the same sessions -------------------------------------------------------

@pytest.mark.parametrize("sc", ["N(480,240)/(300,150)", "U(100,200)/(200,300)", "D(100,1000)", "E(1024)",
                                "R(512,64)", "I(64,48,2)", "P(200,50)/20"])
def test_scenario_equals_its_yaml(tmp_path, sc):
    text = scenario_yaml(parse_scenario(sc))
    p = tmp_path / "w.yaml"
    p.write_text(text)
    via_yaml = list(generate(str(p), count=3, seed=7))
    via_string = list(generate(None, scenarios=[sc], count=3, seed=7))
    for s in via_string:
        assert s.pop("scenario") == sc
    for s in via_yaml + via_string:
        s.get("source", {}).pop("file", None)
    assert orjson.dumps(via_yaml) == orjson.dumps(via_string)


def test_man_page_shows_each_yaml():
    from conftest import ROOT

    man = (ROOT / "man" / "vk-gen.1").read_text()
    for sc in ("N(480,240)/(300,150)", "U(100,200)/(200,300)", "D(100,1000)", "E(1024)", "R(512,64)", "I(1024,512)",
               "P(2000,500)/200"):
        assert sc in man
        for line in scenario_yaml(parse_scenario(sc)).splitlines():
            assert line.replace("-", "\\-") in man, (sc, line)


def test_yaml_scenarios_list_and_cli(tmp_path):
    p = tmp_path / "w.yaml"
    p.write_text(yaml.safe_dump({"scenarios": ["D(10,20)", "D(30,40)"], "count": 2}))
    r = run_vk("vk-gen", str(p), check=True)
    recs = [orjson.loads(x) for x in r.stdout.splitlines()]
    assert [(s["scenario"], s["requests"][0]["input_tokens"]) for s in recs] == \
        [("D(10,20)", 10), ("D(10,20)", 10), ("D(30,40)", 30), ("D(30,40)", 30)]
    r = run_vk("vk-gen", "--scenario", "D(10,20)", "--scenario", "Q(1)")
    assert r.returncode == 2 and b"'Q(1)' is not a scenario string" in r.stderr and b"Traceback" not in r.stderr
    r = run_vk("vk-gen", "--scenario", "E(8)", "--set", "task.images=2")
    assert r.returncode == 2 and b"task.images" in r.stderr


def test_prefix_repetition_shares_one_prefix(tok):
    """genai-bench's P(prefix,suffix)/out: every request starts with the same prefix tokens, then its own."""
    out = sessions(["P(100,20)/30"], 5)
    ids = []
    for s in out:
        r = s["requests"][0]
        assert (r["input_tokens"], r["prefix_tokens"], r["output_tokens"]) == (120, 100, 30)
        assert len(r["messages"]) == 1 and tok.count(r["messages"][0]["content"]) == 120
        ids.append(tok.encode(r["messages"][0]["content"]))
    assert all(x[:95] == ids[0][:95] for x in ids) and len({tuple(x[100:]) for x in ids}) == 5
