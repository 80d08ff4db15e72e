"""Tokenizer loading and chat templates as a server applies them (vk/tokenizer.py)."""

from __future__ import annotations

import json
import shutil

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
