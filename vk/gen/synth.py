"""Synthetic sessions: single requests, multi-turn conversations and agentic DAGs, with exact token counts.

``generate(config, seed=..., count=...)`` streams ``session`` records (``vk.records``). The config follows the
seed design's schema (``session_generator`` with ``session_graph``, ``channels`` and ``output_spec``); see
``man vk-gen`` for every key and where vk differs.

Reproducibility: every random choice comes from a stream derived from ``(seed, component, session index)``, for
the components graph (shape and history parents), input (lengths), output (lengths), content (text), prefix
(shared-prefix use and group) and think (think times). Changing one component's parameters leaves the others'
draws alone, and session N is the same whatever ``count`` is.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterator
from pathlib import Path

from vk import records
from vk.errors import VkError
from vk.gen.config import (
    DEFAULT_BODY,
    DEFAULT_OUTPUT,
    FOREIGN_SECTIONS,
    TOP_KEYS,
    Config,
    apply_overrides,
    load_config,
)
from vk.gen.distributions import (
    FixedInterval,
)
from vk.gen.sections import Notes, _Groups, _Section, _tname, component_rng  # noqa: F401 - split out of this module

DEFAULT_COUNT = 100

GRAPH_TYPES = ("single_request", "linear", "branching")
_GRAPH_ALIASES = {"single": "single_request", "single_request": "single_request", "singlerequest": "single_request",
                  "linear": "linear", "multi_turn": "linear", "branching": "branching", "dag": "branching"}
OUTPUT_CONTROLS = records.OUTPUT_CONTROLS
FORMATS = ("chat", "completion")
INPUT_MODES = ("content", "templated")

_COMPONENTS = {"graph": 1, "input": 2, "output": 3, "content": 4, "prefix": 5, "think": 6, "groups": 7, "task": 8}


# --------------------------------------------------------------------------------------------------------------
# config sections


def template_ignores_system(tok) -> bool:
    """Whether the tokenizer's chat template leaves a system message's content out of the prompt (Phi-3)."""
    probe = "Marker of the system prompt"
    try:
        text = tok.render_chat([{"role": "system", "content": probe}, {"role": "user", "content": "Hello"}])
    except VkError:
        return True  # a template that refuses system messages (Gemma's older ones) leaves them out too
    return probe not in text


# --------------------------------------------------------------------------------------------------------------
# the workload


class Workload:
    """A validated synthetic workload: builds session ``i`` for a seed."""

    def __init__(self, cfg: Config, seed: int, tokenizer=None):
        self.cfg = cfg
        self.seed = seed
        data = cfg.data
        sg = _Section(cfg, data.get("session_generator"), "session_generator",
                      ("type", "session_graph", "channels", "output_spec", "inherit_history",
                       "think_time_generator", "request_params", "task", "dataset"))
        sg.choice("type", ("synthetic",), "synthetic")
        from vk.gen.tasks import TASK_KEYS, TaskSpec

        self.task = TaskSpec(_Section(cfg, sg.get("task"), "session_generator.task", TASK_KEYS))
        self.dataset = None
        if sg.has("dataset"):
            from vk.gen.datasets import DATASET_KEYS, Dataset

            self.dataset = Dataset(_Section(cfg, sg.get("dataset"), "session_generator.dataset", DATASET_KEYS), cfg)

        # --- graph --------------------------------------------------------------------------------------------
        gdata = sg.get("session_graph", {"type": "single_request"})
        if isinstance(gdata, str):
            gdata = {"type": gdata}
        if not isinstance(gdata, dict):
            raise cfg.error("session_generator.session_graph", f"expected a mapping, got {_tname(gdata)}")
        raw_t = gdata.get("type", "single_request")
        if not isinstance(raw_t, str) or raw_t.lower() not in _GRAPH_ALIASES:
            raise cfg.error("session_generator.session_graph.type",
                            f"expected one of {', '.join(GRAPH_TYPES)}, got {raw_t!r}")
        self.graph_type = _GRAPH_ALIASES[raw_t.lower()]
        if self.graph_type == "single_request" and sg.data.get("inherit_history") is True:
            # Veeksha configs set it next to a graph; on the default graph it would silently do nothing
            print("vk-gen: note: session_generator.inherit_history: true has no effect on a single_request graph "
                  "(the default): set session_graph.type: linear or branching for multi-turn sessions",
                  file=sys.stderr)
        allowed = {
            "single_request": ("type",),
            "linear": ("type", "num_request_generator", "request_wait_generator", "inherit_history"),
            "branching": ("type", "num_layers_generator", "layer_width_generator", "fan_out_generator",
                          "fan_in_generator", "connection_dist_generator", "request_wait_generator",
                          "inherit_history", "single_root"),
        }[self.graph_type]
        g = _Section(cfg, gdata, "session_generator.session_graph", allowed)
        if g.has("inherit_history") and sg.has("inherit_history") and \
                g.boolean("inherit_history", True) != sg.boolean("inherit_history", True):
            raise cfg.error("session_generator.inherit_history",
                            "differs from session_generator.session_graph.inherit_history; give one")
        self.inherit_history = g.boolean("inherit_history", sg.boolean("inherit_history", True))
        if self.graph_type == "linear":
            self.turns = g.length("num_request_generator", {"type": "uniform", "min": 2, "max": 6})
        elif self.graph_type == "branching":
            self.layers = g.length("num_layers_generator", {"type": "uniform", "min": 2, "max": 5})
            self.width = g.length("layer_width_generator", {"type": "uniform", "min": 1, "max": 3})
            self.fan_out = g.length("fan_out_generator", {"type": "uniform", "min": 1, "max": 2}, minimum=0)
            self.fan_in = g.length("fan_in_generator", {"type": "uniform", "min": 1, "max": 2})
            self.conn = g.length("connection_dist_generator", {"type": "fixed", "value": 1})
            self.single_root = g.boolean("single_root", True)
        if g.has("request_wait_generator") and sg.has("think_time_generator"):
            raise cfg.error("session_generator.think_time_generator",
                            "give either this or session_graph.request_wait_generator (the same thing), not both")
        if g.has("request_wait_generator"):
            self.think = g.interval("request_wait_generator")
        else:
            self.think = sg.interval("think_time_generator", None)

        # --- channels -----------------------------------------------------------------------------------------
        chans = sg.get("channels", [{"type": "text"}])
        if isinstance(chans, dict):
            chans = [chans]
        if not isinstance(chans, list) or not chans:
            raise cfg.error("session_generator.channels", "expected a list with one text channel")
        if len(chans) > 1:
            raise cfg.error("session_generator.channels[1]", "vk-gen supports one channel (type: text)")
        cpath = "session_generator.channels[0]"
        ch = _Section(cfg, chans[0], cpath,
                      ("type", "body_length_generator", "shared_prefix_ratio", "shared_prefix_probability",
                       "prefix_groups", "unique_salt", "input_length_mode", "format", "corpus"))
        ch.choice("type", ("text",), "text")
        self.body = ch.length("body_length_generator", DEFAULT_BODY)
        self.prefix_ratio = ch.number("shared_prefix_ratio", 0.0, 0.0, 1.0)
        self.prefix_prob = ch.number("shared_prefix_probability", 1.0, 0.0, 1.0)
        self.groups = None
        if ch.has("prefix_groups"):
            if self.prefix_ratio > 0:
                raise cfg.error(f"{cpath}.prefix_groups", "give either shared_prefix_ratio or prefix_groups, not both")
            gsec = _Section(cfg, ch.data["prefix_groups"], f"{cpath}.prefix_groups",
                            ("num_groups", "lengths", "length_generator", "group_distribution", "role"))
            self.groups = _Groups(gsec, seed)
        self.unique_salt = ch.boolean("unique_salt", False)
        self.format = ch.choice("format", FORMATS, "chat", {"completions": "completion", "chat_completions": "chat"})
        self.input_mode = ch.choice("input_length_mode", INPUT_MODES, "content")
        if self.task.type == "vision" and self.format != "chat":
            raise cfg.error(f"{cpath}.format", "task type 'vision' sends chat messages: format must be chat")
        if self.input_mode == "templated" and self.format != "chat":
            raise cfg.error(f"{cpath}.input_length_mode", "'templated' applies to format: chat only")
        corpus = ch.get("corpus")
        if corpus is not None:
            if not isinstance(corpus, str):
                raise cfg.error(f"{cpath}.corpus", f"expected a file path, got {corpus!r}")
            p = Path(corpus).expanduser()
            if not p.is_absolute() and cfg.base_dir is not None:
                p = cfg.base_dir / p
            if not p.is_file():
                raise cfg.error(f"{cpath}.corpus", f"no such file: {p}")
            corpus = p

        # --- output -------------------------------------------------------------------------------------------
        out = _Section(cfg, sg.get("output_spec"), "session_generator.output_spec", ("text",))
        ot = _Section(cfg, out.get("text"), "session_generator.output_spec.text",
                      ("output_length_generator", "output_control"))
        self.output = ot.length("output_length_generator", DEFAULT_OUTPUT)
        self.output_control = ot.choice("output_control", OUTPUT_CONTROLS, "exact")

        params = sg.get("request_params", {})
        if not isinstance(params, dict):
            raise cfg.error("session_generator.request_params", f"expected a mapping, got {_tname(params)}")
        self.params = params

        # --- text ---------------------------------------------------------------------------------------------
        from vk.gen.content import TextSource
        from vk.tokenizer import load_tokenizer

        tok = tokenizer if tokenizer is not None and not isinstance(tokenizer, str) else load_tokenizer(tokenizer)
        self.tokenizer = tok
        self.text = TextSource(tok, corpus)
        if self.input_mode == "templated" and not tok.has_chat_template:
            raise cfg.error(f"{cpath}.input_length_mode",
                            f"'templated' needs a chat template, and tokenizer '{tok.name}' has none")
        self._overheads: dict = {}
        self._instr: dict = {}
        self.notes = Notes()
        # salts and prefix heads are numbered from a per-seed base: other seeds start prompts with other words
        self._salt_base = int(component_rng(seed, "groups", 1 << 20).integers(0, 1 << 30))
        self._system_ignored = False
        if self.input_mode == "templated" and self.groups is not None and self.groups.role == "system" \
                and self.format == "chat" and template_ignores_system(tok):
            self._system_ignored = True
            print(f"vk-gen: note: the chat template of tokenizer '{tok.name}' leaves system messages out of the "
                  "prompt: prefix groups go at the start of the user message instead, so that the server's "
                  "prompt_tokens still equal the targets", file=sys.stderr)

    # -- graph shapes ----------------------------------------------------------------------------------------
    def _graph(self, rng) -> list[tuple[list[int], int | None]]:
        """[(parents, history parent or None)] in topological order."""
        if self.graph_type == "single_request":
            return [([], None)]
        if self.graph_type == "linear":
            n = max(1, self.turns.sample(rng))
            return [([], None)] + [([j - 1], j - 1 if self.inherit_history else None) for j in range(1, n)]
        n_layers = max(1, self.layers.sample(rng))
        layers: list[list[int]] = []
        k = 0
        for li in range(n_layers):
            w = 1 if (li == 0 and self.single_root) else max(1, self.width.sample(rng))
            layers.append(list(range(k, k + w)))
            k += w
        parents: list[set[int]] = [set() for _ in range(k)]
        for li in range(n_layers - 1):  # forward: fan-out, with skip distance
            for u in layers[li]:
                f = self.fan_out.sample(rng)
                d = max(1, self.conn.sample(rng))
                targets = layers[min(li + d, n_layers - 1)]
                m = min(f, len(targets))
                if m > 0:
                    for c in rng.choice(len(targets), size=m, replace=False).tolist():
                        parents[targets[c]].add(u)
        for li in range(1, n_layers):  # backward: fan-in (every non-root node gets at least one parent)
            earlier = sum(len(x) for x in layers[:li])
            for v in layers[li]:
                need = min(max(1, self.fan_in.sample(rng)), earlier)
                pl = li - 1
                while len(parents[v]) < need and pl >= 0:
                    cand = [u for u in layers[pl] if u not in parents[v]]
                    if cand:
                        parents[v].add(cand[int(rng.integers(0, len(cand)))])
                    else:
                        pl -= 1
        out = []
        for v in range(k):
            ps = sorted(parents[v])
            hist = ps[int(rng.integers(0, len(ps)))] if (ps and self.inherit_history) else None
            out.append((ps, hist))
        return out

    # -- token bookkeeping -----------------------------------------------------------------------------------
    def _overhead(self, kind: str) -> int:
        """Chat-template tokens around a request's new content (templated mode)."""
        v = self._overheads.get(kind)
        if v is None:
            tok = self.tokenizer
            # prompts start with a word, not a space (vk.gen.content), as these probes do
            a = "The sea was calm."
            b = "We sailed on."
            c = "The wind rose."
            ca, cb, cc = tok.count(a), tok.count(b), tok.count(c)
            if kind == "root":
                v = tok.count_chat([{"role": "user", "content": a}]) - ca
            elif kind == "root+system":
                v = tok.count_chat([{"role": "system", "content": b}, {"role": "user", "content": a}]) - ca - cb
            else:  # a later turn: the assistant's closing and the new user message's wrapper
                first = tok.count_chat([{"role": "user", "content": a}])
                full = tok.count_chat([{"role": "user", "content": a}, {"role": "assistant", "content": b},
                                       {"role": "user", "content": c}])
                v = full - first - cb - cc
            self._overheads[kind] = v = max(0, v)
        return v

    def _instruction(self, out_tokens: int) -> tuple[str, int]:
        r = self._instr.get(out_tokens)
        if r is None:
            words = max(1, round(out_tokens * 0.75))
            text = f" Please write a reply of about {words} words."
            r = self._instr[out_tokens] = (text, self.text.count_after(text))
        return r

    def _user_text(self, body_n: int, *, i: int, j: int, prefix, salted: bool, instr: str, attempt: int = 0) -> str:
        """The user message: [shared prefix] [salt] body [instruction]. Its first piece is a head (start form),
        the others follow it (in context), so the lengths add up exactly."""
        text = self.text
        parts = []
        if prefix is not None:
            key, n, head = prefix
            parts.append(text.block_start(key, n, head=head))
        if salted:
            salt = text.salt(self._salt_base + 1024 + i * 8 + min(j, 7))
            parts.append(" " + salt if parts else salt)
        rng = component_rng(self.seed, "content", (i * 4096 + j) * 8 + min(attempt, 7))
        parts.append(text.sample(body_n, rng) if parts else text.start(body_n, rng))
        parts.append(instr)
        return "".join(parts)

    # -- one session -----------------------------------------------------------------------------------------
    def session(self, i: int, source_extra: dict | None = None) -> dict:
        seed = self.seed
        g_rng = component_rng(seed, "graph", i)
        in_rng = component_rng(seed, "input", i)
        out_rng = component_rng(seed, "output", i)
        p_rng = component_rng(seed, "prefix", i)
        t_rng = component_rng(seed, "think", i)
        nodes = self._graph(g_rng)
        text = self.text
        reqs = []
        task_rng = component_rng(seed, "task", i) if self.task.type != "chat" or self.dataset else None
        for j, (parents, hist) in enumerate(nodes):
            is_root = not parents
            fields = None
            if self.dataset is not None:  # content from the user's data (vk.gen.datasets): row i + j
                from vk.gen.datasets import request_fields

                fields = request_fields(self, self.dataset.row(i + j, task_rng), in_rng, task_rng)
                if "messages" in fields:
                    fields.update(history=f"r{hist}" if hist is not None else None,
                                  output_tokens=max(1, self.output.sample(out_rng)),
                                  output_control=self.output_control)
            elif self.task.type in ("embeddings", "rerank", "image_generation", "speech"):
                c_rng = component_rng(seed, "content", i * 4096 + j)
                if self.task.type in ("embeddings", "rerank"):
                    fields = self.task.text_request(text, task_rng, c_rng)
                else:
                    n = self.body.sample(in_rng)
                    fields = self.task.prompt_request(text.start(n, c_rng), n, task_rng)
            if fields is not None:
                no_think = is_root or (isinstance(self.think, FixedInterval) and self.think.mean == 0)
                reqs.append(records.new_request(
                    f"r{j}", parents=[f"r{x}" for x in parents],
                    think_time=0.0 if no_think else round(self.think.sample(t_rng), 6),
                    params=dict(self.params) if self.params else None, **fields))
                continue
            body_len = self.body.sample(in_rng)
            out_len = max(1, self.output.sample(out_rng))
            no_think = is_root or (isinstance(self.think, FixedInterval) and self.think.mean == 0)
            think = 0.0 if no_think else round(self.think.sample(t_rng), 6)
            # shared prefix (roots only); the draws happen for every request so that streams stay aligned
            use_prefix = p_rng.random() < self.prefix_prob
            group = self.groups.pick(p_rng) if self.groups is not None else None
            system_text = None
            k = 0
            total = body_len
            kind = "turn" if hist is not None else "root"
            group_key = None
            if is_root and use_prefix and self.groups is not None:
                k = self.groups.lengths[group]
                total = body_len + k
                group_key = ("prefix-group", seed, group)
                if self.format == "chat" and self.groups.role == "system" and not self._system_ignored:
                    system_text = text.block_start(group_key, k, head=self._salt_base + group)
                    kind = "root+system"
            else:
                group = None
            overhead = self._overhead(kind) if self.input_mode == "templated" else 0
            content_target = total - overhead
            if content_target < 1:
                self.notes.add(f"requests whose target is below the chat template's own {overhead} tokens "
                               "(sent with 1 token of content)", i)
                content_target = 1
            if is_root and use_prefix and self.prefix_ratio > 0:
                k = int(round(self.prefix_ratio * content_target))
            n_salt = 2 if self.unique_salt and hist is None else 0
            instr, n_instr = ("", 0)
            if self.output_control == "prompt":
                instr, n_instr = self._instruction(out_len)
            in_user_prefix = k if system_text is None else 0
            # a message starts with a word (a head), never with the instruction's space: at least 1 body token
            body_n = max(0 if (in_user_prefix or n_salt) else 1, content_target - k - n_salt - n_instr)

            prefix = None
            if in_user_prefix:
                prefix = (group_key, in_user_prefix, self._salt_base + group) if group_key is not None else \
                    (("shared-prefix", seed), in_user_prefix, self._salt_base - 1)
            build = functools.partial(self._user_text, i=i, j=j, prefix=prefix, salted=bool(n_salt), instr=instr)

            user = build(body_n)
            n_input = k + n_salt + body_n + n_instr
            if text.mode == "verify":
                # joins are not guaranteed exact under this tokenizer: count, and correct the body until they are
                n_sys = self.tokenizer.count(system_text) if system_text is not None else 0
                want = n_input
                for _ in range(10):
                    n_input = n_sys + self.tokenizer.count(user)
                    if n_input == want or body_n + want - n_input < 0:
                        break
                    body_n += want - n_input
                    user = build(body_n)
            msgs = []
            if system_text is not None:
                msgs.append({"role": "system", "content": system_text})
            msgs.append({"role": "user", "content": user})
            if self.input_mode == "templated" and hist is None:
                # measure what the server will count (the real template applied) and adjust the body until exact
                want = max(total, overhead + 1)
                got = self.tokenizer.count_chat(msgs)
                tries = 0
                while got != want and tries < 12 and body_n + want - got >= 0:
                    # where the template's text meets the content, tokens can merge (a template whose markers
                    # are not special tokens of this tokenizer): after two tries, cut another body as well
                    tries += 1
                    body_n += want - got
                    user = build(body_n, attempt=tries // 3)
                    n_input = k + n_salt + body_n + n_instr
                    msgs[-1] = {"role": "user", "content": user}
                    got = self.tokenizer.count_chat(msgs)
                if got != want:
                    self.notes.add(f"first requests {got - want:+d} tokens off their templated target under "
                                   f"this chat template", i)
                overhead = got - n_input  # this request's own template tokens, as the server will count them
            extra: dict = {}
            if self.task.type == "vision":
                parts, sizes = self.task.image_parts(task_rng)
                msgs[-1] = {"role": "user", "content": [{"type": "text", "text": user}] + parts}
                extra.update(task="vision", image_sizes=sizes)
            if self.format == "chat":
                content = {"messages": msgs}
            else:
                content = {"prompt": user}
            if overhead:
                extra["template_tokens"] = overhead
            if group is not None:
                extra["prefix_group"] = group
            reqs.append(records.new_request(
                f"r{j}",
                parents=[f"r{x}" for x in parents],
                history=f"r{hist}" if hist is not None else None,
                think_time=think,
                input_tokens=n_input,
                prefix_tokens=k,
                output_tokens=out_len,
                output_control=self.output_control,
                params=dict(self.params) if self.params else None,
                **content,
                **extra,
            ))
        src = {"generator": "synthetic", "graph": self.graph_type, "seed": seed, "index": i,
               "tokenizer": self.tokenizer.ref}
        if source_extra:
            src.update(source_extra)
        return records.new_session(f"s{seed}-{i}", reqs, source=src)


# --------------------------------------------------------------------------------------------------------------
# public API


def _resolve(config, overrides) -> Config:
    cfg = load_config(config)
    apply_overrides(cfg, overrides)
    _client_settings(cfg)
    return cfg


def _client_settings(cfg: Config) -> None:
    """The seed design's ``client:`` keys that shape the workload itself: the prompt fallback for servers without
    ``min_tokens`` is vk-gen's ``output_control: prompt``; the name of the max-tokens parameter is vk-send's."""
    client = cfg.data.get("client")
    if not isinstance(client, dict):
        return
    if client.get("use_min_tokens_prompt_fallback") is True:
        sg = cfg.data.setdefault("session_generator", {})
        if isinstance(sg, dict):
            trace = str(sg.get("type", "synthetic")).lower() == "trace"
            spec = sg.setdefault("output_spec", {}) if isinstance(sg.get("output_spec", {}), dict) else None
            text = spec.setdefault("text", {}) if spec is not None and isinstance(spec.get("text", {}), dict) \
                else None
            if text is not None and text.get("output_control") is None and not (trace and sg.get("output_control")):
                text["output_control"] = "prompt"
                print("vk-gen: note: client.use_min_tokens_prompt_fallback: true: output_control is 'prompt' (the "
                      "prompt asks for the output length)", file=sys.stderr)
    if client.get("max_tokens_param") is not None:
        print(f"vk-gen: note: client.max_tokens_param ({client['max_tokens_param']!r}) is vk-send's setting: "
              f"vk-send --max-tokens-param {client['max_tokens_param']}", file=sys.stderr)


def _top(cfg: Config, seed, count, tokenizer):
    data = cfg.data
    for k in data:
        if k not in TOP_KEYS and k not in FOREIGN_SECTIONS:
            raise cfg.error(str(k), f"unknown key (expected one of: {', '.join(TOP_KEYS)})")
    top = _Section(cfg, {k: v for k, v in data.items() if k in ("seed", "count")}, "", ("seed", "count"))
    if seed is None:
        seed = top.integer("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise VkError(f"seed: expected an integer >= 0, got {seed!r}")
    if count is None:
        count = top.integer("count", None)
    if tokenizer is None:
        tokenizer = data.get("tokenizer")
        if tokenizer is not None and not isinstance(tokenizer, str):
            raise cfg.error("tokenizer", f"expected a tokenizer name or path, got {tokenizer!r}")
    return seed, count, tokenizer


def ignored_sections(config) -> list[str]:
    """Top-level sections of the config that belong to other stages and that vk-gen ignores."""
    cfg = load_config(config)
    return [k for k in cfg.data if k in FOREIGN_SECTIONS]


def generator_type(cfg: Config) -> str:
    sg = cfg.data.get("session_generator")
    t = sg.get("type", "synthetic") if isinstance(sg, dict) else "synthetic"
    return str(t).lower() if t is not None else "synthetic"


def generate(config=None, *, seed: int | None = None, count: int | None = None, duration: float | None = None,
             tokenizer=None, overrides=(), progress: bool = False, scenarios=()) -> Iterator[dict]:
    """Stream session records for a vk-gen config (a dict, a YAML path, or None for the default workload).

    ``seed`` (default: the config's ``seed``, else 0), ``count`` sessions (default: the config's ``count``, else
    100; 0 means no limit), ``duration``: for trace workloads, stop at sessions whose ``trace_time`` is past it.
    ``tokenizer``: a name, a path or a ``vk.tokenizer.Tokenizer`` (default: the config's, else qwen2.5).
    ``overrides``: ``"dotted.key=value"`` strings, as ``--set`` takes them. ``scenarios``: genai-bench scenario
    strings (else the config's ``scenarios`` list): ``count`` sessions of each, labelled (``vk.gen.scenarios``).
    Errors raise ``VkError``.
    """
    cfg = _resolve(config, overrides)
    scenarios = _scenario_list(cfg, scenarios)
    seed, count, tokenizer = _top(cfg, seed, count, tokenizer)
    if duration is not None and (isinstance(duration, bool) or not isinstance(duration, (int, float))
                                 or duration <= 0):
        raise VkError(f"--duration: expected a number of seconds > 0, got {duration!r}")
    gtype = generator_type(cfg)
    if gtype == "trace":
        return _trace_sessions(cfg, seed, count, duration, tokenizer, progress)
    if duration is not None:
        raise VkError("--duration applies to trace workloads (sessions with a trace_time); synthetic sessions "
                      "get their start times from vk-schedule: use --count (0 for no limit) and "
                      "vk-schedule --duration")
    if count is None:
        count = DEFAULT_COUNT
    if scenarios:
        return _scenario_sessions(cfg, scenarios, seed, count, tokenizer, progress)
    work = Workload(cfg, seed, tokenizer)
    return _synthetic_sessions(work, count, progress, cfg.source)


def _scenario_list(cfg: Config, given) -> list:
    from vk.gen.scenarios import parse_scenario

    if given:
        return [parse_scenario(x) for x in given]
    listed = cfg.data.get("scenarios")
    if listed is None:
        return []
    if isinstance(listed, str):
        listed = [listed]
    if not isinstance(listed, list) or not listed:
        raise cfg.error("scenarios", f"expected a list of scenario strings, got {listed!r}")
    return [parse_scenario(x, cfg.where(f"scenarios[{i}]").rstrip(": ")) for i, x in enumerate(listed)]


def _scenario_sessions(cfg: Config, scenarios, seed, count, tokenizer, progress) -> Iterator[dict]:
    """``count`` sessions per scenario, one block after the other; session indexes run on across blocks."""
    from vk.gen.scenarios import scenario_config
    from vk.tokenizer import load_tokenizer

    if count == 0:
        raise VkError("--scenario: give --count N (sessions per scenario); 0 (no limit) would never reach the next")
    tok = tokenizer if tokenizer is not None and not isinstance(tokenizer, str) else load_tokenizer(tokenizer)
    works = [(sc, Workload(scenario_config(cfg, sc), seed, tok)) for sc in scenarios]  # all errors before output
    bar = _progress_bar(count * len(works), progress)
    extra = {"file": cfg.source} if cfg.source else None
    try:
        for b, (sc, work) in enumerate(works):
            for i in range(b * count, (b + 1) * count):
                s = work.session(i, extra)
                s["scenario"] = sc.label
                yield s
                if bar is not None:
                    bar.update(1)
            work.notes.flush()
    finally:
        if bar is not None:
            bar.close()


def _progress_bar(total, progress: bool):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total or None, unit=" sessions", file=sys.stderr, dynamic_ncols=True, mininterval=0.25)


def _synthetic_sessions(work: Workload, count: int, progress: bool, source: str | None) -> Iterator[dict]:
    bar = _progress_bar(count, progress)
    extra = {"file": source} if source else None
    try:
        i = 0
        while count == 0 or i < count:
            yield work.session(i, extra)
            i += 1
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        work.notes.flush()


def _trace_sessions(cfg: Config, seed, count, duration, tokenizer, progress) -> Iterator[dict]:
    try:
        from vk.gen import traces
    except ImportError as e:
        raise VkError(f"trace workloads need vk.gen.traces, which is not available here ({e})") from None
    it = traces.generate(cfg.data, seed=seed, count=count or None, tokenizer=tokenizer, progress=progress)
    if duration is None:
        return it
    return _until(it, duration)


def _until(it, duration) -> Iterator[dict]:
    for s in it:
        t = s.get("trace_time")
        if t is not None and t > duration:
            return
        yield s


def trace_stats(config=None, overrides=(), *, seed: int | None = None, tokenizer=None) -> str:
    """The summary ``vk-gen --trace FILE --stats`` prints (from ``vk.gen.traces.stats``)."""
    cfg = _resolve(config, overrides)
    seed, _, tokenizer = _top(cfg, seed, None, tokenizer)
    if generator_type(cfg) != "trace":
        raise VkError("--stats describes a trace: give --trace FILE (or session_generator.type: trace)")
    try:
        from vk.gen import traces
    except ImportError as e:
        raise VkError(f"--stats needs vk.gen.traces, which is not available here ({e})") from None
    import inspect

    kw = {}
    try:
        accepted = inspect.signature(traces.stats).parameters
    except (TypeError, ValueError):
        accepted = {}
    if tokenizer is not None and "tokenizer" in accepted:
        kw["tokenizer"] = tokenizer
    if seed is not None and "seed" in accepted:
        kw["seed"] = seed
    return traces.stats(cfg.data, **kw)
