"""Google Vertex AI Gemini (and the Gemini API): ``POST {api}/models/{model}:streamGenerateContent?alt=sse``,
where ``--api`` is ``https://LOCATION-aiplatform.googleapis.com/v1/projects/PROJECT/locations/LOCATION/publishers
/google`` (Vertex) or ``https://generativelanguage.googleapis.com/v1beta`` (Gemini API). Authentication: a bearer
token from google-auth's application-default credentials (``gcloud auth application-default login``, a service
account in $GOOGLE_APPLICATION_CREDENTIALS, the metadata server; ``pip install 'vk[gcp]'``), refreshed before it
expires; or ``--api-key`` ($GEMINI_API_KEY, $GOOGLE_API_KEY) as ``x-goog-api-key``. Each SSE event is a
GenerateContentResponse whose cumulative usageMetadata gives the tokens of every event."""

from __future__ import annotations

import time
from datetime import timezone

from vk.errors import VkError
from vk.send.apis.base import (
    Acc,
    BearerToken,
    counts,
    join_query,
    output_target,
    quote_model,
    split_system,
    text_of,
)
from vk.send.apis.base import Adapter as _Base

SCOPE = "https://www.googleapis.com/auth/cloud-platform"
REFRESH_AHEAD = 300  # seconds before expiry at which the token is refreshed (in a thread, between requests)
MUST_REFRESH = 30  # seconds before expiry from which a request waits for the new token


def _google_auth():
    try:
        import google.auth
        import google.auth.transport.requests
    except ImportError:
        raise VkError("--api-style vertex: needs google-auth for application-default credentials "
                      "(pip install 'vk[gcp]'), or give --api-key") from None
    return google.auth


class Adapter(_Base):
    name = "vertex"
    exact_length = False  # generationConfig.maxOutputTokens only
    streams_only = False
    env_keys = ("GEMINI_API_KEY", "GOOGLE_API_KEY")

    def __init__(self, cfg):
        super().__init__(cfg)
        self._creds = None
        self.token = BearerToken(self._fetch, REFRESH_AHEAD, MUST_REFRESH)
        if not cfg.api_key and getattr(cfg, "run_id", ""):
            self.token.refresh()  # the first token now, in the worker's set-up, not on the first request

    @classmethod
    def request_path(cls, base: str, query: str, model, endpoint: str, stream: bool = True) -> str:
        if not stream:
            return join_query(f"{base}/models/{quote_model(model)}:generateContent", query)
        alt = "" if any(q.startswith("alt=") for q in query.split("&")) else "alt=sse"  # --api's alt= wins
        return join_query(f"{base}/models/{quote_model(model)}:streamGenerateContent", query, alt)

    @classmethod
    def preflight(cls, api_key: str | None) -> None:
        if api_key:
            return
        ga = _google_auth()
        try:
            ga.default(scopes=[SCOPE])
        except ga.exceptions.DefaultCredentialsError as e:
            raise VkError(f"--api-style vertex: no application-default credentials ({str(e)[:200]})") from None

    def framing_for(self, media_type: str) -> str | None:
        """SSE with ``alt=sse`` (the default), else the streamed JSON array (``--api '...?alt=json'``)."""
        return {"text/event-stream": "sse", "application/json": "jsonarray"}.get(media_type)

    def headers(self) -> dict[str, str]:
        return {"x-goog-api-key": self.cfg.api_key} if self.cfg.api_key else {}

    def sign(self, body: bytes) -> dict[str, str]:
        return {} if self.cfg.api_key else self.token.headers()

    def _fetch(self) -> tuple[str, float]:
        ga = _google_auth()
        if self._creds is None:
            self._creds, _ = ga.default(scopes=[SCOPE])
        self._creds.refresh(ga.transport.requests.Request())
        expiry = getattr(self._creds, "expiry", None)  # naive UTC (google-auth's convention)
        return self._creds.token, (expiry.replace(tzinfo=timezone.utc).timestamp() if expiry is not None
                                   else time.time() + 3000)

    def body(self, r: dict, content) -> bytes:
        system, rest = split_system(content)
        body: dict = {"contents": [{"role": "model" if m.get("role") == "assistant" else "user",
                                    "parts": [{"text": text_of(m.get("content"))}]} for m in rest]}
        if system is not None:
            body["systemInstruction"] = {"parts": [{"text": system}]}
        target = output_target(r)
        if target is not None:
            body["generationConfig"] = {"maxOutputTokens": target}
        return self.merge_extras(body, r)

    def whole(self, obj: dict, acc: Acc) -> str | None:
        return self.event(obj, acc)  # a GenerateContentResponse, like each streamed one

    def event(self, obj: dict, acc: Acc) -> str | None:
        if "error" in obj and "candidates" not in obj:
            err = obj["error"]
            acc.error = f"server error in stream: {str(err.get('message') if isinstance(err, dict) else err)[:300]}"
            return None
        if acc.server_id is None:
            acc.server_id = obj.get("responseId")
        kind = "e"
        cands = obj.get("candidates")
        if isinstance(cands, list) and cands and isinstance(cands[0], dict):
            cand = cands[0]
            for part in (cand.get("content") or {}).get("parts") or []:
                if part.get("functionCall"):
                    kind = "t"
                elif part.get("text"):
                    if part.get("thought"):
                        kind = "r" if kind == "e" else kind
                    else:
                        kind = "c"
                        acc.text.append(part["text"])
            if cand.get("finishReason"):
                acc.finish = cand["finishReason"]
                acc.done = True
        elif "usageMetadata" in obj:
            kind = "u"
        u = obj.get("usageMetadata")
        if isinstance(u, dict):
            cand_tok, thoughts = u.get("candidatesTokenCount"), u.get("thoughtsTokenCount")
            out = (cand_tok or 0) + (thoughts or 0) if cand_tok is not None or thoughts is not None else None
            acc.usage = counts(u.get("promptTokenCount"), out, u.get("cachedContentTokenCount"), thoughts)
            if out is not None:
                acc.ntok = out - acc.prev  # Gemini's usage is cumulative in every event: per-event tokens
                acc.prev = out
        return kind
