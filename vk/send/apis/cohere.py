"""Cohere v2: ``POST {api}/v2/chat`` with ``Authorization: Bearer`` and ``stream: true``; SSE with typed events
(message-start, content-delta, tool-call-*, message-end with the finish reason and usage)."""

from __future__ import annotations

from vk.send.apis.base import Acc, counts, join_query, output_target, text_of
from vk.send.apis.base import Adapter as _Base


class Adapter(_Base):
    name = "cohere"
    exact_length = False  # max_tokens only
    streams_only = False
    env_keys = ("CO_API_KEY", "COHERE_API_KEY")

    @classmethod
    def request_path(cls, base: str, query: str, model, endpoint: str, stream: bool = True) -> str:
        return join_query((base if base.endswith("/v2") else base + "/v2") + "/chat", query)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.cfg.api_key}"} if self.cfg.api_key else {}

    def body(self, r: dict, content) -> bytes:
        body = {"model": self.cfg.model, "stream": bool(self.cfg.stream),
                "messages": [{"role": m.get("role"), "content": text_of(m.get("content"))} for m in content]}
        target = output_target(r)
        if target is not None:
            body["max_tokens"] = target
        return self.merge_extras(body, r)

    def whole(self, obj: dict, acc: Acc) -> str | None:
        acc.server_id = obj.get("id")
        kinds = set()
        msg = obj.get("message") or {}
        for c in msg.get("content") or []:
            if isinstance(c, dict) and c.get("text"):
                acc.text.append(c["text"])
                kinds.add("c")
            elif isinstance(c, dict) and c.get("thinking"):
                kinds.add("r")
        if msg.get("tool_calls"):
            kinds.add("t")
        self.event({"type": "message-end", "delta": obj}, acc)  # finish_reason and usage, as message-end has them
        acc.done = False
        return next((k for k in "crt" if k in kinds), "e")

    def event(self, obj: dict, acc: Acc) -> str | None:
        typ = obj.get("type")
        if typ == "content-delta":
            c = ((obj.get("delta") or {}).get("message") or {}).get("content") or {}
            txt = c.get("text")
            if txt:
                acc.text.append(txt)
                return "c"
            return "r" if c.get("thinking") else "e"
        if typ in ("tool-call-start", "tool-call-delta"):
            return "t"
        if typ == "tool-plan-delta":
            return "r"
        if typ == "message-start":
            acc.server_id = obj.get("id")
            return "e"
        if typ == "message-end":
            d = obj.get("delta") or {}
            if d.get("finish_reason"):
                acc.finish = d["finish_reason"]
            if d.get("error"):
                acc.error = f"server error in stream: {str(d['error'])[:300]}"
            u = d.get("usage") or {}
            tok = u.get("tokens") or u.get("billed_units") or {}
            acc.usage = counts(tok.get("input_tokens"), tok.get("output_tokens"), u.get("cached_tokens"), None)
            acc.done = True
            return "u"
        return "e"
