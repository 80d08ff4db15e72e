"""AWS Bedrock ConverseStream (``POST /model/{modelId}/converse-stream``): the answer is the AWS event-stream
binary framing, one frame per event (messageStart, contentBlockDelta, contentBlockStop, messageStop, metadata).

Signatures: when botocore is installed and vk-serve's environment holds AWS credentials
($AWS_ACCESS_KEY_ID, $AWS_SECRET_ACCESS_KEY), every request's SigV4 signature is checked as AWS would (403
InvalidSignatureException when it does not verify), recomputed by botocore from the bytes received."""

from __future__ import annotations

import base64
import os
import re
import struct
import urllib.parse
import zlib

import orjson

from vk.serve.apis.base import LENGTH_EXTRAS, load_object, positive_int, text_of
from vk.serve.apis.base import Protocol as _Base
from vk.serve.connection import HTTPError

_ROUTE = re.compile(r"^/model/([^/]+)/(converse-stream|converse|invoke-with-response-stream)$")
INVOKE = "vk_bedrock_invoke"  # marks an InvokeModelWithResponseStream request: Anthropic events in chunk frames
_AUTH = re.compile(r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request,\s*"
                   r"SignedHeaders=([^,]+),\s*Signature=([0-9a-f]+)")
STOP = {"stop": "end_turn", "length": "max_tokens"}


def _string_header(name: str, value: str) -> bytes:
    n, v = name.encode(), value.encode()
    return struct.pack(">B", len(n)) + n + b"\x07" + struct.pack(">H", len(v)) + v


def encode_frame(headers: dict[str, str], payload: bytes) -> bytes:
    """One AWS event-stream frame with string headers."""
    hb = b"".join(_string_header(k, v) for k, v in headers.items())
    total = 16 + len(hb) + len(payload)
    prelude = struct.pack(">II", total, len(hb))
    head = prelude + struct.pack(">I", zlib.crc32(prelude)) + hb + payload
    return head + struct.pack(">I", zlib.crc32(head))


def event_frame(event_type: str, obj: dict) -> bytes:
    return encode_frame({":event-type": event_type, ":content-type": "application/json", ":message-type": "event"},
                        orjson.dumps(obj))


class SignatureError(HTTPError):
    def __init__(self, message: str):
        super().__init__(403, message, "InvalidSignatureException")


def _verifier():
    """(credentials, SigV4Auth, AWSRequest) when signatures are to be checked, else None."""
    if not (os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY")):
        return None
    try:
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials
    except ImportError:
        return None
    creds = Credentials(os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"],
                        os.environ.get("AWS_SESSION_TOKEN"))
    return creds, SigV4Auth, AWSRequest


def verify_sigv4(verifier, method: str, target: str, headers: dict, body: bytes) -> None:
    """Recompute the request's SigV4 signature with botocore from what was received; raises SignatureError."""
    creds, SigV4Auth, AWSRequest = verifier
    m = _AUTH.fullmatch(headers.get("authorization", "").strip())
    if m is None:
        raise SignatureError("Missing or malformed SigV4 Authorization header")
    akid, _date, region, service, signed, signature = m.groups()
    if akid != creds.access_key:
        raise SignatureError("The security token included in the request is invalid.")
    names = signed.split(";")
    if any(n not in headers for n in names):
        raise SignatureError("A signed header is missing from the request")
    req = AWSRequest(method=method, url=f"http://{headers.get('host', '')}{target}", data=body,
                     headers={n: headers[n] for n in names})
    req.context["timestamp"] = headers.get("x-amz-date", "")
    auth = SigV4Auth(creds, service, region)
    expected = auth.signature(auth.string_to_sign(req, auth.canonical_request(req)), req)
    if expected != signature:
        raise SignatureError("The request signature we calculated does not match the signature you provided.")


class Protocol(_Base):
    name = "bedrock"
    media_type = b"application/vnd.amazon.eventstream"

    def __init__(self, app):
        super().__init__(app)
        self.verifier = _verifier()
        from vk.serve.apis.anthropic import Protocol as Anthropic

        self.native = Anthropic(app)

    def match(self, method: str, path: str) -> bool:
        return _ROUTE.match(path) is not None

    def request(self, method: str, target: str, headers: dict, body: bytes) -> dict:
        if self.verifier is not None:
            verify_sigv4(self.verifier, method, target, headers, body)
        route = _ROUTE.match(target.partition("?")[0])
        model = urllib.parse.unquote(route.group(1))
        req = load_object(body)
        if route.group(2) == "invoke-with-response-stream":
            if req.get("anthropic_version") != "bedrock-2023-05-31":
                raise HTTPError(400, "anthropic_version: expected bedrock-2023-05-31 (vk-serve serves Anthropic's "
                                     "native body)", "ValidationException")
            oa = self.native.request(method, target, headers, orjson.dumps({**req, "model": model, "stream": True}))
            oa[INVOKE] = True
            return oa
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
        ic = req.get("inferenceConfig") or {}
        extra = req.get("additionalModelRequestFields") or {}
        oa = {"model": model, "messages": out, "stream": route.group(2) == "converse-stream",
              **{k: extra[k] for k in LENGTH_EXTRAS if k in extra}}
        if oa["stream"]:
            oa["stream_options"] = {"include_usage": True}
        mt = positive_int(ic.get("maxTokens"), "inferenceConfig.maxTokens")
        if mt is not None:
            oa["max_tokens"] = mt
        return oa

    def head_extra(self, sink) -> bytes:
        return b"x-amzn-requestid: %s\r\n" % sink.rid.split("-", 1)[-1].encode()

    def frame(self, name: str, obj: dict) -> bytes:
        if name.startswith("invoke:"):  # a native event: base64 in the bytes of a chunk frame
            ts = obj.pop("vk_server_time", None)
            chunk = {"bytes": base64.b64encode(orjson.dumps(obj)).decode()}
            if ts is not None:
                chunk["vk_server_time"] = ts
            return event_frame("chunk", chunk)
        return event_frame(name, obj)

    def _native(self, events: list) -> list:
        return [("invoke:" + name, obj) for name, obj in events]

    def malformed(self) -> bytes:
        """A frame whose checksum does not hold: after it, nothing of the stream can be framed."""
        f = bytearray(event_frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "broken"}}))
        f[-1] ^= 0xFF
        return bytes(f)

    def begin(self, sink, seq) -> list:
        if sink.req.get(INVOKE):
            return self._native(self.native.begin(sink, seq))
        return [("messageStart", {"role": "assistant"})]

    def token(self, sink, seq, n: int, text: str, reasoning: bool) -> list:
        if sink.req.get(INVOKE):
            return self._native(self.native.token(sink, seq, n, text, reasoning))
        if reasoning:
            return [("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"reasoningContent": {"text": text}}})]
        events = []
        index = 1 if sink.n_reasoning else 0
        if sink.n_reasoning and n == sink.n_reasoning + 1:
            events.append(("contentBlockStop", {"contentBlockIndex": 0}))
        events.append(("contentBlockDelta", {"contentBlockIndex": index, "delta": {"text": text}}))
        return events

    def _usage(self, sink, seq) -> dict:
        p, c, cached, _ = sink.counts(seq)
        usage = {"inputTokens": p - cached, "outputTokens": c, "totalTokens": p + c}
        if cached:
            usage["cacheReadInputTokens"] = cached
        return usage

    def whole(self, sink, seq, text: str, thinking: str) -> dict:
        content = [{"reasoningContent": {"reasoningText": {"text": thinking}}}] if thinking else []
        content.append({"text": text})
        return {"output": {"message": {"role": "assistant", "content": content}},
                "stopReason": STOP.get(seq.finish_reason, seq.finish_reason), "usage": self._usage(sink, seq),
                "metrics": {"latencyMs": 0}}

    def end(self, sink, seq) -> list:
        p, c, cached, _ = sink.counts(seq)
        if sink.req.get(INVOKE):
            events = self.native.end(sink, seq)
            events[-1][1]["amazon-bedrock-invocationMetrics"] = {
                "inputTokenCount": p, "outputTokenCount": c, "invocationLatency": 0, "firstByteLatency": 0}
            return self._native(events)
        last = 1 if sink.n_reasoning and seq.n_out > sink.n_reasoning else 0
        return [
            ("contentBlockStop", {"contentBlockIndex": last}),
            ("messageStop", {"stopReason": STOP.get(seq.finish_reason, seq.finish_reason)}),
            ("metadata", {"usage": self._usage(sink, seq), "metrics": {"latencyMs": 0}}),
        ]
