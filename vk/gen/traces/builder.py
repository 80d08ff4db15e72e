"""Trace turns -> session records: exact-length or verbatim content, hash-id blocks, salts (``Builder``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from vk import records
from vk.gen.content import key_seed
from vk.gen.traces.common import CacheSim, Warnings, block_sizes, component_rng
from vk.gen.traces.flavors import Flavor, Turn

if TYPE_CHECKING:
    from vk.gen.traces.engine import TraceConfig

_TEXT_SOURCES: dict = {}  # (tokenizer, corpus) -> TextSource, built once per process


class Builder:
    """Turns of one session -> a session record with exact-length or verbatim content."""

    def __init__(self, cfg: TraceConfig, flavor: Flavor, seed: int, tokenizer, warn: Warnings,
                 max_int_id: int | None = None):
        self.cfg = cfg
        self.fl = flavor
        self.seed = int(seed)
        self.tok = tokenizer
        self.warn = warn
        self.prefix = cfg.id_prefix if cfg.id_prefix is not None else flavor.name
        self.source_file = cfg.trace_file
        self.generator = f"trace:{flavor.name}"
        self._text = None
        self.cache = CacheSim() if flavor.hash_ids else None
        self.stride = (max_int_id + 1) if max_int_id is not None else None
        self._instr: dict[int, tuple[str, int]] = {}
        self.tok_ref = getattr(tokenizer, "ref", getattr(tokenizer, "name", None))
        # Salts are numbers written as two head words (vk.gen.content): the first word is the prompt's (or the
        # block's) first token, so it is what tells two prompts apart. Fresh prompts take consecutive numbers from
        # a per-seed base (distinct first tokens for as many sessions as there are head words); a hash id takes a
        # number from its hash, moved on until no other id after the same parent (the previous id) starts with
        # the same token, so that different ids share no leading token at any block size.
        self._base = int(component_rng(self.seed, "vk.gen.traces.salts").integers(0, 1 << 40))
        self._n_fresh = 0
        self._id_number: dict = {}
        self._first_used: dict = {}

    @property
    def text(self):
        if self._text is None:
            from vk.gen.content import TextSource

            corpus = getattr(self.fl, "corpus_file", None) or self.cfg.corpus_file
            key = (id(self.tok), corpus)
            ts = _TEXT_SOURCES.get(key)
            if ts is None or ts.tokenizer is not self.tok:
                ts = _TEXT_SOURCES[key] = TextSource(self.tok, corpus)
            self._text = ts
        return self._text

    # -- content ------------------------------------------------------------------------------------------------
    def fresh(self, n: int, rng: np.random.Generator, salt_key: tuple | None) -> str:
        """n tokens of new text, starting a prompt. With a salt key (a session's first request), the text starts
        with a salt, so that sessions (and runs with other seeds) never share a prompt's first token."""
        text = self.text
        if salt_key is None or n < 1:
            return text.start(n, rng)
        x = self._base + self._n_fresh
        self._n_fresh += 1
        k = len(text.heads)
        x = x % k + k * ((x // k) % k)
        if n == 1:
            return text.head(x)
        return text.salt(x) + text.sample(n - 2, rng)

    def _number(self, key, parent) -> int:
        """The salt number of a hash id (fixed at its first use)."""
        x = self._id_number.get(key)
        if x is None:
            k = len(self.text.heads)
            h = key_seed((self.seed, key))
            first = h % k
            used = self._first_used.get(parent)
            if used is None:
                used = self._first_used[parent] = set()
            if len(used) < k:
                while first in used:
                    first = (first + 1) % k
            used.add(first)
            x = self._id_number[key] = first + k * ((h // k) % k)
        return x

    def instruction(self, out_tokens: int) -> tuple[str, int]:
        """``output_control: prompt``: the sentence asking for the output length, and its token count (after
        the prompt's text)."""
        r = self._instr.get(out_tokens)
        if r is None:
            text = f" Please write a reply of about {max(1, round(out_tokens * 0.75))} words."
            r = self._instr[out_tokens] = (text, self.text.count_after(text))
        return r

    def block_key(self, x, epoch: int):
        if epoch and not self.cfg.wrap_share_cache and x not in self.fl.keep_set:
            if isinstance(x, int) and self.stride is not None and x >= 0:
                return x + epoch * self.stride
            return f"{x}@{epoch}"
        return x

    def hashed(self, ids: list, inp: int, epoch: int) -> tuple[str, int]:
        """The prompt of a hash-id request: one block of text per id, ``block_size`` tokens (the last may be
        partial). A block starts with a salt naming its id, so that different ids never give the same tokens
        (corpus blocks alone can collide), then deterministic corpus text for (seed, id)."""
        sizes = block_sizes(len(ids), inp, self.fl.block_size)
        keys = [self.block_key(x, epoch) for x in ids]
        served = self.cache.serve(keys, sizes)
        text = self.text
        s = self.seed
        parts = []
        parent = None
        for k, n in zip(keys, sizes, strict=True):
            x = self._number(k, parent)
            parent = k
            sep = " " if parts else ""  # the first block starts the prompt (start form), the others follow it
            if n == 1:
                parts.append(sep + text.head(x))
            else:
                parts.append(sep + text.salt(x))
                parts.append(text.block(f"h{s}:{k!r}", n - 2))
        return "".join(parts), served

    # -- requests -----------------------------------------------------------------------------------------------
    def plan(self, turns: list[Turn]) -> list[dict]:
        """Ids, parents, history, think time and new-content length of each turn."""
        fl = self.fl
        src = fl.src
        cumulative = fl.lengths == "cumulative"
        first_history = getattr(fl, "history_mode", "first_parent") == "first_parent"
        col = fl._resolved or {}
        seen: dict[str, int] = {}
        out: list[dict] = []
        t0 = turns[0].t
        for k, tu in enumerate(turns):
            rid = tu.rid if tu.rid is not None else f"r{k}"
            if rid in seen:
                raise src.error(tu.line, col.get("rid") or "request_id", f"duplicate request id {rid!r} in the session")
            if tu.parents is not None:
                parents = tu.parents
                for p in parents:
                    if p not in seen:
                        raise src.error(tu.line, col.get("parents") or "parents",
                                        f"parent {p!r} is not an earlier request of this session")
            else:
                parents = [out[-1]["id"]] if out else []
            if tu.history is not None:
                if tu.history not in parents:
                    raise src.error(tu.line, col.get("history") or "history",
                                    f"history parent {tu.history!r} is not among the parents {parents}")
                history = tu.history
            else:
                history = parents[0] if parents and first_history else None
            # think time: explicit, or the gap between arrivals (latest parent's, or the session start for roots)
            if tu.think is not None:
                think = tu.think
            elif tu.t is not None and t0 is not None:
                ref = max((turns[seen[p]].t for p in parents if turns[seen[p]].t is not None), default=t0)
                think = tu.t - ref
                if think < 0:
                    self.warn.add("turns arriving before their parent (think time set to 0)", tu.line)
                    think = 0.0
            else:
                think = 0.0
            new = None
            if tu.text is None:
                if tu.new is not None:
                    new = tu.new
                elif cumulative and history is not None:
                    h = turns[seen[history]]
                    new = tu.inp - (h.inp + max(h.out or 0, 0))
                else:
                    new = tu.inp
                if new < 1:
                    if cumulative and history is not None and tu.new is None:
                        self.warn.add("turns whose cumulative input is not longer than the previous input + "
                                      "output (new content clipped to 1 token)", tu.line)
                    else:
                        self.warn.add("requests with an input length of 0 (set to 1 token)", tu.line)
                    new = 1
            seen[rid] = k
            out.append({"id": rid, "parents": list(parents), "history": history, "think": round(think, 6),
                        "new": new})
        return out

    def output_tokens(self, tu: Turn) -> int:
        if tu.reply is not None:
            n = self.tok.count(tu.reply)
        else:
            n = tu.out
        if n is None or n < 1:
            self.warn.add("requests with an output length of 0 (set to 1 token)", tu.line)
            return 1
        return int(n)

    def session(self, turns: list[Turn], *, epoch: int, trace_time: float | None, first_line: int,
                warmup: bool = False, ordinal: int = 0) -> dict:
        cfg = self.cfg
        fl = self.fl
        sid = f"{self.prefix}-warmup-{ordinal}" if warmup else \
            f"{self.prefix}-{first_line}" + (f"-w{epoch}" if epoch else "")
        plan = self.plan(turns)
        rng = None
        reqs = []
        chat = cfg.request_format == "chat"
        instr_mode = cfg.output_control == "prompt"
        for k, (tu, p) in enumerate(zip(turns, plan, strict=True)):
            prefix_tokens = 0
            system = tu.system
            out_tokens = fl.warmup_output_tokens if warmup else self.output_tokens(tu)
            if tu.text is not None:
                text = tu.text
                n_in = self.tok.count(text) + (self.tok.count(system) if system else 0)
            elif tu.ids is not None:
                text, prefix_tokens = self.hashed(tu.ids, p["new"], epoch)
                n_in = p["new"]
            else:
                if rng is None:
                    rng = component_rng(self.seed, "vk.gen.traces.content", epoch, first_line)
                n_gen = p["new"]
                if instr_mode:  # the instruction comes out of the target: the total stays the trace's length
                    n_gen = max(1, n_gen - self.instruction(out_tokens)[1])
                text = self.fresh(n_gen, rng, (epoch, first_line, self.prefix) if k == 0 else None)
                n_in = n_gen
            if instr_mode:
                instr, n_instr = self.instruction(out_tokens)
                text += instr
                n_in += n_instr
            if tu.text is None and self.text.mode == "verify":
                # this tokenizer's joins are not known to be exact (its self-check failed): check, and say so
                got = self.tok.count(text) + (self.tok.count(system) if system else 0)
                if got != n_in:
                    self.warn.add("generated prompts whose length is off under this tokenizer (its self-check "
                                  "failed: verify mode)", tu.line)
            if chat:
                msgs = ([{"role": "system", "content": system}] if system else []) + \
                       [{"role": "user", "content": text}]
                body = {"messages": msgs}
            else:
                body = {"prompt": (system + "\n\n" + text) if system else text}
                if system:
                    n_in = self.tok.count(body["prompt"])
            extra = tu.extra or {}
            reqs.append(records.new_request(
                p["id"], parents=p["parents"], history=p["history"], think_time=p["think"],
                input_tokens=n_in, prefix_tokens=prefix_tokens, output_tokens=out_tokens,
                output_control=cfg.output_control, params=dict(cfg.params) if cfg.params else None,
                **body, **extra))
        source = {"generator": self.generator, "seed": self.seed, "file": self.source_file,
                  "row": first_line, "tokenizer": self.tok_ref}
        if len(turns) > 1:
            rows = sorted({tu.line for tu in turns})
            if len(rows) > 1:
                source["rows"] = rows
        if turns[0].key is not None:
            source["session"] = turns[0].key  # the trace's own session (or conversation) id
        if epoch:
            source["epoch"] = epoch
        extra = {"warmup": True} if warmup else {}
        if warmup and fl.name == "rag":
            source["doc_id"] = turns[0].doc
        return records.new_session(sid, reqs, source=source, trace_time=trace_time, **extra)
