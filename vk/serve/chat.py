"""How vk-serve turns chat messages into prompt text: the tokenizer's chat template, as a real server applies it."""

from __future__ import annotations


def chat_renderer(tok):
    """``render(messages, add_generation_prompt) -> text`` for the tokenizer ``tok``."""
    if tok.has_chat_template:
        return lambda messages, agp: tok.apply_chat_template(messages, add_generation_prompt=agp)

    def fallback(messages, agp):
        return "".join(f"{m['role']}: {m.get('content') or ''}\n" for m in messages) + ("assistant: " if agp else "")

    return fallback
