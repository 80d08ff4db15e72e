"""Prompt text of an exact number of tokens, cut from a public-domain corpus that ships with vk.

The corpus (``vk/data/moby-dick.txt``, see ``vk/data/README.md``) is tokenized ONCE per tokenizer, with the
character offset of every token. A token that starts a word after a space (its text begins with the space, as in
byte-level BPE and SentencePiece's ``▁``, or follows it, as in WordPiece and T5's whitespace split) starts a
pre-tokenizer chunk, and no family merges across those, so any slice of the corpus from one such *safe boundary*
to another re-encodes, *in context* (after earlier text), to exactly the number of tokens between them, and such
slices concatenate exactly. Cutting a prompt is then a ``searchsorted`` over the boundary array and a string slice
by character offsets: no encoding or decoding per prompt.

*In context* matters for SentencePiece tokenizers that prepend ``▁`` to the whole text (Llama-2, Mistral v0.1,
Phi-3): a text that starts with a space gets one more token standalone than after other text. So every prompt
(every message's content) starts with a *head*: one corpus word, without a leading space, that is a single token
both at the start of a text and after a space under this tokenizer (:attr:`TextSource.heads`). Head words also
make prompts distinct where they must be: a salt (:meth:`TextSource.salt`) is two head words, and different salts
differ in their FIRST token, so two prompts never share a cached block they should not share, at any block size.

At load a self-check encodes a few hundred samples and concatenations; for a tokenizer where the property does
not hold (another pre-tokenizer, a normalizer that rewrites text) the source switches to *verify mode*: every
sample is encoded and retried until it has the exact length (much slower, still exact). ``TextSource.mode``
says which mode is in use.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import threading
from pathlib import Path

import numpy as np

from vk.errors import VkError

CORPUS_PATH = Path(__file__).resolve().parent.parent / "data" / "moby-dick.txt"

_SELF_CHECK_SAMPLES = 200
_FILLER_MAX = 64
_CACHE_FORMAT = 2  # remainders up to this many tokens are filled from precomputed exact segments

_cache: dict[tuple, _Corpus] = {}
_cache_lock = threading.Lock()


def _tokenizer_key(tokenizer) -> tuple:
    return (getattr(tokenizer, "name", None), str(getattr(tokenizer, "directory", "")), id(tokenizer))


def _read_corpus(corpus) -> tuple[str, str]:
    """(text, label) for a corpus argument: None (built-in), a path, or the text itself."""
    if corpus is None:
        path = CORPUS_PATH
    elif isinstance(corpus, Path) or (isinstance(corpus, str) and "\n" not in corpus and len(corpus) < 4096
                                      and Path(corpus).is_file()):
        path = Path(corpus)
    else:
        return str(corpus), "<text>"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise VkError(f"corpus {path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise VkError(f"corpus {path}: not UTF-8 text") from None
    return text, str(path)


class _Corpus:
    """A corpus tokenized once: token char offsets and safe boundaries (token indices)."""

    def __init__(self, text: str, label: str, tokenizer):
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        self.text = text
        self.label = label
        self.check: tuple[str, int] | None = None  # (mode, failures) of an earlier self-check, from the disk cache
        self.warned = False
        self.cache_file = _cache_file(tokenizer, text)
        self.heads: list[str] | None = None  # TextSource.heads, found once (kept in the disk cache)
        cached = _read_cache(self.cache_file)
        if cached is not None:
            ids, starts, self.check, self.heads = cached
        else:
            enc = tokenizer.backend.encode(text, add_special_tokens=False)
            ids = np.asarray(enc.ids, dtype=np.int64)
            starts = _word_starts(text, enc.offsets)
        n = len(ids)
        if n < 2000:
            raise VkError(f"corpus {label}: too short ({n} tokens); give at least a few thousand tokens of text")
        self.ids = ids
        self.n_tokens = n
        # char offset where token i starts; one extra entry: the end of the text
        self.char_at = np.append(starts, len(text))
        self.starts = starts
        safe = []
        prev = -1
        for i, s in enumerate(starts.tolist()):
            if s > prev and s + 1 < len(text) and text[s] == " ":
                c = text[s + 1]
                if ("a" <= c <= "z") or ("A" <= c <= "Z"):
                    safe.append(i)
            prev = s
        # too few boundaries (a tokenizer without space-led tokens, e.g. WordPiece): verify mode only
        self.has_boundaries = len(safe) >= 1000
        if not self.has_boundaries:
            safe = list(range(0, n, max(1, n // 1000)))[:1000] if n >= 1000 else list(range(n))
        self.safe = np.asarray(safe, dtype=np.int64)
        self.is_safe = np.zeros(n + 1, dtype=bool)
        self.is_safe[self.safe] = True
        self.first = int(self.safe[0])
        self.last = int(self.safe[-1])
        self.span = self.last - self.first  # longest exact slice
        # block starts: boundaries with at least span // 2 tokens after them
        self.n_block_starts = int(np.searchsorted(self.safe, self.last - self.span // 2, side="right"))
        # for small remainders r: safe starts s with s + r also safe
        self.fill_starts: list[np.ndarray] = [np.empty(0, dtype=np.int64)]
        for r in range(1, _FILLER_MAX + 1):
            cand = self.safe[self.safe + r <= self.last]
            self.fill_starts.append(cand[self.is_safe[cand + r]])

    def slice(self, a: int, b: int) -> str:
        return self.text[self.char_at[a]:self.char_at[b]]


def _word_starts(text: str, offsets) -> np.ndarray:
    """Each token's start offset; a word-initial token whose text does not hold the space before it (WordPiece,
    T5's whitespace split) is moved back onto that space, so that slices cut there keep the space between words."""
    starts = np.fromiter((o[0] for o in offsets), dtype=np.int64, count=len(offsets))
    prev_end = 0
    out = starts.copy()
    for i, (s, e) in enumerate(offsets):
        if s > 0 and text[s] != " " and text[s - 1] == " " and prev_end <= s - 1 and (i == 0 or starts[i - 1] < s - 1):
            out[i] = s - 1
        prev_end = max(prev_end, e)
    return out


def _cache_file(tokenizer, text: str) -> Path | None:
    """Where the tokenized corpus is kept between processes (None: no disk cache).

    Keyed by the tokenizer file's content, the corpus text and the cache format. ``VK_CACHE_DIR``
    moves it (default ``~/.cache/vk``); ``VK_NO_CACHE=1`` turns it off.
    """
    if os.environ.get("VK_NO_CACHE"):
        return None
    directory = getattr(tokenizer, "directory", None)
    if directory is None:
        return None
    try:
        tj = Path(directory) / "tokenizer.json"
        st = tj.stat()
    except OSError:
        return None
    h = hashlib.sha1()
    # keyed by the tokenizer's content: a copy of tokenizer.json (another checkout, a chat template added next to
    # it) shares the cache; the digest of the file is itself cached per (path, size, mtime)
    h.update(f"{_CACHE_FORMAT}|{_file_digest(str(tj.resolve()), st.st_size, st.st_mtime_ns)}|".encode())
    h.update(text.encode("utf-8", "surrogatepass"))
    root = Path(os.environ.get("VK_CACHE_DIR") or Path.home() / ".cache" / "vk")
    return root / f"corpus-{h.hexdigest()[:24]}.npz"


@functools.lru_cache(maxsize=64)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_cache(path: Path | None):
    if path is None or not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            ids, starts = z["ids"].astype(np.int64), z["starts"].astype(np.int64)
            check = (str(z["mode"]), int(z["failures"])) if "mode" in z else None
            heads = [str(x) for x in z["heads"].tolist()] if "heads" in z else None
        if len(ids) != len(starts):
            return None
        return ids, starts, check, heads
    except Exception:  # noqa: BLE001 - a damaged cache is only a cache: rebuild it
        return None


def _write_cache(c: _Corpus, mode: str, failures: int) -> None:
    path = c.cache_file
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
        extra = {"heads": np.asarray(c.heads, dtype=str)} if c.heads else {}
        np.savez(tmp, ids=c.ids.astype(np.int32), starts=c.starts.astype(np.int32), mode=np.str_(mode),
                 failures=np.int64(failures), **extra)
        os.replace(tmp, path)
        c.check = (mode, failures)
    except OSError:
        pass  # read-only home, full disk: keep going without the cache


def _load_corpus(tokenizer, corpus) -> _Corpus:
    text, label = _read_corpus(corpus)
    key = (_tokenizer_key(tokenizer), label if corpus is None or label != "<text>" else hashlib.sha1(
        text.encode()).hexdigest())
    with _cache_lock:
        c = _cache.get(key)
        if c is None:
            c = _Corpus(text, label, tokenizer)
            _cache[key] = c
    return c


def key_seed(key) -> int:
    h = hashlib.blake2b(repr(key).encode() if not isinstance(key, bytes) else key, digest_size=16).digest()
    return int.from_bytes(h, "little")


def _head_words(text: str, tokenizer) -> list[str]:
    """See TextSource.heads: lower-case corpus words (3 to 12 letters), one token at the start of a text and
    after a space, not merged with the next word; one word per first token; sorted."""
    import re

    words = sorted(set(re.findall(r"(?<![A-Za-z])[A-Za-z][a-z]{1,11}(?![A-Za-z'])", text)))
    enc = tokenizer.encode_batch
    ref = enc(["the"])[0]
    alone = enc(words)
    after = enc([f"the {w}" for w in words])
    before = enc([f"{w} the" for w in words])
    out = []
    seen = set()
    for w, a, b, c in zip(words, alone, after, before, strict=True):
        if len(a) != 1 or len(b) != len(ref) + 1 or b[:len(ref)] != ref or len(c) != 1 + len(ref) or c[0] != a[0]:
            continue
        if a[0] in seen or b[-1] in seen:
            continue
        seen.add(a[0])
        seen.add(b[-1])
        out.append(w)
    return out


class TextSource:
    """Natural text of exactly N tokens under ``tokenizer`` (a ``vk.tokenizer.Tokenizer``).

    ``corpus``: None for the built-in public-domain corpus, or a path to a UTF-8 text file.

    - ``sample(n, rng)``: random text of exactly n tokens; concatenations of samples stay exact.
    - ``block(key, n)``: deterministic text for a key (e.g. a trace's hash id), exactly n tokens;
      ``block(key, m)`` is a token prefix of ``block(key, n)`` for m < n whenever the corpus allows it.
    - ``start(n, rng)``, ``block_start(key, n)``: the same, as the first text of a prompt (a head word first).
    - ``salt(x)``: two head words naming the number x (start form, 2 tokens); different x < len(heads) differ in
      the first token, different x < len(heads)**2 in the first two. ``" " + salt(x)`` joins after any text.
    - ``unique_salt(i)``: a salt for any key, with a leading space (2 tokens in context).

    Samples and blocks start with a space (the start of a word) and are exact in context: after a head or any
    other sample. A prompt starts with ``start``/``block_start``/``salt``. The empty string is returned for n == 0.
    """

    def __init__(self, tokenizer, corpus=None, *, self_check: bool = True):
        if tokenizer is None:
            from vk.tokenizer import load_tokenizer

            tokenizer = load_tokenizer()
        elif isinstance(tokenizer, str):
            from vk.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(tokenizer)
        self.tokenizer = tokenizer
        self._c = _load_corpus(tokenizer, corpus)
        self.mode = "boundary"
        self.failures = 0  # self-check mismatches found at load
        self._heads: list[str] | None = None
        if not self._c.has_boundaries:
            self.mode = "verify"
        elif self_check:
            if self._c.check is not None:
                self.mode, self.failures = self._c.check
            else:
                self._self_check()
                _write_cache(self._c, self.mode, self.failures)
        if self.mode == "verify" and not self._c.warned:
            self._c.warned = True
            why = (f"{self.failures} of {_SELF_CHECK_SAMPLES + 40} self-check cuts changed length"
                   if self._c.has_boundaries else "its tokens do not start words with a space")
            print(f"vk-gen: note: tokenizer '{getattr(tokenizer, 'name', tokenizer)}': {why}; cutting prompts "
                  "with verification (exact, but slower)", file=sys.stderr)

    # -- public API -------------------------------------------------------------------------------------------
    @property
    def corpus_tokens(self) -> int:
        return self._c.n_tokens

    @property
    def corpus_label(self) -> str:
        return self._c.label

    def count(self, text: str) -> int:
        return self.tokenizer.count(text)

    def sample(self, n_tokens: int, rng: np.random.Generator) -> str:
        """Random corpus text of exactly ``n_tokens`` tokens (starting at a word boundary)."""
        n = int(n_tokens)
        if n <= 0:
            if n < 0:
                raise ValueError(f"n_tokens must be >= 0, got {n}")
            return ""
        if self.mode == "verify":
            return self._sample_verified(n, rng)
        c = self._c
        if n > c.span // 2:
            # longer than the corpus can give in one random piece: chain pieces (each exact, joins exact)
            parts = []
            left = n
            while left > 0:
                k = min(left, c.span // 4)
                if left - k and left - k < 8:  # keep the last piece comfortably long
                    k = left - 8 if left > 16 else left
                parts.append(self._piece(k, rng))
                left -= k
            return "".join(parts)
        return self._piece(n, rng)

    def block(self, key, n_tokens: int) -> str:
        """Deterministic text of exactly ``n_tokens`` tokens for ``key`` (any str/int/bytes).

        Keys map to one of the corpus's safe start boundaries (about one per word), so two keys can share a
        start and give the same block: with many thousands of keys that is likely. Callers that need distinct
        keys to give distinct blocks (hash-id traces) put a salt naming the key first, as vk.gen.traces does.
        """
        n = int(n_tokens)
        if n <= 0:
            if n < 0:
                raise ValueError(f"n_tokens must be >= 0, got {n}")
            return ""
        seed = key_seed(key)
        if self.mode == "verify":
            return self._sample_verified(n, np.random.default_rng(seed))
        c = self._c
        if n > c.span // 2:
            return self.sample(n, np.random.default_rng(seed))
        # start: a safe boundary chosen by the key, leaving room for n tokens
        # (the same start for every n, so that shorter blocks are prefixes of longer ones)
        a = int(c.safe[seed % c.n_block_starts])
        end = a + n
        if c.is_safe[end]:
            return c.slice(a, end)
        # the last safe boundary before the end; the remainder r = end - e tokens
        j = int(np.searchsorted(c.safe, end, side="right")) - 1
        e = int(c.safe[j])
        r = end - e
        if e > a:
            # try the corpus's own continuation: exact when its tail re-encodes to the same tokens
            tail = c.slice(e, end)
            if self.tokenizer.encode(tail) == c.ids[e:end].tolist():
                return c.slice(a, e) + tail
        else:
            e = a
            r = n
        return c.slice(a, e) + self._filler(r, seed)

    @property
    def heads(self) -> list[str]:
        """Corpus words that are one token at the start of a text and one after a space, and that end a token
        chunk (nothing merges across the space after them): the first word of every prompt. Sorted; their
        first tokens are all different."""
        if self._heads is None:
            if self._c.heads is None:
                self._c.heads = _head_words(self._c.text, self.tokenizer)
                if self._c.check is not None:  # the disk cache holds the self-check but not the heads yet
                    _write_cache(self._c, *self._c.check)
            self._heads = self._c.heads
            if len(self._heads) < 16:
                raise VkError(f"tokenizer '{getattr(self.tokenizer, 'name', self.tokenizer)}': fewer than 16 "
                              f"corpus words are single tokens ({len(self._heads)}); vk cannot cut prompts for it")
        return self._heads

    def head(self, x: int) -> str:
        """Head word number x (modulo the number of heads), without a leading space: 1 token."""
        h = self.heads
        return h[int(x) % len(h)]

    def salt(self, x: int) -> str:
        """Two head words naming x: 2 tokens at the start of a prompt; ``" " + salt(x)``: 2 tokens after text."""
        h = self.heads
        k = len(h)
        x = int(x)
        return f"{h[x % k]} {h[(x // k) % k]}"

    def start(self, n_tokens: int, rng: np.random.Generator) -> str:
        """Like ``sample``, as the first text of a prompt: a head word (drawn from rng), then n - 1 tokens."""
        n = int(n_tokens)
        if n <= 0:
            return self.sample(n, rng)
        w = self.head(int(rng.integers(0, 1 << 62)))
        return w + self.sample(n - 1, rng)

    def block_start(self, key, n_tokens: int, head: int | None = None) -> str:
        """Like ``block``, as the first text of a prompt: a head word (number ``head``, else chosen by the key),
        then n - 1 tokens."""
        n = int(n_tokens)
        if n <= 0:
            return self.block(key, n)
        return self.head(key_seed(("head", key)) if head is None else head) + self.block(key, n - 1)

    def count_after(self, text: str) -> int:
        """Tokens of ``text`` after other text (in context), e.g. a sentence appended to a prompt."""
        h = self.head(0)
        return self.tokenizer.count(h + text) - 1

    def unique_salt(self, i) -> str:
        """A salt for any key ``i`` (a leading space, then ``salt(hash(i))``): 2 tokens after any text."""
        return " " + self.salt(key_seed(("salt", i)))

    # -- internals --------------------------------------------------------------------------------------------
    def _piece(self, n: int, rng: np.random.Generator) -> str:
        c = self._c
        safe = c.safe
        # start boundaries with room for n tokens
        hi = int(np.searchsorted(safe, c.last - n, side="right"))
        if hi <= 0:
            raise VkError(f"corpus {c.label} too short for {n} tokens")
        j = int(rng.integers(0, hi))
        for _ in range(64):
            a = int(safe[j])
            if c.is_safe[a + n]:
                return c.slice(a, a + n)
            j += 1
            if j >= hi:
                j = 0
        # rare: no two boundaries exactly n apart near j; build from a prefix and a filler
        a = int(safe[j])
        end = a + n
        k = int(np.searchsorted(safe, end, side="right")) - 1
        e = int(safe[k])
        if e <= a:
            return self._filler(n, int(rng.integers(0, 2**63)))
        return c.slice(a, e) + self._filler(end - e, int(rng.integers(0, 2**63)))

    def _filler(self, r: int, seed: int) -> str:
        """Exactly r tokens from safe boundary to safe boundary (joins exactly after any safe slice)."""
        c = self._c
        parts = []
        while r > 0:
            k = min(r, _FILLER_MAX)
            cand = c.fill_starts[k]
            while len(cand) == 0 and k > 1:
                k -= 1
                cand = c.fill_starts[k]
            if len(cand) == 0:
                raise VkError(f"corpus {c.label}: cannot build exact filler text")
            s = int(cand[seed % len(cand)])
            parts.append(c.slice(s, s + k))
            seed = (seed * 6364136223846793005 + 1442695040888963407) % (1 << 64)
            r -= k
        return "".join(parts)

    def _sample_verified(self, n: int, rng: np.random.Generator) -> str:
        """Verify mode: cut by token offsets, encode, and adjust the end until the count is exact."""
        c = self._c
        count = self.tokenizer.count
        if n > c.n_tokens // 2:
            # longer than one piece of the corpus: join pieces, then correct the last one until the total is exact
            head_parts = []
            left = n
            while left > c.n_tokens // 4:
                k = c.n_tokens // 4
                head_parts.append(self._sample_verified(k, rng))
                left -= k
            head = "".join(head_parts)
            want_tail = left
            for _ in range(20):
                tail = self._sample_verified(max(1, want_tail), rng)
                got = count(head + tail)
                if got == n:
                    return head + tail
                want_tail += n - got
                if want_tail < 1:
                    break
            raise VkError(f"cannot cut text of exactly {n} tokens with tokenizer '{self.tokenizer.name}'")
        for _ in range(100):
            a = int(rng.integers(0, max(1, c.n_tokens - n - 1)))
            if a > 0 and c.char_at[a] == c.char_at[a - 1]:
                continue  # inside a character split over several tokens
            b = a + n
            for _ in range(6):
                if not a < b <= c.n_tokens:
                    break
                text = c.slice(a, b)
                got = count(text)
                if got == n:
                    return text
                b += n - got
        raise VkError(f"cannot cut text of exactly {n} tokens with tokenizer '{self.tokenizer.name}'")

    def _self_check(self) -> None:
        """Samples after a head word, concatenations of samples, and salts in front: every length must hold."""
        rng = np.random.default_rng(12345)
        enc = self.tokenizer.encode_batch
        lengths = rng.integers(1, 1200, size=_SELF_CHECK_SAMPLES).tolist()
        texts = [self._piece(int(n), rng) for n in lengths]
        heads = [self.head(i * 7) for i in range(len(texts))]
        got = [len(x) for x in enc([h + t for h, t in zip(heads, texts, strict=True)])]
        bad = sum(1 for g, n in zip(got, lengths, strict=True) if g != n + 1)
        pairs = [heads[i] + texts[i] + texts[i + 1] for i in range(0, 40, 2)]
        want = [1 + lengths[i] + lengths[i + 1] for i in range(0, 40, 2)]
        salted = [self.salt(i * 131) + texts[i] + " " + self.salt(i) + texts[i + 1] for i in range(20)]
        want_s = [4 + lengths[i] + lengths[i + 1] for i in range(20)]
        got2 = [len(x) for x in enc(pairs + salted)]
        bad += sum(1 for g, w in zip(got2, want + want_s, strict=True) if g != w)
        self.failures = bad
        if bad:
            self.mode = "verify"
