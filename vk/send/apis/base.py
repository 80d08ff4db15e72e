"""What every API-style adapter shares: the interface, the event accumulator and message helpers."""

from __future__ import annotations

import threading
import time
import urllib.parse

import orjson

from vk.errors import VkError


class Acc:
    """What a stream said so far, filled by an adapter's ``event``: text, usage (vk's four counts), finish
    reason, the server's id, an error the stream reported, whether it ended properly (``done``), and the tokens
    of the current event (``ntok``, when the API counts per event)."""

    __slots__ = ("text", "reasoning", "usage", "finish", "server_id", "error", "ntok", "prev", "done")

    def __init__(self):
        self.text: list[str] = []
        self.reasoning: list[str] = []  # reasoning text, kept for --save-text
        self.usage: dict | None = None
        self.finish = None
        self.server_id = None
        self.error = None
        self.ntok = None
        self.prev = 0
        self.done = False


def counts(prompt=None, completion=None, cached=None, reasoning=None) -> dict:
    """vk's usage: the four counts, each an int >= 0 or None."""
    out = {"prompt_tokens": prompt, "completion_tokens": completion, "cached_tokens": cached,
           "reasoning_tokens": reasoning}
    for k, v in out.items():
        if isinstance(v, float) and v.is_integer():  # some APIs count in JSON floats (Cohere: 12.0)
            v = out[k] = int(v)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            out[k] = None
    return out


def text_of(content) -> str:
    """A message's text: a string, or the text parts of an OpenAI content list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return "" if content is None else str(content)


def split_system(messages: list) -> tuple[str | None, list]:
    """(the system messages' text joined, or None; the other messages) for APIs with a separate system field."""
    system = [text_of(m.get("content")) for m in messages if m.get("role") in ("system", "developer")]
    rest = [m for m in messages if m.get("role") not in ("system", "developer")]
    return ("\n".join(system) if system else None), rest


def output_target(r: dict) -> int | None:
    """The request's output target, unless its output control says not to send one."""
    target = r.get("output_tokens")
    if target is None or r.get("output_control", "exact") == "none":
        return None
    return target


class Adapter:
    """The OpenAI-shaped defaults; each style overrides what differs.

    ``framing``: ``sse`` or ``eventstream`` (the shared decoders); ``media_type``: what a streamed answer must be
    labelled; ``exact_length``: whether the API can be asked for an exact output length (else vk-send says once
    that lengths are a maximum only); ``model_lookup``: whether ``GET {api}/models`` finds the model (else
    ``--model`` is required).
    """

    name = "openai"
    framing = "sse"
    media_type = "text/event-stream"
    exact_length = True
    model_lookup = False
    streams_only = True  # --no-stream is refused (the non-streamed answer is parsed only for OpenAI-shaped APIs)
    env_keys: tuple[str, ...] = ()  # environment variables holding the API key, in order
    endpoints: tuple[str, ...] = ()  # --endpoint values besides chat (Bedrock: invoke)

    def __init__(self, cfg):
        self.cfg = cfg

    # -- the request ------------------------------------------------------------------------------------------
    @classmethod
    def request_path(cls, base: str, query: str, model: str | None, endpoint: str, stream: bool = True) -> str:
        raise NotImplementedError

    @classmethod
    def preflight(cls, api_key: str | None) -> None:
        """Before the run, in the parent: a one-line error when the credentials or the SDK this style signs
        with are missing."""

    def headers(self) -> dict[str, str]:
        """Headers of every request (authentication, API version), before the user's ``-H``."""
        return {}

    def sign(self, body: bytes) -> dict[str, str]:
        """Headers for one request (a signature, a freshly refreshed token); most styles need none."""
        return {}

    def body(self, r: dict, content) -> bytes:
        raise NotImplementedError

    def merge_extras(self, body: dict, r: dict) -> bytes:
        if self.cfg.extra_body:
            body.update(self.cfg.extra_body)
        params = r.get("params")
        if params:
            body.update(params)
        return orjson.dumps(body)

    # -- the answer -------------------------------------------------------------------------------------------
    def framing_for(self, media_type: str) -> str | None:
        """The framing of a streamed answer labelled ``media_type`` (None: not a stream this API sends)."""
        return self.framing if media_type == self.media_type else None

    def decode(self, data):
        """A frame's payload as an object (raises on bad JSON)."""
        return orjson.loads(data)

    def event(self, obj: dict, acc: Acc) -> str | None:
        """The kind of one decoded event (``c r t e u``; None: not an answer event, e.g. a keep-alive ping),
        filling ``acc``."""
        raise NotImplementedError

    def usage(self, acc: Acc) -> dict | None:
        """vk's usage at the end of the stream."""
        return acc.usage

    def whole(self, obj: dict, acc: Acc) -> str | None:
        """A non-streamed answer (``--no-stream``): its kind (content first), filling ``acc``."""
        raise NotImplementedError

    def parse_body(self, body: bytes) -> dict:
        """A non-streamed answer body, as ``vk.send.sse.parse_json_body`` reads an OpenAI one."""
        out = {"usage": None, "finish_reason": None, "text": "", "server_id": None, "error": None, "kind": "e"}
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            out["error"] = f"response body is not JSON: {body[:120].decode('utf-8', 'replace')!r}"
            return out
        if not isinstance(obj, dict):
            out["error"] = "response body is not a JSON object"
            return out
        acc = Acc()
        kind = self.whole(obj, acc) or "e"
        out.update(usage=self.usage(acc), finish_reason=acc.finish, text="".join(acc.text),
                   reasoning_text="".join(acc.reasoning),
                   server_id=acc.server_id, error=acc.error, kind=kind)
        if out["error"] is None and kind == "e" and acc.finish is None and acc.usage is None:
            out["error"] = "response body has no answer (no content, finish reason or usage)"
        return out

    def done_marker(self, data: bytes) -> bool:
        """Whether a frame is the stream's end marker (OpenAI's ``[DONE]``) rather than an event."""
        return False


def host_header(cfg) -> str:
    """The Host header every client sends (a signature covers it): the user's ``-H Host``, else the URL's host,
    with the port unless it is the scheme's default."""
    for k, v in getattr(cfg, "headers", None) or ():
        if k.lower() == "host":
            return v
    default = 443 if cfg.scheme == "https" else 80
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    return host if cfg.port == default else f"{host}:{cfg.port}"


def quote_model(model: str | None, option: str = "--model") -> str:
    if not model:
        raise VkError(f"{option}: required with this --api-style (the model or deployment is part of the URL)")
    return urllib.parse.quote(model, safe="")


def join_query(path: str, query: str, extra: str = "") -> str:
    q = "&".join(x for x in (query, extra) if x)
    return path + ("?" + q if q else "")


class BearerToken:
    """A bearer token that expires (Entra ID, Google ADC): ``fetch() -> (token, expiry epoch)`` is called for the
    first one (at set-up, before the run), then again ``ahead`` seconds before expiry in a thread, off the event
    loop, while the old token still serves; a request waits only for a token about to expire (``must``)."""

    def __init__(self, fetch, ahead: float = 300.0, must: float = 30.0):
        self.fetch = fetch
        self.ahead = ahead
        self.must = must
        self.header: dict[str, str] = {}
        self.expires = 0.0
        self.refreshing: threading.Thread | None = None

    def headers(self) -> dict[str, str]:
        now = time.time()
        if now > self.expires - self.ahead and self.refreshing is None:
            if now < self.expires - self.must:
                self.refreshing = threading.Thread(target=self.refresh, daemon=True, name="vk-send-token")
                self.refreshing.start()
            else:
                self.refresh()
        return self.header

    def refresh(self) -> None:
        try:
            token, expires = self.fetch()
            self.header = {"Authorization": f"Bearer {token}"}
            self.expires = expires
        finally:
            self.refreshing = None
