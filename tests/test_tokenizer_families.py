"""Tokenizer loading and chat templates as a server applies them (vk/tokenizer.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import families
import numpy as np
import pytest

from vk.gen import generate
from vk.gen import traces as vk_traces
from vk.gen.content import TextSource
from vk.tokenizer import load_tokenizer


def _qwen_copy(tmp_path, name="tok"):
    src = load_tokenizer("qwen2.5").directory
    d = tmp_path / name
    d.mkdir()
    shutil.copy(src / "tokenizer.json", d / "tokenizer.json")
    return d


def test_chat_template_jinja_next_to_tokenizer_config_is_used(tmp_path):
    d = _qwen_copy(tmp_path)
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    assert not load_tokenizer(str(d)).has_chat_template
    d2 = _qwen_copy(tmp_path, "tok2")
    (d2 / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|im_end|>"},
                                                           "chat_template": "ignored {{ eos_token }}"}))
    (d2 / "chat_template.jinja").write_text(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | trim }}{{ eos_token }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = load_tokenizer(str(d2))
    assert tok.has_chat_template and tok.chat_template_source.endswith("chat_template.jinja")
    text = tok.render_chat([{"role": "user", "content": " Call me Ishmael. "}])
    assert text == "<|im_start|>user\nCall me Ishmael.<|im_end|>\n<|im_start|>assistant\n"
    assert tok.count_chat([{"role": "user", "content": " Call me Ishmael. "}]) == tok.count(text)
    assert tok.encode_chat([{"role": "user", "content": "x"}], add_generation_prompt=False) == \
        tok.encode("<|im_start|>user\nx<|im_end|>\n")


def test_truncation_and_padding_are_switched_off_on_load(tmp_path):
    from tokenizers import Tokenizer

    d = _qwen_copy(tmp_path)
    t = Tokenizer.from_file(str(d / "tokenizer.json"))
    t.enable_truncation(max_length=128)
    t.enable_padding(length=128, pad_id=0)
    t.save(str(d / "tokenizer.json"))
    tok = load_tokenizer(str(d))
    text = " word" * 500
    assert tok.count(text) == 500
    assert len(tok.encode_batch([text, " a"])[1]) == 1


# --------------------------------------------------------------------------------------------------------------
# every tokenizer family x every generator, flavor and chat template: exact lengths, blocks, first tokens

T = Path(__file__).resolve().parent / "data" / "traces"
ALL_FAMILIES = (*families.FAMILIES, "qwen2.5", "deepseek-v3")


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    """Trained once per test session: {family: tokenizer directory}; the built-in ones as they ship."""
    root = tmp_path_factory.mktemp("families")
    out = {n: families.build(n, root / n) for n in families.FAMILIES}
    for n in ("qwen2.5", "deepseek-v3"):
        out[n] = load_tokenizer(n).directory
    out["_root"] = root
    return out


@pytest.fixture(autouse=True)
def _corpus_cache(tmp_path_factory, monkeypatch):
    # the tokenized corpus of each trained tokenizer is cached under the session's temporary directory
    monkeypatch.setenv("VK_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "vk-cache"))


def family_tok(family_dirs, family, template=None):
    d = family_dirs[family]
    if template is not None:
        d = families.with_template(d, template, family_dirs["_root"] / f"{family}+{template}")
    return load_tokenizer(str(d))


def _chat_count(tok, r) -> int:
    return sum(tok.count(m["content"]) for m in r["messages"])


def _synth_cfg(graph: str, _oc: str = "exact", **channel) -> dict:
    ch = {"type": "text", "body_length_generator": {"type": "uniform", "min": 1, "max": 400}, **channel}
    g = {"type": graph}
    if graph == "linear":
        g["num_request_generator"] = {"type": "fixed", "value": 3}
    return {"session_generator": {"session_graph": g, "channels": [ch],
                                  "output_spec": {"text": {"output_control": _oc}}}}


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_text_source_is_exact_and_salts_differ_in_their_first_token(family_dirs, family):
    tok = family_tok(family_dirs, family)
    src = TextSource(tok)
    assert (src.mode, src.failures) == ("boundary", 0)
    k = len(src.heads)
    salts = [src.salt(x) for x in range(k)]
    enc = tok.encode_batch(salts)
    assert {len(e) for e in enc} == {2}
    assert len({e[0] for e in enc}) == k  # different salts never share the first token
    ctx = tok.encode_batch(["The end." + " " + s for s in salts[:200]])
    assert {len(e) for e in ctx} == {tok.count("The end.") + 2}
    rng = np.random.default_rng(1)
    texts = [src.start(int(n), rng) for n in rng.integers(1, 900, 60)]
    assert [len(e) for e in tok.encode_batch(texts)] == [len(e) for e in tok.encode_batch(texts)]
    for n in (1, 2, 3, 17, 500):
        assert tok.count(src.start(n, rng)) == n
        assert tok.count(src.block_start(("k", n), n)) == n
        assert tok.count(src.salt(n) + src.sample(n, rng) + src.block(n, n)) == 2 + 2 * n


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("graph", ["single_request", "linear", "branching"])
def test_synthetic_prompts_are_exact(family_dirs, family, graph):
    tok = family_tok(family_dirs, family)
    groups = {"num_groups": 3, "lengths": [1, 40, 300]}
    variants = [
        _synth_cfg(graph, prefix_groups=groups, unique_salt=True),
        _synth_cfg(graph, prefix_groups={**groups, "role": "user"}, unique_salt=True, _oc="prompt"),
        _synth_cfg(graph, shared_prefix_ratio=0.4, format="completion"),
    ]
    for cfg in variants:
        shared: dict = {}
        for s in generate(cfg, count=8, seed=3, tokenizer=tok):
            for r in s["requests"]:
                got = _chat_count(tok, r) if "messages" in r else tok.count(r["prompt"])
                assert got == r["input_tokens"], (s["id"], r["id"])
                k = r.get("prefix_tokens", 0)
                if k:  # a shared prefix is the same tokens in every session that has it
                    ids = tok.encode(r["messages"][-1]["content"] if "messages" in r else r["prompt"])
                    if "messages" in r and len(r["messages"]) > 1:
                        ids = tok.encode(r["messages"][0]["content"])
                    key = (r.get("prefix_group"), k)
                    assert shared.setdefault(key, ids[:k]) == ids[:k], (s["id"], r["id"])


FLAVORS = [
    ("mooncake_head200.jsonl", "mooncake"), ("azure2023_head200.csv", "azure"), ("burstgpt.csv", "burstgpt"),
    ("burstgpt_sessions.csv", {"type": "burstgpt", "session_column": "Session ID"}),
    ("claude_code.jsonl", "claude_code"), ("rag.jsonl", "rag"), ("mooncake_conv.jsonl", "mooncake_conv"),
    ("sharegpt.json", "conversations"), ("chat_messages.jsonl", "conversations"),
    ("requests_dag.jsonl", {"type": "requests", "lengths": "per_turn"}),
    ("requests_cumulative.csv", {"type": "requests", "lengths": "cumulative"}), ("requests_text.jsonl", "requests"),
    ("requests_hash.csv", {"type": "requests", "block_size": 16, "time_unit": "ms", "columns": {
        "timestamp": "arrival_ms", "input": "prompt_len", "output": "gen_len", "ids": "blocks"}}),
]


def _trace(path, flavor, tok, **sg):
    fl = flavor if isinstance(flavor, dict) else {"type": flavor}
    cfg = {"session_generator": {"type": "trace", "trace_file": str(path), "flavor": fl, **sg}}
    return list(vk_traces.generate(cfg, seed=1, count=20, tokenizer=tok, warnings=[]))


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_every_trace_flavor_is_exact(family_dirs, family):
    tok = family_tok(family_dirs, family)
    for name, flavor in FLAVORS:
        for fmt in ("chat", "completion"):
            out = _trace(T / name, flavor, tok, format=fmt)
            for s in out:
                for r in s["requests"]:
                    got = _chat_count(tok, r) if fmt == "chat" else tok.count(r["prompt"])
                    assert got == r["input_tokens"], (name, fmt, s["id"], r["id"])


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("name,bs", [("mooncake_head200.jsonl", 512), ("mooncake_small_blocks.jsonl", 16)])
def test_hash_id_blocks_are_identical_and_different_ids_share_no_leading_token(family_dirs, family, name, bs):
    tok = family_tok(family_dirs, family)
    out = _trace(T / name, {"type": "mooncake", "block_size": bs}, tok, format="completion")
    rows = (T / name).read_text().splitlines()

    block_of: dict = {}
    first_of: dict = {}
    for s in out:
        row = json.loads(rows[s["source"]["row"] - 1])
        ids = row["hash_ids"]
        r = s["requests"][0]
        toks = tok.encode(r["prompt"])
        assert len(toks) == r["input_tokens"] == row["input_length"]
        parent = None
        for k, x in enumerate(ids):
            block = toks[k * bs:(k + 1) * bs]
            if k < len(ids) - 1:
                assert block_of.setdefault(x, block) == block, f"hash id {x}: blocks differ"
            siblings = first_of.setdefault(parent, {})
            assert siblings.setdefault(block[0], x) == x, f"ids {x} and {siblings[block[0]]} share a first token"
            parent = x


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("template", families.TEMPLATES)
def test_templated_lengths_are_exact_under_real_chat_templates(family_dirs, family, template, capsys):
    tok = family_tok(family_dirs, family, template)
    assert tok.chat_template_source.endswith("chat_template.jinja")
    base = {"input_length_mode": "templated", "body_length_generator": {"type": "uniform", "min": 100, "max": 400}}
    variants = [
        _synth_cfg("linear", **base),
        _synth_cfg("single_request", **base, prefix_groups={"num_groups": 2, "lengths": [50, 120]},
                   unique_salt=True),
    ]
    for cfg in variants:
        sessions = list(generate(cfg, count=6, seed=5, tokenizer=tok))
        for s in sessions:
            for r in s["requests"]:
                assert _chat_count(tok, r) == r["input_tokens"]
                if r.get("history") is None:
                    assert tok.count_chat(r["messages"]) == r["input_tokens"] + r.get("template_tokens", 0)
    if template in ("phi3", "gemma"):  # they leave out (or refuse) system messages: said once on stderr
        assert "leaves system messages out" in capsys.readouterr().err


def test_templated_targets_below_the_template_size_are_said_once(capsys):
    cfg = _synth_cfg("single_request", input_length_mode="templated",
                     body_length_generator={"type": "fixed", "value": 3})
    out = list(generate(cfg, count=4, seed=1))
    err = capsys.readouterr().err
    assert err.count("below the chat template's own") == 1 and "4 requests" in err
    tok = load_tokenizer()
    for s in out:
        r = s["requests"][0]
        assert tok.count_chat(r["messages"]) == r["input_tokens"] + r["template_tokens"] > 3
