"""Google Gemini ``streamGenerateContent`` (Vertex AI ``.../publishers/google/models/M:streamGenerateContent`` and
the Gemini API ``/v1beta/models/M:streamGenerateContent``), with ``?alt=sse``: each SSE event is a
GenerateContentResponse carrying the cumulative usageMetadata."""

from __future__ import annotations

import re
import urllib.parse

import orjson

from vk.serve.apis.base import LENGTH_EXTRAS, load_object, positive_int, text_of
from vk.serve.apis.base import Protocol as _Base
from vk.serve.connection import HTTPError

_ROUTE = re.compile(r"/models/([^/:]+):(streamGenerateContent|generateContent)$")
FINISH = {"stop": "STOP", "length": "MAX_TOKENS"}
JSON_ARRAY = "vk_json_array"  # marks a request without alt=sse: its answer is a streamed JSON array


class Protocol(_Base):
    name = "vertex"

    def match(self, method: str, path: str) -> bool:
        return _ROUTE.search(path) is not None

    def request(self, method: str, target: str, headers: dict, body: bytes) -> dict:
        path, _, query = target.partition("?")
        sse = "alt=sse" in query.split("&")  # else the streamed JSON array, as Google answers without alt=sse
        m = _ROUTE.search(path)
        model = urllib.parse.unquote(m.group(1))
        stream = m.group(2) == "streamGenerateContent"
        req = load_object(body)
        contents = req.get("contents")
        if not isinstance(contents, list) or not contents:
            raise HTTPError(400, "contents: expected a non-empty list", param="contents")
        out = []
        si = req.get("systemInstruction") or req.get("system_instruction")
        if si is not None:
            out.append({"role": "system", "content": text_of((si or {}).get("parts"), "systemInstruction.parts")})
        for i, c in enumerate(contents):
            if not isinstance(c, dict):
                raise HTTPError(400, f"contents[{i}]: expected an object", param="contents")
            role = "assistant" if c.get("role") == "model" else "user"
            out.append({"role": role, "content": text_of(c.get("parts"), f"contents[{i}].parts")})
        gc = req.get("generationConfig") or req.get("generation_config") or {}
        oa = {"model": model, "messages": out, "stream": stream, JSON_ARRAY: not sse,
              **{k: gc[k] for k in LENGTH_EXTRAS if k in gc}}
        mt = positive_int(gc.get("maxOutputTokens", gc.get("max_output_tokens")), "maxOutputTokens")
        if mt is not None:
            oa["max_tokens"] = mt
        if stream:
            oa["stream_options"] = {"include_usage": True}
        return oa

    def frame(self, name: str, obj: dict) -> bytes:
        return b"data: %s\r\n\r\n" % orjson.dumps(obj)

    def frame_for(self, sink, name: str, obj: dict) -> bytes:
        if not sink.req.get(JSON_ARRAY):
            return self.frame(name, obj)
        first = not sink.state.get("opened")
        sink.state["opened"] = True
        return (b"[" if first else b",\r\n") + orjson.dumps(obj)

    def tail(self, sink) -> bytes:
        return b"]" if sink.req.get(JSON_ARRAY) else b""

    def content_type(self, sink) -> bytes:
        return b"application/json; charset=UTF-8" if sink.req.get(JSON_ARRAY) else self.media_type

    def _response(self, sink, seq, parts: list, finish: str | None) -> dict:
        p, c, cached, r = sink.counts(seq)
        cand: dict = {"content": {"role": "model", "parts": parts}, "index": 0}
        if finish:
            cand["finishReason"] = finish
        usage = {"promptTokenCount": p, "candidatesTokenCount": c - r, "totalTokenCount": p + c}
        if cached:
            usage["cachedContentTokenCount"] = cached
        if r:
            usage["thoughtsTokenCount"] = r
        return {"candidates": [cand], "usageMetadata": usage, "modelVersion": self.app.opts.model,
                "responseId": sink.rid.split("-", 1)[-1]}

    def whole(self, sink, seq, text: str, thinking: str) -> dict:
        parts = [{"text": thinking, "thought": True}] if thinking else []
        parts.append({"text": text})
        return self._response(sink, seq, parts, FINISH.get(seq.finish_reason, seq.finish_reason))

    def token(self, sink, seq, n: int, text: str, reasoning: bool) -> list:
        part = {"text": text, "thought": True} if reasoning else {"text": text}
        finish = None
        if n == seq.out_target and seq.prompt_len >= 0:  # else the usage waits for the prompt count (end())
            finish = FINISH.get(seq.finish_reason, seq.finish_reason)
            sink.state["finish_sent"] = True
        return [("", self._response(sink, seq, [part], finish))]

    def end(self, sink, seq) -> list:
        if sink.state.get("finish_sent"):
            return []  # the last token's event carried the finish reason and the usage
        return [("", self._response(sink, seq, [{"text": ""}], FINISH.get(seq.finish_reason, seq.finish_reason)))]
