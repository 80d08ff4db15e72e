"""OCI Generative AI: ``POST {api}/20231130/actions/chat`` (``--api`` is the service endpoint, e.g.
``https://inference.generativeai.us-chicago-1.oci.oraclecloud.com``), each request signed by the oci SDK's
signer (``pip install 'vk[oci]'``) with the API key of ~/.oci/config ($OCI_CONFIG_FILE; profile
$OCI_CLI_PROFILE, else DEFAULT). The body is a GENERIC chat request for the on-demand model ``--model`` in the
compartment $OCI_COMPARTMENT_ID (default: the tenancy); ``--extra-body`` and a request's params go into
``chatRequest``. The answer is SSE: each event a message delta, then the finish reason and the usage."""

from __future__ import annotations

import os

import orjson

from vk.errors import VkError
from vk.send.apis.base import Acc, counts, host_header, join_query, output_target, text_of
from vk.send.apis.base import Adapter as _Base

ROLES = {"system": "SYSTEM", "developer": "SYSTEM", "user": "USER", "assistant": "ASSISTANT"}


def _oci():
    try:
        import oci
    except ImportError:
        raise VkError("--api-style oci: needs the oci SDK (pip install 'vk[oci]')") from None
    return oci


def load_config() -> dict:
    oci = _oci()
    path = os.environ.get("OCI_CONFIG_FILE", oci.config.DEFAULT_LOCATION)
    profile = os.environ.get("OCI_CLI_PROFILE", oci.config.DEFAULT_PROFILE)
    try:
        cfg = oci.config.from_file(path, profile)
        oci.config.validate_config(cfg)
    except Exception as e:  # noqa: BLE001 - the SDK's own exceptions, one line each
        raise VkError(f"--api-style oci: cannot use the OCI config {path} [{profile}]: {str(e)[:200]}") from None
    return cfg


class Adapter(_Base):
    name = "oci"
    exact_length = False  # maxTokens only
    streams_only = False

    def __init__(self, cfg):
        super().__init__(cfg)
        oci = _oci()
        conf = load_config()
        self.signer = oci.signer.Signer(conf["tenancy"], conf["user"], conf["fingerprint"], conf.get("key_file"),
                                        conf.get("pass_phrase"), conf.get("key_content"))
        self.compartment = os.environ.get("OCI_COMPARTMENT_ID") or conf["tenancy"]
        self.host = host_header(cfg)
        self.url = f"{cfg.scheme}://{self.host}{cfg.path}"
        from oci._vendor import requests

        self._Request = requests.Request

    @classmethod
    def request_path(cls, base: str, query: str, model, endpoint: str, stream: bool = True) -> str:
        return join_query((base if base.endswith("/20231130") else base + "/20231130") + "/actions/chat", query)

    @classmethod
    def preflight(cls, api_key: str | None) -> None:
        load_config()

    def sign(self, body: bytes) -> dict[str, str]:
        """The oci signer's headers over date, (request-target), host, content-length, content-type and the
        body's SHA-256, for these exact bytes."""
        req = self._Request("POST", self.url, data=body,
                            headers={"content-type": "application/json", "host": self.host}).prepare()
        self.signer(req)
        return {k: req.headers[k] for k in ("date", "x-content-sha256", "authorization")}

    def body(self, r: dict, content) -> bytes:
        chat = {"apiFormat": "GENERIC", "isStream": bool(self.cfg.stream),
                "messages": [{"role": ROLES.get(m.get("role"), "USER"),
                              "content": [{"type": "TEXT", "text": text_of(m.get("content"))}]} for m in content]}
        if self.cfg.stream:
            chat["streamOptions"] = {"isIncludeUsage": True}
        target = output_target(r)
        if target is not None:
            chat["maxTokens"] = target
        if self.cfg.extra_body:
            chat.update(self.cfg.extra_body)
        if r.get("params"):
            chat.update(r["params"])
        return orjson.dumps({"compartmentId": self.compartment,
                             "servingMode": {"servingType": "ON_DEMAND", "modelId": self.cfg.model},
                             "chatRequest": chat})

    def whole(self, obj: dict, acc: Acc) -> str | None:
        resp = obj.get("chatResponse") or {}
        choices = resp.get("choices") or [{}]
        kind = self.event({**choices[0], "usage": resp.get("usage")}, acc) if isinstance(choices[0], dict) else "e"
        acc.done = False
        return "e" if kind == "u" else kind

    def event(self, obj: dict, acc: Acc) -> str | None:
        kind = "e"
        msg = obj.get("message")
        if isinstance(msg, dict):
            for part in msg.get("content") or []:
                if isinstance(part, dict) and part.get("text"):
                    kind = "c"
                    acc.text.append(part["text"])
            if kind == "e" and msg.get("reasoningContent"):
                kind = "r"
            if kind == "e" and msg.get("toolCalls"):
                kind = "t"
        if obj.get("finishReason"):
            acc.finish = obj["finishReason"]
        u = obj.get("usage")
        if isinstance(u, dict):
            ptd = u.get("promptTokensDetails") or {}
            ctd = u.get("completionTokensDetails") or {}
            acc.usage = counts(u.get("promptTokens"), u.get("completionTokens"), ptd.get("cachedTokens"),
                               ctd.get("reasoningTokens"))
            acc.done = True
            if kind == "e" and msg is None:
                kind = "u"
        return kind
