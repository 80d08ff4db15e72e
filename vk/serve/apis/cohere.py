"""Cohere v2 chat (``POST /v2/chat``, ``stream: true``): typed SSE events (message-start, content-start,
content-delta, content-end, message-end with the finish reason and usage)."""

from __future__ import annotations

from vk.serve.apis.base import LENGTH_EXTRAS, load_object, positive_int, text_of
from vk.serve.apis.base import Protocol as _Base
from vk.serve.connection import HTTPError

FINISH = {"stop": "COMPLETE", "length": "MAX_TOKENS"}


class Protocol(_Base):
    name = "cohere"

    def match(self, method: str, path: str) -> bool:
        return path == "/v2/chat"

    def request(self, method: str, target: str, headers: dict, body: bytes) -> dict:
        req = load_object(body)
        msgs = req.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise HTTPError(400, "messages: expected a non-empty list", param="messages")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise HTTPError(400, f"messages[{i}].role: expected system, user or assistant", param="messages")
            out.append({"role": m["role"], "content": text_of(m.get("content"), f"messages[{i}].content")})
        oa = {"model": req.get("model"), "messages": out, "stream": bool(req.get("stream")),
              "max_tokens": positive_int(req.get("max_tokens"), "max_tokens"),
              **{k: req[k] for k in LENGTH_EXTRAS if k in req}}
        if oa["max_tokens"] is None:
            del oa["max_tokens"]
        if oa["stream"]:
            oa["stream_options"] = {"include_usage": True}
        return oa

    def _usage(self, sink, seq) -> dict:
        p, c, cached, _ = sink.counts(seq)
        return {"billed_units": {"input_tokens": p, "output_tokens": c}, "tokens": {"input_tokens": p,
                "output_tokens": c}, "cached_tokens": cached}

    def whole(self, sink, seq, text: str, thinking: str) -> dict:
        content = [{"type": "thinking", "thinking": thinking}] if thinking else []
        content.append({"type": "text", "text": text})
        return {"id": sink.rid.split("-", 1)[-1], "finish_reason": FINISH.get(seq.finish_reason, seq.finish_reason),
                "message": {"role": "assistant", "content": content}, "usage": self._usage(sink, seq)}

    def begin(self, sink, seq) -> list:
        return [("message-start", {"id": sink.rid.split("-", 1)[-1], "type": "message-start", "delta": {
            "message": {"role": "assistant", "content": [], "tool_plan": "", "tool_calls": [], "citations": []}}})]

    def token(self, sink, seq, n: int, text: str, reasoning: bool) -> list:
        kind = "thinking" if reasoning else "text"
        events = []
        first_text = n == sink.n_reasoning + 1
        if n == 1 or first_text:
            index = 1 if first_text and sink.n_reasoning else 0
            if first_text and sink.n_reasoning:
                events.append(("content-end", {"type": "content-end", "index": 0}))
            events.append(("content-start", {"type": "content-start", "index": index, "delta": {
                "message": {"content": {"type": kind, kind: ""}}}}))
        index = 1 if sink.n_reasoning and not reasoning else 0
        events.append(("content-delta", {"type": "content-delta", "index": index, "delta": {
            "message": {"content": {kind: text}}}}))
        return events

    def end(self, sink, seq) -> list:
        index = 1 if sink.n_reasoning and seq.n_out > sink.n_reasoning else 0
        return [
            ("content-end", {"type": "content-end", "index": index}),
            ("message-end", {"type": "message-end", "delta": {
                "finish_reason": FINISH.get(seq.finish_reason, seq.finish_reason),
                "usage": self._usage(sink, seq)}}),
        ]
