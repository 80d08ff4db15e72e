"""Trace flavors: how each trace format's rows become turns (one request each) of sessions.

A flavor reads one row (a dict from JSONL/CSV/JSON) and returns :class:`Turn` objects with normalized fields:
absolute trace time in seconds, input/output lengths, text or messages where the trace has them, hash ids, and the
session key that groups turns into multi-turn sessions. Content is made later (``engine``), so the same parsing
serves ``--stats``.

What every built-in flavor's lengths mean (``lengths``):

==============  ===================================================================================
flavor          multi-turn input lengths
==============  ===================================================================================
claude_code     cumulative (the whole context of the turn); a ``new_input_length`` column wins
rag             single-turn
mooncake_conv   per turn: the turn's own ``prompt_text`` (counted with the tokenizer)
mooncake        single-turn rows (prefix reuse is in ``hash_ids``, not in sessions)
azure           single-turn
burstgpt        single-turn; with ``session_column`` set: cumulative unless ``lengths`` says otherwise
conversations   per turn: the real text of each user turn
requests        explicit: ``lengths: per_turn | cumulative`` is required when rows carry session ids;
                optional ``hash_ids`` for single-request rows (blocks as for mooncake)
==============  ===================================================================================
"""

from __future__ import annotations

from typing import Any

import orjson

from vk.errors import VkError
from vk.gen.traces.options import Options
from vk.gen.traces.readers import RowSource, parse_number, parse_time

LENGTHS = ("per_turn", "cumulative")
TIME_UNITS = ("s", "ms", "us", "ns")


class Turn:
    """One request-to-be, as read from the trace."""

    __slots__ = ("line", "key", "t", "inp", "out", "text", "system", "ids", "rid", "parents", "history", "think",
                 "new", "drop", "extra", "doc", "reply")

    def __init__(self, line: int, key: Any = None, t: float | None = None, inp: int | None = None,
                 out: int | None = None):
        self.line = line
        self.key = key  # session key (grouped flavors) or None
        self.t = t  # arrival, seconds on the trace's clock (absolute)
        self.inp = inp  # input length as the trace states it (cumulative or per turn: see the flavor)
        self.out = out  # output length
        self.text = None  # verbatim new content (str), when the trace has text
        self.system = None  # a system message before the first user turn (conversations)
        self.ids = None  # hash ids (mooncake)
        self.rid = None  # explicit request id (requests flavor)
        self.parents = None  # explicit parent request ids
        self.history = None  # explicit history parent
        self.think = None  # explicit think time (seconds after the parents complete)
        self.new = None  # explicit new-content length (claude_code new_input_length)
        self.drop = None  # reason the row is filtered out (burstgpt model/log-type/failed filters)
        self.extra = None  # extra request fields (e.g. {"trace_failed": True})
        self.doc = None  # rag document id
        self.reply = None  # the trace's assistant reply text (conversations: its token count is the output)


class Field:
    __slots__ = ("name", "candidates", "required")

    def __init__(self, name: str, candidates: tuple[str, ...], required: bool):
        self.name = name
        self.candidates = candidates
        self.required = required


def _norm(s: str) -> str:
    return "".join(ch for ch in s.lower() if ch.isalnum())


class Flavor:
    """Base class. Subclasses set ``name``, ``fields`` and implement ``parse``."""

    name = "?"
    grouped = False  # rows sharing a session key form one session (needs the indexed mode)
    hash_ids = False  # content comes from hash-id blocks (prefix-cache statistics apply)
    needs_index = False  # a first pass over the whole trace is needed (rag: document frequencies)
    has_text = False  # requests carry the trace's own text
    lengths = "per_turn"  # how multi-turn input lengths are read
    default_time_unit = "s"
    # logical name -> (candidate column names, required)
    FIELDS: dict[str, tuple[tuple[str, ...], bool]] = {}

    def __init__(self, opts: Options, src: RowSource):
        self.src = src
        self.opts = opts
        self.time_unit = opts.str("time_unit", self.default_time_unit, choices=TIME_UNITS) \
            if "time_unit" in self.option_names() else self.default_time_unit
        self.columns_override = {}
        self.fields = {k: Field(k, c, r) for k, (c, r) in self.FIELDS.items()}
        self._resolved: dict[str, str | None] | None = None

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return ("time_unit",)

    # -- columns ----------------------------------------------------------------------------------------------
    def resolve(self, columns, line: int | None = None) -> None:
        """Map logical fields to actual column names (exact, then case/space/underscore-insensitive)."""
        cols = list(columns)
        by_norm = {}
        for c in cols:
            by_norm.setdefault(_norm(str(c)), c)
        res: dict[str, str | None] = {}
        for f in self.fields.values():
            found = None
            for cand in f.candidates:
                if cand in columns:
                    found = cand
                    break
            if found is None:
                for cand in f.candidates:
                    if _norm(cand) in by_norm:
                        found = by_norm[_norm(cand)]
                        break
            if found is None and f.required:
                need = ", ".join(repr(x.candidates[0]) for x in self.fields.values() if x.required)
                where = self.src.src if line is None or self.src.kind != "jsonl" else f"{self.src.src}:{line}"
                if self.src.kind == "json":
                    where = f"{self.src.src}: item {line}"
                raise VkError(f"{where}: missing column '{f.candidates[0]}' (the {self.name} flavor needs {need}; "
                              f"columns found: {', '.join(map(str, cols[:20])) or 'none'})")
            res[f.name] = found
        self._resolved = res

    def start(self) -> None:
        """Called before the first row: resolve CSV columns from the header."""
        if self.src.columns is not None:
            self.resolve(self.src.columns)

    def col(self, obj: dict, name: str) -> str | None:
        if self._resolved is None:
            self.resolve(obj.keys(), getattr(self, "_line", None))
        c = self._resolved[name]
        if c is None and self.src.columns is None:
            # JSON rows may carry an optional field the first row did not have
            for cand in self.fields[name].candidates:
                if cand in obj:
                    return cand
        return c

    def _colname(self, obj: dict, name: str) -> str:
        return self.col(obj, name) or self.fields[name].candidates[0]

    def get(self, obj: dict, line: int, name: str, *, required: bool | None = None):
        c = self.col(obj, name)
        if c is None:
            return None
        v = obj.get(c)
        if v is None or (isinstance(v, str) and not v.strip()):
            if required if required is not None else self.fields[name].required:
                raise self.src.error(line, c, "missing value")
            return None
        return v

    def number(self, obj, line, name, *, integer=True, minimum=None, required=None):
        v = self.get(obj, line, name, required=required)
        if v is None:
            return None
        try:
            x = parse_number(v, integer=integer)
        except ValueError as e:
            raise self.src.error(line, self._colname(obj, name), str(e)) from None
        if x is None:
            if required if required is not None else self.fields[name].required:
                raise self.src.error(line, self._colname(obj, name), "missing value")
            return None
        if minimum is not None and x < minimum:
            raise self.src.error(line, self._colname(obj, name), f"must be >= {minimum}, got {v}")
        return x

    def time(self, obj, line, name="timestamp", *, required=None):
        v = self.get(obj, line, name, required=required)
        if v is None:
            return None
        try:
            return parse_time(v, self.time_unit)
        except ValueError as e:
            raise self.src.error(line, self._colname(obj, name), str(e)) from None

    def string(self, obj, line, name, *, required=None):
        v = self.get(obj, line, name, required=required)
        if v is None:
            return None
        if not isinstance(v, str):
            raise self.src.error(line, self._colname(obj, name), f"expected a string, got {type(v).__name__}")
        return v

    def key_value(self, obj, line, name, *, required=None):
        """A session/document key: string or integer, kept as given."""
        v = self.get(obj, line, name, required=required)
        if v is None:
            return None
        if isinstance(v, (dict, list)) or isinstance(v, bool):
            raise self.src.error(line, self._colname(obj, name), f"expected a string or number, got {type(v).__name__}")
        return v

    def parse(self, obj: dict, line: int) -> list[Turn]:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"flavor": self.name, "lengths": self.lengths}


# ----------------------------------------------------------------------------------------------------------------
# length-only flavors

_WAIT = ("wait_after_previous_response_s", "wait_time", "think_time", "wait_s")


class Mooncake(Flavor):
    """Mooncake/FAST'25 JSONL: timestamp (ms), input_length, output_length, hash_ids (prefix blocks)."""

    name = "mooncake"
    hash_ids = True
    default_time_unit = "ms"
    FIELDS = {
        "timestamp": (("timestamp",), True),
        "input": (("input_length",), True),
        "output": (("output_length",), True),
        "ids": (("hash_ids",), True),
    }

    def __init__(self, opts, src):
        super().__init__(opts, src)
        self.block_size = opts.int("block_size", 512, minimum=1)
        self.wrap_keep_ids = opts.list("wrap_keep_ids", [])
        self.keep_set = set(self.wrap_keep_ids)

    @classmethod
    def option_names(cls):
        return ("time_unit", "block_size", "wrap_keep_ids")

    def parse(self, obj, line):
        t = self.time(obj, line)
        inp = self.number(obj, line, "input", minimum=1)
        out = self.number(obj, line, "output", minimum=0)
        tu = Turn(line, None, t, inp, out)
        tu.ids = check_hash_ids(self, obj, line, inp)
        return [tu]

    def describe(self):
        return {"flavor": self.name, "lengths": "single-turn", "block_size": self.block_size}


def check_hash_ids(fl: Flavor, obj: dict, line: int, inp: int) -> list:
    """The row's hash ids: a non-empty list of ints or strings that fits the input length in blocks."""
    c = fl._colname(obj, "ids")
    ids = fl.get(obj, line, "ids", required=True)
    if isinstance(ids, str):  # CSV: "[1, 2, 3]" or "1 2 3"
        try:
            ids = orjson.loads(ids) if ids.strip().startswith("[") else [int(x) for x in ids.replace(";", " ").split()]
        except (orjson.JSONDecodeError, ValueError):
            raise fl.src.error(line, c, f"expected a list of hash ids, got {ids[:40]!r}") from None
    if not isinstance(ids, list) or not ids:
        raise fl.src.error(line, c, "expected a non-empty list of hash ids")
    for x in ids:
        if isinstance(x, bool) or not isinstance(x, (int, str)):
            raise fl.src.error(line, c, f"expected integer or string hash ids, got {x!r}")
    bs = fl.block_size
    k = len(ids)
    if inp is None or not (bs * (k - 1) < inp <= bs * k):
        raise fl.src.error(
            line, c, f"{k} hash ids of {bs}-token blocks do not fit input length {inp} "
                     f"(need {bs * (k - 1) + 1}..{bs * k} tokens; is block_size right?)")
    return ids


class Azure(Flavor):
    """Azure LLM inference trace CSV (2023 and 2024): TIMESTAMP, ContextTokens, GeneratedTokens."""

    name = "azure"
    FIELDS = {
        "timestamp": (("TIMESTAMP", "timestamp"), True),
        "input": (("ContextTokens", "context_tokens"), True),
        "output": (("GeneratedTokens", "generated_tokens"), True),
    }

    def parse(self, obj, line):
        t = self.time(obj, line)
        inp = self.number(obj, line, "input", minimum=0)
        out = self.number(obj, line, "output", minimum=0)
        return [Turn(line, None, t, inp, out)]

    def describe(self):
        return {"flavor": self.name, "lengths": "single-turn"}


class BurstGPT(Flavor):
    """BurstGPT CSV: Timestamp (s), Model, Request tokens, Response tokens, Log Type (and a session id)."""

    name = "burstgpt"
    FIELDS = {
        "timestamp": (("Timestamp",), True),
        "model": (("Model",), False),
        "input": (("Request tokens", "request_tokens"), True),
        "output": (("Response tokens", "response_tokens"), True),
        "log_type": (("Log Type", "log_type"), False),
        "session": (("Session ID",), False),
    }
    FAILED = ("drop", "keep")

    def __init__(self, opts, src):
        super().__init__(opts, src)
        self.models = opts.str_list("models")
        self.log_types = opts.str_list("log_types")
        self.failed = opts.str("failed", "drop", choices=self.FAILED)
        sc = opts.str("session_column")
        if sc is not None:
            self.fields["session"] = Field("session", (sc,), True)
            self.grouped = True
            self.lengths = opts.str("lengths", "cumulative", choices=LENGTHS)
        else:
            self.fields.pop("session")
            self.lengths = opts.str("lengths", "cumulative", choices=LENGTHS)
        self._models = {m.lower() for m in self.models} if self.models else None
        self._logs = {m.lower() for m in self.log_types} if self.log_types else None

    @classmethod
    def option_names(cls):
        return ("time_unit", "models", "log_types", "failed", "session_column", "lengths")

    def parse(self, obj, line):
        t = self.time(obj, line)
        inp = self.number(obj, line, "input", minimum=0)
        out = self.number(obj, line, "output", minimum=0)
        key = self.key_value(obj, line, "session") if self.grouped else None
        tu = Turn(line, key, t, inp, out)
        if self._models is not None:
            m = self.string(obj, line, "model", required=True)
            if m.strip().lower() not in self._models:
                tu.drop = "model"
        if tu.drop is None and self._logs is not None:
            lt = self.string(obj, line, "log_type", required=True)
            if lt.strip().lower() not in self._logs:
                tu.drop = "log_type"
        if tu.drop is None and out == 0:
            if self.failed == "drop":
                tu.drop = "failed"
            else:
                tu.extra = {"trace_failed": True}
        return [tu]

    def describe(self):
        d = {"flavor": self.name, "lengths": self.lengths if self.grouped else "single-turn",
             "failed": self.failed}
        if self.models:
            d["models"] = self.models
        if self.log_types:
            d["log_types"] = self.log_types
        return d


class ClaudeCode(Flavor):
    """Context-cached coding-assistant sessions: session_id, input_length, output_length (+ waits)."""

    name = "claude_code"
    grouped = True
    FIELDS = {
        "session": (("session_id",), True),
        "input": (("input_length",), True),
        "output": (("output_length",), True),
        "new": (("new_input_length",), False),
        "timestamp": (("timestamp", "arrival_time", "start_time"), False),
        "wait": (_WAIT, False),
    }

    def __init__(self, opts, src):
        super().__init__(opts, src)
        self.page_size = opts.int("page_size", 16, minimum=1)
        self.corpus_file = opts.str("corpus_file")
        self.lengths = opts.str("lengths", "cumulative", choices=LENGTHS)

    @classmethod
    def option_names(cls):
        return ("time_unit", "page_size", "corpus_file", "lengths")

    def parse(self, obj, line):
        key = self.key_value(obj, line, "session")
        t = self.time(obj, line)
        inp = self.number(obj, line, "input", minimum=0)
        out = self.number(obj, line, "output", minimum=0)
        tu = Turn(line, key, t, inp, out)
        tu.new = self.number(obj, line, "new", minimum=0)
        w = self.number(obj, line, "wait", integer=False, minimum=0)
        if w is not None:
            tu.think = float(w)
        return [tu]

    def describe(self):
        return {"flavor": self.name, "lengths": self.lengths, "page_size": self.page_size}


# ----------------------------------------------------------------------------------------------------------------
# text flavors


class Rag(Flavor):
    """RAG: doc_id, prompt_text, input_length, output_length; single-turn, top documents, warm-up sessions."""

    name = "rag"
    needs_index = True
    has_text = True
    FIELDS = {
        "doc": (("doc_id",), True),
        "text": (("prompt_text",), True),
        "input": (("input_length",), True),
        "output": (("output_length",), True),
        "timestamp": (("timestamp",), False),
    }

    def __init__(self, opts, src):
        super().__init__(opts, src)
        self.num_documents = opts.int("num_documents", 10, minimum=1)
        self.warmup = opts.bool("warmup", True)
        self.warmup_output_tokens = opts.int("warmup_output_tokens", 1, minimum=1)

    @classmethod
    def option_names(cls):
        return ("time_unit", "num_documents", "warmup", "warmup_output_tokens")

    def parse(self, obj, line):
        doc = self.key_value(obj, line, "doc")
        text = self.string(obj, line, "text")
        inp = self.number(obj, line, "input", minimum=0)
        out = self.number(obj, line, "output", minimum=0)
        t = self.time(obj, line)
        tu = Turn(line, None, t, inp, out)
        tu.text = text
        tu.doc = doc
        return [tu]

    def describe(self):
        return {"flavor": self.name, "lengths": "single-turn", "num_documents": self.num_documents,
                "warmup": self.warmup}


class MooncakeConv(Flavor):
    """Mooncake conversations with text: session_id, prompt_text (the turn's new text), output_length."""

    name = "mooncake_conv"
    grouped = True
    has_text = True
    default_time_unit = "ms"
    FIELDS = {
        "session": (("session_id",), True),
        "text": (("prompt_text",), True),
        "output": (("output_length",), True),
        "input": (("input_length",), False),
        "timestamp": (("timestamp",), False),
        "wait": (_WAIT, False),
    }

    def parse(self, obj, line):
        key = self.key_value(obj, line, "session")
        text = self.string(obj, line, "text")
        out = self.number(obj, line, "output", minimum=0)
        inp = self.number(obj, line, "input", minimum=0)
        t = self.time(obj, line)
        tu = Turn(line, key, t, inp, out)
        tu.text = text
        w = self.number(obj, line, "wait", integer=False, minimum=0)
        if w is not None:
            tu.think = float(w)
        return [tu]


class Conversations(Flavor):
    """ShareGPT-style conversations (JSON array or JSONL): every user turn becomes a request."""

    name = "conversations"
    has_text = True
    AUTO_MESSAGES = ("conversations", "messages", "conversation", "turns")
    AUTO_ROLE = ("from", "role")
    AUTO_CONTENT = ("value", "content", "text")
    USER = ("human", "user", "prompter")
    ASSISTANT = ("gpt", "assistant", "model", "chatgpt", "bard", "bing", "bot")
    SYSTEM = ("system",)

    def __init__(self, opts, src):
        super().__init__(opts, src)
        self.messages_key = opts.str("messages_key")
        self.role_key = opts.str("role_key")
        self.content_key = opts.str("content_key")
        self.user_roles = {r.lower() for r in opts.str_list("user_roles", list(self.USER))}
        self.assistant_roles = {r.lower() for r in opts.str_list("assistant_roles", list(self.ASSISTANT))}
        self.system_roles = {r.lower() for r in opts.str_list("system_roles", list(self.SYSTEM))}
        self.timestamp_key = opts.str("timestamp_key")
        self.last_output_tokens = opts.int("last_turn_output_tokens", None, minimum=1)
        self.min_turns = opts.int("min_turns", 1, minimum=1)
        self.max_turns = opts.int("max_turns", None, minimum=1)
        self.empty_user = 0  # empty user messages left out (said on stderr by the engine)
        self.empty_first = 0

    @classmethod
    def option_names(cls):
        return ("time_unit", "messages_key", "role_key", "content_key", "user_roles", "assistant_roles",
                "system_roles", "timestamp_key", "last_turn_output_tokens", "min_turns", "max_turns")

    def start(self):
        pass

    def _pick(self, obj: dict, explicit: str | None, auto: tuple[str, ...]) -> str | None:
        if explicit is not None:
            return explicit if explicit in obj else None
        for k in auto:
            if k in obj:
                return k
        return None

    def parse(self, obj, line):
        err = self.src.error
        mk = self._pick(obj, self.messages_key, self.AUTO_MESSAGES)
        if mk is None:
            want = self.messages_key or " or ".join(self.AUTO_MESSAGES)
            raise err(line, self.messages_key or self.AUTO_MESSAGES[0], f"missing (expected a list of messages: {want})")
        msgs = obj[mk]
        if not isinstance(msgs, list):
            raise err(line, mk, f"expected a list of messages, got {type(msgs).__name__}")
        t = None
        if self.timestamp_key is not None and obj.get(self.timestamp_key) is not None:
            try:
                t = parse_time(obj[self.timestamp_key], self.time_unit)
            except ValueError as e:
                raise err(line, self.timestamp_key, str(e)) from None
        # fold the messages into (system, [(user_text, assistant_text|None)]); FastChat puts the system prompt in a
        # top-level "system" field
        top = obj.get("system")
        system = top if isinstance(top, str) and top else None
        pairs: list[list] = []
        skip_reply = False
        for j, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise err(line, f"{mk}[{j}]", "expected an object with a role and a content")
            rk = self._pick(m, self.role_key, self.AUTO_ROLE)
            ck = self._pick(m, self.content_key, self.AUTO_CONTENT)
            if rk is None:
                raise err(line, f"{mk}[{j}].{self.role_key or 'from'}", "missing role")
            if ck is None:
                raise err(line, f"{mk}[{j}].{self.content_key or 'value'}", "missing content")
            role = m[rk]
            content = m[ck]
            if not isinstance(role, str):
                raise err(line, f"{mk}[{j}].{rk}", "expected a string role")
            if not isinstance(content, str):
                raise err(line, f"{mk}[{j}].{ck}", f"expected a string content, got {type(content).__name__}")
            r = role.lower()
            if r in self.system_roles:
                if pairs:
                    raise err(line, f"{mk}[{j}].{rk}", "a system message after the first user turn is not supported")
                system = content if system is None else system + "\n\n" + content
            elif r in self.user_roles:
                if not content.strip():
                    # an empty user message is no request (0 tokens of content): left out, with its reply
                    self.empty_user += 1
                    self.empty_first = self.empty_first or line
                    skip_reply = True
                    continue
                skip_reply = False
                if pairs and pairs[-1][1] is None:
                    pairs[-1][0] += "\n\n" + content  # two user messages in a row: one turn
                else:
                    pairs.append([content, None])
            elif r in self.assistant_roles:
                if not pairs or skip_reply:
                    continue  # an assistant greeting before any user turn: not a request
                if pairs[-1][1] is None:
                    pairs[-1][1] = content
                else:
                    pairs[-1][1] += "\n\n" + content
            else:
                raise err(line, f"{mk}[{j}].{rk}",
                          f"unknown role {role!r} (set user_roles/assistant_roles/system_roles)")
        if self.max_turns is not None:
            pairs = pairs[: self.max_turns]
        if pairs and pairs[-1][1] is None and self.last_output_tokens is None:
            pairs.pop()  # the last user turn has no reply to take a length from
        turns = []
        key = obj.get("id")
        if isinstance(key, (dict, list)):
            key = None
        for k, (u, a) in enumerate(pairs):
            tu = Turn(line, key, t if k == 0 else None, None, None)
            tu.text = u
            tu.reply = a  # the engine counts its tokens (last_turn_output_tokens when there is no reply)
            if a is None:
                tu.out = self.last_output_tokens
            if k == 0:
                tu.system = system
            turns.append(tu)
        if len(turns) < self.min_turns:
            tu = Turn(line, key, t, None, None)
            tu.drop = "no user turn with a reply" if not turns else "fewer turns than min_turns"
            return [tu]
        return turns

    def describe(self):
        return {"flavor": self.name, "lengths": "per_turn (real text)"}


class Requests(Flavor):
    """A generic request log (JSONL or CSV): lengths, optional session id, timestamp, text, parents, think time."""

    name = "requests"
    FIELDS = {
        "input": (("input_length", "input_tokens", "prompt_tokens"), False),
        "output": (("output_length", "output_tokens", "completion_tokens"), True),
        "session": (("session_id",), False),
        "timestamp": (("timestamp",), False),
        "text": (("prompt", "prompt_text", "text"), False),
        "rid": (("request_id",), False),
        "parents": (("parents", "parent_ids"), False),
        "history": (("history", "history_parent"), False),
        "think": (("think_time",), False),
        "ids": (("hash_ids",), False),
    }

    def __init__(self, opts, src):
        super().__init__(opts, src)
        self.block_size = opts.int("block_size", 512, minimum=1)
        self.wrap_keep_ids = opts.list("wrap_keep_ids", [])
        self.keep_set = set(self.wrap_keep_ids)
        cols = opts.mapping("columns")
        co = Options(cols, opts.key("columns"))
        for logical in self.FIELDS:
            name = co.str(logical)
            if name is not None:
                self.fields[logical] = Field(logical, (name,), self.fields[logical].required)
        co.done()
        self.lengths_opt = opts.str("lengths", None, choices=LENGTHS)
        self.lengths = self.lengths_opt or "per_turn"
        self.history_mode = opts.str("history", "first_parent", choices=("first_parent", "none"))

    @classmethod
    def option_names(cls):
        return ("time_unit", "columns", "lengths", "history", "block_size", "wrap_keep_ids")

    def resolve(self, columns, line=None):
        super().resolve(columns, line)
        if self._resolved["input"] is None and self._resolved["text"] is None:
            raise VkError(f"{self.src.src}: the requests flavor needs an input length column (input_length) or a "
                          f"prompt text column (prompt); set flavor.columns.input or flavor.columns.text")
        if self._resolved["ids"] is not None:
            if self._resolved["session"] is not None:
                raise VkError(f"{self.src.src}: hash ids describe a request's whole prompt: the requests flavor "
                              f"takes them for single-request rows only (no session column)")
            self.hash_ids = True
        if self._resolved["session"] is not None:
            self.grouped = True
            if self.lengths_opt is None:
                raise VkError(
                    f"{self.src.src}: rows carry session ids ('{self._resolved['session']}'), so say how input "
                    f"lengths are counted: set session_generator.flavor.lengths to per_turn (each row's new "
                    f"content) or cumulative (the whole prompt, history included)")

    def parse(self, obj, line):
        key = self.key_value(obj, line, "session")
        t = self.time(obj, line)
        text = self.string(obj, line, "text")
        inp = self.number(obj, line, "input", minimum=0, required=text is None)
        out = self.number(obj, line, "output", minimum=0)
        tu = Turn(line, key, t, inp, out)
        tu.text = text
        rid = self.key_value(obj, line, "rid")
        if rid is not None:
            tu.rid = str(rid)
        p = self.get(obj, line, "parents")
        if p is not None:
            if isinstance(p, str):
                p = [x for x in p.replace(";", " ").replace("|", " ").replace(",", " ").split() if x]
            if not isinstance(p, list) or not all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in p):
                raise self.src.error(line, self._colname(obj, "parents"), "expected a list of request ids")
            tu.parents = [str(x) for x in p]
        h = self.key_value(obj, line, "history")
        if h is not None:
            tu.history = str(h)
        th = self.number(obj, line, "think", integer=False, minimum=0)
        if th is not None:
            tu.think = float(th)
        if self.hash_ids:
            tu.ids = check_hash_ids(self, obj, line, inp)
            if text is not None:
                raise self.src.error(line, self._colname(obj, "text"), "a row has either text or hash ids, not both")
        return [tu]

    def describe(self):
        d = {"flavor": self.name, "lengths": self.lengths if self.grouped else "single-turn"}
        if self.hash_ids:
            d["block_size"] = self.block_size
        return d


FLAVORS: dict[str, type[Flavor]] = {
    f.name: f for f in (ClaudeCode, Rag, MooncakeConv, Mooncake, Azure, BurstGPT, Conversations, Requests)
}
