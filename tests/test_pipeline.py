"""The Python API: each stage callable from Python, and the whole pipeline in one call."""

from __future__ import annotations

import pytest

import vk
from vk.eval import evaluate
from vk.gen import generate
from vk.jsonl import read_records
from vk.schedule import schedule
from vk.send import send

WORKLOAD = {
    "session_generator": {
        "type": "synthetic",
        "channels": [{"type": "text", "body_length_generator": {"type": "fixed", "value": 100}}],
        "output_spec": {"text": {"output_length_generator": {"type": "fixed", "value": 10}}},
    }
}


def test_run_benchmark_starts_vk_serve_and_returns_the_evaluation(tmp_path):
    out = tmp_path / "run.jsonl"
    result = vk.run_benchmark(WORKLOAD, count=8, concurrency=2, output=out,
                              serve_args=("--ttft", "0.04", "--tpot", "0.005"))
    d = result.to_dict()
    assert d["overall"]["counts"]["ok"] == 8
    assert d["overall"]["latency"]["ttft"]["p50"] == pytest.approx(0.04, abs=0.005)
    assert d["overall"]["latency"]["tpot"]["p50"] == pytest.approx(0.005, abs=0.002)
    kinds = [r["kind"] for _, _, r in read_records(out)]
    assert kinds[0] == "run" and kinds[-1] == "run_end" and kinds.count("response") == 8
    assert "ttft" in result.format("table")


def test_stages_from_python_against_a_server(tmp_path):
    with vk.serving("--ttft", "0.01", "--tpot", "0.002") as url:
        sessions = list(generate(WORKLOAD, seed=5, count=6))
        assert [s["kind"] for s in sessions] == ["session"] * 6
        assert all(s["requests"][0]["input_tokens"] == 100 for s in sessions)
        sched = list(schedule(sessions, poisson=50, seed=5))
        assert sched[0]["kind"] == "schedule" and len(sched) == 7
        end = send(sched, api=url, output=str(tmp_path / "run.jsonl"), workers=1)
    assert end["kind"] == "run_end" and end["statuses"] == {"ok": 6}
    res = evaluate(str(tmp_path / "run.jsonl"))
    assert res.to_dict()["overall"]["counts"]["requests"] == 6
