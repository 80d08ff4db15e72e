"""vk-gen content: text of exactly N tokens under two real tokenizers, samples, concatenations, blocks, salts."""

from __future__ import annotations

import numpy as np
import pytest

from vk.errors import VkError
from vk.gen.content import TextSource
from vk.tokenizer import load_tokenizer

TOKENIZERS = ["qwen2.5", "deepseek-v3"]


@pytest.fixture(scope="module", params=TOKENIZERS)
def src(request):
    tok = load_tokenizer(request.param)
    return TextSource(tok)


def test_boundary_mode_holds_for_builtin_tokenizers(src):
    # run the self-check now (the loaded one may come from the disk cache): no mismatch, the fast path holds
    src._self_check()
    assert src.mode == "boundary"
    assert src.failures == 0
    assert src.corpus_tokens > 100_000


def test_disk_cache_round_trip(tmp_path, monkeypatch):
    from vk.gen import content

    monkeypatch.setenv("VK_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("VK_NO_CACHE", raising=False)
    tok = load_tokenizer("qwen2.5")
    text, label = content._read_corpus(None)
    fresh = content._Corpus(text, label, tok)
    assert fresh.check is None and fresh.cache_file.parent == tmp_path
    content._write_cache(fresh, "boundary", 0)
    again = content._Corpus(text, label, tok)
    assert again.check == ("boundary", 0)
    assert np.array_equal(again.ids, fresh.ids) and np.array_equal(again.safe, fresh.safe)
    # a damaged cache file is rebuilt, not trusted
    fresh.cache_file.write_bytes(b"garbage")
    assert content._Corpus(text, label, tok).check is None
    monkeypatch.setenv("VK_NO_CACHE", "1")
    assert content._Corpus(text, label, tok).cache_file is None


def test_samples_have_exact_lengths(src):
    tok = src.tokenizer
    rng = np.random.default_rng(7)
    lengths = rng.integers(1, 2500, size=150).tolist() + [1, 2, 3, 5, 8, 13, 999, 1000, 1001, 4096]
    texts = [src.sample(n, rng) for n in lengths]
    got = [len(ids) for ids in tok.encode_batch(texts)]
    assert got == lengths


def test_concatenations_stay_exact(src):
    tok = src.tokenizer
    rng = np.random.default_rng(8)
    joined, want = [], []
    for _ in range(60):
        parts = rng.integers(1, 700, size=int(rng.integers(2, 6))).tolist()
        joined.append("".join(src.sample(n, rng) for n in parts))
        want.append(sum(parts))
    assert [len(x) for x in tok.encode_batch(joined)] == want


def test_longer_than_the_corpus_is_still_exact(src):
    rng = np.random.default_rng(9)
    n = src.corpus_tokens + 12_345
    assert src.tokenizer.count(src.sample(n, rng)) == n


def test_zero_and_negative(src):
    rng = np.random.default_rng(0)
    assert src.sample(0, rng) == ""
    assert src.block("k", 0) == ""
    with pytest.raises(ValueError):
        src.sample(-1, rng)


def test_blocks_are_deterministic_exact_and_prefixes(src):
    tok = src.tokenizer
    rng = np.random.default_rng(10)
    prefix_ok = 0
    trials = 100
    for key in range(trials):
        n = int(rng.integers(2, 1200))
        m = int(rng.integers(1, n))
        bn, bm = src.block(key, n), src.block(key, m)
        assert tok.count(bn) == n
        assert tok.count(bm) == m
        assert src.block(key, n) == bn  # deterministic
        prefix_ok += tok.encode(bn)[:m] == tok.encode(bm)
    assert prefix_ok >= trials * 0.95, f"block(key, m) a token prefix of block(key, n) in {prefix_ok}/{trials}"
    # different keys give different text
    assert src.block("a", 200) != src.block("b", 200)
    # a block followed by samples stays exact (a trace prompt: hash blocks, then new text)
    text = src.block(("h", 1), 512) + src.block(("h", 2), 300) + src.sample(77, rng)
    assert tok.count(text) == 512 + 300 + 77


def test_salt_joins_exactly(src):
    tok = src.tokenizer
    rng = np.random.default_rng(11)
    salts = [src.unique_salt(i) for i in range(50)]
    assert len(set(salts)) == 50
    for i, salt in enumerate(salts[:20]):
        body = src.sample(100 + i, rng)
        head = src.block(("p", i), 40)
        assert tok.count(salt + body) == tok.count(salt) + 100 + i
        assert tok.count(head + salt + body) == 40 + tok.count(salt) + 100 + i


def test_custom_corpus_and_errors(tmp_path):
    tok = load_tokenizer("qwen2.5")
    words = ("the whale swam under a grey sky while sailors sang old songs about home and far away islands "
             "where palm trees swayed in warm wind ").split()
    rng = np.random.default_rng(1)
    text = " ".join(words[i] for i in rng.integers(0, len(words), 6000)) + "\n"
    p = tmp_path / "corpus.txt"
    p.write_text(text)
    src = TextSource(tok, corpus=str(p))
    assert src.corpus_label == str(p)
    s = src.sample(333, rng)
    assert tok.count(s) == 333 and s in text
    small = tmp_path / "small.txt"
    small.write_text("too short")
    with pytest.raises(VkError, match="too short"):
        TextSource(tok, corpus=str(small))
    with pytest.raises(VkError, match="cannot read"):
        TextSource(tok, corpus=tmp_path / "missing.txt")


def test_verify_mode_is_exact_too():
    # force the slow path (used for tokenizers where the boundary property does not hold) and check it
    tok = load_tokenizer("qwen2.5")
    src = TextSource(tok, self_check=False)
    src.mode = "verify"
    rng = np.random.default_rng(3)
    for n in (1, 17, 256, 1000):
        assert tok.count(src.sample(n, rng)) == n
        assert tok.count(src.block(("v", n), n)) == n


def _wordlevel_tokenizer(tmp_path):
    """A real tokenizer without space-led tokens (word level, whitespace pre-tokenizer), saved as tokenizer.json."""
    import re

    from tokenizers import Tokenizer, models, pre_tokenizers

    from vk.gen.content import CORPUS_PATH

    words = sorted(set(re.findall(r"\w+|[^\w\s]", CORPUS_PATH.read_text(encoding="utf-8"))))
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    d = tmp_path / "wordlevel"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    return load_tokenizer(str(d))


def test_whitespace_split_tokenizer_has_word_boundaries_and_verify_mode_stays_exact(tmp_path, monkeypatch):
    from vk.gen import generate

    monkeypatch.setenv("VK_NO_CACHE", "1")
    tok = _wordlevel_tokenizer(tmp_path)
    src = TextSource(tok)
    # its tokens do not hold the space before a word, but start after it: the boundaries are found there
    assert src.mode == "boundary" and src.failures == 0
    src = TextSource(tok, self_check=False)
    src.mode = "verify"
    rng = np.random.default_rng(5)
    for n in (1, 9, 250, 1000):
        assert tok.count(src.sample(n, rng)) == n
    # whole sessions stay exact: prefix, salt and body are counted together and corrected
    cfg = {"session_generator": {"session_graph": {"type": "linear"},
                                 "channels": [{"type": "text", "shared_prefix_ratio": 0.3, "unique_salt": True,
                                               "body_length_generator": {"type": "uniform", "min": 20,
                                                                         "max": 300}}]}}
    for s in generate(cfg, count=5, tokenizer=tok):
        for r in s["requests"]:
            assert tok.count(r["messages"][0]["content"]) == r["input_tokens"]
            assert 20 <= r["input_tokens"] <= 300
    cfg["session_generator"]["channels"][0]["body_length_generator"] = {"type": "fixed", "value": 150}
    for s in generate(cfg, count=5, tokenizer=tok):
        assert [r["input_tokens"] for r in s["requests"]] == [150] * len(s["requests"])
