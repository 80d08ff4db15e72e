"""vk-sweep: a series of probes (schedule + send + evaluate with one knob changed), or a capacity search.

Python API::

    from vk.sweep import sweep, rescore
    res = sweep("sessions.jsonl", api="http://127.0.0.1:8000/v1", output="sw/", search="rate",
                slo="ttft:p90<500ms,tpot:p99<50ms", duration=30)
    res.answer          # {"last_pass": 8.0, "first_fail": 9.0, "confidence": 0.93, ...}
    print(res.format("table"))
    rescore("sw/", slo="ttft:p90<1s").answer      # new objectives over the kept runs, no traffic

Files: ``DIR/sweep.jsonl`` (a ``sweep`` header, one ``sweep_probe`` line per probe, a ``sweep_end`` footer) and,
per probe, ``DIR/<probe>/schedule.jsonl``, ``run.jsonl``, ``eval.json`` and ``probe.json`` (see vk-formats(5)).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import types
import uuid
from collections.abc import Iterable
from typing import Any

import orjson

from vk import __version__, records
from vk.errors import VkError
from vk.jsonl import Writer, dumps, iter_lines
from vk.sweep.result import SweepResult
from vk.sweep.spec import make_plan

__all__ = ["sweep", "rescore", "SweepResult"]

PLAN_KEYS = ("poisson", "gamma", "cv", "concurrency", "target_rate", "search", "start", "growth", "tolerance",
             "max_probes", "max_value", "slo", "goodput", "min_goodput", "confidence", "bootstrap", "extend",
             "duration", "max_sessions", "warmup", "seed", "saturation", "saturation_min", "cooldown",
             "between_cmd", "drain_timeout")


def sweep(sessions: str | os.PathLike | Iterable[dict], *, api: str, output: str | os.PathLike,
          model: str | None = None, workers: int = 1, send_options: dict | None = None, quiet: bool = True,
          argv: list[str] | None = None, **options: Any) -> SweepResult:
    """Run a sweep or a capacity search; returns a SweepResult (the same as ``vk-sweep --json``).

    ``sessions``: a vk-gen file (``-`` is stdin) or session dicts. ``options``: the command's options by their
    Python names (``poisson="1,2,4"``, ``search="rate"``, ``slo=...``, ``duration=10``, ...). Probes already
    complete in ``output`` are reused, so calling it again after an interruption resumes.
    """
    from vk.sweep.probe import Context, sha256_file
    from vk.sweep.search import answer, run_grid, run_search

    unknown = sorted(set(options) - set(PLAN_KEYS))
    if unknown:
        raise VkError(f"unknown sweep option {unknown[0]!r}")
    plan = make_plan(**options)
    outdir = str(output)
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise VkError(f"{outdir}: exists and is not a directory (-o names the sweep's directory)")
    os.makedirs(outdir, exist_ok=True)
    spath = _sessions_file(sessions, outdir)
    if not os.path.getsize(spath):
        raise VkError(f"{spath}: no sessions")
    sweep_path = os.path.join(outdir, "sweep.jsonl")
    sweep_id = _previous_id(sweep_path) or str(uuid.uuid4())
    sopts = dict(send_options or {})
    if model is not None:
        sopts["model"] = model
    sopts["workers"] = workers
    ctx = Context(plan=plan, sessions=spath, sessions_sha=sha256_file(spath), api=api, outdir=outdir,
                  sweep_id=sweep_id, send_options=sopts, quiet=quiet)
    header = records.new_sweep(sweep_id, plan.mode, plan.knob, seed=plan.seed, slo=plan.slo, goodput=plan.goodput,
                               min_goodput=plan.min_goodput, objectives=plan.objectives(), plan=plan.to_dict(),
                               sessions=spath, sessions_sha256=ctx.sessions_sha, api=api, dir=outdir, vk_version=__version__,
                               argv=list(argv or []))
    t0 = time.monotonic()
    with Writer(sweep_path) as w:
        w.write(header)
        ctx.on_probe = lambda rec: w.write({k: v for k, v in rec.items() if k != "key"})
        why = "all values probed"
        if plan.mode == "grid":
            run_grid(ctx)
        else:
            why = run_search(ctx)
        ans = answer(ctx.probes, plan.tolerance if plan.mode == "search" else None)
        probe_time = sum(p.get("wall_s") or 0.0 for p in ctx.probes)
        end = records.new_sweep_end(sweep_id, answer=ans, reason=why, probes=len(ctx.probes),
                                    probes_reused=sum(1 for p in ctx.probes if p.get("reused")),
                                    probe_time_s=round(probe_time, 3), wall_s=round(time.monotonic() - t0, 3))
        w.write(end)
    return SweepResult(header, [{k: v for k, v in p.items() if k != "key"} for p in ctx.probes], end)


def rescore(dirs: str | os.PathLike | Iterable[str | os.PathLike], *, slo: str | None = None,
            goodput: str | None = None, min_goodput: float | None = None, confidence: float | None = None,
            bootstrap: int | None = None) -> SweepResult | list[SweepResult]:
    """Score finished sweeps again from their kept runs, under new objectives (None: the sweep's own); no
    request is sent. One directory gives a SweepResult, several a list."""
    from vk.sweep.rescore import rescore_dir

    if isinstance(dirs, (str, os.PathLike)):
        return rescore_dir(str(dirs), slo=slo, goodput=goodput, min_goodput=min_goodput, confidence=confidence,
                           bootstrap=bootstrap)
    return [rescore_dir(str(d), slo=slo, goodput=goodput, min_goodput=min_goodput, confidence=confidence,
                        bootstrap=bootstrap) for d in dirs]


def _sessions_file(sessions, outdir: str) -> str:
    """A path to re-read the sessions from for each probe (stdin and dicts are kept in DIR/sessions.jsonl)."""
    if isinstance(sessions, (str, os.PathLike)) and str(sessions) != "-":
        path = str(sessions)
        if not os.path.isfile(path):
            raise VkError(f"{path}: no such file")
        return path
    path = os.path.join(outdir, "sessions.jsonl")
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        if isinstance(sessions, (str, os.PathLike)):
            shutil.copyfileobj(sys.stdin.buffer, fh)
        else:
            for s in sessions:
                fh.write(dumps(s))
    os.replace(tmp, path)
    return path


def _previous_id(sweep_path: str) -> str | None:
    """The sweep id of an earlier run of this sweep into the same directory (so a resumed sweep keeps it)."""
    try:
        for _, rec in iter_lines(sweep_path):
            return rec.get("sweep_id") if rec.get("kind") == "sweep" else None
    except (VkError, OSError, orjson.JSONDecodeError):
        return None
    return None


class _CallableModule(types.ModuleType):
    """``vk.sweep(...)`` calls :func:`sweep` although ``vk.sweep`` is this package."""

    def __call__(self, *args, **kwargs) -> SweepResult:
        return sweep(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
