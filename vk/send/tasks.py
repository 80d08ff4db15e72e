"""vk-send's encoder requests: embeddings and rerank (request field ``task``), sent whole, answered whole.

- path: the request's ``endpoint`` (default ``embeddings`` / ``rerank``), relative to the ``--api`` base
  (``http://host/v1`` + ``rerank`` = ``/v1/rerank``) or absolute from the server root (``/v2/rerank``);
- body: embeddings ``{"model", "input": [documents], "encoding_format": "float"}``; rerank ``{"model", "query",
  "documents"}`` (vLLM's and Cohere's v2 shape alike), or ``{"model", "text_1": query, "text_2": documents}`` to
  an endpoint ending in ``score`` (vLLM's score API); the request's ``params`` are added (``top_n``, ...);
- answer: a JSON object with one embedding per document (``data``), or rerank ``results`` whose indexes are
  documents of the request; anything else is an error record naming what is wrong. Its usage becomes the
  record's ``usage.prompt_tokens`` (``usage.prompt_tokens``/``total_tokens``, or Cohere's ``meta.tokens`` /
  ``meta.billed_units.input_tokens``); a count that differs from the request's targets is a ``warning``
  (embeddings: the documents' tokens; rerank: documents + query, or documents x (query + document) as
  cross-encoders count pairs).

The record has no token events: ``t_first_byte`` and ``t_done`` are the times that matter (request latency is
``t_done - t_sent``), with ``task``, ``document_count``, ``document_tokens`` and ``query_tokens``.
"""

from __future__ import annotations

import orjson

from vk.records import BYTE_TASKS, STATUS_ERROR, STATUS_OK
from vk.send.answer import decode_body, interpret

# request fields that are the request's content, not annotations to copy into the response record
CONTENT_FIELDS = ("documents", "query", "endpoint")
DEFAULT_ENDPOINT = {"embeddings": "embeddings", "rerank": "rerank", "image_generation": "images/generations",
                    "speech": "audio/speech"}


def is_task_request(r: dict) -> bool:
    """A request this module builds and reads (not chat, completions or vision chat)."""
    return r.get("task") in DEFAULT_ENDPOINT


def api_base(path: str) -> str:
    """The ``--api`` base of a chat or completions path: ``/v1/chat/completions?x`` -> ``/v1``."""
    path = path.split("?", 1)[0]
    for suffix in ("/chat/completions", "/completions"):
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path.rstrip("/")


def request_path(chat_path: str, r: dict) -> str:
    ep = r.get("endpoint") or DEFAULT_ENDPOINT[r["task"]]
    return ep if ep.startswith("/") else f"{api_base(chat_path)}/{ep}"


def request_body(r: dict, model: str | None) -> bytes:
    body: dict = {"model": model} if model else {}
    if r["task"] == "image_generation":
        body.update(prompt=r["prompt"], n=r.get("images") or 1, response_format="b64_json")
        if r.get("image_width") and r.get("image_height"):
            body["size"] = f"{r['image_width']}x{r['image_height']}"
    elif r["task"] == "speech":
        body.update(input=r["prompt"], voice=r.get("voice") or "alloy", response_format=r.get("audio_format") or "pcm")
    elif r["task"] == "embeddings":
        body["input"] = r["documents"]
        body["encoding_format"] = "float"
    elif _is_score(r):  # vLLM's score API: the query against each document
        body["text_1"] = r["query"]
        body["text_2"] = r["documents"]
    else:
        body["query"] = r["query"]
        body["documents"] = r["documents"]
    if r.get("params"):
        body.update(r["params"])
    return orjson.dumps(body)


def _is_score(r: dict) -> bool:
    return r["task"] == "rerank" and (r.get("endpoint") or "").rstrip("/").endswith("score")


def head_prefix(chat_prefix: bytes, chat_path: str, path: str) -> bytes:
    """The raw client's request head for ``path`` (the chat head names the chat path on its first line)."""
    first, _, rest = chat_prefix.partition(b"\r\n")
    return f"POST {path} HTTP/1.1".encode("latin-1") + b"\r\n" + rest.replace(
        b"Accept: text/event-stream\r\n", b"")


def record_fields(r: dict) -> dict:
    """What a task adds to its response record (counts, not the texts)."""
    if r["task"] in BYTE_TASKS:
        return {"task": r["task"]}
    out = {"task": r["task"], "document_count": len(r.get("documents") or ())}
    for f in ("document_tokens", "query_tokens"):
        if r.get(f) is not None:
            out[f] = r[f]
    return out


def interpret_answer(ex, r: dict, clock) -> dict:
    """The verdict on a finished exchange, shaped as ``vk.send.answer.interpret``'s (no token events)."""
    if ex.error_kind is not None or ex.status is None or not 200 <= ex.status < 300:
        return interpret(ex, False, False, clock)  # failures read the same as for every other request
    out = {"status": STATUS_OK, "error": None, "warning": None, "parsed": None}

    def fail(msg: str) -> dict:
        out["status"], out["error"] = STATUS_ERROR, msg
        return out

    chunks, derr = decode_body(ex.chunks, ex.headers.get("content-encoding"))
    if derr:
        return fail(derr)
    body = b"".join(c for _, c in chunks)
    if r["task"] in BYTE_TASKS:
        return _bytes_answer(out, fail, r, ex, chunks, body, clock)
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return fail(f"the {r['task']} answer is not JSON: {body[:80].decode('utf-8', 'replace')!r}")
    if not isinstance(doc, dict):
        return fail(f"the {r['task']} answer is not a JSON object")
    n = len(r["documents"])
    if r["task"] == "embeddings":
        data = doc.get("data")
        if not isinstance(data, list):
            return fail("the embeddings answer has no 'data' list")
        if len(data) != n:
            return fail(f"the embeddings answer has {len(data)} embeddings for {n} documents")
        for i, e in enumerate(data):
            v = e.get("embedding") if isinstance(e, dict) else None
            if not (isinstance(v, list) and v) and not (isinstance(v, str) and v):
                return fail(f"the embeddings answer's data[{i}] has no embedding")
    elif _is_score(r):
        data = doc.get("data")
        if not isinstance(data, list) or len(data) != n:
            return fail(f"the score answer has {len(data) if isinstance(data, list) else 'no'} scores for {n} "
                        "documents")
        if any(not isinstance(x, dict) or not isinstance(x.get("score"), (int, float)) for x in data):
            return fail("the score answer has an item without a numeric score")
    else:
        res = doc.get("results")
        if not isinstance(res, list):
            return fail("the rerank answer has no 'results' list")
        top_n = (r.get("params") or {}).get("top_n")
        want = min(n, top_n) if isinstance(top_n, int) and top_n > 0 else n
        if len(res) != want:
            return fail(f"the rerank answer has {len(res)} results for {want} documents")
        idx = [x.get("index") if isinstance(x, dict) else None for x in res]
        if any(not isinstance(i, int) or not 0 <= i < n for i in idx) or len(set(idx)) != len(idx):
            return fail("the rerank answer's results do not index the request's documents once each")
        if any(not isinstance(x.get("relevance_score"), (int, float)) for x in res):
            return fail("the rerank answer has a result without a numeric relevance_score")
    tokens = _usage_tokens(doc)
    out["parsed"] = {"events": {"t": [], "kind": ""}, "text": "", "finish_reason": None, "error": None,
                     "usage": {"prompt_tokens": tokens} if tokens is not None else None,
                     "server_id": doc.get("id") if isinstance(doc.get("id"), str) else None,
                     "t_first_token": None, "t_first_content": None, "t_last_token": None}
    if tokens is not None:
        expected = _expected_tokens(r)
        if expected and tokens not in expected:
            out["warning"] = (f"the server counted {tokens} input tokens; the targets make "
                              f"{' or '.join(map(str, expected))}")
    return out


def _usage_tokens(doc: dict) -> int | None:
    u = doc.get("usage")
    if isinstance(u, dict):
        for k in ("prompt_tokens", "total_tokens", "input_tokens"):
            if isinstance(u.get(k), int):
                return u[k]
    meta = doc.get("meta")
    if isinstance(meta, dict):
        for sec in ("tokens", "billed_units"):
            x = meta.get(sec)
            if isinstance(x, dict) and isinstance(x.get("input_tokens"), int):
                return x["input_tokens"]
    return None


def _expected_tokens(r: dict) -> list[int]:
    n = len(r["documents"])
    d = r.get("document_tokens")
    if d is None:
        return []
    if r["task"] == "embeddings":
        return [n * d]
    q = r.get("query_tokens")
    if q is None:
        return []
    return sorted({n * d + q, n * (d + q)})


def _bytes_answer(out: dict, fail, r: dict, ex, chunks, body: bytes, clock) -> dict:
    """Image generation (JSON with ``data[]`` of ``b64_json`` or ``url``) and speech (audio bytes)."""
    ctype = ex.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if not body:
        return fail(f"the {r['task']} answer is empty")
    if r["task"] == "image_generation":
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return fail(f"the image generation answer is not JSON: {body[:80].decode('utf-8', 'replace')!r}")
        data = doc.get("data") if isinstance(doc, dict) else None
        n = r.get("images") or 1
        if not isinstance(data, list) or len(data) != n:
            return fail(f"the image generation answer has {len(data) if isinstance(data, list) else 'no'} images "
                        f"for {n} asked")
        if not all(isinstance(x, dict) and (x.get("b64_json") or x.get("url")) for x in data):
            return fail("the image generation answer has an image without b64_json or url")
    elif ctype.endswith("json") or ctype.startswith("text/"):
        return fail(f"the speech answer is {ctype}, not audio: {body[:80].decode('utf-8', 'replace')!r}")
    out["parsed"] = {"events": {"t": [], "kind": ""}, "text": "", "finish_reason": None, "error": None,
                     "usage": None, "server_id": None, "t_first_token": None, "t_first_content": None,
                     "t_last_token": None,
                     "fields": {"body_bytes": len(body), "t_first_body": round(chunks[0][0] - clock.mono0, 7)}}
    return out
