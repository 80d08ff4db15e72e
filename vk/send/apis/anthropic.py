"""Anthropic Messages: ``POST {api}/v1/messages`` with ``x-api-key`` and ``anthropic-version``; SSE with typed
events (message_start with the input usage, content_block_delta with text, thinking and tool-input deltas,
message_delta with the stop reason and output usage, message_stop)."""

from __future__ import annotations

from vk.send.apis.base import Acc, counts, join_query, output_target, split_system, text_of
from vk.send.apis.base import Adapter as _Base

VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096  # max_tokens is required; a request without an output target gets this


class Adapter(_Base):
    name = "anthropic"
    exact_length = False  # max_tokens only
    streams_only = False
    env_keys = ("ANTHROPIC_API_KEY",)

    @classmethod
    def request_path(cls, base: str, query: str, model, endpoint: str, stream: bool = True) -> str:
        return join_query((base if base.endswith("/v1") else base + "/v1") + "/messages", query)

    def headers(self) -> dict[str, str]:
        h = {"anthropic-version": VERSION}
        if self.cfg.api_key:
            h["x-api-key"] = self.cfg.api_key
        return h

    def body(self, r: dict, content) -> bytes:
        system, rest = split_system(content)
        body = {"model": self.cfg.model, "max_tokens": output_target(r) or DEFAULT_MAX_TOKENS,
                "messages": [{"role": m.get("role"), "content": text_of(m.get("content"))} for m in rest],
                "stream": bool(self.cfg.stream)}
        if system is not None:
            body["system"] = system
        return self.merge_extras(body, r)

    def event(self, obj: dict, acc: Acc) -> str | None:
        typ = obj.get("type")
        if typ == "content_block_delta":
            d = obj.get("delta") or {}
            dt = d.get("type")
            if dt == "text_delta":
                txt = d.get("text")
                if txt:
                    acc.text.append(txt)
                    return "c"
                return "e"
            if dt == "thinking_delta":
                if txt := d.get("thinking"):
                    acc.reasoning.append(str(txt))
                return "r"
            if dt == "input_json_delta":
                return "t"
            return "e"  # signature_delta and the like
        if typ == "message_start":
            msg = obj.get("message") or {}
            acc.server_id = msg.get("id")
            self._usage(msg.get("usage"), acc)
            return "e"
        if typ == "message_delta":
            fr = (obj.get("delta") or {}).get("stop_reason")
            if fr:
                acc.finish = fr
            self._usage(obj.get("usage"), acc)
            return "u"
        if typ == "content_block_start":
            block = obj.get("content_block") or {}
            return "t" if block.get("type") == "tool_use" else "e"
        if typ == "message_stop":
            acc.done = True
            return "e"
        if typ == "error":
            err = obj.get("error") or {}
            acc.error = f"server error in stream: {str(err.get('message') if isinstance(err, dict) else err)[:300]}"
            return None
        if typ == "ping":
            return None
        return "e"

    def whole(self, obj: dict, acc: Acc) -> str | None:
        if obj.get("type") == "error":
            return self.event(obj, acc)
        acc.server_id = obj.get("id")
        acc.finish = obj.get("stop_reason")
        self._usage(obj.get("usage"), acc)
        kinds = set()
        for block in obj.get("content") or []:
            if not isinstance(block, dict):
                continue
            if block.get("type") == "text" and block.get("text"):
                acc.text.append(block["text"])
                kinds.add("c")
            elif block.get("type") == "thinking":
                kinds.add("r")
            elif block.get("type") == "tool_use":
                kinds.add("t")
        return next((k for k in "crt" if k in kinds), "e")

    @staticmethod
    def _usage(u, acc: Acc) -> None:
        """Anthropic counts cache reads and writes apart from input_tokens; vk's prompt_tokens is all of them."""
        if not isinstance(u, dict):
            return
        old = acc.usage or {}
        inp = u.get("input_tokens")
        read = u.get("cache_read_input_tokens")
        write = u.get("cache_creation_input_tokens")
        prompt = old.get("prompt_tokens")
        if isinstance(inp, int):
            prompt = inp + (read if isinstance(read, int) else 0) + (write if isinstance(write, int) else 0)
        cached = read if isinstance(read, int) else old.get("cached_tokens")
        out = u.get("output_tokens", old.get("completion_tokens"))
        acc.usage = counts(prompt, out, cached, None)
