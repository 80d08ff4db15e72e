"""OpenAI-compatible APIs (vLLM, SGLang, TGI, OpenAI): ``POST {api}/chat/completions`` or ``/completions``,
``Authorization: Bearer``, SSE ``data:`` chunks with ``choices[0].delta`` and a final usage chunk."""

from __future__ import annotations

from vk.send.apis.base import Acc, counts
from vk.send.apis.base import Adapter as _Base


def openai_usage(u: dict) -> dict:
    ptd = u.get("prompt_tokens_details") or {}
    ctd = u.get("completion_tokens_details") or {}
    return counts(u.get("prompt_tokens"), u.get("completion_tokens"),
                  ptd.get("cached_tokens") if isinstance(ptd, dict) else None,
                  ctd.get("reasoning_tokens") if isinstance(ctd, dict) else None)


class Adapter(_Base):
    name = "openai"
    model_lookup = True
    streams_only = False
    send_model = True  # the model goes in the body (Azure: in the path)
    exact_length = True
    env_keys = ("OPENAI_API_KEY",)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.completions = cfg.endpoint == "completions"
        base = {"model": cfg.model} if cfg.model and self.send_model else {}
        if cfg.stream:
            base["stream"] = True
            so = {"include_usage": True}
            if cfg.continuous_usage:
                so["continuous_usage_stats"] = True
            base["stream_options"] = so
        else:
            base["stream"] = False
        self.base_body = base

    @classmethod
    def request_path(cls, base: str, query: str, model, endpoint: str, stream: bool = True) -> str:
        path = base + ("/chat/completions" if endpoint == "chat" else "/completions")
        return path + ("?" + query if query else "")  # e.g. a gateway's ?api-version=...

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.cfg.api_key}"} if self.cfg.api_key else {}

    def body(self, r: dict, content) -> bytes:
        cfg = self.cfg
        body = dict(self.base_body)
        if self.completions:
            body["prompt"] = content
        else:
            body["messages"] = content
        target = r.get("output_tokens")
        oc = r.get("output_control", "exact")
        if target is not None and oc != "none":
            if cfg.max_tokens_param:
                body[cfg.max_tokens_param] = target
            if not self.exact_length:  # Azure: no vLLM extensions (they would be refused)
                pass
            elif oc == "exact" and cfg.min_tokens_param:
                body[cfg.min_tokens_param] = target
            elif oc == "ignore_eos" and cfg.ignore_eos_param:
                body[cfg.ignore_eos_param] = True
        return self.merge_extras(body, r)

    def event(self, obj: dict, acc: Acc) -> str | None:
        choices = obj.get("choices")
        if choices is None and "error" in obj:
            err = obj["error"]
            msg = err.get("message") if isinstance(err, dict) else err
            acc.error = f"server error in stream: {str(msg)[:300]}"
            return None
        if acc.server_id is None:
            acc.server_id = obj.get("id")
        kind = "e"
        if choices:
            ch = choices[0] if type(choices) is list else None
            if type(ch) is dict:
                if self.completions:
                    txt = ch.get("text")
                    if txt:
                        kind = "c"
                        acc.text.append(str(txt))
                else:
                    delta = ch.get("delta") or ch.get("message")
                    if type(delta) is dict:
                        txt = delta.get("content")
                        if txt:
                            kind = "c"
                            acc.text.append(txt if type(txt) is str else str(txt))
                        elif rsn := delta.get("reasoning_content") or delta.get("reasoning"):
                            kind = "r"
                            acc.reasoning.append(rsn if type(rsn) is str else str(rsn))
                        elif delta.get("tool_calls"):
                            kind = "t"
                fr = ch.get("finish_reason")
                if fr:
                    acc.finish = fr
        else:
            kind = "u"
        u = obj.get("usage")
        if type(u) is dict:
            acc.usage = u  # normalised once, in usage()
            ct = u.get("completion_tokens")
            if type(ct) is int:
                acc.ntok = ct - acc.prev  # per-event tokens (continuous_usage_stats)
                acc.prev = ct
        return kind

    def parse_body(self, body: bytes) -> dict:
        from vk.send.sse import parse_json_body

        return parse_json_body(body, self.completions)

    def usage(self, acc: Acc) -> dict | None:
        return openai_usage(acc.usage) if isinstance(acc.usage, dict) else None

    def done_marker(self, data: bytes) -> bool:
        return data == b"[DONE]"
