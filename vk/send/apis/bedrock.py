"""AWS Bedrock ConverseStream: ``POST {api}/model/{model}/converse-stream``, signed with SigV4 (service
``bedrock``) by botocore from the standard credential chain (environment, ~/.aws/credentials and config,
SSO, container and instance metadata; ``pip install 'vk[aws]'``); the answer is the AWS event-stream binary
framing (vk.send.apis.eventstream), one frame per event: messageStart, contentBlockDelta (text, reasoning,
tool input), messageStop (the stop reason), metadata (usage)."""

from __future__ import annotations

import base64
import os
import re

import orjson

from vk.errors import VkError
from vk.send.apis.base import (
    Acc,
    counts,
    host_header,
    join_query,
    output_target,
    quote_model,
    split_system,
    text_of,
)
from vk.send.apis.base import Adapter as _Base

SERVICE = "bedrock"
_REGION_IN_HOST = re.compile(r"bedrock-runtime(?:-fips)?\.([a-z0-9-]+)\.amazonaws\.com")


def _botocore():
    try:
        import botocore.session  # noqa: F401
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest
    except ImportError:
        raise VkError("--api-style bedrock: needs botocore (pip install 'vk[aws]')") from None
    import botocore.session

    return botocore.session, SigV4Auth, AWSRequest


def region_for(host: str) -> str | None:
    """The region: from a bedrock-runtime host name, else $AWS_REGION / $AWS_DEFAULT_REGION / the profile's."""
    m = _REGION_IN_HOST.search(host)
    if m:
        return m.group(1)
    session, _, _ = _botocore()
    return os.environ.get("AWS_REGION") or session.get_session().get_config_variable("region")


class Adapter(_Base):
    name = "bedrock"
    framing = "eventstream"
    media_type = "application/vnd.amazon.eventstream"
    exact_length = False  # inferenceConfig.maxTokens only
    streams_only = False

    def __init__(self, cfg):
        super().__init__(cfg)
        session, self._SigV4Auth, self._AWSRequest = _botocore()
        self.credentials = session.get_session().get_credentials()
        self.region = region_for(cfg.host)
        self.host = host_header(cfg)
        self.url = f"{cfg.scheme}://{self.host}{cfg.path}"

    @classmethod
    def request_path(cls, base: str, query: str, model, endpoint: str, stream: bool = True) -> str:
        return join_query(f"{base}/model/{quote_model(model)}/{'converse-stream' if stream else 'converse'}", query)

    @classmethod
    def preflight(cls, api_key: str | None) -> None:
        session, _, _ = _botocore()
        if session.get_session().get_credentials() is None:
            raise VkError("--api-style bedrock: no AWS credentials found (environment, ~/.aws/credentials, "
                          "AWS_PROFILE, SSO, container or instance metadata)")

    def sign(self, body: bytes) -> dict[str, str]:
        """SigV4 over the method, path, query, Host, Content-Type, X-Amz-Date and the body's hash; the other
        headers vk sends are left unsigned, as AWS allows."""
        req = self._AWSRequest(method="POST", url=self.url, data=body,
                               headers={"Content-Type": "application/json", "Host": self.host})
        self._SigV4Auth(self.credentials, SERVICE, self.region).add_auth(req)
        h = req.headers
        out = {"X-Amz-Date": h["X-Amz-Date"], "Authorization": h["Authorization"]}
        if "X-Amz-Security-Token" in h:
            out["X-Amz-Security-Token"] = h["X-Amz-Security-Token"]
        return out

    def body(self, r: dict, content) -> bytes:
        system, rest = split_system(content)
        body: dict = {"messages": [{"role": m.get("role"), "content": [{"text": text_of(m.get("content"))}]}
                                   for m in rest]}
        if system is not None:
            body["system"] = [{"text": system}]
        target = output_target(r)
        if target is not None:
            body["inferenceConfig"] = {"maxTokens": target}
        return self.merge_extras(body, r)

    def decode(self, data):
        headers, payload = data
        mtype = headers.get(":message-type", "event")
        if mtype == "event":
            obj = orjson.loads(payload)
            out = {headers.get(":event-type", ""): obj}
            if type(obj) is dict and "vk_server_time" in obj:  # vk-serve --server-timestamps, in the payload
                out["vk_server_time"] = obj["vk_server_time"]
            return out
        if mtype == "exception":
            msg = payload.decode("utf-8", "replace")
            try:
                msg = orjson.loads(payload).get("message", msg)
            except (ValueError, AttributeError):
                pass
            return {"__error__": f"{headers.get(':exception-type', 'exception')}: {msg}"}
        return {"__error__": f"{headers.get(':error-code', 'error')}: {headers.get(':error-message', '')}"}

    def whole(self, obj: dict, acc: Acc) -> str | None:
        """Converse's answer: output.message.content, stopReason, usage."""
        kinds = set()
        for block in ((obj.get("output") or {}).get("message") or {}).get("content") or []:
            if not isinstance(block, dict):
                continue
            if block.get("text"):
                acc.text.append(block["text"])
                kinds.add("c")
            elif block.get("reasoningContent"):
                kinds.add("r")
            elif block.get("toolUse"):
                kinds.add("t")
        if obj.get("stopReason"):
            acc.finish = obj["stopReason"]
        if isinstance(obj.get("usage"), dict):
            self.event({"metadata": {"usage": obj["usage"]}}, acc)
        return next((k for k in "crt" if k in kinds), "e")

    def event(self, obj: dict, acc: Acc) -> str | None:
        if "contentBlockDelta" in obj:
            d = (obj["contentBlockDelta"] or {}).get("delta") or {}
            txt = d.get("text")
            if txt:
                acc.text.append(txt)
                return "c"
            if d.get("reasoningContent"):
                return "r"
            if d.get("toolUse"):
                return "t"
            return "e"
        if "metadata" in obj:
            u = (obj["metadata"] or {}).get("usage") or {}
            inp, read, write = u.get("inputTokens"), u.get("cacheReadInputTokens"), u.get("cacheWriteInputTokens")
            prompt = inp + (read or 0) + (write or 0) if isinstance(inp, int) else None
            acc.usage = counts(prompt, u.get("outputTokens"), read, None)
            acc.done = True
            return "u"
        if "messageStop" in obj:
            acc.finish = (obj["messageStop"] or {}).get("stopReason")
            return "e"
        if "contentBlockStart" in obj:
            start = (obj["contentBlockStart"] or {}).get("start") or {}
            return "t" if "toolUse" in start else "e"
        if "__error__" in obj:
            acc.error = f"server error in stream: {obj['__error__'][:300]}"
            return None
        return "e"


class InvokeAdapter(Adapter):
    """Bedrock InvokeModelWithResponseStream (``--endpoint invoke``): ``POST {api}/model/{model}/invoke-with-response-
    stream`` with the model's native body, here Anthropic's Messages (``anthropic_version: bedrock-2023-05-31``);
    each event-stream ``chunk`` frame carries one native event, base64-encoded in ``bytes``, read by the
    anthropic adapter; the last one's ``amazon-bedrock-invocationMetrics`` has the token counts."""

    endpoints = ("invoke",)
    streams_only = True  # (InvokeModel without a stream is not read)

    def __init__(self, cfg):
        super().__init__(cfg)
        from vk.send.apis.anthropic import Adapter as Anthropic

        self.native = Anthropic(cfg)

    @classmethod
    def request_path(cls, base: str, query: str, model, endpoint: str, stream: bool = True) -> str:
        return join_query(f"{base}/model/{quote_model(model)}/invoke-with-response-stream", query)

    def body(self, r: dict, content) -> bytes:
        body = orjson.loads(self.native.body(r, content))
        body.pop("model", None)
        body.pop("stream", None)
        body["anthropic_version"] = "bedrock-2023-05-31"
        return orjson.dumps(body)

    def decode(self, data):
        headers, payload = data
        if headers.get(":message-type", "event") != "event":
            return super().decode(data)
        obj = orjson.loads(payload)
        event = orjson.loads(base64.b64decode(obj["bytes"]))
        if "vk_server_time" in obj:
            event["vk_server_time"] = obj["vk_server_time"]
        return event

    def event(self, obj: dict, acc: Acc) -> str | None:
        if "__error__" in obj:
            return super().event(obj, acc)
        kind = self.native.event(obj, acc)
        metrics = obj.get("amazon-bedrock-invocationMetrics")
        if isinstance(metrics, dict):
            u = acc.usage or {}
            acc.usage = counts(metrics.get("inputTokenCount", u.get("prompt_tokens")),
                               metrics.get("outputTokenCount", u.get("completion_tokens")),
                               u.get("cached_tokens"), None)
        return kind


ENDPOINTS = {"invoke": InvokeAdapter}
