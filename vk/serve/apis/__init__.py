"""vk-serve's API styles (``--api-style``): each module parses one provider's request into the OpenAI-shaped
request the engine model serves, and renders the engine's tokens as that provider's stream, so that vk-send's
adapters (and the providers' own SDKs) can be tested offline against the same engine model."""

from __future__ import annotations

import importlib

from vk.records import API_STYLES

STYLE_MARK = "vk_api_style"  # set in the OpenAI-shaped request of a style's route: its answer is in that style
STYLES = API_STYLES


def protocol_for(style: str, app):
    """The protocol object of ``style`` for ``app`` (None for openai: the app's own routes)."""
    if style == "openai":
        return None
    if style not in STYLES:
        raise ValueError(f"--api-style: expected one of {', '.join(STYLES)}, got {style!r}")
    return importlib.import_module(f"vk.serve.apis.{style}").Protocol(app)
