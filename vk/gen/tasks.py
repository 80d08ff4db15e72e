"""vk-gen's ``session_generator.task`` section: requests for tasks other than chat.

    task:
      type: embeddings        # chat (default) | embeddings | rerank | vision
      documents: 8            # embeddings, rerank: documents per request (a length generator; default 1)
      document_length: 512    # embeddings, rerank: tokens per document (a length generator; default 512)
      query_length: 64        # rerank: tokens of the query (a length generator; default 64)
      endpoint: rerank        # embeddings, rerank: the path the request goes to (default: embeddings, rerank;
                              # relative to vk-send --api's base, or absolute from the server root: /v2/rerank)
      image_width: 512        # vision: image size in pixels (length generators; default 512 x 512)
      image_height: 512
      images: 1               # vision: images per request (a length generator; default 1)
      image_dir: pictures/    # vision: the user's images (picked at random), resized when a size is given

Embeddings and rerank requests carry their texts (``documents``, ``query``) with exact token counts under the
tokenizer; vision requests are chat requests whose user message has the text first and then ``images``
``image_url`` parts (PNG data URLs of synthetic images, the same for the same seed).
"""

from __future__ import annotations

import base64
import io

import numpy as np

TASK_TYPES = ("chat", "embeddings", "rerank", "vision", "image_generation", "speech")
TASK_KEYS = ("type", "documents", "document_length", "query_length", "endpoint", "image_width", "image_height",
             "images", "voice", "audio_format", "image_dir")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")
DEFAULT_ENDPOINT = {"embeddings": "embeddings", "rerank": "rerank", "image_generation": "images/generations",
                    "speech": "audio/speech"}
AUDIO_FORMATS = ("pcm", "wav", "mp3", "opus", "aac", "flac")


class TaskSpec:
    """The validated task section of a workload."""

    def __init__(self, sec):
        self.type = sec.choice("type", TASK_TYPES, "chat")
        allowed = {"chat": ("type",), "embeddings": ("type", "documents", "document_length", "endpoint"),
                   "rerank": ("type", "documents", "document_length", "query_length", "endpoint"),
                   "vision": ("type", "image_width", "image_height", "images", "image_dir"),
                   "image_generation": ("type", "image_width", "image_height", "images", "endpoint"),
                   "speech": ("type", "voice", "audio_format", "endpoint")}[self.type]
        for k in sec.data or {}:
            if k not in allowed:
                raise sec.cfg.error(sec.key(k), f"not a setting of task type '{self.type}' "
                                                f"(expected: {', '.join(allowed)})")
        if self.type in ("embeddings", "rerank"):
            self.documents = sec.length("documents", 1)
            self.document_length = sec.length("document_length", 512)
        if self.type in DEFAULT_ENDPOINT:
            ep = sec.get("endpoint", DEFAULT_ENDPOINT[self.type])
            if not isinstance(ep, str) or not ep.strip() or any(c in ep for c in " \r\n?#"):
                raise sec.cfg.error(sec.key("endpoint"), f"expected a URL path like rerank or /v2/rerank, got {ep!r}")
            self.endpoint = ep
        if self.type == "rerank":
            self.query_length = sec.length("query_length", 64)
        if self.type == "speech":
            voice = sec.get("voice", "alloy")
            if not isinstance(voice, str) or not voice:
                raise sec.cfg.error(sec.key("voice"), f"expected a voice name, got {voice!r}")
            self.voice = voice
            self.audio_format = sec.choice("audio_format", AUDIO_FORMATS, "pcm")
        self.size_given = sec.has("image_width") or sec.has("image_height")
        self.image_files = []
        if sec.has("image_dir"):
            from pathlib import Path

            d = Path(str(sec.get("image_dir"))).expanduser()
            if not d.is_absolute() and sec.cfg.base_dir is not None:
                d = sec.cfg.base_dir / d
            files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if d.is_dir() else []
            if not files:
                raise sec.cfg.error(sec.key("image_dir"), f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {d}")
            self.image_files = files
        if self.type in ("vision", "image_generation"):
            self.width = sec.length("image_width", 512)
            self.height = sec.length("image_height", 512)
            self.images = sec.length("images", 1)

    def text_request(self, text, rng, rng_content) -> dict:
        """The fields of an embeddings or rerank request (documents, query, their targets)."""
        n = self.documents.sample(rng)
        d = self.document_length.sample(rng)
        docs = [text.start(d, rng_content) for _ in range(n)]
        fields = {"task": self.type, "documents": docs, "document_tokens": d}
        total = n * d
        if self.type == "rerank":
            q = self.query_length.sample(rng)
            fields["query"] = text.start(q, rng_content)
            fields["query_tokens"] = q
            total += q
        if self.endpoint != DEFAULT_ENDPOINT[self.type]:
            fields["endpoint"] = self.endpoint
        fields["input_tokens"] = total
        return fields

    def prompt_request(self, prompt: str, n_tokens: int, rng) -> dict:
        """The fields of an image generation or speech request whose prompt (input) is ``prompt``."""
        fields: dict = {"task": self.type, "prompt": prompt, "input_tokens": n_tokens}
        if self.type == "image_generation":
            fields.update(image_width=self.width.sample(rng), image_height=self.height.sample(rng),
                          images=self.images.sample(rng))
        else:
            fields.update(voice=self.voice, audio_format=self.audio_format)
        if self.endpoint != DEFAULT_ENDPOINT[self.type]:
            fields["endpoint"] = self.endpoint
        return fields

    def image_parts(self, rng) -> tuple[list[dict], list[list[int]]]:
        """``image_url`` content parts for one request, and their sizes [[w, h], ...]."""
        n = self.images.sample(rng)
        parts, sizes = [], []
        for _ in range(n):
            w, h = self.width.sample(rng), self.height.sample(rng)
            if self.image_files:  # the user's pictures, resized to the size asked when the config gives one
                f = self.image_files[int(rng.integers(len(self.image_files)))]
                url, (w, h) = file_data_url(f, (w, h) if self.size_given else None)
            else:
                url = png_data_url(w, h, rng)
            parts.append({"type": "image_url", "image_url": {"url": url}})
            sizes.append([w, h])
        return parts, sizes


MAX_PIXELS = 8192 * 8192


def png_data_url(width: int, height: int, rng: np.random.Generator) -> str:
    """A ``data:image/png;base64,...`` URL of a synthetic width x height picture: a colour gradient with a
    random tint (cheap to make, compresses like a photo's smooth areas, never the same for two images)."""
    from PIL import Image

    if width * height > MAX_PIXELS:
        from vk.errors import VkError

        raise VkError(f"task: an image of {width} x {height} pixels is above the ceiling of {MAX_PIXELS:,} pixels")
    tint = rng.integers(0, 256, size=3)
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    img = np.empty((height, width, 3), dtype=np.uint8)
    img[..., 0] = ((x + tint[0]) % 256).astype(np.uint8)
    img[..., 1] = ((y + tint[1]) % 256).astype(np.uint8)
    img[..., 2] = (((x + y) / 2 + tint[2]) % 256).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def file_data_url(path, size: tuple[int, int] | None) -> tuple[str, tuple[int, int]]:
    """A PNG data URL of the image file ``path`` (resized to ``size`` when given), and its size."""
    from PIL import Image

    from vk.errors import VkError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size is not None and im.size != size:
                im = im.resize(size)
            buf = io.BytesIO()
            im.save(buf, format="PNG", compress_level=1)
            got = im.size
    except (OSError, ValueError) as e:
        raise VkError(f"image {path}: cannot read ({e})") from None
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), got
