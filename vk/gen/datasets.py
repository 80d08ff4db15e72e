"""vk-gen's ``session_generator.dataset``: prompts, images and documents from the user's data.

    dataset:
      file: prompts.parquet     # .txt (one prompt per line), .csv, .json (a list of objects or JSON lines),
                                # .jsonl, .parquet; relative to the config file
      # or: hf: owner/name      # a Hugging Face dataset already in the local cache (never downloaded)
      #     split: train        # which of its files (name contains the split; default train)
      columns: {prompt: question, image: image_path, documents: passages, query: question}
      lengths: as_is            # as_is: the data's own lengths; cut: cut to the input length generator's
      order: sequential         # sequential (row i for session i, wrapping) or random

Chat (and vision) requests take their user message from ``prompt`` (and an image file from ``image``, resized to
the task's image size when the config gives one); embeddings and rerank take ``documents`` (a list, or one text
per row) and ``query``; image generation and speech take ``prompt``. Files are read with DuckDB (a dependency
already), only the mapped columns.
"""

from __future__ import annotations

import os
from pathlib import Path

ROLES = ("prompt", "image", "documents", "query")
DATASET_KEYS = ("file", "hf", "split", "columns", "lengths", "order")
_READERS = {".csv": "read_csv_auto", ".tsv": "read_csv_auto", ".json": "read_json_auto",
            ".jsonl": "read_json_auto", ".ndjson": "read_json_auto", ".parquet": "read_parquet"}
MAX_ROWS = 10_000_000


def hf_cache_dirs() -> list[Path]:
    """Where huggingface_hub keeps its cache (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return [Path(os.environ["HF_HUB_CACHE"])]
    home = os.environ.get("HF_HOME") or str(Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface")
    return [Path(home).expanduser() / "hub"]


def find_hf_files(name: str, split: str) -> list[Path]:
    """The data files of split ``split`` of dataset ``name`` in the local cache (the newest snapshot); []."""
    for cache in hf_cache_dirs():
        repo = cache / ("datasets--" + name.replace("/", "--")) / "snapshots"
        if not repo.is_dir():
            continue
        for snap in sorted(repo.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True):
            files = sorted(p for p in snap.rglob("*") if p.suffix in _READERS and split in p.name and p.is_file())
            if files:
                return files
    return []


class Dataset:
    """The rows of a dataset, mapped to vk's roles (prompt, image, documents, query)."""

    def __init__(self, sec, cfg):
        where = sec.key
        if sec.has("file") == sec.has("hf"):
            raise cfg.error(where("file"), "give either file: PATH or hf: OWNER/NAME (from the local cache)")
        cols = sec.get("columns", {"prompt": "prompt"})
        if isinstance(cols, str):
            cols = {"prompt": cols}
        if not isinstance(cols, dict) or not cols or any(k not in ROLES or not isinstance(v, str)
                                                          for k, v in cols.items()):
            raise cfg.error(where("columns"), f"expected a mapping of {', '.join(ROLES)} to column names, got {cols!r}")
        self.columns = cols
        self.lengths = sec.choice("lengths", ("as_is", "cut"), "as_is")
        self.order = sec.choice("order", ("sequential", "random"), "sequential")
        if sec.has("file"):
            path = Path(str(sec.get("file"))).expanduser()
            if not path.is_absolute() and cfg.base_dir is not None:
                path = cfg.base_dir / path
            if not path.is_file():
                raise cfg.error(where("file"), f"no such file: {path}")
            files = [path]
        else:
            name, split = str(sec.get("hf")), str(sec.get("split", "train"))
            files = find_hf_files(name, split)
            if not files:
                raise cfg.error(where("hf"), f"{name} (split {split}) is not in the local Hugging Face cache "
                                             f"({', '.join(map(str, hf_cache_dirs()))}); vk never downloads: fetch "
                                             "it first (huggingface-cli download --repo-type dataset ...)")
        self.base = files[0].parent
        self.rows = []
        for f in files:
            self.rows += self._read(f, cfg, where("file" if sec.has("file") else "hf"))
        if not self.rows:
            raise cfg.error(where("file" if sec.has("file") else "hf"), "the dataset has no rows")

    def _read(self, path: Path, cfg, where: str) -> list[dict]:
        if path.suffix == ".txt" or path.suffix not in _READERS:
            if set(self.columns) != {"prompt"}:
                raise cfg.error(where, f"{path.name}: a text file has prompts only (one per line)")
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise cfg.error(where, f"{path}: cannot read ({e})") from None
            return [{"prompt": line} for line in text.splitlines() if line.strip()][:MAX_ROWS]
        import duckdb

        con = duckdb.connect()
        try:
            have = [r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {_READERS[path.suffix]}(?)",
                                              [str(path)]).fetchall()]
            missing = [c for c in self.columns.values() if c not in have]
            if missing:
                raise cfg.error(where, f"{path.name}: no column {missing[0]!r} (columns: {', '.join(have)})")
            sel = ", ".join(f'"{c}"' for c in self.columns.values())
            data = con.execute(f"SELECT {sel} FROM {_READERS[path.suffix]}(?) LIMIT {MAX_ROWS}",
                               [str(path)]).fetchall()
        except duckdb.Error as e:
            raise cfg.error(where, f"{path}: cannot read ({str(e).splitlines()[0]})") from None
        finally:
            con.close()
        return [dict(zip(self.columns, row, strict=True)) for row in data]

    def row(self, i: int, rng) -> dict:
        return self.rows[i % len(self.rows)] if self.order == "sequential" else self.rows[int(rng.integers(
            len(self.rows)))]

    def image_url(self, value, size: tuple[int, int] | None) -> str:
        """A data URL of the image file ``value`` (relative to the data), resized to ``size`` when given."""
        from vk.gen.tasks import file_data_url

        p = Path(str(value)).expanduser()
        return file_data_url(p if p.is_absolute() else self.base / p, size)[0]


def cut(tok, text: str, n: int) -> tuple[str, int]:
    """``text`` cut to its first ``n`` tokens (as it is when shorter); (text, its token count)."""
    ids = tok.backend.encode(text, add_special_tokens=False).ids if hasattr(tok, "backend") else None
    if ids is None or len(ids) <= n:
        return text, tok.count(text)
    t = tok.backend.decode(ids[:n])
    return t, tok.count(t)


def request_fields(work, row: dict, in_rng, task_rng) -> dict:
    """The content fields of one request made from a dataset row, for the workload's task (see the module)."""
    from vk.errors import VkError

    tok, ds, task = work.tokenizer, work.dataset, work.task

    def text_of(role: str, n_rng=None, length=None) -> tuple[str, int]:
        v = row.get(role)
        if v is None:
            raise VkError(f"dataset: a row has no {role} (map it: dataset.columns.{role})")
        v = str(v)
        if ds.lengths == "cut":
            return cut(tok, v, (length or work.body).sample(n_rng or in_rng))
        return v, tok.count(v)

    t = task.type
    if t in ("embeddings", "rerank"):
        docs = row.get("documents")
        if docs is None:
            raise VkError("dataset: a row has no documents (map it: dataset.columns.documents)")
        docs = [str(x) for x in docs] if isinstance(docs, (list, tuple)) else [str(docs)]
        d_len = task.document_length.sample(task_rng) if ds.lengths == "cut" else None
        pairs = [cut(tok, x, d_len) if d_len else (x, tok.count(x)) for x in docs]
        out = {"task": t, "documents": [p[0] for p in pairs], "input_tokens": sum(p[1] for p in pairs)}
        if d_len and len({p[1] for p in pairs}) == 1:
            out["document_tokens"] = pairs[0][1]
        if t == "rerank":
            q, nq = text_of("query", task_rng, task.query_length)
            out.update(query=q, query_tokens=nq, input_tokens=out["input_tokens"] + nq)
        return out
    prompt, n = text_of("prompt")
    if t in ("image_generation", "speech"):
        return task.prompt_request(prompt, n, task_rng)
    out: dict = {"messages": [{"role": "user", "content": prompt}], "input_tokens": n}
    if t == "vision":
        if "image" in ds.columns:
            size = (task.width.sample(task_rng), task.height.sample(task_rng)) if task.size_given else None
            parts = [{"type": "image_url", "image_url": {"url": ds.image_url(row.get("image"), size)}}]
            sizes = [list(size)] if size else None
        else:
            parts, sizes = task.image_parts(task_rng)
        out["messages"][0]["content"] = [{"type": "text", "text": prompt}] + parts
        out["task"] = "vision"
        if sizes:
            out["image_sizes"] = sizes
    return out
