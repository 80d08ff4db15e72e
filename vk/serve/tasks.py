"""vk-serve's encoder endpoints: embeddings and rerank, with a cost model proportional to tokens.

Routes (POST)::

    /v1/embeddings                      OpenAI's shape (input: a string or a list; encoding_format float|base64)
    /v1/rerank, /rerank                 vLLM's (Jina-style) shape: results[].relevance_score, usage.total_tokens
    /v2/rerank                          Cohere's v2 shape: results[], meta.billed_units, meta.tokens
    /score, /v1/score                   vLLM's score API: text_1 (the query) against text_2 (documents): data[].score

Cost model: one encoder, like one GPU running one batch at a time, takes requests in arrival order; a request
takes ``encoder_fixed + tokens * encoder_token`` seconds once the encoder is free. Its tokens are the sum of its
texts' tokens under the server's tokenizer, without special tokens (so that they equal vk-gen's targets); a
rerank request is scored as query-document pairs, ``documents x (query + document)`` tokens, as cross-encoders
(and vLLM's usage) count them. So the encoder's throughput is ``1 / encoder_token`` tokens/s at saturation, and a
request's latency is its queueing plus its own cost. Vectors are pseudo-random unit vectors of ``EMBED_DIM``
floats, the same for the same text; relevance scores are pseudo-random in (0, 1), the same for the same pair.
"""

from __future__ import annotations

import base64
import hashlib
import io
import time
import uuid

import numpy as np
import orjson

from vk.serve.connection import HTTPError
from vk.serve.connection import chunk as http_chunk
from vk.serve.prompts import parse_body

EMBED_DIM = 384
EMBED_PATHS = ("/v1/embeddings",)
RERANK_PATHS = ("/v1/rerank", "/rerank", "/v2/rerank", "/score", "/v1/score")
PATHS = EMBED_PATHS + RERANK_PATHS + ("/v1/images/generations", "/v1/audio/speech")
MAX_ITEMS = 2048  # texts per request (OpenAI's limit for embeddings inputs)


class Encoder:
    """The one encoder of the cost model: when it is free again."""

    def __init__(self, fixed: float, per_token: float):
        self.fixed, self.per_token = fixed, per_token
        self.free_at = 0.0

    def finish_time(self, now: float, tokens: int) -> float:
        start = max(now, self.free_at)
        self.free_at = start + self.fixed + tokens * self.per_token
        return self.free_at


def _texts(req: dict, key: str, *, single_ok: bool) -> list[str]:
    v = req.get(key)
    if isinstance(v, str) and single_ok:
        v = [v]
    if not isinstance(v, list) or not v:
        raise HTTPError(400, f"'{key}' must be a non-empty list of strings" + (" or a string" if single_ok else ""),
                        param=key)
    if len(v) > MAX_ITEMS:
        raise HTTPError(400, f"'{key}' has {len(v)} items (at most {MAX_ITEMS})", param=key)
    out = []
    for x in v:
        if isinstance(x, dict) and isinstance(x.get("text"), str):  # Cohere/Jina documents as {"text": ...}
            x = x["text"]
        if not isinstance(x, str):
            raise HTTPError(400, f"'{key}' items must be strings", param=key)
        out.append(x)
    return out


def _seed(*texts: str) -> int:
    h = hashlib.blake2b(digest_size=8)
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return int.from_bytes(h.digest(), "little")


def _vector(text: str) -> np.ndarray:
    v = np.random.default_rng(_seed(text)).standard_normal(EMBED_DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def handle(app, conn, method: str, path: str, body: bytes) -> None:
    """Answer an encoder request after its modelled time (errors at once)."""
    if path in IMAGE_PATHS + SPEECH_PATHS:
        handle_bytes(app, conn, method, path, body)
        return
    if method != "POST":
        raise HTTPError(405, "Method Not Allowed")
    t_recv = conn.t_recv or time.monotonic()
    req = parse_body(body, app.opts.model)
    count = app.tok.count
    if path in EMBED_PATHS:
        texts = _texts(req, "input", single_ok=True)
        fmt = req.get("encoding_format", "float") or "float"
        if fmt not in ("float", "base64"):
            raise HTTPError(400, f"encoding_format must be float or base64, got {fmt!r}", param="encoding_format")
        lens = [count(t) for t in texts]
        tokens = sum(lens)

        def answer() -> bytes:
            data = []
            for i, t in enumerate(texts):
                v = _vector(t)
                emb = base64.b64encode(v.tobytes()).decode("ascii") if fmt == "base64" else v.tolist()
                data.append({"object": "embedding", "index": i, "embedding": emb})
            return orjson.dumps({"id": f"embd-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                                 "model": app.opts.model, "data": data,
                                 "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
    else:
        score = path.endswith("/score")
        query = req.get("text_1" if score else "query")
        if not isinstance(query, str):
            raise HTTPError(400, f"'{'text_1' if score else 'query'}' must be a string", param="query")
        docs = _texts(req, "text_2" if score else "documents", single_ok=score)
        top_n = req.get("top_n")
        if top_n is not None and (not isinstance(top_n, int) or isinstance(top_n, bool) or top_n < 0):
            raise HTTPError(400, "'top_n' must be an integer >= 0", param="top_n")
        return_docs = req.get("return_documents", path != "/v2/rerank")
        q = count(query)
        tokens = sum(q + count(d) for d in docs)  # pairs, as a cross-encoder (and vLLM's usage) counts them

        def answer() -> bytes:
            scores = [float(np.random.default_rng(_seed(query, d)).random()) for d in docs]
            if score:
                return orjson.dumps({"id": f"score-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                                     "model": app.opts.model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                                     "data": [{"index": i, "object": "score", "score": x} for i, x in enumerate(scores)]})
            order = sorted(range(len(docs)), key=lambda i: -scores[i])
            if top_n:
                order = order[:top_n]
            results = []
            for i in order:
                r = {"index": i, "relevance_score": scores[i]}
                if return_docs:
                    r["document"] = {"text": docs[i]}
                results.append(r)
            if path == "/v2/rerank":
                return orjson.dumps({"id": str(uuid.uuid4()), "results": results, "meta": {
                    "api_version": {"version": "2"}, "billed_units": {"search_units": 1},
                    "tokens": {"input_tokens": tokens, "output_tokens": 0}}})
            return orjson.dumps({"id": f"rerank-{uuid.uuid4().hex}", "model": app.opts.model,
                                 "usage": {"total_tokens": tokens}, "results": results})

    app.stats.prompt_tokens += tokens
    done = app.encoder.finish_time(t_recv, tokens)

    def respond() -> None:
        if not conn.closed:
            app.stats.count_response(200)
            conn.respond(200, answer())

    wait = done - time.monotonic()
    if wait > 0:
        app.loop.call_later(wait, respond)
    else:
        respond()


# --------------------------------------------------------------------------------------------------------------
# vision: image tokens from the image size, as Qwen2-VL counts them

PATCH = 14  # ViT patch side in pixels
MERGE = 2  # 2 x 2 patches merge into one token: one token per 28 x 28 pixels
MIN_PIXELS = 4 * 28 * 28  # Qwen2-VL's image processor defaults
MAX_PIXELS = 16384 * 28 * 28
IMAGE_KEY = "_vk_images"  # where _chat_text leaves [(tokens, seed), ...] in the parsed request for _admit


def image_tokens(width: int, height: int) -> int:
    """Qwen2-VL's count: the image resized to multiples of 28 pixels (rounded, then kept within MIN_PIXELS ..
    MAX_PIXELS by scaling both sides), one token per 28 x 28 block (14 x 14 ViT patches, 2 x 2 merged)."""
    f = PATCH * MERGE
    h, w = max(f, round(height / f) * f), max(f, round(width / f) * f)
    if h * w > MAX_PIXELS:
        beta = (height * width / MAX_PIXELS) ** 0.5
        h, w = max(f, int(height / beta // f) * f), max(f, int(width / beta // f) * f)
    elif h * w < MIN_PIXELS:
        beta = (MIN_PIXELS / (height * width)) ** 0.5
        h, w = -(-int(height * beta) // f) * f, -(-int(width * beta) // f) * f
    return (h // f) * (w // f)


def image_part(part: dict) -> tuple[int, int]:
    """``(tokens, seed)`` of an ``image_url`` content part: its size read from the image's header (a base64 data
    URL; vk-serve fetches nothing). Raises HTTPError for anything it cannot read."""
    from PIL import Image, UnidentifiedImageError

    iu = part.get("image_url")
    url = iu.get("url") if isinstance(iu, dict) else iu
    if not isinstance(url, str) or not url.startswith("data:image/") or ";base64," not in url:
        raise HTTPError(400, "image_url: vk-serve reads base64 data URLs (data:image/...;base64,...) only",
                        param="messages")
    try:
        raw = base64.b64decode(url.split(",", 1)[1], validate=True)
        with Image.open(io.BytesIO(raw)) as im:  # reads the header only
            w, h = im.size
    except (ValueError, UnidentifiedImageError, OSError):
        raise HTTPError(400, "image_url: not a readable image", param="messages") from None
    return image_tokens(w, h), _seed(url[-64:], str(len(url)))


def image_ids(images, word_ids: np.ndarray) -> list[int]:
    """Token ids standing for the images' tokens: different for different images, so prefix caching sees them
    as different content."""
    out: list[int] = []
    for n, seed in images:
        out += word_ids[np.random.default_rng(seed).integers(0, len(word_ids), n)].tolist()
    return out


# --------------------------------------------------------------------------------------------------------------
# image generation and speech: answered with bytes

IMAGE_PATHS = ("/v1/images/generations",)
SPEECH_PATHS = ("/v1/audio/speech",)
MAX_IMAGE_PIXELS = 4096 * 4096
SPEECH_SECONDS_PER_TOKEN = 0.2  # seconds of speech per input token (about 150 words a minute)
PCM_RATE = 24_000  # OpenAI's pcm: 24 kHz, 16-bit signed little-endian, mono
SPEECH_CHUNK = 0.1  # seconds of audio per chunk written


def _solid_png(w: int, h: int, n: int) -> str:
    """A base64 PNG of w x h pixels in one colour (fast to make at any size; generation time is the model's)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), ((n * 67) % 256, (n * 131) % 256, (n * 29) % 256)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def handle_bytes(app, conn, method: str, path: str, body: bytes) -> None:
    """Image generation (one diffusion queue, ``--image-megapixel`` seconds per megapixel) and speech (a stream of
    PCM or WAV audio after ``--speech-ttfb``, ``--speech-speed`` times faster than real time)."""
    if method != "POST":
        raise HTTPError(405, "Method Not Allowed")
    t_recv = conn.t_recv or time.monotonic()
    req = parse_body(body, app.opts.model)
    prompt = req.get("prompt" if path in IMAGE_PATHS else "input")
    if not isinstance(prompt, str) or not prompt:
        raise HTTPError(400, f"'{'prompt' if path in IMAGE_PATHS else 'input'}' must be a non-empty string")
    if path in IMAGE_PATHS:
        n = req.get("n", 1) or 1
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 10:
            raise HTTPError(400, "'n' must be an integer from 1 to 10", param="n")
        size = req.get("size") or "1024x1024"
        try:
            w, h = (int(x) for x in str(size).lower().split("x"))
        except ValueError:
            raise HTTPError(400, f"'size' must be WIDTHxHEIGHT, got {size!r}", param="size") from None
        if not (1 <= w and 1 <= h and w * h <= MAX_IMAGE_PIXELS):
            raise HTTPError(400, f"'size' {size} is outside 1x1 .. {MAX_IMAGE_PIXELS} pixels", param="size")
        fmt = req.get("response_format") or "b64_json"
        if fmt != "b64_json":
            raise HTTPError(400, "vk-serve answers response_format b64_json only (no URLs to fetch)",
                            param="response_format")
        done = app.painter.finish_time(t_recv, 0)
        app.painter.free_at = done = done + n * w * h / 1e6 * app.opts.image_megapixel

        def respond() -> None:
            if not conn.closed:
                app.stats.count_response(200)
                data = [{"b64_json": _solid_png(w, h, i)} for i in range(n)]
                conn.respond(200, orjson.dumps({"created": int(time.time()), "data": data}))

        wait = done - time.monotonic()
        app.loop.call_later(max(0.0, wait), respond)
        return
    fmt = req.get("response_format") or "mp3"
    if fmt not in ("pcm", "wav"):
        raise HTTPError(400, f"vk-serve makes pcm and wav audio, not {fmt!r}", param="response_format")
    seconds = app.tok.count(prompt) * SPEECH_SECONDS_PER_TOKEN
    n_bytes = int(seconds * PCM_RATE) * 2
    per_chunk = int(SPEECH_CHUNK * PCM_RATE) * 2
    chunks = max(1, -(-n_bytes // per_chunk))
    ttfb, gap = app.opts.speech_ttfb, SPEECH_CHUNK / app.opts.speech_speed
    app.stats.count_response(200)
    conn.write(b"HTTP/1.1 200 OK\r\nserver: vk-serve\r\ncontent-type: %s\r\ntransfer-encoding: chunked\r\n%s\r\n"
               % (b"audio/pcm" if fmt == "pcm" else b"audio/wav", b"connection: close\r\n" if conn.close_after
                  else b""))
    rng = np.random.default_rng(_seed(prompt))

    def piece(k: int) -> None:
        if conn.closed:
            return
        size = min(per_chunk, n_bytes - k * per_chunk) if n_bytes else 0
        data = (rng.integers(-2000, 2000, max(0, size) // 2, dtype=np.int16)).astype("<i2").tobytes()
        if k == 0 and fmt == "wav":
            data = _wav_header(n_bytes) + data
        out = (http_chunk(data) if data else b"")
        if k == chunks - 1:
            conn.write(out + b"0\r\n\r\n")
            conn.response_done()
            return
        conn.write(out)
        app.loop.call_at(t0 + ttfb + (k + 1) * gap, piece, k + 1)

    t0 = app.loop.time() - (time.monotonic() - t_recv)
    app.loop.call_at(t0 + ttfb, piece, 0)


def _wav_header(n: int) -> bytes:
    import struct

    return b"RIFF" + struct.pack("<I", 36 + n) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, PCM_RATE,
                                                                          PCM_RATE * 2, 2, 16) + \
        b"data" + struct.pack("<I", n)
