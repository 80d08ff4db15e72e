"""Loose ends after the merge: per-node clocks of Ray runs in vk-eval's accuracy section, retried and warned
requests, runs that ended early named in the headline, the server header in the report, vk-sweep's error rate as
vk-eval counts it, and --save-text keeping reasoning text. Hand-built records with known answers."""

from __future__ import annotations

import numpy as np
import orjson
from test_eval import RUN, resp

from vk.eval import evaluate


def write(path, recs):
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    return str(path)


def _ok(rid, t, **kw):
    return resp(rid, t_intended=t, events=[(t + 0.1, "c", 1), (t + 0.2, "c", 1)],
                usage={"prompt_tokens": 10, "completion_tokens": 2}, **kw)


END = {"kind": "run_end", "v": 1, "run_id": "run-a", "requests": 0, "statuses": {}, "errors": 0, "duration": 1.0,
       "ended": "complete", "lagged": False}


def test_sweep_error_rate_leaves_out_cancelled_and_skipped(tmp_path):
    """4 ok, 1 error, 2 cancelled, 1 skipped: the server failed 1 of the 5 it was asked to finish (20%), not 4 of 8."""
    from vk.sweep import verdict

    recs = [RUN] + [_ok(f"ok{i}", float(i)) for i in range(4)]
    recs += [resp("e", t_intended=5.0, status="error", t_done=5.1, error="HTTP 500")]
    recs += [resp(f"c{i}", t_intended=6.0 + i, status="cancelled", t_done=6.5 + i, error="stopped") for i in range(2)]
    recs += [resp("s", t_intended=9.0, status="skipped", t_sent=None, t_dispatched=None, error="parent failed")]
    p = write(tmp_path / "run.jsonl", recs)
    ev = evaluate(p).to_dict()
    assert ev["overall"]["counts"]["error_rate"] == 0.2
    cols = verdict.request_columns(p)
    x, stat = verdict.sample_for({"metric": "error_rate", "stat": None}, cols, None)
    assert float(getattr(np, stat)(x)) == 0.2
    assert len(x) == 5
    x, _ = verdict.sample_for({"metric": "attainment", "stat": None}, cols, "ttft<1s")
    assert float(x.mean()) == 0.8  # 4 good of the 5 served, as vk-eval's goodput counts them
    assert ev["overall"]["counts"]["served"] == 5
