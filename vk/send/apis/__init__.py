"""vk-send's API styles (``--api-style``): one small adapter per provider API, each with one job.

An adapter builds the HTTP request for a request record (path, headers, per-request signature, body) and maps
the decoded events of the answer to vk's events (content, reasoning, tool calls, usage, finish reason). Reading
the socket, timing, content encodings and the stream framing (SSE in ``vk.send.sse``, the AWS event-stream in
``vk.send.apis.eventstream``) live once, shared by every style, so that every metric means the same thing
whatever the API: an event's time is the receive time of the read that completed its frame.
"""

from __future__ import annotations

import importlib

from vk.errors import VkError
from vk.records import API_STYLES

STYLES = API_STYLES


def adapter_class(style: str, endpoint: str = "chat"):
    """The adapter class of ``style`` (a one-line error for an unknown one); a style with more than one
    operation names the others in ``ENDPOINTS`` (Bedrock's ``invoke``)."""
    if style not in STYLES:
        raise VkError(f"--api-style: expected one of {', '.join(STYLES)}, got {style!r}")
    module = importlib.import_module(f"vk.send.apis.{style}")
    return getattr(module, "ENDPOINTS", {}).get(endpoint, module.Adapter)


def adapter_for(cfg):
    """The adapter for a worker's ``Config`` (credentials are loaded here, in the process that signs)."""
    return adapter_class(getattr(cfg, "api_style", "openai"), getattr(cfg, "endpoint", "chat"))(cfg)
