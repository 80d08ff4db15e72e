"""``vk-eval plot``: PNG figures (matplotlib, Agg backend)."""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from vk.errors import VkError

MAX_POINTS = 20000  # scatter plots and CDF lines are subsampled (evenly in rank) beyond this


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name))[:80] or "run"


def _cdf(ax, values: np.ndarray, label: str) -> None:
    v = np.sort(values[np.isfinite(values)])
    if len(v) == 0:
        return
    y = np.arange(1, len(v) + 1) / len(v)
    if len(v) > MAX_POINTS:
        idx = np.linspace(0, len(v) - 1, MAX_POINTS).astype(np.int64)
        v, y = v[idx], y[idx]
    ax.plot(v * 1000, y, label=label, lw=1.4)


def _save(fig, plt, path: str) -> str:
    """Lay out, write and close one figure; returns its path."""
    from vk.eval.outputs import writing

    fig.tight_layout()
    try:
        with writing(path):
            fig.savefig(path, dpi=90)
    finally:
        plt.close(fig)
    return path


def _run_data(d, r: int) -> dict[str, np.ndarray]:
    a = d.a
    m = (a["run"] == r) & a["ok"] & ~a["warmup"]
    from vk.eval.metrics import gap_mask

    gsel = gap_mask(d.pe, m)
    itl = d.pe["gaps"] if gsel is None else d.pe["gaps"][np.flatnonzero(gsel)]
    return {"ttft": a["ttft"][m], "tpot": a["tpot"][m], "e2e": a["e2e"][m], "itl": itl,
            "input": a["input_tokens"][m]}


def run_labels(d, labels: list[str] | None = None) -> dict[int, str]:
    """A legend label per run: ``labels`` in input-file order (--label), else the file's name without .jsonl
    (with the start of the run id when one file holds several runs, or two files share a name)."""
    files = [str(r.get("file") or "") for r in d.runs]
    order = list(dict.fromkeys(files))
    if labels:
        if len(labels) != len(order):
            raise VkError(f"--label: {len(labels)} label(s) for {len(order)} input file(s); give one per file")
        by_file = dict(zip(order, labels, strict=True))
        base = [by_file[f] for f in files]
    else:
        base = [os.path.basename(f).removesuffix(".jsonl") or f or "run" for f in files]
    out = {}
    for r, b in enumerate(base):
        out[r] = b if base.count(b) == 1 else f"{b}:{str(d.runs[r]['run_id'])[:8]}"
    return out


def figures(d, runs: list[int], ts: dict, prefix: str, outdir: str, plt, labels: dict[int, str]) -> list[str]:
    paths = []
    run_ids = {r: str(d.runs[r]["run_id"]) for r in runs}
    data = {r: _run_data(d, r) for r in runs}

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (key, title) in zip(axes.flat, (("ttft", "TTFT (ms)"), ("tpot", "TPOT (ms)"),
                                            ("itl", "ITL per chunk (ms)"), ("e2e", "End-to-end latency (ms)")), strict=False):
        for r in runs:
            _cdf(ax, data[r][key], labels[r])
        ax.set_xlabel(title)
        ax.set_ylabel("CDF")
        ax.grid(alpha=0.3)
        ax.set_title(f"CDF of {title.split(' (')[0]}")
    axes.flat[0].legend(fontsize=8)
    paths.append(_save(fig, plt, os.path.join(outdir, f"{prefix}cdf.png")))

    fig, axes = plt.subplots(3, 1, figsize=(11, 9), sharex=True)
    for r in runs:
        s = ts.get(run_ids[r])
        if not s:
            continue
        t = np.array(s["t"])
        ttft = np.array([np.nan if v is None else v * 1000 for v in s["ttft_p50"]])
        axes[0].plot(t, ttft, marker=".", label=labels[r])
        axes[1].plot(t, s["output_tokens_per_s"], label=labels[r])
        axes[2].plot(t, s["concurrency"], label=labels[r])
    axes[0].set_ylabel("TTFT p50 (ms)")
    axes[1].set_ylabel("output tokens/s")
    axes[2].set_ylabel("requests in flight")
    axes[2].set_xlabel("seconds since run start")
    axes[0].set_title("Latency and throughput over time")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    paths.append(_save(fig, plt, os.path.join(outdir, f"{prefix}over_time.png")))

    fig, ax = plt.subplots(figsize=(9, 6))
    for r in runs:
        x, y = data[r]["input"], data[r]["ttft"] * 1000
        ok = np.isfinite(x) & np.isfinite(y)
        x, y = x[ok], y[ok]
        if len(x) > MAX_POINTS:
            idx = np.random.default_rng(0).choice(len(x), MAX_POINTS, replace=False)
            x, y = x[idx], y[idx]
        ax.scatter(x, y, s=6, alpha=0.5, label=labels[r])
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("TTFT (ms)")
    ax.set_title("TTFT against prompt length")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(_save(fig, plt, os.path.join(outdir, f"{prefix}ttft_vs_prompt.png")))

    fig, ax = plt.subplots(figsize=(9, 6))
    for r in runs:
        v = data[r]["itl"] * 1000
        v = v[np.isfinite(v)]
        if len(v):
            hi = np.percentile(v, 99.9) if len(v) > 10 else v.max()
            ax.hist(v[v <= hi], bins=100, histtype="step", label=labels[r], density=True)
    ax.set_xlabel("ITL per chunk (ms), up to p99.9")
    ax.set_ylabel("density")
    ax.set_title("Inter-token latency distribution")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(_save(fig, plt, os.path.join(outdir, f"{prefix}itl_hist.png")))
    return paths


def plot_data(d, outdir: str, overlay: bool = False, labels: list[str] | None = None) -> list[str]:
    from vk.eval.timeseries import timeseries

    plt = _plt()
    try:
        os.makedirs(outdir, exist_ok=True)
    except OSError as e:
        raise VkError(f"{outdir}: cannot create the directory ({e.strerror})") from None
    names = run_labels(d, labels)
    ts = timeseries(d)
    runs = [r for r in range(len(d.runs)) if (d.a["run"] == r).any()]
    if overlay or len(runs) == 1:
        paths = figures(d, runs, ts, "", outdir, plt, names)
    else:
        paths = []
        for r in runs:
            paths += figures(d, [r], ts, _safe(names[r]) + "-", outdir, plt, names)
    from vk.eval.server_metrics import server_figure, timelines

    server = server_figure(timelines(d.inputs.paths, d.con), ts, os.path.join(outdir, "server.png"), plt)
    return paths + ([server] if server else [])


def plot_files(inputs: Any, outdir: str, overlay: bool = False, validate: str = "auto",
               labels: list[str] | None = None) -> list[str]:
    from vk.eval.data import Data

    d = Data(inputs, validate=validate)
    try:
        return plot_data(d, outdir, overlay, labels)
    finally:
        d.con.close()
        d.inputs.close()
