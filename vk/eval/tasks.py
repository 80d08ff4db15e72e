"""vk-eval's figures for tasks beyond chat (response field ``task``: embeddings, rerank, vision).

Per task, over its ok requests: ``request_latency`` (``t_done - t_sent``, ms statistics), ``documents_per_s``
and ``input_tokens_per_s`` (documents and input tokens of the completed requests over the group's whole-run
duration, as the throughput table counts it) and ``documents_per_request``. Input tokens are the server's usage
when it reported one, else the targets (vk-eval's ``input_tokens``). Vision requests are chat requests (TTFT,
TPOT in the usual tables); their ``prompt_tokens_over_text`` (``usage.prompt_tokens - target_input_tokens``) is
the images' share of the prompt as the server counts it, plus the chat template's tokens. Image generation and
speech (answered with bytes): ``time_to_first_byte`` (``t_first_body - t_sent``: the first byte of the body, the
first audio of a speech stream), ``time_to_last_byte`` (``t_done - t_sent``), ``bytes_per_s`` (the completed
requests' body bytes over the whole-run duration) and ``bytes_per_request``.
"""

from __future__ import annotations

import numpy as np

from vk.eval import metrics as M
from vk.records import BYTE_TASKS, DOCUMENT_TASKS


def _columns(d) -> tuple[np.ndarray, np.ndarray] | None:
    cached = getattr(d, "_task_columns", False)
    if cached is not False:
        return cached
    cols = {c[0] for c in d.con.execute("DESCRIBE responses").fetchall()}
    out = None
    if {"task", "document_count", "body_bytes", "t_first_body"} <= cols:
        v = d.con.execute("SELECT task, CAST(document_count AS DOUBLE) AS n, CAST(body_bytes AS DOUBLE) AS b, "
                          "t_first_body FROM responses ORDER BY row").fetchnumpy()
        task = np.array([None if x is None else str(x) for x in v["task"]], dtype=object)
        if any(t in DOCUMENT_TASKS + BYTE_TASKS or t == "vision" for t in task):
            out = (task, *(np.asarray(v[k], dtype=float) for k in ("n", "b", "t_first_body")))
    d._task_columns = out
    return out


def task_summary(d, okg: np.ndarray, P, duration: float) -> dict | None:
    """``{task: {requests, request_latency, documents_per_s, input_tokens_per_s, documents_per_request}}`` for
    the ok requests ``okg`` of a group; None when it has no encoder task."""
    cols = _columns(d)
    if cols is None:
        return None
    task, ndocs, nbytes, t_first_body = cols
    out = {}
    for name in DOCUMENT_TASKS:
        m = okg & (task == name)
        if not m.any():
            continue
        docs = float(np.nansum(ndocs[m]))
        tin = float(np.nansum(d.a["input_tokens"][m]))
        out[name] = {
            "requests": int(m.sum()),
            "request_latency": M.stats(d.a["e2e"][m], P),
            "documents_per_s": docs / duration if duration > 0 else None,
            "input_tokens_per_s": tin / duration if duration > 0 else None,
            "documents_per_request": docs / int(m.sum()),
        }
    for name in BYTE_TASKS:
        m = okg & (task == name)
        if not m.any():
            continue
        b = float(np.nansum(nbytes[m]))
        out[name] = {
            "requests": int(m.sum()),
            "time_to_first_byte": M.stats((t_first_body - d.a["t_sent"])[m], P),
            "time_to_last_byte": M.stats(d.a["e2e"][m], P),
            "bytes_per_s": b / duration if duration > 0 else None,
            "bytes_per_request": b / int(m.sum()),
        }
    m = okg & (task == "vision")
    if m.any():
        over = d.a["prompt_tokens"][m] - d.a["target_input_tokens"][m]
        out["vision"] = {"requests": int(m.sum()), "prompt_tokens_over_text": M.stats(over[np.isfinite(over)], P)}
    return out or None


def _byte_text(t: dict, cols, num, table, heading, markdown) -> str:
    byt = {k: x for k, x in t.items() if k in BYTE_TASKS}
    if not byt:
        return ""
    rows = [[name, str(x["requests"]), num(x["bytes_per_request"]), num(x["bytes_per_s"])] for name, x in byt.items()]
    lat = [[f"{name} {k}", str(x[k]["n"])] + [num(x[k].get(c), "ms") for c in cols]
           for name, x in byt.items() for k in ("time_to_first_byte", "time_to_last_byte")]
    return ("\n" + heading("Image generation and speech (ok requests; times from t_sent to the first and last "
                           "byte of the answer's body)", markdown, 3)
            + table(["task", "requests", "bytes/request", "bytes/s"], rows, markdown)
            + "\n" + table(["metric", "n", *[f"{c} ms" for c in cols]], lat, markdown))


def task_text(s: dict, cols: list[str], num, table, heading, markdown: bool) -> str:
    """The text report's table of the encoder tasks (empty without any)."""
    t = s.get("tasks")
    if not t:
        return ""
    enc = {k: x for k, x in t.items() if k in DOCUMENT_TASKS}
    out = ""
    if enc:
        rows = [[name, str(x["requests"]), num(x["documents_per_request"]), num(x["documents_per_s"]),
                 num(x["input_tokens_per_s"])] for name, x in enc.items()]
        lat = [[f"{name} request_latency", str(x["request_latency"]["n"])]
               + [num(x["request_latency"].get(k), "ms") for k in cols] for name, x in enc.items()]
        out += ("\n" + heading("Encoder tasks (ok requests; request_latency = t_done - t_sent)", markdown, 3)
                + table(["task", "requests", "documents/request", "documents/s", "input tok/s"], rows, markdown)
                + "\n" + table(["metric", "n", *[f"{k} ms" for k in cols]], lat, markdown))
    out += _byte_text(t, cols, num, table, heading, markdown)
    v = t.get("vision")
    if v and v["prompt_tokens_over_text"].get("n"):
        st = v["prompt_tokens_over_text"]
        out += ("\n" + heading("Vision (ok requests; TTFT and TPOT as for chat above)", markdown, 3)
                + table(["metric", "n", *[f"{k} tok" for k in cols]],
                        [["prompt_tokens_over_text", str(st["n"])] + [num(st.get(k)) for k in cols]], markdown)
                + "prompt_tokens_over_text = usage.prompt_tokens - target_input_tokens: the images' tokens as the "
                  "server counts them, plus its chat template's\n")
    return out
