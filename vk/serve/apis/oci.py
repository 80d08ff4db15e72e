"""OCI Generative AI chat (``POST /20231130/actions/chat``, a GENERIC chat request with ``isStream``): SSE events
with a message delta each, the finish reason on the last, then the usage (``streamOptions.isIncludeUsage``).

Signatures: the request must carry one (an ``authorization`` header with a keyId). When vk-serve's environment
names an OCI config ($OCI_CONFIG_FILE, profile $OCI_CLI_PROFILE) whose API key it can read, every signature is
checked against that key's public half (RSA-SHA256 over the signed headers, as OCI's HTTP signatures are), and
the body against ``x-content-sha256``: 401 when they do not hold."""

from __future__ import annotations

import base64
import hashlib
import os
import re

import orjson

from vk.serve.apis.base import LENGTH_EXTRAS, load_object, positive_int, text_of
from vk.serve.apis.base import Protocol as _Base
from vk.serve.connection import HTTPError

ROLES = {"SYSTEM": "system", "USER": "user", "ASSISTANT": "assistant"}


_SIG_FIELD = re.compile(r'(\w+)="([^"]*)"')


def _verifier():
    """(keyId, public key) of the API key in $OCI_CONFIG_FILE, or None (signatures then only need to exist)."""
    path = os.environ.get("OCI_CONFIG_FILE")
    if not path:
        return None
    try:
        import oci
        from cryptography.hazmat.primitives.serialization import load_pem_private_key
    except ImportError:
        return None
    conf = oci.config.from_file(path, os.environ.get("OCI_CLI_PROFILE", "DEFAULT"))
    with open(os.path.expanduser(conf["key_file"]), "rb") as f:
        key = load_pem_private_key(f.read(), (conf.get("pass_phrase") or "").encode() or None)
    return f"{conf['tenancy']}/{conf['user']}/{conf['fingerprint']}", key.public_key()


def verify_signature(verifier, method: str, target: str, headers: dict, body: bytes) -> None:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    key_id, public = verifier
    auth = headers.get("authorization", "")
    fields = dict(_SIG_FIELD.findall(auth))
    if not auth.startswith("Signature ") or fields.get("keyId") != key_id or fields.get("algorithm") != "rsa-sha256":
        raise HTTPError(401, "The required information to complete authentication was not provided or was "
                             "incorrect.", "NotAuthenticated")
    names = fields.get("headers", "date").split()
    lines = []
    for n in names:
        if n == "(request-target)":
            lines.append(f"(request-target): {method.lower()} {target}")
        elif n in headers:
            lines.append(f"{n}: {headers[n]}")
        else:
            raise HTTPError(401, f"signed header {n!r} is missing", "NotAuthenticated")
    digest = base64.b64encode(hashlib.sha256(body).digest()).decode()
    if "x-content-sha256" in names and headers.get("x-content-sha256") != digest:
        raise HTTPError(401, "x-content-sha256 does not match the body", "NotAuthenticated")
    try:
        public.verify(base64.b64decode(fields.get("signature", "")), "\n".join(lines).encode(),
                      padding.PKCS1v15(), hashes.SHA256())
    except (InvalidSignature, ValueError):
        raise HTTPError(401, "The required information to complete authentication was not provided or was "
                             "incorrect.", "NotAuthenticated") from None


class Protocol(_Base):
    name = "oci"
    media_type = b"text/event-stream"  # exactly: the oci SDK compares the whole header value

    def __init__(self, app):
        super().__init__(app)
        self.verifier = _verifier()

    def match(self, method: str, path: str) -> bool:
        return path == "/20231130/actions/chat"

    def request(self, method: str, target: str, headers: dict, body: bytes) -> dict:
        if 'keyId="' not in headers.get("authorization", ""):
            raise HTTPError(401, "The required information to complete authentication was not provided.",
                            "NotAuthenticated")
        if self.verifier is not None:
            verify_signature(self.verifier, method, target, headers, body)
        req = load_object(body)
        mode = req.get("servingMode") or {}
        chat = req.get("chatRequest") or {}
        if not req.get("compartmentId"):
            raise HTTPError(400, "compartmentId: required", param="compartmentId")
        if chat.get("apiFormat") != "GENERIC":
            raise HTTPError(400, "vk-serve --api-style oci: chatRequest.apiFormat GENERIC only", param="apiFormat")
        msgs = chat.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise HTTPError(400, "chatRequest.messages: expected a non-empty list", param="messages")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise HTTPError(400, f"messages[{i}].role: expected SYSTEM, USER or ASSISTANT", param="messages")
            out.append({"role": ROLES[m["role"]], "content": text_of(m.get("content"), f"messages[{i}].content")})
        oa = {"model": mode.get("modelId"), "messages": out, "stream": bool(chat.get("isStream")),
              **{k: chat[k] for k in LENGTH_EXTRAS if k in chat}}
        if oa["stream"]:
            oa["stream_options"] = {"include_usage": bool((chat.get("streamOptions") or {}).get("isIncludeUsage"))}
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

    def _usage(self, sink, seq) -> dict:
        p, c, cached, r = sink.counts(seq)
        usage = {"promptTokens": p, "completionTokens": c, "totalTokens": p + c,
                 "promptTokensDetails": {"cachedTokens": cached}}
        if r:
            usage["completionTokensDetails"] = {"reasoningTokens": r}
        return usage

    def whole(self, sink, seq, text: str, thinking: str) -> dict:
        msg = {"role": "ASSISTANT", "content": [{"type": "TEXT", "text": text}]}
        if thinking:
            msg["reasoningContent"] = thinking
        return {"modelId": sink.req.get("model"), "modelVersion": "1",
                "chatResponse": {"apiFormat": "GENERIC", "timeCreated": "2026-01-01T00:00:00.000Z",
                                 "choices": [{"index": 0, "message": msg, "finishReason": seq.finish_reason}],
                                 "usage": self._usage(sink, seq)}}

    def end(self, sink, seq) -> list:
        if not (sink.req.get("stream_options") or {}).get("include_usage"):
            return []
        return [("", {"usage": self._usage(sink, seq)})]
