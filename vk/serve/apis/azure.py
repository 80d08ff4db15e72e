"""Azure OpenAI (``POST /openai/deployments/{deployment}/chat/completions?api-version=...``): the OpenAI chat
request and stream, with the deployment (the served model) in the path instead of the body."""

from __future__ import annotations

import re
import urllib.parse

from vk.serve.apis.base import Protocol as _Base
from vk.serve.apis.base import load_object
from vk.serve.connection import HTTPError
from vk.serve.sinks import FullSink, StreamSink

_ROUTE = re.compile(r"^/openai/deployments/([^/]+)/chat/completions$")


class Protocol(_Base):
    name = "azure"

    def match(self, method: str, path: str) -> bool:
        return _ROUTE.match(path) is not None

    def request(self, method: str, target: str, headers: dict, body: bytes) -> dict:
        path, _, query = target.partition("?")
        if not any(q.startswith("api-version=") for q in query.split("&")):
            raise HTTPError(400, "api-version: required query parameter", param="api-version")
        req = load_object(body)
        req["model"] = urllib.parse.unquote(_ROUTE.match(path).group(1))
        return req

    def sink_class(self, stream: bool):
        return StreamSink if stream else FullSink
