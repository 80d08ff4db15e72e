"""How vk-serve turns chat messages into prompt text: the tokenizer's chat template, as a real server applies it.

vLLM renders the template with transformers' renderer (the special tokens as variables) and encodes the text
without adding special tokens (the template has them); vk-serve does the same, with the template found where
transformers looks for it (``chat_template.jinja`` next to ``tokenizer_config.json``, ``chat_template.json``, or
``tokenizer_config.json``'s ``chat_template``), by :mod:`vk.tokenizer`.
"""

from __future__ import annotations

from vk.serve.connection import HTTPError
from vk.tokenizer import _compile_template


def chat_renderer(tok):
    """``render(messages, add_generation_prompt) -> text`` for the tokenizer ``tok``: its chat template, or, for a
    tokenizer without one, ``role: content`` lines (a real server would refuse chat requests; see
    :func:`no_template_note`)."""
    if tok.has_chat_template:
        # The jinja environment transformers renders in (sandboxed, trim_blocks, lstrip_blocks, loopcontrols, its
        # tojson, raise_exception, strftime_now), compiled once, with the special tokens as variables: the text
        # Tokenizer.render_chat gives, without importing transformers (over a second per process at start-up).
        template = _compile_template(tok.chat_template)
        variables = tok.template_kwargs()

        def render(messages, agp):
            try:
                return template.render(messages=messages, add_generation_prompt=agp, **variables)
            except Exception as e:  # noqa: BLE001 - the template refused the messages: the client's bad request
                raise HTTPError(400, f"chat template: {type(e).__name__}: {e}", param="messages") from None

        return render

    def fallback(messages, agp):
        return "".join(f"{m['role']}: {m.get('content') or ''}\n" for m in messages) + ("assistant: " if agp else "")

    return fallback


def no_template_note(tok) -> str | None:
    """The start-up line for a tokenizer without a chat template, or None."""
    if tok.has_chat_template:
        return None
    return (f"vk-serve: tokenizer '{tok.name}' has no chat template (no chat_template.jinja, chat_template.json or "
            "tokenizer_config.json chat_template): chat prompts are counted as 'role: content' lines, not as a "
            "server with a template would count them")
