"""The engine model of vk-serve: its effects seen through the real HTTP interface, plus unit tests of its parts."""

from __future__ import annotations

import concurrent.futures as cf
import re
import threading
import time

import httpx
import pytest
from test_serve import content_events, post, stream_chat

from vk.serve.model import PROFILES, EngineConfig, KVCache, step_time

QUIET = ["--t-weights", "0", "--t-token", "0", "--t-kv", "0"]


def metric(base: str, name: str) -> float:
    text = httpx.get(base + "/metrics", timeout=10).text
    m = re.search(r"^" + re.escape(name) + r"(\{[^}]*\})? (\S+)$", text, re.M)
    assert m, name
    return float(m.group(2))


class MetricsPoller:
    """Samples gauges in the background while a test drives load."""

    def __init__(self, base: str, names: list[str]):
        self.base, self.names = base, names
        self.samples: dict[str, list[float]] = {n: [] for n in names}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        with httpx.Client(timeout=10) as c:
            while not self.stop.is_set():
                text = c.get(self.base + "/metrics").text
                for n in self.names:
                    m = re.search(r"^" + re.escape(n) + r"(\{[^}]*\})? (\S+)$", text, re.M)
                    self.samples[n].append(float(m.group(2)))
                time.sleep(0.01)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def ttft(res) -> float:
    """Time of the first token event (chat content or completions text)."""
    for e, t in zip(res["events"], res["times"], strict=True):
        if isinstance(e, dict) and e["choices"] and (e["choices"][0].get("delta", {}).get("content")
                                                     or e["choices"][0].get("text")):
            return t
    raise AssertionError("no token in the stream")


def tpot(res) -> float:
    ce = content_events(res)
    return (ce[-1][1] - ce[0][1]) / (len(ce) - 1)


# -- effects through HTTP ------------------------------------------------------------------------------------------

@pytest.mark.timing  # a queue of ~0.4 s seen by a poller thread: missed on a loaded machine
def test_ttft_grows_with_queue_when_saturated(serve):
    s = serve("--max-num-seqs", "2", "--t-fixed", "0.01", *QUIET)
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 10, "min_tokens": 10}
    with MetricsPoller(s.base, ["vllm:num_requests_waiting", "vllm:num_requests_running"]) as mp:
        with cf.ThreadPoolExecutor(8) as ex:
            results = list(ex.map(lambda _: stream_chat(s.url, body), range(8)))
    ttfts = sorted(ttft(r) for r in results)
    # two at a time, ~110 ms each: the k-th pair waits about k x 110 ms
    assert ttfts[1] < 0.1, ttfts
    assert ttfts[-1] > 0.28, ttfts
    assert sum(ttfts[4:]) / 4 > sum(ttfts[:4]) / 4 + 0.15, ttfts
    assert max(mp.samples["vllm:num_requests_waiting"]) >= 2
    assert max(mp.samples["vllm:num_requests_running"]) <= 2


def test_prefix_cache_hits_are_reported_and_faster(serve):
    s = serve("--t-fixed", "0.002", "--t-weights", "0.002", "--t-token", "0.0001", "--t-kv", "0")
    system = {"role": "system", "content": " ".join(f"rule {i}: be kind to the number {i * 7}." for i in range(150))}
    a = stream_chat(s.url, {"messages": [system, {"role": "user", "content": "What is rule 3?"}], "max_tokens": 20,
                            "min_tokens": 20, "stream_options": {"include_usage": True}})
    ua = a["events"][-2]["usage"]
    assert ua["prompt_tokens"] > 1500 and ua["prompt_tokens_details"]["cached_tokens"] == 0
    b = stream_chat(s.url, {"messages": [system, {"role": "user", "content": "And rule 99?"}], "max_tokens": 20,
                            "min_tokens": 20, "stream_options": {"include_usage": True}})
    ub = b["events"][-2]["usage"]
    cached = ub["prompt_tokens_details"]["cached_tokens"]
    assert ub["prompt_tokens"] - 32 <= cached < ub["prompt_tokens"] and cached % 16 == 0
    assert ttft(b) < 0.5 * ttft(a), (ttft(a), ttft(b))  # ~170 ms of prefill saved
    # a continued conversation hits the cache for the previous prompt and the answer the server gave
    answer = "".join(e["choices"][0]["delta"]["content"] for e, _ in content_events(a))
    conv = [system, {"role": "user", "content": "What is rule 3?"}, {"role": "assistant", "content": answer},
            {"role": "user", "content": "Thanks. And rule 4?"}]
    c = post(s.url, "/chat/completions", {"messages": conv, "max_tokens": 2}).json()
    assert c["usage"]["prompt_tokens_details"]["cached_tokens"] >= ua["prompt_tokens"] + 20 - 16
    # an unrelated prompt does not hit
    d = post(s.url, "/chat/completions", {"messages": [{"role": "user", "content": "x " * 300}],
                                          "max_tokens": 2}).json()
    assert d["usage"]["prompt_tokens_details"]["cached_tokens"] < 64
    assert metric(s.base, "vllm:prefix_cache_hits_total") >= cached
    assert metric(s.base, "vllm:prefix_cache_queries_total") == ua["prompt_tokens"] + ub["prompt_tokens"] + \
        c["usage"]["prompt_tokens"] + d["usage"]["prompt_tokens"]


def test_decode_time_per_token_grows_with_batch(serve):
    s = serve("--t-fixed", "0.001", "--t-weights", "0.003", "--t-token", "0.0004", "--t-kv", "0",
              "--max-num-seqs", "64")
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 40, "min_tokens": 40}
    alone = [tpot(stream_chat(s.url, body)) for _ in range(2)]
    with cf.ThreadPoolExecutor(32) as ex:
        batch = [tpot(r) for r in ex.map(lambda _: stream_chat(s.url, body), range(32))]
    batch.sort()
    # model: 1 + max(3, 0.4) = 4 ms alone; 1 + 32 x 0.4 = 13.8 ms with 32 decoding together
    assert min(alone) < 0.0065, alone
    assert batch[len(batch) // 2] > 2 * min(alone), (alone, batch)


def test_requests_wait_when_kv_cache_is_full(serve):
    s = serve("--num-blocks", "24", "--block-size", "16", "--max-num-seqs", "16", "--t-fixed", "0.004", *QUIET)
    # distinct prompts of exactly 150 tokens (10 blocks); each request grows to 190 tokens (12 blocks)
    bodies = [{"prompt": [1000 + 200 * i + j for j in range(150)], "max_tokens": 40, "min_tokens": 40}
              for i in range(6)]
    with MetricsPoller(s.base, ["vllm:num_requests_waiting", "vllm:num_requests_running",
                                "vllm:kv_cache_usage_perc"]) as mp:
        with cf.ThreadPoolExecutor(6) as ex:
            results = list(ex.map(lambda b: stream_chat(s.url, b, path="/completions"), bodies))
    assert all(len([e for e in r["events"] if isinstance(e, dict)]) == 40 for r in results)
    assert max(mp.samples["vllm:num_requests_running"]) <= 2  # 2 x 12 blocks fill the 24
    assert max(mp.samples["vllm:num_requests_waiting"]) >= 3
    assert max(mp.samples["vllm:kv_cache_usage_perc"]) >= 0.8
    firsts = sorted(r["times"][0] for r in results)
    assert firsts[-1] > firsts[0] + 0.25  # the last ones waited for blocks (40 steps of 4 ms per pair)


def test_preemption_recomputes_and_completes(serve):
    s = serve("--num-blocks", "12", "--block-size", "16", "--t-fixed", "0.002", *QUIET)
    # two prompts of 80 tokens (5 blocks each) are admitted together; growing to 160 tokens they need 20 blocks
    bodies = [{"prompt": [3000 + 100 * i + j for j in range(80)], "max_tokens": 80, "min_tokens": 80,
               "stream_options": {"include_usage": True}} for i in range(2)]
    with cf.ThreadPoolExecutor(2) as ex:
        results = list(ex.map(lambda b: stream_chat(s.url, b, path="/completions"), bodies))
    for r in results:
        texts = [e["choices"][0]["text"] for e in r["events"] if isinstance(e, dict) and e["choices"]]
        assert len(texts) == 80 and r["events"][-2]["usage"]["completion_tokens"] == 80
    assert metric(s.base, "vllm:num_preemptions_total") >= 1
    assert metric(s.base, "vllm:kv_cache_usage_perc") == 0


def test_chunked_prefill_and_prefix_caching_switch(serve):
    # a 200-token prompt with a 64-token budget is prefilled in 4 steps of 20 ms; with the default budget in 1
    prompt = {"prompt": [500 + j for j in range(200)], "max_tokens": 2, "min_tokens": 2,
              "stream_options": {"include_usage": True}}
    chunked = serve("--max-num-batched-tokens", "64", "--t-fixed", "0.02", "--no-prefix-caching", *QUIET)
    whole = serve("--t-fixed", "0.02", *QUIET)
    t_chunked = [stream_chat(chunked.url, prompt, path="/completions") for _ in range(2)]
    t_whole = stream_chat(whole.url, prompt, path="/completions")
    assert min(ttft(r) for r in t_chunked) > 0.075 and ttft(t_whole) < 0.055, (
        [ttft(r) for r in t_chunked], ttft(t_whole))
    # without prefix caching the repeated prompt is computed again
    assert t_chunked[1]["events"][-2]["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    again = stream_chat(whole.url, prompt, path="/completions")
    assert again["events"][-2]["usage"]["prompt_tokens_details"]["cached_tokens"] == 192


def test_metric_counters_match_usage(serve):
    s = serve("--t-fixed", "0.001", *QUIET)
    usages = []
    for i in range(5):
        r = post(s.url, "/chat/completions", {"messages": [{"role": "user", "content": f"question {i}"}],
                                              "max_tokens": 5 + i, "min_tokens": 5 + i}).json()
        usages.append(r["usage"])
    assert metric(s.base, "vllm:prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert metric(s.base, "vllm:generation_tokens_total") == sum(u["completion_tokens"] for u in usages)
    assert metric(s.base, "vllm:time_to_first_token_seconds_count") == 5
    assert metric(s.base, "vllm:num_requests_running") == 0


def test_prefix_cache_counters_agree_with_responses(serve):
    """What a scraper computes from /metrics (issue 16) is what the responses say: the hit rate from the counters
    equals the cached tokens over the prompt tokens of the responses, and the other counters add up."""
    s = serve("--t-fixed", "0.002", "--max-num-seqs", "4", *QUIET)
    shared = " ".join(f"rule {i}: be kind to the number {i * 7}." for i in range(60))
    bodies = [{"messages": [{"role": "system", "content": shared if i % 3 else f"{i} {shared}"},
                            {"role": "user", "content": f"question {i}"}], "max_tokens": 4 + i % 5, "ignore_eos": True}
              for i in range(24)]
    with MetricsPoller(s.base, ["vllm:num_requests_waiting", "vllm:num_requests_running"]) as mp:
        with cf.ThreadPoolExecutor(8) as ex:
            usages = [r["usage"] for r in ex.map(lambda b: post(s.url, "/chat/completions", b).json(), bodies)]
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    prompt = sum(u["prompt_tokens"] for u in usages)
    assert cached > 0.3 * prompt
    assert metric(s.base, "vllm:prefix_cache_hits_total") == cached
    assert metric(s.base, "vllm:prefix_cache_queries_total") == prompt
    assert metric(s.base, "vllm:gpu_prefix_cache_hits_total") == cached
    assert metric(s.base, "vllm:prompt_tokens_total") == prompt
    assert metric(s.base, "vllm:generation_tokens_total") == sum(u["completion_tokens"] for u in usages)
    assert metric(s.base, 'vllm:request_success_total{model_name="vk-sim",engine="0",finished_reason="length"}') == 24
    assert max(mp.samples["vllm:num_requests_running"]) <= 4 and max(mp.samples["vllm:num_requests_waiting"]) >= 1
    assert metric(s.base, "vllm:num_requests_running") == metric(s.base, "vllm:num_requests_waiting") == 0
    assert metric(s.base, "vllm:kv_cache_usage_perc") == 0


@pytest.mark.timing
def test_fixed_latency_queue_gauges(serve):
    s = serve("--ttft", "0.2", "--tpot", "0.02", "--max-num-seqs", "2")  # 0.28 s per request: the queue lasts
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 5, "ignore_eos": True}
    with MetricsPoller(s.base, ["vllm:num_requests_waiting", "vllm:num_requests_running"]) as mp:
        with cf.ThreadPoolExecutor(6) as ex:
            list(ex.map(lambda _: stream_chat(s.url, body), range(6)))
    assert max(mp.samples["vllm:num_requests_running"]) == 2 and max(mp.samples["vllm:num_requests_waiting"]) >= 2
    assert metric(s.base, "vllm:num_requests_running") == metric(s.base, "vllm:num_requests_waiting") == 0
    assert metric(s.base, "vllm:generation_tokens_total") == 30


@pytest.mark.timing
def test_client_disconnect_frees_the_engine(serve):
    s = serve("--max-num-seqs", "1", "--t-fixed", "0.005", *QUIET)
    with httpx.Client() as c, c.stream("POST", s.url + "/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2000, "ignore_eos": True,
            "stream": True}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 5:
                break
    time.sleep(0.1)
    res = stream_chat(s.url, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert ttft(res) < 0.1  # the aborted request no longer holds the only slot
    assert metric(s.base, "vllm:num_requests_running") == 0


# -- the model's parts -----------------------------------------------------------------------------------------------

def test_step_time_equation():
    cfg = EngineConfig.from_profile("llama3.1-8b-h100", t_fixed=0.001, t_weights=0.006, t_token=3e-5, t_kv=5e-8)
    assert step_time(cfg, 1, 1000) == pytest.approx(0.001 + 0.006 + 1000 * 5e-8)  # memory-bound decode
    assert step_time(cfg, 1000, 0) == pytest.approx(0.001 + 1000 * 3e-5)  # compute-bound prefill
    cfg.speed = 2.0
    assert step_time(cfg, 1000, 0) == pytest.approx((0.001 + 0.03) / 2)
    for p in PROFILES.values():
        assert p.t_weights > 0 and p.t_token > 0 and p.t_kv > 0 and p.num_blocks > 1000
    # published-figure sanity: Llama-3.1-8B on one H100 decodes one stream at 100-250 tokens/s
    c = EngineConfig.from_profile("llama3.1-8b-h100")
    assert 100 < 1 / step_time(c, 1, 1000) < 250
    assert EngineConfig.from_profile("llama3.1-8b-h100", num_blocks=10, block_size=16).max_model_len == 160


def test_kv_cache_lru_eviction():
    kv = KVCache(num_blocks=4, block_size=16)
    a = []
    kv.allocate(2, a)
    kv.register(a[0], "h0")
    kv.register(a[1], "h1")
    assert kv.free == 2 and kv.usage() == 0.5
    kv.release(a)  # cached, evictable, still findable
    assert kv.free == 4 and kv.lookup(["h0", "h1", "h2"]) == a
    kv.release(a)
    b = []
    kv.allocate(3, b)  # 2 empty blocks, then evicts the least recently freed: h1 (tails are freed first)
    assert "h1" not in kv.cached and "h0" in kv.cached
    assert kv.lookup(["h0", "h1"]) == [a[0]]
