"""vk-send --scrape: the server's Prometheus samples as server_metric records, and what vk-eval makes of them."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections import defaultdict
from pathlib import Path

import orjson
import pytest

from tests.conftest import ROOT, run_vk, vk_cmd
from vk import records
from vk.errors import RecordError
from vk.send.scrape import exposition_records, metrics_url

METRICS = Path(__file__).resolve().parent / "data" / "metrics"


def _read(path) -> list[dict]:
    return [orjson.loads(ln) for ln in Path(path).read_bytes().splitlines()]


def _scrapes(recs) -> dict[float, dict[str, float]]:
    """{t: {name: value}} (labels dropped: vk-serve has one model and one engine)."""
    out: dict[float, dict[str, float]] = defaultdict(dict)
    for r in recs:
        if r["kind"] == "server_metric" and r["name"] is not None:
            out[r["t"]][r["name"]] = r["value"]
    return dict(sorted(out.items()))


def _no_process_with(marker: str) -> bool:
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker.encode() in (d / "cmdline").read_bytes():
                    return False
            except OSError:
                pass
    return True


# -- records -------------------------------------------------------------------------------------------------


def test_server_metric_records_are_validated_with_the_field_named():
    ok = records.new_server_metric("r", 1.0, "vllm:num_requests_running", 2.0, labels={"engine": "0"},
                                   type="gauge")
    assert records.validate(ok) is ok
    failed = records.new_server_metric("r", 1.0, None, None, error="HTTP 404 from http://h/metrics")
    assert records.validate(failed) is failed
    for bad, field in (({**ok, "t": "1"}, "t"), ({**ok, "labels": {"engine": 0}}, "labels"),
                       ({**ok, "type": "histo"}, "type"), ({**ok, "name": None}, "name"),
                       ({**ok, "value": "x"}, "value")):
        with pytest.raises(RecordError) as e:
            records.validate(bad, "run.jsonl", 7)
        assert e.value.field == field and str(e.value).startswith("run.jsonl:7:")


def test_the_run_header_server_field_is_validated():
    run = records.new_run("r", 1.7e9, api="http://127.0.0.1:1/v1", model="m", endpoint="chat", vk_version="0",
                          host="h", argv=[], server={"cmd": "vllm serve m", "pid": 12, "models": ["m"]})
    assert records.validate(run) is run
    with pytest.raises(RecordError, match="server.models"):
        records.validate({**run, "server": {"cmd": "x", "models": "m"}})


def test_exposition_parsing_keeps_counters_raw_and_leaves_buckets_out():
    text = (METRICS / "vllm-1.prom").read_text()
    recs = exposition_records(text, 1.5, "r")
    by_name = {r["name"]: r for r in recs}
    assert by_name["vllm:prefix_cache_hits_total"]["value"] == 3400.0
    assert by_name["vllm:prefix_cache_hits_total"]["type"] == "counter"
    assert by_name["vllm:num_requests_waiting"]["labels"] == {"engine": "0", "model_name": "meta-llama/Llama-3.1-8B"}
    assert "vllm:e2e_request_latency_seconds_sum" in by_name
    assert not any(r["name"].endswith(("_bucket", "_created")) for r in recs)
    assert any(r["name"].endswith("_bucket") for r in exposition_records(text, 1.5, "r", buckets=True))
    assert all(records.validate(r) for r in recs) and all(r["t"] == 1.5 for r in recs)


def test_the_default_scrape_url_is_the_api_origin_and_the_key_goes_only_there():
    from vk.send.scrape import Scraper

    assert metrics_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/metrics"
    own = Scraper.for_api("http://127.0.0.1:8000/v1", "", 1.0, False, "sk-x")
    assert own.url == "http://127.0.0.1:8000/metrics" and own.api_key == "sk-x"
    assert Scraper.for_api("http://127.0.0.1:8000/v1", "http://127.0.0.1:9100/metrics", 1.0, False,
                           "sk-x").api_key is None


# -- vk-eval: the names of vLLM, SGLang and TGI mapped ----------------------------------------------------------


def _run_with_scrapes(engine: str, *, scale_server_tokens: float = 1.0) -> list[dict]:
    """A run of 10 responses of 100 output tokens each between 0.5 s and 9.5 s, with two scrapes of the engine's
    fixture expositions around it (t = -0.01 and t = 10)."""
    rid = "run-" + engine
    out = [records.new_run(rid, 1.7e9, api="http://127.0.0.1:1/v1", model="m", endpoint="chat", vk_version="0",
                           host="h", argv=[])]
    for t, name in ((-0.01, f"{engine}-0.prom"), (10.0, f"{engine}-1.prom")):
        recs = exposition_records((METRICS / name).read_text(), t, rid)
        if t > 0 and scale_server_tokens != 1.0:
            for r in recs:
                if r["name"] == "vllm:generation_tokens_total":
                    r["value"] = 500 + (r["value"] - 500) * scale_server_tokens
        out += recs
    for i in range(10):
        t0 = 0.5 + i
        ts = [round(t0 + 0.1 + j * 0.003, 6) for j in range(100)]
        out.append(records.new_response(
            rid, f"s{i}", "r0", "ok", t_intended=t0, t_dispatched=t0, t_sent=t0, t_first_byte=ts[0],
            t_first_token=ts[0], t_first_content=ts[0], t_last_token=ts[-1], t_done=ts[-1],
            events={"t": ts, "kind": "c" * 100}, usage={"prompt_tokens": 1000, "completion_tokens": 100}))
    out.append(records.new_run_end(rid, requests=10, lagged=False))
    return out


@pytest.mark.parametrize("engine, running, waiting, kv, hit_rate, preemptions", [
    ("vllm", 6, 3, 0.42, 0.3, 3),
    ("sglang", 4, 2, 0.25, 0.3, 1),
    ("tgi", 8, 5, None, None, None),
])
def test_each_engines_names_are_mapped(engine, running, waiting, kv, hit_rate, preemptions):
    from vk.eval import evaluate

    res = evaluate(_run_with_scrapes(engine)).to_dict()
    (s,) = res["server"]
    assert s["engine"] == engine and s["scrapes"] == 2 and s["window"] == [-0.01, 10.0]
    assert s["running"]["max"] == running and s["waiting"]["max"] == waiting
    assert (s["kv_cache_usage"] or {}).get("max") == kv
    assert s["prefix_cache_hit_rate"] == (pytest.approx(hit_rate) if hit_rate is not None else None)
    assert s["preemptions"] == preemptions
    assert s["prompt_tokens"] == 10000 and s["generation_tokens"] == 1000
    assert s["generation_tokens_per_s"] == pytest.approx(1000 / 10.01)
    cc = s["cross_check"]
    assert cc["client_output_tokens"] == 1000 and cc["ratio"] == pytest.approx(1.0)
    assert not s["warnings"]
    assert not any("SERVER TOKENS" in f for f in res["overall"]["accuracy"]["flags"])


def test_a_server_that_counts_other_tokens_than_the_client_is_a_warning():
    from vk.eval import evaluate

    res = evaluate(_run_with_scrapes("vllm", scale_server_tokens=1.5))
    s = res.to_dict()["server"][0]
    assert s["cross_check"]["ratio"] == pytest.approx(1.5)
    flags = res.to_dict()["overall"]["accuracy"]["flags"]
    assert any(f.startswith("SERVER TOKENS DISAGREE") and "1500" in f and "1000" in f for f in flags)
    text = res.format("table")
    assert "Server (scraped metrics)" in text and "SERVER TOKENS DISAGREE" in text


def test_the_server_metrics_view_and_the_figure(tmp_path):
    from vk.eval import sql
    from vk.eval.plots import plot_files

    path = tmp_path / "run.jsonl"
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in _run_with_scrapes("sglang")))
    rows = sql("SELECT t, sum(value) FROM server_samples WHERE name = 'sglang:cached_tokens_total' "
               "GROUP BY t ORDER BY t", str(path))
    assert rows == [(-0.01, 600.0), (10.0, 3600.0)]
    rows = sql("SELECT t, running, waiting, kv_cache_usage, prefix_cache_hits, preemptions, "
               "generation_tokens_per_s, prefix_cache_hit_rate FROM server_metrics", str(path))
    assert rows[0] == (-0.01, 0, 0, 0, 600, 0, None, None)
    assert rows[1][:6] == (10.0, 4, 2, 0.25, 3600, 1)
    assert rows[1][6] == pytest.approx(1000 / 10.01) and rows[1][7] == pytest.approx(0.3)
    figs = plot_files(str(path), str(tmp_path / "plots"))
    assert str(tmp_path / "plots" / "server.png") in figs


def test_runs_without_scrapes_have_no_server_section():
    from vk.eval import evaluate

    recs = [r for r in _run_with_scrapes("vllm") if r["kind"] != "server_metric"]
    assert "server" not in evaluate(recs).to_dict()


# -- vk-send --scrape against vk-serve ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def prefix_sessions(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("scrape") / "sessions.jsonl"
    p = run_vk("vk-gen", str(ROOT / "examples" / "gen-prefix.yaml"), "--seed", "3", "--count", "24",
               "--set", "session_generator.session_graph.request_wait_generator.mean=0.05", check=True)
    path.write_bytes(p.stdout)
    return path


@pytest.mark.timing
def test_scraped_gauges_and_counters_agree_with_what_vk_serve_did(serve, tmp_path, prefix_sessions):
    # two sequences at a time and six sessions in flight: a queue forms and the prefix cache is hit
    srv = serve("--max-num-seqs", "2", "--speed", "8")
    out = tmp_path / "run.jsonl"
    run_vk("vk-send", str(prefix_sessions), "--api", srv.url, "--concurrency", "6", "--workers", "1",
           "--scrape", "--scrape-interval", "0.1", "-o", str(out), check=True)
    recs = _read(out)
    for i, r in enumerate(recs):
        records.validate(r, str(out), i + 1)
    assert recs[0]["kind"] == "run" and recs[-1]["kind"] == "run_end"
    rs = [r for r in recs if r["kind"] == "response"]
    assert rs and all(r["status"] == "ok" for r in rs)
    scrapes = _scrapes(recs)
    ts = list(scrapes)
    assert len(ts) >= 5
    assert ts[0] < 0  # the baseline before the first request
    assert ts[-1] >= max(r["t_done"] for r in rs)  # the last one after the last response

    first, last = scrapes[ts[0]], scrapes[ts[-1]]

    def delta(name):
        return last[name] - first[name]

    # counters: what the responses say the server did (the baseline is taken before the run's start instant, so
    # no request of the run is counted in it, however late the server answers it)
    assert delta("vllm:generation_tokens_total") == sum(r["usage"]["completion_tokens"] for r in rs)
    assert delta("vllm:prompt_tokens_total") == sum(r["usage"]["prompt_tokens"] for r in rs)
    cached = sum(r["usage"]["cached_tokens"] for r in rs)
    prompt = sum(r["usage"]["prompt_tokens"] for r in rs)
    assert cached > 0
    hit_rate = delta("vllm:prefix_cache_hits_total") / delta("vllm:prefix_cache_queries_total")
    assert hit_rate == pytest.approx(cached / prompt, abs=0.03)

    # gauges: never more than two running; a queue while six sessions want service; empty at the end
    assert all(s["vllm:num_requests_running"] <= 2 for s in scrapes.values())
    assert max(s["vllm:num_requests_waiting"] for s in scrapes.values()) >= 2
    assert last["vllm:num_requests_running"] == 0 and last["vllm:num_requests_waiting"] == 0
    # what the server held at each scrape is what the client had in flight then (give or take the one request
    # whose bytes were on the way)
    near = 0
    inner = [t for t in ts if 0 < t < max(r["t_done"] for r in rs)]
    for t in inner:
        inflight = sum(r["t_sent"] <= t < r["t_done"] for r in rs)
        held = scrapes[t]["vllm:num_requests_running"] + scrapes[t]["vllm:num_requests_waiting"]
        near += abs(held - inflight) <= 1
    assert near >= 0.8 * len(inner), (near, len(inner))
    for s in scrapes.values():
        assert 0 <= s["vllm:kv_cache_usage_perc"] <= 1
        if s["vllm:num_requests_running"] > 0:
            assert s["vllm:kv_cache_usage_perc"] > 0


def test_current_load_reads_the_queue_gauges_of_a_live_server(serve):
    import concurrent.futures as cf

    import httpx

    from vk.eval.server_metrics import current_load

    # one sequence at a time, slow steps: of three long requests, one runs and two wait
    srv = serve("--max-num-seqs", "1", "--speed", "0.2")
    assert current_load(srv.base + "/metrics") == {"engine": "vllm", "running": 0.0, "waiting": 0.0,
                                                   "kv_cache_usage": 0.0}
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 400, "min_tokens": 400}

    def post() -> int:
        return httpx.post(srv.url + "/chat/completions", json=body, timeout=120).status_code

    with cf.ThreadPoolExecutor(3) as ex:
        futures = [ex.submit(post) for _ in range(3)]
        deadline = time.monotonic() + 30
        load = None
        while time.monotonic() < deadline:
            load = current_load(srv.base + "/metrics")
            if load["running"] + load["waiting"] == 3:
                break
            time.sleep(0.05)
        assert load["running"] == 1 and load["waiting"] == 2 and load["kv_cache_usage"] > 0, load
        srv.stop()  # the requests fail; they were only there to fill the queue
        for f in futures:
            with pytest.raises(httpx.HTTPError):
                f.result()
    assert current_load(srv.base + "/metrics", timeout=0.5) is None


def test_a_failed_scrape_is_a_record_and_the_run_goes_on(serve, tmp_path):
    srv = serve("--ttft", "0.01", "--tpot", "0.001")
    sessions = run_vk("vk-gen", "--count", "3", "--seed", "1", check=True).stdout
    out = tmp_path / "run.jsonl"
    run_vk("vk-send", "--api", srv.url, "--scrape", srv.base + "/nothing-here", "-o", str(out), "--workers", "1",
           input=sessions, check=True)
    recs = _read(out)
    errors = [r for r in recs if r["kind"] == "server_metric"]
    assert errors and all(r["name"] is None and "HTTP 404" in r["error"] for r in errors)
    assert sum(r["kind"] == "response" and r["status"] == "ok" for r in recs) >= 3


def test_a_file_name_after_scrape_is_refused_in_one_line(tmp_path):
    p = run_vk("vk-send", "--api", "http://127.0.0.1:9/v1", "--scrape", "sched.jsonl")
    assert p.returncode == 2
    err = p.stderr.decode().strip()
    assert len(err.splitlines()) == 1 and "--scrape: expected an http(s) URL, got 'sched.jsonl'" in err


def test_sigint_leaves_no_scraper_behind_and_the_last_scrape_is_written(serve, tmp_path):
    srv = serve("--ttft", "0.05", "--tpot", "0.02")
    sessions = run_vk("vk-gen", "--count", "200", "--seed", "1", check=True).stdout
    sched = tmp_path / "sched.jsonl"
    sched.write_bytes(sessions)
    marker = uuid.uuid4().hex
    out = tmp_path / "run.jsonl"
    p = subprocess.Popen([*vk_cmd("vk-send"), str(sched), "--api", srv.url, "--workers", "1", "--concurrency", "4",
                          "--scrape", f"{srv.base}/metrics?run={marker}", "-o", str(out)],
                         stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while sum(b'"kind":"response"' in ln for ln in out.read_bytes().splitlines()) < 3 if out.exists() else True:
        assert time.monotonic() < deadline and p.poll() is None
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 130, err.decode()
    recs = _read(out)
    assert recs[-1]["kind"] == "run_end" and recs[-1]["ended"] == "interrupted"
    scrapes = _scrapes(recs)
    rs = [r for r in recs if r["kind"] == "response"]
    assert list(scrapes)[-1] >= max(r["t_done"] for r in rs if r.get("t_done") is not None)
    deadline = time.monotonic() + 5
    while not _no_process_with(marker):
        assert time.monotonic() < deadline, "the scraping process outlived vk-send"
        time.sleep(0.05)
    assert os.path.exists(out)
