"""Copies of a session that are new requests to the server: what vk-schedule sends for ``--cycle`` and for the
superposed copies of ``--replay --target-rate``.

A prompt made by vk-gen starts with a *head* word (vk.gen.content): one token, and the token that tells prompts
apart. :func:`retext` replaces that first word of every request that starts a conversation with another head
word, shifted by the copy number: the copy then shares no prefix with its original or with other copies, keeps
every length exactly (one head word for another, one token for one token), and keeps what the original shared
inside its own copy (two sessions of a trace that shared hash-id blocks, or a prefix group's system prompt, still
start with the same word in the same copy). Requests that continue a conversation need no change: their history
is their own copy's.

Text that does not start with a head word (verbatim trace text) gets its first word replaced by a head word of
the same token count, checked by encoding.
"""

from __future__ import annotations

import re

_WORD = re.compile(r"[A-Za-z]+")
_STRIDE = 7919  # copies move the head index by a prime step: copy c of head a is head a + c * 7919 (mod heads)
_sources: dict = {}


def _text_source(tokenizer_name: str | None):
    ts = _sources.get(tokenizer_name)
    if ts is None:
        from vk.gen.content import TextSource
        from vk.tokenizer import load_tokenizer

        ts = _sources[tokenizer_name] = TextSource(load_tokenizer(tokenizer_name))
    return ts


def session_tokenizer(session: dict) -> str | None:
    """The tokenizer a session's lengths are counted with (``source.tokenizer``; None: vk's default)."""
    src = session.get("source")
    t = src.get("tokenizer") if isinstance(src, dict) else None
    return t if isinstance(t, str) else None


def retext(session: dict, copy: int, tokenizer=None) -> tuple[dict, int]:
    """Copy number ``copy`` (>= 2) of ``session`` as new requests; returns (session, requests left unchanged
    because no word of the same length could be swapped in). ``tokenizer``: a name or path (default: the
    session's ``source.tokenizer``, else vk's default)."""
    ts = _text_source(tokenizer if tokenizer is not None else session_tokenizer(session))
    heads = ts.heads
    index = _head_index(ts)
    k = len(heads)
    shift = (int(copy) - 1) * _STRIDE
    unchanged = 0
    reqs = []
    for r in session["requests"]:
        if r.get("history") is not None:
            reqs.append(r)
            continue
        r = dict(r)
        if "messages" in r and r["messages"]:
            msgs = [dict(m) for m in r["messages"]]
            new = _swap_first_word(ts, msgs[0].get("content"), index, heads, k, shift)
            if new is None:
                unchanged += 1
            else:
                msgs[0]["content"] = new
            r["messages"] = msgs
        elif isinstance(r.get("prompt"), str):
            new = _swap_first_word(ts, r["prompt"], index, heads, k, shift)
            if new is None:
                unchanged += 1
            else:
                r["prompt"] = new
        reqs.append(r)
    out = dict(session)
    out["requests"] = reqs
    return out, unchanged


def _head_index(ts) -> dict[str, int]:
    idx = getattr(ts, "_head_index", None)
    if idx is None:
        idx = ts._head_index = {w: i for i, w in enumerate(ts.heads)}
    return idx


def _swap_first_word(ts, text, index, heads, k, shift) -> str | None:
    if not isinstance(text, str) or not text:
        return None
    m = _WORD.match(text)
    if m is None:
        return None
    word = m.group(0)
    a = index.get(word)
    if a is not None and (m.end() == len(text) or text[m.end()] == " "):
        return heads[(a + shift) % k] + text[m.end():]  # one head token for another: the length holds
    # verbatim text: find a head word that keeps the token count
    from vk.gen.content import key_seed

    count = ts.tokenizer.count
    want = count(text)
    base = key_seed(word) + shift
    for t in range(32):
        cand = heads[(base + t) % k] + text[m.end():]
        if count(cand) == want:
            return cand
    return None

