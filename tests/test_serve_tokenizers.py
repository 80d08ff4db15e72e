"""vk-serve counts prompts as a real server with the same tokenizer and chat template would, in every family."""

from __future__ import annotations

import json
import random
import shutil

import httpx

from vk.serve.textgen import COMMON
from vk.tokenizer import load_tokenizer


def _sentencepiece_dir(d, template: bool = True):
    """A small SentencePiece-style BPE tokenizer as Llama-2, Mistral v0.1 and Phi-3 ship theirs: the normalizer
    prepends ▁ to every text and replaces spaces by ▁, byte fallback, a BOS added by the post-processor; with a
    Mistral-like chat template in chat_template.jinja (transformers 5's layout)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    rng = random.Random(0)
    words = list(dict.fromkeys(COMMON)) + ["Call", "me", "Ishmael", "Write", "poem", "sea", "short"]
    corpus = [" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(3000)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=1200, special_tokens=["<unk>", "<s>", "</s>"],
                                                        initial_alphabet=list("abcdefghijklmnopqrstuvwxyz")))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    d.mkdir(parents=True)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    if template:
        (d / "chat_template.jinja").write_text(
            "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] | trim }} "
            "[/INST]{% elif m['role'] == 'assistant' %}{{ m['content'] | trim }}{{ eos_token }}{% endif %}"
            "{% endfor %}")
    return d


def _chat(url: str, messages: list[dict], **kw) -> dict:
    r = httpx.post(url + "/chat/completions", json={"messages": messages, **kw}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_sentencepiece_tokenizer_and_chat_template_jinja(serve, tmp_path):
    d = _sentencepiece_dir(tmp_path / "sp")
    s = serve("--ttft", "0", "--tpot", "0", "--tokenizer", str(d))
    tok = load_tokenizer(str(d))  # renders through transformers' own renderer: an independent count
    msgs = [{"role": "user", "content": " Write a short poem about the sea. "}]
    r = _chat(s.url, msgs, max_tokens=12, ignore_eos=True)
    assert r["usage"]["prompt_tokens"] == tok.count_chat(msgs)
    answer = r["choices"][0]["message"]["content"]
    base = tok.encode("x")
    assert len(tok.encode("x" + answer)) == len(base) + 12  # the output re-encodes to its count in running text
    conv = msgs + [{"role": "assistant", "content": answer}, {"role": "user", "content": "Call me Ishmael."}]
    assert _chat(s.url, conv, max_tokens=2)["usage"]["prompt_tokens"] == tok.count_chat(conv)
    big = [{"role": "user", "content": " ".join(random.Random(1).choice(COMMON) for _ in range(3000))}]
    assert _chat(s.url, big, max_tokens=2)["usage"]["prompt_tokens"] == tok.count_chat(big)  # the prompt worker
    # completions add the tokenizer's BOS, as vLLM does by default (add_special_tokens), unless told not to
    r = httpx.post(s.url + "/completions", json={"prompt": "the river", "max_tokens": 1}).json()
    assert r["usage"]["prompt_tokens"] == len(tok.backend.encode("the river", add_special_tokens=True).ids) == 3
    r = httpx.post(s.url + "/completions", json={"prompt": "the river", "max_tokens": 1,
                                                  "add_special_tokens": False}).json()
    assert r["usage"]["prompt_tokens"] == 2
    assert "Traceback" not in s.stop()


def test_the_default_tokenizer_counts_with_its_template(serve):
    s = serve("--ttft", "0", "--tpot", "0")
    tok = load_tokenizer("qwen2.5")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Call me Ishmael."}]
    assert _chat(s.url, msgs, max_tokens=1)["usage"]["prompt_tokens"] == tok.count_chat(msgs)


def test_a_tokenizer_without_template_says_so_at_start_up(serve, tmp_path):
    d = tmp_path / "plain"
    d.mkdir()
    shutil.copy(load_tokenizer("qwen2.5").directory / "tokenizer.json", d / "tokenizer.json")
    s = serve("--ttft", "0", "--tpot", "0", "--tokenizer", str(d))
    _chat(s.url, [{"role": "user", "content": "hi"}], max_tokens=1)
    err = s.stop()
    assert err.count("has no chat template") == 1 and "role: content" in err and "Traceback" not in err
