"""Anthropic Messages (``POST /v1/messages``): typed SSE events (message_start, content_block_start/delta/stop,
message_delta with the stop reason and usage, message_stop); thinking blocks for --reasoning-tokens."""

from __future__ import annotations

from vk.serve.apis.base import LENGTH_EXTRAS, load_object, positive_int, text_of
from vk.serve.apis.base import Protocol as _Base
from vk.serve.connection import HTTPError

STOP = {"stop": "end_turn", "length": "max_tokens"}


class Protocol(_Base):
    name = "anthropic"

    def match(self, method: str, path: str) -> bool:
        return path == "/v1/messages"

    def request(self, method: str, target: str, headers: dict, body: bytes) -> dict:
        req = load_object(body)
        max_tokens = positive_int(req.get("max_tokens"), "max_tokens")
        if max_tokens is None:
            raise HTTPError(400, "max_tokens: Field required", param="max_tokens")
        msgs = req.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise HTTPError(400, "messages: expected a non-empty list", param="messages")
        out = []
        system = req.get("system")
        if system is not None:
            out.append({"role": "system", "content": text_of(system, "system")})
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
                raise HTTPError(400, f"messages.{i}.role: expected user or assistant", param="messages")
            out.append({"role": m["role"], "content": text_of(m.get("content"), f"messages.{i}.content")})
        oa = {"model": req.get("model"), "messages": out, "max_tokens": max_tokens, "stream": bool(req.get("stream")),
              **{k: req[k] for k in LENGTH_EXTRAS if k in req}}
        if oa["stream"]:
            oa["stream_options"] = {"include_usage": True}
        return oa

    def whole(self, sink, seq, text: str, thinking: str) -> dict:
        content = [{"type": "thinking", "thinking": thinking, "signature": "vk-sim"}] if thinking else []
        content.append({"type": "text", "text": text})
        return {"id": "msg_" + sink.rid.split("-", 1)[-1], "type": "message", "role": "assistant",
                "model": sink.req.get("model") or self.app.opts.model, "content": content,
                "stop_reason": STOP.get(seq.finish_reason, seq.finish_reason), "stop_sequence": None,
                "usage": self._usage(sink, seq, True)}

    def _usage(self, sink, seq, final: bool) -> dict:
        p, c, cached, _ = sink.counts(seq)
        return {"input_tokens": p - cached, "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached,
                "output_tokens": c if final else 0}

    def begin(self, sink, seq) -> list:
        model = sink.req.get("model") or self.app.opts.model
        block = {"type": "thinking", "thinking": "", "signature": ""} if sink.n_reasoning else \
            {"type": "text", "text": ""}
        return [
            ("message_start", {"type": "message_start", "message": {
                "id": "msg_" + sink.rid.split("-", 1)[-1], "type": "message", "role": "assistant", "model": model,
                "content": [], "stop_reason": None, "stop_sequence": None, "usage": self._usage(sink, seq, False)}}),
            ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block}),
        ]

    def token(self, sink, seq, n: int, text: str, reasoning: bool) -> list:
        if reasoning:
            return [("content_block_delta", {"type": "content_block_delta", "index": 0,
                                             "delta": {"type": "thinking_delta", "thinking": text}})]
        events = []
        index = 1 if sink.n_reasoning else 0
        if sink.n_reasoning and n == sink.n_reasoning + 1:  # the thinking block ends, the text block starts
            events += [("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                "delta": {"type": "signature_delta", "signature": "vk-sim"}}),
                       ("content_block_stop", {"type": "content_block_stop", "index": 0}),
                       ("content_block_start", {"type": "content_block_start", "index": 1,
                                                "content_block": {"type": "text", "text": ""}})]
        events.append(("content_block_delta", {"type": "content_block_delta", "index": index,
                                               "delta": {"type": "text_delta", "text": text}}))
        return events

    def end(self, sink, seq) -> list:
        last = 1 if sink.n_reasoning and seq.n_out > sink.n_reasoning else 0
        return [
            ("content_block_stop", {"type": "content_block_stop", "index": last}),
            ("message_delta", {"type": "message_delta",
                               "delta": {"stop_reason": STOP.get(seq.finish_reason, seq.finish_reason),
                                         "stop_sequence": None},
                               "usage": self._usage(sink, seq, True)}),
            ("message_stop", {"type": "message_stop"}),
        ]
