"""vk-gen benchmark: sessions/s and prompt tokens/s for 1,000-token prompts (target >= 1M tokens/s, one core)."""

from __future__ import annotations

import time

import numpy as np

from vk.jsonl import dumps


def _rate(fn, seconds: float) -> tuple[int, float]:
    n = 0
    t0 = time.perf_counter()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= seconds:
            return n, dt


def run(quick: bool = False) -> list[dict]:
    from vk.gen.content import TextSource
    from vk.gen.synth import generate
    from vk.tokenizer import load_tokenizer

    secs = 0.3 if quick else 3.0
    rows = []
    t0 = time.perf_counter()
    tok = load_tokenizer("qwen2.5")
    t1 = time.perf_counter()
    ts = TextSource(tok)
    t2 = time.perf_counter()
    rows.append({"figure": "start-up: tokenizer load + corpus (from the disk cache after the first run)",
                 "value": f"{t1 - t0:.2f} s + {t2 - t1:.2f} s ({ts.corpus_tokens:,} tokens, mode {ts.mode})",
                 "target": "once per process", "ok": None})
    if not quick:
        import os

        from vk.gen import content

        text, label = content._read_corpus(None)
        old = os.environ.get("VK_NO_CACHE")
        os.environ["VK_NO_CACHE"] = "1"
        try:
            t0 = time.perf_counter()
            content._Corpus(text, label, tok)
            t1 = time.perf_counter()
            ts._self_check()
            t2 = time.perf_counter()
        finally:
            if old is None:
                os.environ.pop("VK_NO_CACHE", None)
            else:
                os.environ["VK_NO_CACHE"] = old
        rows.append({"figure": "cold start: corpus tokenization + self-check (no cache)",
                     "value": f"{t1 - t0:.2f} s + {t2 - t1:.2f} s", "target": "once per tokenizer", "ok": None})

    rng = np.random.default_rng(0)
    n, dt = _rate(lambda: ts.sample(1000, rng), secs)
    rows.append({"figure": "TextSource.sample, 1,000-token prompts (one core)",
                 "value": f"{n * 1000 / dt / 1e6:.1f} M tokens/s", "target": ">= 1 M tokens/s",
                 "ok": n * 1000 / dt >= 1e6})

    # whole sessions, serialized as vk-gen writes them: single 1,000-token requests
    cfg = {"session_generator": {"channels": [{"type": "text", "body_length_generator": {"type": "fixed",
                                                                                          "value": 1000}}],
                                 "output_spec": {"text": {"output_length_generator": {"type": "fixed",
                                                                                      "value": 128}}}}}
    it = generate(cfg, seed=1, count=0, tokenizer=tok)
    n, dt = _rate(lambda: dumps(next(it)), secs)
    sps = n / dt
    rows.append({"figure": "single-request sessions, 1,000-token prompts, generated + serialized",
                 "value": f"{sps:,.0f} sessions/s = {sps * 1000 / 1e6:.2f} M prompt tokens/s",
                 "target": ">= 1 M prompt tokens/s", "ok": sps * 1000 >= 1e6})

    # agentic DAGs with shared prefixes (a heavier mix), for scale
    cfg2 = {"session_generator": {"session_graph": {"type": "branching"},
                                  "think_time_generator": {"type": "exponential", "mean": 1.0},
                                  "channels": [{"type": "text",
                                                "body_length_generator": {"type": "fixed", "value": 1000},
                                                "shared_prefix_ratio": 0.3, "unique_salt": True}]}}
    it2 = generate(cfg2, seed=1, count=0, tokenizer=tok)
    reqs = [0]

    def one():
        s = next(it2)
        reqs[0] += len(s["requests"])
        dumps(s)

    n, dt = _rate(one, secs)
    rows.append({"figure": "branching sessions (shared prefix, salt), 1,000-token requests",
                 "value": f"{n / dt:,.0f} sessions/s, {reqs[0] / dt:,.0f} requests/s = "
                          f"{reqs[0] * 1000 / dt / 1e6:.2f} M prompt tokens/s",
                 "target": "-", "ok": None})
    if not quick:
        # streaming: memory stays flat however many sessions are made
        it3 = generate(cfg2, seed=2, count=0, tokenizer=tok)
        for _ in range(2000):
            dumps(next(it3))
        r0 = _rss_mb()
        for _ in range(20000):
            dumps(next(it3))
        r1 = _rss_mb()
        rows.append({"figure": "memory: resident set after 2,000 and after 22,000 branching sessions",
                     "value": f"{r0:.0f} MB -> {r1:.0f} MB", "target": "flat", "ok": r1 - r0 < 20})
    return rows


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    for r in run():
        print(f"{r['figure']}: {r['value']} (target {r['target']})")
