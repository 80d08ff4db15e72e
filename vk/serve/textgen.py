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

# Common English words; those that are one token (with their leading space) in the tokenizer are used first, so
# the output reads like (random) English. Tokenizers without enough of them fall back to their own vocabulary.
COMMON = """the of and to in is was for on that with as by at from his her an be this which or had are not but
have were one all their they there been has who its new more after also first two when other into time only
over can would some than she out most about world him made then may years under through many where these people
state such during her both between city part year later known before well three while being work used because
since each number high film series new school same long however called area until them early several against
following day own another season second including name team based government people place house life water
music river great light small group family any story game line power back way water village men company form
end around large national case power right day part state good old left little just like general children war
local major within family life among down along near music town head side great open point order system young
land course home women south north east west short art book night present public game field late law air death
body best hand free power still next long market white black green blue red full half real true level king
garden tree stone road bridge letter paper window door table chair horse river ocean mountain forest island
summer winter morning evening friend doctor teacher student mother father brother sister voice heart mind
dream story song color sound word page picture question answer reason moment history nature science money
language problem example result energy island travel simple quiet strong bright warm cold deep clear""".split()


class Words:
    """Single-token words of a tokenizer: ``ids`` (token ids), ``text[i]`` and ``json[i]`` (JSON string bytes)."""

    def __init__(self, tokenizer, limit: int = 2000):
        ids, words = [], []
        seen = set()
        common = [" " + w for w in dict.fromkeys(COMMON)]
        for t, e in zip(common, tokenizer.encode_batch(common), strict=True):
            if len(e) == 1 and e[0] not in seen:
                seen.add(e[0])
                ids.append(e[0])
                words.append(t)
        if len(ids) >= 100:
            self._finish(ids, words)
            return
        ids, words = [], []
        vocab = tokenizer.backend.get_vocab()
        cands = []
        for tok, i in vocab.items():
            if tok[:1] in ("\u0120", "\u2581") and _WORD.match(tok[1:]):
                cands.append((i, tok[1:]))
        cands.sort()
        cands = cands[: limit * 2]
        texts = [" " + w for _, w in cands]
        enc = tokenizer.encode_batch(texts) if cands else []
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
        self._finish(ids, words)

    def _finish(self, ids, words):
        self.ids = ids
        self.text = dict(zip(ids, words, strict=True))
        self.json = {i: orjson.dumps(w) for i, w in self.text.items()}
        self.count = len(ids)

    def decode(self, ids) -> str:
        return "".join(self.text[i] for i in ids)


@functools.lru_cache(maxsize=4)
def words_for(tokenizer) -> Words:
    return Words(tokenizer)
