"""vk-gen configs: YAML loading with line numbers, ``--set`` overrides, and errors that name the key.

A config is a dict (or a YAML file holding one). Errors read ``FILE:LINE: key.path: message`` when the key came
from a file, ``key.path: message`` otherwise.
"""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from vk.errors import VkError
from vk.gen.distributions import MAX_LENGTH, ConfigError

# Top-level sections of the seed design's benchmark config that belong to other vk stages: accepted and ignored
# so that such a config can be given to vk-gen unchanged (vk-gen reports them in `ignored`).
FOREIGN_SECTIONS = ("client", "traffic_scheduler", "runtime", "output_dir", "server", "evaluators", "evaluator",
                    "trace_recorder", "metrics", "slos", "wandb", "name", "description")
TOP_KEYS = ("seed", "count", "tokenizer", "session_generator", "scenarios")

# --set shorthands (first path segments) and what they stand for
ALIASES = {
    "input.length": "session_generator.channels.0.body_length_generator",
    "output.length": "session_generator.output_spec.text.output_length_generator",
    "output.control": "session_generator.output_spec.text.output_control",
    "think_time": "session_generator.think_time_generator",
    "graph": "session_generator.session_graph",
    "channel": "session_generator.channels.0",
    "prefix_groups": "session_generator.channels.0.prefix_groups",
    "task": "session_generator.task",
    "dataset": "session_generator.dataset",
}

DEFAULT_BODY = {"type": "fixed", "value": 512}
DEFAULT_OUTPUT = {"type": "fixed", "value": 128}

# What a missing section stands for, so that --set can change one field of a default (input.length.value=64).
DEFAULTS = {
    ("session_generator",): {"type": "synthetic"},
    ("session_generator", "session_graph"): {"type": "single_request"},
    ("session_generator", "channels"): [{"type": "text", "body_length_generator": DEFAULT_BODY}],
    ("session_generator", "channels", 0): {"type": "text", "body_length_generator": DEFAULT_BODY},
    ("session_generator", "channels", 0, "body_length_generator"): DEFAULT_BODY,
    ("session_generator", "output_spec"): {"text": {"output_length_generator": DEFAULT_OUTPUT}},
    ("session_generator", "output_spec", "text"): {"output_length_generator": DEFAULT_OUTPUT},
    ("session_generator", "output_spec", "text", "output_length_generator"): DEFAULT_OUTPUT,
}

SESSION_GENERATOR_KEYS = ("type", "session_graph", "channels", "output_spec", "inherit_history",
                          "think_time_generator", "request_params", "trace_file", "flavor", "wrap_mode",
                          # trace keys (vk.gen.traces.engine.TraceConfig)
                          "file_format", "format", "output_control", "shuffle", "sample", "max_rows", "window",
                          "wrap_share_cache", "id_prefix", "corpus_file", "task", "dataset")


class Config:
    """A loaded config: the dict, where it came from, and the line of each key path (for messages)."""

    def __init__(self, data: dict, source: str | None = None, lines: dict | None = None,
                 base_dir: Path | None = None):
        self.data = data
        self.source = source
        self.lines = lines or {}
        self.base_dir = base_dir
        self.overridden: set[tuple] = set()  # key paths set with --set

    def error(self, path: str, message: str) -> VkError:
        return VkError(self.where(path) + message)

    def where(self, path: str) -> str:
        """``FILE:LINE: path: `` for a key path like ``a.b[0].c`` (the nearest known line)."""
        if not path:
            return f"{self.source}: " if self.source else ""
        parts = split_path(path)
        for k in range(len(parts), 0, -1):
            if tuple(parts[:k]) in self.overridden:
                return f"--set {path}: "
        line = None
        while parts:
            line = self.lines.get(tuple(parts))
            if line is not None:
                break
            parts = parts[:-1]
        if self.source and line is not None:
            return f"{self.source}:{line}: {path}: "
        if self.source:
            return f"{self.source}: {path}: "
        return f"{path}: "

    def reraise(self, e: ConfigError):
        """Re-raise a ConfigError ('path: message') with the file and line in front."""
        msg = str(e)
        m = re.match(r"^([A-Za-z0-9_\.\[\]]+): (.*)$", msg, re.S)
        if m:
            raise VkError(self.where(m.group(1)) + m.group(2)) from None
        raise VkError((f"{self.source}: " if self.source else "") + msg) from None


def split_path(path: str) -> list:
    """``a.b[0].c`` or ``a.b.0.c`` -> ``['a', 'b', 0, 'c']``."""
    out: list = []
    for seg in path.replace("[", ".").replace("]", "").split("."):
        if seg == "":
            continue
        out.append(int(seg) if seg.isdigit() else seg)
    return out


# Bounds on what a config may ask for (man vk-gen: LIMITS). A small file must not make vk-gen use unbounded memory.
MAX_NODES = 100_000  # values in the config once YAML aliases are expanded (a "billion laughs" file has 10^9)
MAX_SEED = 2**64 - 1


def _expanded_size(node, memo: dict) -> int:
    """How many nodes the YAML tree holds once its aliases are expanded (each shared node counted per use)."""
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = 1  # a node that refers to itself counts once (safe_load refuses real recursion anyway)
    n = 1
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            n += _expanded_size(k, memo) + _expanded_size(v, memo)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            n += _expanded_size(item, memo)
    memo[key] = n
    return n


def check_bounds(cfg: Config) -> None:
    """Refuse non-finite numbers anywhere, lengths above MAX_LENGTH tokens, and seeds outside 0..2**64-1."""

    def walk(x, path: list, in_length: bool) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, path + [str(k)], in_length or "length" in str(k).lower())
        elif isinstance(x, list):
            for i, v in enumerate(x):
                walk(v, path + [str(i)], in_length)
        elif isinstance(x, float) and x != x or isinstance(x, float) and x in (float("inf"), float("-inf")):
            raise cfg.error(".".join(path), f"{x} is not a finite number")
        elif isinstance(x, (int, float)) and not isinstance(x, bool) and in_length and abs(x) > MAX_LENGTH:
            raise cfg.error(".".join(path), f"{x:g} tokens is above the ceiling of {MAX_LENGTH:,} tokens per length")

    walk(cfg.data, [], False)
    seed = cfg.data.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool) and not 0 <= seed <= MAX_SEED:
        raise cfg.error("seed", f"expected an integer from 0 to 2**64-1, got {seed}")


def _line_map(node, path: tuple, out: dict) -> None:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = k.value
            p = path + (key,)
            out[p] = k.start_mark.line + 1
            _line_map(v, p, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            p = path + (i,)
            out[p] = item.start_mark.line + 1
            _line_map(item, p, out)


def load_config(config: Any = None) -> Config:
    """A Config from a dict, a YAML path, or None (the default workload)."""
    if config is None:
        return Config({})
    if isinstance(config, Config):
        return config
    if isinstance(config, dict):
        return Config(copy.deepcopy(config))
    path = Path(config)
    try:
        if str(config) == "-":  # the config from stdin: `envsubst < w.yaml | vk-gen -`
            path = Path("<stdin>")
            text = sys.stdin.buffer.read().decode("utf-8")
        else:
            text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise VkError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise VkError(f"{path}: is a directory, expected a YAML config") from None
    except OSError as e:
        raise VkError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise VkError(f"{path}: not UTF-8 text") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise VkError(f"{path}{line}: not valid YAML ({problem})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise VkError(f"{path}: expected a mapping of settings at the top, got {type(data).__name__}")
    if node is not None and _expanded_size(node, {}) > MAX_NODES:
        raise VkError(f"{path}: the config expands to more than {MAX_NODES:,} values through YAML aliases "
                      "(anchors used over and over): refused")
    lines: dict = {}
    if node is not None:
        _line_map(node, (), lines)
    return Config(data, str(path), lines, path.resolve().parent)


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=VALUE"`` -> ``("a.b", value)``; the value is read as YAML (numbers, booleans, lists, mappings)."""
    if "=" not in text:
        raise VkError(f"--set {text!r}: expected KEY=VALUE, e.g. --set output.length.value=200")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key:
        raise VkError(f"--set {text!r}: the key is empty")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def expand_key(key: str) -> str:
    for short, full in sorted(ALIASES.items(), key=lambda kv: -len(kv[0])):
        if key == short or key.startswith(short + "."):
            return full + key[len(short):]
    first = split_path(key)[0]
    if first in SESSION_GENERATOR_KEYS and first not in TOP_KEYS:
        return "session_generator." + key
    return key


def apply_overrides(cfg: Config, overrides) -> None:
    """Apply ``--set`` strings (or (key, value) pairs) to the config in place."""
    for ov in overrides or ():
        key, value = parse_override(ov) if isinstance(ov, str) else ov
        full = expand_key(key)
        parts = split_path(full)
        node: Any = cfg.data
        for i, p in enumerate(parts[:-1]):
            nxt = parts[i + 1]
            default = DEFAULTS.get(tuple(parts[: i + 1]))
            if isinstance(p, int):
                if not isinstance(node, list):
                    raise VkError(f"--set {key}: {'.'.join(map(str, parts[:i]))} is not a list")
                if p > len(node):
                    raise VkError(f"--set {key}: index {p} is past the end of the list ({len(node)} items)")
                if p == len(node):
                    node.append(copy.deepcopy(default) if default is not None else {})
                node = node[p]
            else:
                if not isinstance(node, dict):
                    raise VkError(f"--set {key}: {'.'.join(map(str, parts[:i]))} is not a mapping")
                if isinstance(node.get(p), str) and not isinstance(nxt, int):
                    node[p] = {"type": node[p]}  # graph=linear, then graph.num_request_generator=...
                if node.get(p) is None:
                    if default is not None:
                        node[p] = copy.deepcopy(default)
                    else:
                        node[p] = [] if isinstance(nxt, int) else {}
                node = node[p]
            cfg.lines.pop(tuple(parts[: i + 1]), None)
        last = parts[-1]
        if isinstance(last, int):
            if not isinstance(node, list) or last > len(node):
                raise VkError(f"--set {key}: no list item {last} to set")
            if last == len(node):
                node.append(value)
            else:
                node[last] = value
        else:
            if not isinstance(node, dict):
                raise VkError(f"--set {key}: the parent is not a mapping")
            node[last] = value
        # a value set on the command line has no line in the file
        cfg.overridden.add(tuple(parts))
        for k in [k for k in cfg.lines if k[: len(parts)] == tuple(parts)]:
            cfg.lines.pop(k, None)
    check_bounds(cfg)
