"""``vk-eval sweep DIR [--slo NEW]``: score a finished sweep again from its kept runs, sending no request.

Each probe's ``run.jsonl`` is evaluated again under the new objectives; a probe that was stopped for saturation
stays failing (its run is cut short, so what it measured says little about the objectives). The answer is
recomputed from the new verdicts: the last passing and first failing value among the probes that were run.
"""

from __future__ import annotations

import os
from dataclasses import replace

from vk import records
from vk.errors import RecordError, VkError
from vk.jsonl import read_records
from vk.sweep import verdict
from vk.sweep.probe import figures
from vk.sweep.result import SweepResult
from vk.sweep.search import answer
from vk.sweep.spec import Plan, per_request_goodput


def load(dirpath: str) -> tuple[dict, list[dict], dict | None]:
    path = os.path.join(dirpath, "sweep.jsonl")
    if not os.path.isfile(path):
        raise VkError(f"{dirpath}: not a vk-sweep directory (no sweep.jsonl)")
    header, probes, end = None, [], None
    for src, n, rec in read_records(path, ("sweep", "sweep_probe", "sweep_end")):
        if rec["kind"] == "sweep":
            header = rec
        elif header is None:
            raise RecordError(src, n, "kind", "expected the 'sweep' header first")
        elif rec["kind"] == "sweep_probe":
            probes.append(rec)
        else:
            end = rec
    if header is None:
        raise VkError(f"{path}: empty (no sweep header)")
    return header, probes, end


def rescore_dir(dirpath: str, *, slo=None, goodput=None, min_goodput=None, confidence=None,
                bootstrap=None) -> SweepResult:
    from vk.eval import evaluate
    from vk.eval.slo import parse_goodput, parse_slo

    header, probes, end = load(dirpath)
    pd = dict(header.get("plan") or {})
    plan = Plan(**{k: v for k, v in pd.items() if k in Plan.__dataclass_fields__})
    changes = {}
    if slo is not None:
        changes["slo"] = slo
        parse_slo(slo)
    if goodput is not None:
        changes["goodput"] = goodput
        parse_goodput(goodput)
    if min_goodput is not None:
        changes["min_goodput"] = min_goodput
    if confidence is not None:
        changes["confidence"] = confidence
    if bootstrap is not None:
        changes["bootstrap"] = bootstrap
    plan = replace(plan, **changes)
    objectives = plan.objectives()
    gp = per_request_goodput(plan)
    out = []
    for p in probes:
        run_path = os.path.join(dirpath, p.get("dir") or p["probe"], "run.jsonl")
        if not os.path.isfile(run_path):
            raise VkError(f"{run_path}: missing (the sweep's runs are needed to score it again)")
        res = evaluate(run_path, slo=objectives, goodput=gp).to_dict()
        cols = verdict.request_columns(run_path) if objectives else None
        scored = verdict.score(res, cols, goodput_spec=gp, confidence=plan.confidence, bootstrap=plan.bootstrap,
                               seed=p.get("seed") or 0)
        if p.get("saturation") is not None:
            scored.update(verdict="fail", confidence=1.0, uncertain=False)
        out.append({**p, **figures(res), **scored, "rescored": True})
    hdr = {**header, "slo": plan.slo, "goodput": plan.goodput, "min_goodput": plan.min_goodput,
           "objectives": objectives, "rescored_from": header.get("objectives")}
    new_end = records.new_sweep_end(header["sweep_id"], answer=answer(out, plan.tolerance if plan.mode == "search"
                                                                      else None),
                                    reason="scored again from the kept runs (no request sent)", probes=len(out),
                                    probes_reused=len(out),
                                    probe_time_s=(end or {}).get("probe_time_s"), dir=dirpath)
    return SweepResult(hdr, out, new_end)
