"""Output text for the simulated server: real words, one token each.

The server emits tokens drawn from a list of vocabulary entries that are a space followed by a lowercase word
(`` the``, `` house`` ...). Each one is a single token on its own, and because the tokenizer's pre-tokenizer
splits text at spaces before merging, ``N`` such tokens concatenated re-encode to exactly ``N`` tokens: a client
that counts the text, or continues the conversation with it, sees the length the server reported.
"""

from __future__ import annotations

import functools
import re

import orjson

_WORD = re.compile(r"^[a-z]{2,10}$")


class Words:
    """Single-token words of a tokenizer: ``ids`` (token ids), ``text[i]`` and ``json[i]`` (JSON string bytes)."""

    def __init__(self, tokenizer, limit: int = 2000):
        vocab = tokenizer.backend.get_vocab()
        cands = []
        for tok, i in vocab.items():
            if tok[:1] in ("\u0120", "\u2581") and _WORD.match(tok[1:]):
                cands.append((i, tok[1:]))
        cands.sort()
        cands = cands[: limit * 2]
        texts = [" " + w for _, w in cands]
        enc = tokenizer.encode_batch(texts) if cands else []
        ids, words = [], []
        for (i, _), t, e in zip(cands, texts, enc, strict=True):
            if e == [i]:
                ids.append(i)
                words.append(t)
            if len(ids) >= limit:
                break
        if len(ids) < 10:
            # A tokenizer without such entries: fall back to any token that decodes and re-encodes to itself.
            for i in range(min(tokenizer.vocab_size, 50000)):
                t = tokenizer.decode([i])
                if t.strip() and t.startswith(" ") and tokenizer.encode(t) == [i]:
                    ids.append(i)
                    words.append(t)
                if len(ids) >= limit:
                    break
        if not ids:
            raise ValueError(f"tokenizer {tokenizer.name}: no single-token words found")
        self.ids = ids
        self.text = dict(zip(ids, words, strict=True))
        self.json = {i: orjson.dumps(w) for i, w in self.text.items()}
        self.count = len(ids)

    def decode(self, ids) -> str:
        return "".join(self.text[i] for i in ids)


@functools.lru_cache(maxsize=4)
def words_for(tokenizer) -> Words:
    return Words(tokenizer)
