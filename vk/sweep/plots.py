"""Sweep figures, one or several sweeps overlaid (a side-by-side of two servers or configurations):

- ``latency-throughput.png``: TTFT and TPOT (p50 and p99) against the output tokens/s achieved;
- ``goodput-load.png``: the share of requests meeting the per-request objectives (or, without them, the
  requests/s achieved) against the offered load (the knob);
- ``pareto.png``: output tokens/s per user (1 / TPOT p50) against total output tokens/s, each point labelled
  with its knob value: the throughput-interactivity trade-off.
"""

from __future__ import annotations

import os

from vk.sweep.result import SweepResult


def _label(res: SweepResult, i: int) -> str:
    h = res.header
    name = os.path.basename(os.path.normpath(h.get("dir") or res.end.get("dir") or "")) or f"sweep {i + 1}"
    return f"{name} ({h['knob']})"


def _points(res: SweepResult, *fields: str) -> list[tuple]:
    rows = sorted(res.probes, key=lambda p: (p["value"], p.get("attempt", 0)))
    last = {}
    for p in rows:
        last[p["value"]] = p  # the longest attempt at each value
    out = []
    for p in last.values():
        vals = tuple(p.get(f) for f in fields)
        if all(v is not None for v in vals):
            out.append((*vals, p))
    return out


def plot_sweeps(results: list[SweepResult], outdir: str, labels: list[str] | None = None) -> list[str]:
    """Write the three figures to ``outdir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(outdir, exist_ok=True)
    labels = labels or [_label(r, i) for i, r in enumerate(results)]
    paths = []

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for res, lab in zip(results, labels, strict=True):
        for ax, metric in zip(axes, ("ttft", "tpot"), strict=True):
            for stat, style in (("p50", "-o"), ("p99", "--s")):
                pts = _points(res, "output_tps", f"{metric}_{stat}")
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] * 1000 for p in pts], style, label=f"{lab} {stat}", ms=4)
    for ax, metric in zip(axes, ("TTFT", "TPOT"), strict=True):
        ax.set_xlabel("output tokens/s (achieved)")
        ax.set_ylabel(f"{metric} (ms)")
        ax.set_title(f"{metric} against throughput")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    paths.append(_save(fig, plt, outdir, "latency-throughput.png"))

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    share = any(p.get("attainment") is not None for r in results for p in r.probes)
    for res, lab in zip(results, labels, strict=True):
        pts = _points(res, "value", "attainment" if share else "achieved_rps")
        if pts:
            ax.plot([p[0] for p in pts], [p[1] * (100 if share else 1) for p in pts], "-o", ms=4, label=lab)
            for x, y, p in pts:
                if p.get("verdict") == "fail":
                    ax.plot([x], [y * (100 if share else 1)], "x", color="red", ms=8)
    knob = results[0].header["knob"] if results else "value"
    ax.set_xlabel(f"offered load ({knob})")
    ax.set_ylabel("requests meeting the objectives (%)" if share else "requests/s achieved")
    ax.set_title("goodput against offered load (x: failing probe)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    paths.append(_save(fig, plt, outdir, "goodput-load.png"))

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for res, lab in zip(results, labels, strict=True):
        pts = sorted(_points(res, "output_tps", "user_tps"), key=lambda p: p[0])
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", ms=4, label=lab)
            for x, y, p in pts:
                ax.annotate(f"{p['value']:g}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("total output tokens/s")
    ax.set_ylabel("output tokens/s per user (1 / TPOT p50)")
    ax.set_title("throughput against interactivity (Pareto view)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    paths.append(_save(fig, plt, outdir, "pareto.png"))
    return paths


def _save(fig, plt, outdir: str, name: str) -> str:
    path = os.path.join(outdir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
