"""OCI Generative AI chat (``POST /20231130/actions/chat``, a GENERIC chat request with ``isStream``): SSE events
with a message delta each, the finish reason on the last, then the usage (``streamOptions.isIncludeUsage``).
Signatures are not checked (the request must carry one: an ``authorization`` header with a keyId)."""

from __future__ import annotations

import orjson

from vk.serve.apis.base import LENGTH_EXTRAS, load_object, positive_int, text_of
from vk.serve.apis.base import Protocol as _Base
from vk.serve.connection import HTTPError

ROLES = {"SYSTEM": "system", "USER": "user", "ASSISTANT": "assistant"}


class Protocol(_Base):
    name = "oci"
    media_type = b"text/event-stream"  # exactly: the oci SDK compares the whole header value

    def match(self, method: str, path: str) -> bool:
        return path == "/20231130/actions/chat"

    def request(self, method: str, target: str, headers: dict, body: bytes) -> dict:
        if 'keyId="' not in headers.get("authorization", ""):
            raise HTTPError(401, "The required information to complete authentication was not provided.",
                            "NotAuthenticated")
        req = load_object(body)
        mode = req.get("servingMode") or {}
        chat = req.get("chatRequest") or {}
        if not req.get("compartmentId"):
            raise HTTPError(400, "compartmentId: required", param="compartmentId")
        if chat.get("apiFormat") != "GENERIC":
            raise HTTPError(400, "vk-serve --api-style oci: chatRequest.apiFormat GENERIC only", param="apiFormat")
        if not chat.get("isStream"):
            raise HTTPError(400, "vk-serve --api-style oci answers streamed requests only (isStream)")
        msgs = chat.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise HTTPError(400, "chatRequest.messages: expected a non-empty list", param="messages")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise HTTPError(400, f"messages[{i}].role: expected SYSTEM, USER or ASSISTANT", param="messages")
            out.append({"role": ROLES[m["role"]], "content": text_of(m.get("content"), f"messages[{i}].content")})
        oa = {"model": mode.get("modelId"), "messages": out, "stream": True,
              "stream_options": {"include_usage": bool((chat.get("streamOptions") or {}).get("isIncludeUsage"))},
              **{k: chat[k] for k in LENGTH_EXTRAS if k in chat}}
        mt = positive_int(chat.get("maxTokens"), "maxTokens")
        if mt is not None:
            oa["max_tokens"] = mt
        return oa

    def frame(self, name: str, obj: dict) -> bytes:
        return b"data: %s\n\n" % orjson.dumps(obj)

    def token(self, sink, seq, n: int, text: str, reasoning: bool) -> list:
        msg = {"role": "ASSISTANT"}
        if reasoning:
            msg["reasoningContent"] = text
        else:
            msg["content"] = [{"type": "TEXT", "text": text}]
        ev = {"index": 0, "message": msg}
        if n == seq.out_target:
            ev["finishReason"] = seq.finish_reason
        return [("", ev)]

    def end(self, sink, seq) -> list:
        if not sink.req.get("stream_options", {}).get("include_usage"):
            return []
        p, c, cached, r = sink.counts(seq)
        usage = {"promptTokens": p, "completionTokens": c, "totalTokens": p + c,
                 "promptTokensDetails": {"cachedTokens": cached}}
        if r:
            usage["completionTokensDetails"] = {"reasoningTokens": r}
        return [("", {"usage": usage})]
