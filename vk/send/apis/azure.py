"""Azure OpenAI: ``POST {api}/openai/deployments/{deployment}/chat/completions?api-version=...``, the OpenAI
body and stream without the model field (the deployment, ``--model``, is in the path). Authentication: the
``api-key`` header (``--api-key``, $AZURE_OPENAI_API_KEY), else an Entra ID bearer token ($AZURE_OPENAI_AD_TOKEN,
else azure-identity's DefaultAzureCredential when installed, refreshed before it expires)."""

from __future__ import annotations

import os

from vk.errors import VkError
from vk.send.apis.base import Acc, BearerToken, join_query, quote_model
from vk.send.apis.openai import Adapter as OpenAI

API_VERSION = "2024-10-21"  # the GA data-plane version when --api carries no ?api-version=
SCOPE = "https://cognitiveservices.azure.com/.default"


class Adapter(OpenAI):
    name = "azure"
    model_lookup = False
    send_model = False
    exact_length = False  # Azure has max_tokens only (no min_tokens or ignore_eos)
    env_keys = ("AZURE_OPENAI_API_KEY",)

    def __init__(self, cfg):
        super().__init__(cfg)
        self._credential = None
        self.token = None  # an Entra ID token from azure-identity, when neither a key nor $AZURE_OPENAI_AD_TOKEN
        if not cfg.api_key and not os.environ.get("AZURE_OPENAI_AD_TOKEN") and getattr(cfg, "run_id", ""):
            self.token = BearerToken(self._fetch)
            self.token.refresh()

    @classmethod
    def request_path(cls, base: str, query: str, model, endpoint: str, stream: bool = True) -> str:
        if "api-version=" not in query:
            query = "&".join(x for x in (query, f"api-version={API_VERSION}") if x)
        return join_query(f"{base}/openai/deployments/{quote_model(model)}/chat/completions", query)

    @classmethod
    def preflight(cls, api_key: str | None) -> None:
        if api_key or os.environ.get("AZURE_OPENAI_AD_TOKEN"):
            return
        try:
            import azure.identity  # noqa: F401
        except ImportError:
            raise VkError("--api-style azure: no API key (--api-key, $AZURE_OPENAI_API_KEY) and no Entra ID token "
                          "($AZURE_OPENAI_AD_TOKEN, or pip install azure-identity)") from None

    def headers(self) -> dict[str, str]:
        if self.cfg.api_key:
            return {"api-key": self.cfg.api_key}
        tok = os.environ.get("AZURE_OPENAI_AD_TOKEN")
        return {"Authorization": f"Bearer {tok}"} if tok else {}

    def sign(self, body: bytes) -> dict[str, str]:
        return {} if self.token is None else self.token.headers()

    def _fetch(self) -> tuple[str, float]:
        if self._credential is None:
            from azure.identity import DefaultAzureCredential

            self._credential = DefaultAzureCredential()
        tok = self._credential.get_token(SCOPE)
        return tok.token, float(tok.expires_on)

    def event(self, obj: dict, acc: Acc) -> str | None:
        if "prompt_filter_results" in obj and not obj.get("choices") and obj.get("usage") is None:
            return "e"  # Azure's content-filter prelude (no choices) is not a usage chunk
        return super().event(obj, acc)
