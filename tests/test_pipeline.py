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


@pytest.mark.timing
def test_run_benchmark_starts_vk_serve_and_returns_the_evaluation(tmp_path):
    out = tmp_path / "run.jsonl"
    result = vk.run_benchmark(WORKLOAD, count=8, concurrency=2, output=out,
                              serve_args=("--ttft", "0.04", "--tpot", "0.005", "--server-timestamps"))
    d = result.to_dict()
    assert d["overall"]["counts"]["ok"] == 8
    # against the server's own write times of the first and last token (not the configured values, loosely)
    resp = [r for _, _, r in read_records(out) if r["kind"] == "response"]
    st = [[t for t, k in zip(r["events"]["server_t"], r["events"]["kind"], strict=True) if k in "crt"] for r in resp]
    server_ttft = sorted(s[0] - r["t_sent"] for s, r in zip(st, resp, strict=True))
    server_tpot = sorted((s[-1] - s[0]) / (len(s) - 1) for s in st)
    assert d["overall"]["latency"]["ttft"]["p50"] == pytest.approx((server_ttft[3] + server_ttft[4]) / 2, abs=2e-4)
    assert d["overall"]["latency"]["tpot"]["p50"] == pytest.approx((server_tpot[3] + server_tpot[4]) / 2, abs=2e-4)
    assert d["overall"]["latency"]["ttft"]["p50"] == pytest.approx(0.04, rel=0.05)
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


def test_run_benchmark_takes_send_options_and_leaves_no_temporary_files(tmp_path, monkeypatch):
    """send_options may set workers (it failed with "multiple values for 'workers'"); without an output file the
    records' temporary directory is gone after the evaluation (issue 14.7)."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # TMPDIR is read again
    result = vk.run_benchmark(WORKLOAD, count=4, concurrency=2, send_options={"workers": 2},
                              serve_args=("--ttft", "0.01", "--tpot", "0.002"))
    assert result.to_dict()["overall"]["counts"]["ok"] == 4
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("vk-run-")]
