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
    """Single-token words of a tokenizer: ``ids`` (token ids), ``text[i]`` and ``json[i]`` (JSON string bytes).

    A word qualifies when it is one token *in running text*: ``PREFIX + word`` encodes as ``PREFIX`` plus one token,
    so that a tokenizer whose normalizer prepends ``▁`` to every text (SentencePiece as Llama-2, Mistral v0.1 and
    Phi-3 ship it) is handled as well as byte-level BPE and WordPiece. Common English words come first; then the
    vocabulary's own ``Ġword`` / ``▁word`` / ``word`` entries; a sample of the chosen words must re-encode, joined,
    to exactly their tokens. ``exact`` is False when no such words exist: the output is then the text of arbitrary
    tokens (usage stays exact, as the server counts token ids, but the text may re-encode differently), and
    ``note`` says so.
    """

    def __init__(self, tokenizer, limit: int = 2000):
        self.exact = True
        self.note = None
        found = _in_context(tokenizer, [" " + w for w in dict.fromkeys(COMMON)])
        if len(found) < 100:
            vocab = tokenizer.backend.get_vocab()
            cands = sorted((i, t.lstrip("\u0120\u2581")) for t, i in vocab.items()
                           if _WORD.match(t.lstrip("\u0120\u2581")))
            seen = {i for i, _ in found}
            more = _in_context(tokenizer, [" " + w for _, w in cands[: limit * 4]])
            found += [(i, t) for i, t in more if i not in seen][: limit]
        if found and _joins_exactly(tokenizer, found):
            self._finish([i for i, _ in found], [t for _, t in found])
            return
        # No words that stay one token each: any ordinary tokens, with their own text.
        ids, words = [], []
        special = set(tokenizer.backend.get_added_tokens_decoder()) if hasattr(
            tokenizer.backend, "get_added_tokens_decoder") else set()
        for i in range(min(tokenizer.vocab_size, 20000)):
            t = tokenizer.decode([i])
            if i not in special and t.strip() and "\ufffd" not in t:
                ids.append(i)
                words.append(t if t.startswith(" ") else " " + t)
            if len(ids) >= limit:
                break
        if not ids:
            raise ValueError(f"tokenizer {tokenizer.name}: no tokens with text found")
        self.exact = False
        self.note = (f"vk-serve: tokenizer '{tokenizer.name}': no words that stay one token each in running text; "
                     "output text is made of arbitrary tokens' text: usage counts stay exact, but the text may "
                     "re-encode to a different count")
        self._finish(ids, words)

    def _finish(self, ids, words):
        self.ids = ids
        self.text = dict(zip(ids, words, strict=True))
        self.json = {i: orjson.dumps(w) for i, w in self.text.items()}
        self.count = len(ids)

    def decode(self, ids) -> str:
        return "".join(self.text[i] for i in ids)


PREFIX = "x"  # a word before the candidates: " word" after it is a word of running text, in every family


def _in_context(tokenizer, texts: list[str]) -> list[tuple[int, str]]:
    """``(id, text)`` of the texts that are exactly one token after :data:`PREFIX` (first of each id kept)."""
    base = tokenizer.encode(PREFIX)
    n = len(base)
    out, seen = [], set()
    for t, e in zip(texts, tokenizer.encode_batch([PREFIX + t for t in texts]), strict=True):
        if len(e) == n + 1 and e[:n] == base and e[n] not in seen:
            seen.add(e[n])
            out.append((e[n], t))
    return out


def _joins_exactly(tokenizer, found: list[tuple[int, str]]) -> bool:
    """Do the words, joined (as a stream's deltas are), re-encode to exactly their tokens?"""
    sample = found[:200]
    base = tokenizer.encode(PREFIX)
    return tokenizer.encode(PREFIX + "".join(t for _, t in sample)) == base + [i for i, _ in sample]


@functools.lru_cache(maxsize=4)
def words_for(tokenizer) -> Words:
    return Words(tokenizer)
