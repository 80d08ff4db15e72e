"""vk-gen trace flavors: real rows (Mooncake FAST'25, Azure 2023 slices) and hand-made files for the others.

Every figure is checked against the trace file read independently (orjson/csv/duckdb/numpy here), and every
prompt's token count against the tokenizer.
"""

from __future__ import annotations

import csv
import datetime as dt
import json

import duckdb
import numpy as np
import orjson
import pytest
from conftest import DATA, run_vk

from vk import records
from vk.errors import VkError
from vk.gen import traces
from vk.tokenizer import load_tokenizer

T = DATA / "traces"
MOONCAKE = T / "mooncake_head200.jsonl"
AZURE = T / "azure2023_head200.csv"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def cfg(path, flavor, **sg):
    fl = flavor if isinstance(flavor, dict) else {"type": flavor}
    return {"session_generator": {"type": "trace", "trace_file": str(path), "flavor": fl, **sg}}


def gen(path, flavor, tok, *, seed=1, count=None, warnings=None, **sg):
    out = list(traces.generate(cfg(path, flavor, **sg), seed=seed, count=count, tokenizer=tok,
                               warnings=warnings if warnings is not None else []))
    for s in out:
        records.validate_session(s)
    return out


def content(req) -> str:
    return req["prompt"] if "prompt" in req else "".join(m["content"] for m in req["messages"])


def mooncake_rows(n=None):
    rows = [orjson.loads(x) for x in MOONCAKE.read_bytes().splitlines() if x.strip()]
    return rows[:n] if n else rows


# ---------------------------------------------------------------------------------------------------------------
# mooncake: hash-id blocks


def test_mooncake_lengths_timestamps_and_provenance(tok):
    rows = mooncake_rows(40)
    out = gen(MOONCAKE, "mooncake", tok, count=40, format="completion")
    assert len(out) == 40
    counts = [len(x) for x in tok.encode_batch([s["requests"][0]["prompt"] for s in out])]
    for i, (s, row) in enumerate(zip(out, rows, strict=True)):
        r = s["requests"][0]
        assert r["input_tokens"] == row["input_length"] == counts[i]
        assert r["output_tokens"] == max(1, row["output_length"])
        assert s["trace_time"] == pytest.approx((row["timestamp"] - rows[0]["timestamp"]) / 1000.0)
        assert s["source"] == {"generator": "trace:mooncake", "seed": 1, "file": str(MOONCAKE), "row": i + 1,
                               "tokenizer": "qwen2.5"}


def test_mooncake_equal_hash_ids_give_identical_token_blocks(tok):
    rows = mooncake_rows()
    out = gen(MOONCAKE, "mooncake", tok, format="completion")
    uses: dict = {}
    for i, r in enumerate(rows):
        for h in r["hash_ids"]:
            uses.setdefault(h, []).append(i)
    # rows that share a block other than the common first one, plus a few that share nothing but block 0
    pick = sorted({i for h, ix in uses.items() if h != 0 and len(ix) > 1 for i in ix})[:30] + [0, 1, 2]
    pick = sorted(set(pick))
    enc = tok.encode_batch([out[i]["requests"][0]["prompt"] for i in pick])
    blocks: dict = {}  # hash id -> token tuples seen for it
    for i, ids in zip(pick, enc, strict=True):
        row = rows[i]
        assert len(ids) == row["input_length"]
        for j, h in enumerate(row["hash_ids"]):
            blocks.setdefault(h, set()).add(tuple(ids[512 * j: 512 * (j + 1)]))
    shared = [h for h in blocks if sum(h in rows[i]["hash_ids"] for i in pick) > 1]
    assert 0 in shared and len(shared) >= 2  # the real trace reuses blocks (id 0 in every request)
    full = {}
    for h, variants in blocks.items():
        longest = max(variants, key=len)
        for v in variants:  # a partial last block is a token prefix of the full block
            assert longest[: len(v)] == v, f"hash id {h}: blocks differ"
        if len(longest) == 512:
            full[h] = longest
    # different ids give different blocks
    assert len(set(full.values())) == len(full)


def test_mooncake_prefix_tokens_match_an_infinite_prefix_cache(tok):
    rows = mooncake_rows()
    out = gen(MOONCAKE, "mooncake", tok)
    seen: set = set()
    for row, s in zip(rows, out, strict=True):
        served = 0
        for j, h in enumerate(row["hash_ids"]):
            if h not in seen:
                break
            served += min(512, row["input_length"] - 512 * j)
        seen.update(row["hash_ids"])
        assert s["requests"][0].get("prefix_tokens", 0) == served


def test_mooncake_block_size_is_configurable_and_checked(tok):
    with pytest.raises(VkError, match=r"mooncake_head200.jsonl:1: field 'hash_ids': 14 hash ids of 256-token"):
        gen(MOONCAKE, {"type": "mooncake", "block_size": 256}, tok, count=1)
    p = T / "bad_mooncake.jsonl"
    out = gen(p, {"type": "mooncake", "block_size": 512}, tok, count=2, format="completion")
    a, b = (tok.encode(s["requests"][0]["prompt"]) for s in out)
    assert a[:512] == b[:512] and a[512:] != b[512:600]


def test_wrap_remaps_hash_ids_unless_asked(tok):
    # 3 rows sharing hash id 0 at their start; wrap to 7 sessions
    p = T / "bad_mooncake.jsonl"
    out = gen(p, "mooncake", tok, count=4, wrap_mode=True, max_rows=2, format="completion")
    assert [s["id"] for s in out][:2] == ["mooncake-1", "mooncake-2"]
    assert out[2]["source"]["epoch"] == 1 and out[2]["id"].endswith("-w1")
    first = {s["source"]["row"]: tok.encode(s["requests"][0]["prompt"])[:512] for s in out[:2]}
    wrapped = [tok.encode(s["requests"][0]["prompt"])[:512] for s in out[2:]]
    assert all(w not in first.values() for w in wrapped)
    assert out[3]["requests"][0].get("prefix_tokens") == 512  # shares with the other wrapped copy only
    # times continue: the second copy starts one period (span + mean gap) later
    assert [s["trace_time"] for s in out] == [0.0, 0.01, 0.02, 0.03]
    shared = gen(p, "mooncake", tok, count=4, wrap_mode=True, max_rows=2, wrap_share_cache=True,
                 format="completion")
    assert shared[2]["requests"][0]["prefix_tokens"] >= 512
    assert {s["requests"][0]["prompt"] for s in shared[2:]} == {s["requests"][0]["prompt"] for s in shared[:2]}


# ---------------------------------------------------------------------------------------------------------------
# azure, burstgpt


def _azure_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_azure_2023_real_rows(tok):
    rows = _azure_rows(AZURE)
    out = gen(AZURE, "azure", tok, count=30)
    t0 = np.datetime64(rows[0]["TIMESTAMP"][:26])
    for s, row in zip(out, rows, strict=False):
        r = s["requests"][0]
        assert r["input_tokens"] == int(row["ContextTokens"]) == tok.count(content(r))
        assert r["output_tokens"] == int(row["GeneratedTokens"])
        want = (np.datetime64(row["TIMESTAMP"][:26]) - t0) / np.timedelta64(1, "us") / 1e6
        assert s["trace_time"] == pytest.approx(want, abs=1e-6)


def test_azure_2024_timezone_timestamps(tok):
    out = gen(T / "azure2024_code.csv", "azure", tok)
    assert [s["trace_time"] for s in out] == [0.0, 0.01554, 0.51353, 1.24007, 1.990071]
    assert [s["requests"][0]["input_tokens"] for s in out] == [2162, 4472, 1019, 88, 5620]


def test_burstgpt_filters_and_failed_rows(tok):
    p = T / "burstgpt.csv"
    out = gen(p, "burstgpt", tok)
    assert [s["source"]["row"] for s in out] == [2, 4, 5, 6, 8]  # rows 3 and 7 failed (0 response tokens)
    assert [s["trace_time"] for s in out] == [0.0, 113.0, 129.0, 135.0, 152.0]
    kept = gen(p, {"type": "burstgpt", "failed": "keep"}, tok)
    assert len(kept) == 7
    failed = [s for s in kept if s["requests"][0].get("trace_failed")]
    assert [s["source"]["row"] for s in failed] == [3, 7] and failed[0]["requests"][0]["output_tokens"] == 1
    gpt4 = gen(p, {"type": "burstgpt", "models": ["GPT-4"], "failed": "keep"}, tok)
    assert [s["source"]["row"] for s in gpt4] == [4, 7]
    api = gen(p, {"type": "burstgpt", "log_types": "API log"}, tok)
    assert [s["source"]["row"] for s in api] == [4, 6]
    for s in out:
        assert s["requests"][0]["input_tokens"] == tok.count(content(s["requests"][0]))


def test_burstgpt_sessions_cumulative(tok):
    out = gen(T / "burstgpt_sessions.csv", {"type": "burstgpt", "session_column": "Session ID"}, tok)
    s1 = out[0]
    # cumulative: new = this input - (previous input + previous output)
    assert [r["input_tokens"] for r in s1["requests"]] == [100, 150 - 120, 190 - 180]
    assert [r.get("think_time", 0) for r in s1["requests"]] == [0, 3.0, 5.0]
    assert out[1]["trace_time"] == 1.5


# ---------------------------------------------------------------------------------------------------------------
# the seed's flavors


def test_claude_code_cumulative_history_and_waits(tok):
    w: list = []
    out = gen(T / "claude_code.jsonl", "claude_code", tok, warnings=w)
    a, b, c = out
    assert [r["input_tokens"] for r in a["requests"]] == [1200, 1500 - 1280, 1600 - 1560]
    assert [r.get("history") for r in a["requests"]] == [None, "r0", "r1"]
    assert [r.get("think_time", 0) for r in a["requests"]] == [0, 2.0, 1.25]  # the trace's own wait column
    assert [s["trace_time"] for s in out] == [0.0, 1.5, 12.0]
    assert [s["source"]["session"] for s in out] == ["a", "b", "c"]  # the trace's own session ids
    for s in out:
        for r in s["requests"]:
            assert tok.count(content(r)) == r["input_tokens"]
    # sessions are unique from their first page on
    firsts = [tok.encode(content(s["requests"][0]))[:16] for s in out]
    assert len({tuple(x) for x in firsts}) == 3
    assert w == []


def test_claude_code_clipped_turn_is_reported(tok):
    w: list = []
    out = gen(T / "claude_code_clip.csv", "claude_code", tok, warnings=w)
    assert [r["input_tokens"] for r in out[0]["requests"]] == [500, 1, 700 - 560]
    assert any("clipped to 1 token" in x and "line 3" in x for x in w)
    st = traces.stats_dict(cfg(T / "claude_code_clip.csv", "claude_code"))
    assert any("clipped" in x for x in st["warnings"])


def test_rag_top_documents_and_warmups(tok):
    rows = [json.loads(x) for x in (T / "rag.jsonl").read_text().splitlines()]
    out = gen(T / "rag.jsonl", {"type": "rag", "num_documents": 2}, tok)
    warm = [s for s in out if s.get("warmup")]
    assert [s["id"] for s in out[:2]] == [s["id"] for s in warm]  # warm-ups first
    assert [s["source"]["doc_id"] for s in warm] == ["d1", "d2"]  # most frequent first
    assert [s["id"] for s in warm] == ["rag-warmup-1", "rag-warmup-2"]
    assert [s["source"]["row"] for s in warm] == [1, 2]  # the document's first row
    assert all(s["requests"][0]["output_tokens"] == 1 for s in warm)
    measured = out[2:]
    assert [s["source"]["row"] for s in measured] == [1, 2, 3, 5, 6]  # d3 (one row) is not a top document
    for s in measured:
        row = rows[s["source"]["row"] - 1]
        r = s["requests"][0]
        assert content(r) == row["prompt_text"]  # verbatim
        assert r["input_tokens"] == tok.count(row["prompt_text"])
        assert r["output_tokens"] == row["output_length"]
        assert s["trace_time"] == row["timestamp"]


def test_mooncake_conv_text_and_turns(tok):
    out = gen(T / "mooncake_conv.jsonl", "mooncake_conv", tok)
    s7 = out[0]
    assert [content(r) for r in s7["requests"]] == ["Tell me about the Pequod.", "And who was its captain?",
                                                    "Why did he chase the whale?"]
    assert [r["output_tokens"] for r in s7["requests"]] == [120, 80, 200]
    assert [r.get("think_time", 0) for r in s7["requests"]] == [0, 4.0, 5.5]  # ms timestamps, arrival gaps
    assert out[1]["trace_time"] == 0.5
    assert s7["source"]["rows"] == [1, 3, 4]


# ---------------------------------------------------------------------------------------------------------------
# conversations, requests


def test_sharegpt_every_turn_becomes_a_request(tok):
    out = gen(T / "sharegpt.json", "conversations", tok)
    assert len(out) == 2  # conv-3 has no answered user turn
    assert [s["source"]["session"] for s in out] == ["conv-1", "conv-2"]
    c1 = out[0]["requests"]
    assert len(c1) == 3
    assert c1[0]["messages"] == [{"role": "system", "content": "You are a helpful sailor."},
                                 {"role": "user", "content": "How do I tie a bowline?"}]
    assert [r["messages"][-1]["content"] for r in c1[1:]] == ["And a clove hitch?", "Thanks!"]
    assert c1[2]["history"] == "r1" and c1[2]["parents"] == ["r1"]
    assert c1[1]["output_tokens"] == tok.count(
        "Two turns around the post, the second crossing over the first, end tucked under.")
    assert c1[0]["input_tokens"] == tok.count("You are a helpful sailor.") + tok.count("How do I tie a bowline?")
    # a leading assistant greeting is not a request
    assert out[1]["requests"][0]["messages"] == [{"role": "user", "content": "What is the capital of France?"}]
    last = gen(T / "sharegpt.json", {"type": "conversations", "last_turn_output_tokens": 50}, tok)
    assert len(last) == 3 and last[2]["requests"][0]["output_tokens"] == 50


def test_messages_jsonl_with_timestamps(tok):
    out = gen(T / "chat_messages.jsonl", {"type": "conversations", "timestamp_key": "ts"}, tok,
              format="completion")
    assert [s["trace_time"] for s in out] == [0.0, 2.5]
    assert [r["prompt"] for r in out[0]["requests"]] == ["Name three oceans.", "Which is largest?"]


def test_requests_dag_with_parents_history_and_think_time(tok):
    out = gen(T / "requests_dag.jsonl", {"type": "requests", "lengths": "per_turn"}, tok)
    s1 = {r["id"]: r for r in out[0]["requests"]}
    assert s1["search-a"]["parents"] == ["plan"] and s1["search-a"]["think_time"] == 0.25  # explicit
    assert s1["search-b"]["think_time"] == 1.5  # arrival gap after its parent (101.5 - 100)
    assert s1["merge"]["parents"] == ["search-a", "search-b"] and s1["merge"]["history"] == "search-b"
    assert s1["merge"]["think_time"] == 2.5  # after the latest parent's arrival
    assert [s1[k]["input_tokens"] for k in ("plan", "search-a", "search-b", "merge")] == [300, 120, 80, 40]
    assert out[0]["trace_time"] == 0.0 and out[1]["trace_time"] == 2.0


def test_requests_lengths_must_be_explicit_for_sessions(tok):
    with pytest.raises(VkError, match="flavor.lengths to per_turn"):
        gen(T / "requests_cumulative.csv", "requests", tok)
    cum = gen(T / "requests_cumulative.csv", {"type": "requests", "lengths": "cumulative"}, tok)
    assert [r["input_tokens"] for r in cum[0]["requests"]] == [100, 150 - 120, 180 - 175]
    per = gen(T / "requests_cumulative.csv", {"type": "requests", "lengths": "per_turn"}, tok)
    assert [r["input_tokens"] for r in per[0]["requests"]] == [100, 150, 180]


def test_requests_with_prompt_text(tok):
    out = gen(T / "requests_text.jsonl", "requests", tok)
    assert [content(s["requests"][0]) for s in out] == ["Write a haiku about the sea.",
                                                       "Summarize Moby-Dick in one sentence."]
    assert out[1]["requests"][0]["output_tokens"] == 40


# ---------------------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("name,flavor,message", [
    ("bad_mooncake.jsonl", "mooncake", "bad_mooncake.jsonl:3: field 'input_length': expected a number, got 'lots'"),
    ("bad_azure.csv", "azure", "bad_azure.csv:3: expected 3 comma-separated fields"),
    ("bad_burstgpt.csv", "burstgpt", "bad_burstgpt.csv:3: field 'Request tokens': must be >= 0, got -3"),
    ("azure2024_code.csv", "mooncake", "azure2024_code.csv: missing column 'input_length' (the mooncake flavor"),
])
def test_bad_rows_name_file_line_and_column(tok, name, flavor, message):
    with pytest.raises(VkError) as e:
        gen(T / name, flavor, tok)
    assert message in str(e.value)


@pytest.mark.parametrize("sg,message", [
    ({"shuffel": True}, "session_generator.shuffel: unknown key"),
    ({"sample": 2}, "session_generator.sample: must be <= 1"),
    ({"max_rows": "ten"}, "session_generator.max_rows: expected an integer"),
    ({"window": {"start": 5, "end": 1}}, "session_generator.window.end: must be after"),
    ({"flavor": {"type": "mooncake", "blocksize": 16}}, "session_generator.flavor.blocksize: unknown key"),
    ({"flavor": {"type": "mooncake", "block_size": "big"}}, "session_generator.flavor.block_size: expected an int"),
    ({"flavor": {"type": "nope"}}, "session_generator.flavor.type: expected one of claude_code"),
    ({"wrap_mode": "yes"}, "session_generator.wrap_mode: expected true or false"),
])
def test_bad_config_names_the_key(tok, sg, message):
    c = cfg(MOONCAKE, "mooncake")
    c["session_generator"].update(sg)
    with pytest.raises(VkError, match=message.replace("(", r"\(")):
        list(traces.generate(c, seed=0, count=1, tokenizer=tok))


def test_cli_bad_row_is_one_line_exit_2():
    p = run_vk("vk-gen", "--trace", str(T / "bad_mooncake.jsonl"), "--flavor", "mooncake")
    assert p.returncode == 2
    err = p.stderr.decode().strip().splitlines()
    assert err == [f"vk-gen: {T / 'bad_mooncake.jsonl'}:3: field 'input_length': expected a number, got 'lots'"]


# ---------------------------------------------------------------------------------------------------------------
# selection: window, head, sample, shuffle, determinism


def test_window_head_sample_and_shuffle(tok):
    rows = mooncake_rows()
    ts = np.array([r["timestamp"] for r in rows]) / 1000.0
    win = gen(MOONCAKE, "mooncake", tok, window={"start": 10, "end": 30}, format="completion")
    want = np.flatnonzero((ts >= 10) & (ts < 30)) + 1
    assert [s["source"]["row"] for s in win] == want.tolist()
    assert win[0]["trace_time"] == pytest.approx(ts[want[0] - 1] - 10)  # relative to the window start
    head = gen(MOONCAKE, "mooncake", tok, max_rows=7)
    assert [s["source"]["row"] for s in head] == list(range(1, 8))
    samp = gen(MOONCAKE, "mooncake", tok, sample=0.5, seed=4)
    assert 70 <= len(samp) <= 130
    assert [s["id"] for s in samp] == [s["id"] for s in gen(MOONCAKE, "mooncake", tok, sample=0.5, seed=4)]
    shuf = gen(MOONCAKE, "mooncake", tok, shuffle=True, max_rows=50, seed=2)
    assert sorted(s["source"]["row"] for s in shuf) == list(range(1, 51))
    assert [s["source"]["row"] for s in shuf] != list(range(1, 51))
    # arrival times stay the trace's (sorted); only which session arrives when changes
    assert [s["trace_time"] for s in shuf] == pytest.approx(sorted(ts[:50] - ts[0]))
    lengths = {s["source"]["row"]: s["requests"][0]["input_tokens"] for s in shuf}
    assert all(lengths[i + 1] == rows[i]["input_length"] for i in range(50))


def test_same_seed_same_bytes_other_seed_other_text(tok):
    a = [orjson.dumps(s) for s in gen(T / "claude_code.jsonl", "claude_code", tok, seed=5)]
    b = [orjson.dumps(s) for s in gen(T / "claude_code.jsonl", "claude_code", tok, seed=5)]
    c = [orjson.dumps(s) for s in gen(T / "claude_code.jsonl", "claude_code", tok, seed=6)]
    assert a == b and a != c


def test_cli_trace_output_replays(tmp_path):
    out = tmp_path / "s.jsonl"
    p = run_vk("vk-gen", "--trace", str(T / "claude_code.jsonl"), "--flavor", "claude_code", "--seed", "3",
               "-o", str(out))
    assert p.returncode == 0, p.stderr.decode()
    recs = [orjson.loads(x) for x in out.read_bytes().splitlines()]
    assert [r["id"] for r in recs] == ["claude_code-1", "claude_code-2", "claude_code-6"]
    q = run_vk("vk-schedule", "--replay", str(out))
    assert q.returncode == 0, q.stderr.decode()
    sched = [orjson.loads(x) for x in q.stdout.splitlines()]
    starts = [x["start"] for x in sched if x["kind"] == "scheduled_session"]
    assert starts == [0.0, 1.5, 12.0]


# ---------------------------------------------------------------------------------------------------------------
# --stats against an independent computation


def test_stats_mooncake_against_duckdb():
    st = traces.stats_dict(cfg(MOONCAKE, "mooncake"))
    con = duckdb.connect()
    q = con.execute(f"""
        WITH t AS (SELECT timestamp / 1000.0 AS ts, input_length AS i, output_length AS o
                   FROM read_json_auto('{MOONCAKE}')),
             g AS (SELECT ts - lag(ts) OVER (ORDER BY ts) AS gap FROM t)
        SELECT (SELECT count(*) FROM t), (SELECT max(ts) - min(ts) FROM t),
               (SELECT quantile_cont(i, [0.5, 0.9, 0.99]) FROM t), (SELECT quantile_cont(o, [0.5, 0.9, 0.99]) FROM t),
               (SELECT stddev_pop(gap) / avg(gap) FROM g)
    """).fetchone()
    n, dur, qi, qo, cv = q
    assert st["requests"] == st["sessions"] == n == 200
    assert st["duration_s"] == pytest.approx(dur)
    assert st["rate_rps"] == pytest.approx(n / dur)
    assert st["interarrival_cv"] == pytest.approx(cv)
    assert [st["input"]["p50"], st["input"]["p90"], st["input"]["p99"]] == pytest.approx(qi)
    assert [st["output"]["p50"], st["output"]["p90"], st["output"]["p99"]] == pytest.approx(qo)
    # infinite prefix cache, prefix-match semantics, computed here with a plain set
    seen: set = set()
    served = total = 0
    for row in mooncake_rows():
        total += row["input_length"]
        for j, h in enumerate(row["hash_ids"]):
            if h not in seen:
                break
            served += min(512, row["input_length"] - 512 * j)
        seen.update(row["hash_ids"])
    assert st["cached_tokens"] == served
    assert st["cache_share"] == pytest.approx(served / total)
    assert st["unique_blocks"] == len(seen)
    text = traces.stats(cfg(MOONCAKE, "mooncake"))
    assert f"{100 * served / total:.2f}% of prompt tokens" in text and "requests      200" in text


def test_stats_azure_against_numpy():
    rows = _azure_rows(AZURE)
    st = traces.stats_dict(cfg(AZURE, "azure", window={"start": 0, "end": 20}))
    t = np.array([dt.datetime.fromisoformat(r["TIMESTAMP"][:26]).timestamp() for r in rows])
    t = t - t[0]
    keep = t < 20
    tk = t[keep]
    gaps = np.diff(np.sort(tk))
    assert st["requests"] == keep.sum()
    assert st["duration_s"] == pytest.approx(tk.max() - tk.min(), abs=1e-6)
    assert st["interarrival_cv"] == pytest.approx(gaps.std() / gaps.mean(), rel=1e-6)
    ctx = np.array([int(r["ContextTokens"]) for r in rows])[keep]
    assert st["input"]["p90"] == pytest.approx(np.percentile(ctx, 90))
    assert st["input"]["mean"] == pytest.approx(ctx.mean())


def test_stats_multi_turn_prompt_is_history_plus_new(tok):
    st = traces.stats_dict(cfg(T / "claude_code.jsonl", "claude_code"))
    # cumulative trace: the prompt a server sees equals the trace's input_length
    assert st["input"]["max"] == 1600 and st["input"]["min"] == 300
    assert st["new_input"]["min"] == 40
    assert st["requests"] == 6 and st["sessions"] == 3
    assert st["turns_per_session"]["max"] == 3


def test_end_to_end_conversation_trace_against_vk_serve(serve, tmp_path):
    """ShareGPT turns -> replayed schedule -> vk-send against vk-serve: every turn answered, history followed."""
    srv = serve("--ttft", "0.001", "--tpot", "0.0005")
    sess = tmp_path / "s.jsonl"
    sched = tmp_path / "sched.jsonl"
    run = tmp_path / "run.jsonl"
    p = run_vk("vk-gen", "--trace", str(T / "chat_messages.jsonl"), "--flavor", "conversations",
               "--set", "flavor.timestamp_key=ts", "-o", str(sess))
    assert p.returncode == 0, p.stderr.decode()
    p = run_vk("vk-schedule", "--replay", "--speedup", "10", str(sess), "-o", str(sched))
    assert p.returncode == 0, p.stderr.decode()
    p = run_vk("vk-send", "--api", srv.url, str(sched), "-o", str(run), timeout=60)
    assert p.returncode == 0, p.stderr.decode()
    recs = [orjson.loads(x) for x in run.read_bytes().splitlines()]
    resp = [r for r in recs if r["kind"] == "response"]
    assert sorted((r["session_id"], r["request_id"]) for r in resp) == [
        ("conversations-1", "r0"), ("conversations-1", "r1"), ("conversations-2", "r0")]
    assert all(r["status"] == "ok" for r in resp), [r.get("error") for r in resp]
    by = {(r["session_id"], r["request_id"]): r for r in resp}
    # the second turn carries the first turn's conversation: a longer prompt than its own new content
    assert by[("conversations-1", "r1")]["usage"]["prompt_tokens"] > by[("conversations-1", "r0")]["usage"][
        "prompt_tokens"]
    assert by[("conversations-1", "r1")]["target_output_tokens"] == 3


def test_streaming_and_indexed_modes_agree(tok):
    """The indexed mode (here: wrap) yields the same first copy as the one-pass streaming mode."""
    a = gen(AZURE, "azure", tok, sample=0.5, seed=9)
    b = gen(AZURE, "azure", tok, sample=0.5, seed=9, wrap_mode=True, count=len(a) + 3)
    assert b[: len(a)] == a
    assert [s["source"].get("epoch") for s in b[len(a):]] == [1, 1, 1]
    c = gen(T / "sharegpt.json", "conversations", tok, shuffle=True, seed=1)  # JSON elements read back by offset
    assert sorted(s["id"] for s in c) == ["conversations-1", "conversations-2"]
    assert {s["id"]: s for s in c} == {s["id"]: s for s in gen(T / "sharegpt.json", "conversations", tok)}


def test_trace_start_is_the_first_row_even_when_filtered_out(tok):
    fl = {"type": "burstgpt", "models": ["GPT-4"], "failed": "keep"}
    one_pass = gen(T / "burstgpt.csv", fl, tok)
    indexed = gen(T / "burstgpt.csv", fl, tok, wrap_mode=True, count=2)
    assert [s["trace_time"] for s in one_pass] == [s["trace_time"] for s in indexed] == [113.0, 147.0]


def test_window_needs_timestamps(tok):
    with pytest.raises(VkError, match="has no timestamps to take a time window of"):
        gen(T / "sharegpt.json", "conversations", tok, window={"start": 1})


def test_session_grouped_file_is_replayed_in_time_order(tok, tmp_path):
    """A trace grouped by session (not sorted by time): sessions come out by start time, from the earliest."""
    p = T / "claude_code_by_session.csv"
    out = gen(p, "claude_code", tok)
    assert [s["source"]["row"] for s in out] == [4, 6, 2]
    assert [s["trace_time"] for s in out] == [0.0, 15.0, 30.0]
    assert [r["input_tokens"] for r in out[0]["requests"]] == [300, 500 - 330]
    win = gen(p, "claude_code", tok, window={"start": 10, "end": 30})  # starts 15 and 30 s after the first
    assert [s["source"]["row"] for s in win] == [6] and win[0]["trace_time"] == 5.0
    st = traces.stats_dict(cfg(p, "claude_code"))
    assert st["duration_s"] == 38.0 and st["requests"] == 5
    # single-request traces are read in one pass: out-of-order rows are an error naming the row
    bad = T / "azure_unsorted.csv"
    with pytest.raises(VkError, match=r"azure_unsorted.csv:3: field 'TIMESTAMP': earlier than the first row"):
        gen(bad, "azure", tok)
    assert [s["source"]["row"] for s in gen(bad, "azure", tok, shuffle=True, seed=0)] != []
    # a row earlier than the previous one (not the first) too: vk-schedule --replay would refuse it later
    back = tmp_path / "back.csv"
    back.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.0,374,44\n"
                    "2023-11-16 18:15:50.0,396,109\n2023-11-16 18:15:48.0,879,55\n")
    with pytest.raises(VkError, match=r"back.csv:4: field 'TIMESTAMP': earlier than the previous row by 2 s"):
        gen(back, "azure", tok)
    # and the keys of a trace config take --set without the session_generator. prefix
    from vk.gen import generate

    out = list(generate(cfg(AZURE, "azure"), overrides=["max_rows=5", "window.start=1", "sample=0.5"], seed=2,
                        tokenizer=tok))
    assert 0 < len(out) < 5


def test_cli_stats_stdin_and_progress():
    p = run_vk("vk-gen", "--trace", str(AZURE), "--flavor", "azure", "--stats")
    assert p.returncode == 0, p.stderr.decode()
    out = p.stdout.decode()
    assert "requests      200" in out and "arrival CV" in out and "input tokens  p50" in out
    q = run_vk("vk-gen", "--trace", "-", "--flavor", "azure", "--count", "3", "--progress",
               input=AZURE.read_bytes())
    assert q.returncode == 0, q.stderr.decode()
    recs = [orjson.loads(x) for x in q.stdout.splitlines()]
    assert [r["id"] for r in recs] == ["azure-2", "azure-3", "azure-4"]
    assert recs[0]["source"]["file"] == "-"


def test_requests_with_hash_ids_in_csv(tok):
    fl = {"type": "requests", "block_size": 16, "time_unit": "ms",
          "columns": {"timestamp": "arrival_ms", "input": "prompt_len", "output": "gen_len", "ids": "blocks"}}
    out = gen(T / "requests_hash.csv", fl, tok, format="completion")
    enc = [tok.encode(s["requests"][0]["prompt"]) for s in out]
    assert [len(x) for x in enc] == [40, 33, 20]
    assert enc[0][:32] == enc[1][:32] and enc[0][32:33] != enc[1][32:33]  # ids 7, 8 shared; 9 vs 3 not
    assert enc[2][:16] == enc[0][:16] and enc[2][16:20] != enc[0][16:20]
    assert [s["requests"][0].get("prefix_tokens", 0) for s in out] == [0, 32, 16]
    assert [s["trace_time"] for s in out] == [0.0, 0.25, 0.9]
    st = traces.stats_dict(cfg(T / "requests_hash.csv", fl))
    assert st["cached_tokens"] == 48 and st["cache_share"] == pytest.approx(48 / 93)


def test_hash_id_prefix_reuse_reaches_the_server_cache(serve, tmp_path):
    """Blocks shared by hash id are token-identical: vk-serve's prefix cache serves exactly the predicted tokens."""
    srv = serve("--block-size", "16")  # engine model with a paged prefix cache of 16-token blocks
    sess = tmp_path / "s.jsonl"
    sched = tmp_path / "sched.jsonl"
    run = tmp_path / "run.jsonl"
    p = run_vk("vk-gen", "--trace", str(T / "mooncake_small_blocks.jsonl"), "--flavor", "mooncake",
               "--set", "flavor.block_size=16", "--set", "session_generator.format=completion", "-o", str(sess))
    assert p.returncode == 0, p.stderr.decode()
    p = run_vk("vk-schedule", "--concurrency", "1", str(sess), "-o", str(sched))  # one at a time, in order
    assert p.returncode == 0, p.stderr.decode()
    p = run_vk("vk-send", "--api", srv.url, "--endpoint", "completions", str(sched), "-o", str(run), timeout=60)
    assert p.returncode == 0, p.stderr.decode()
    reqs = {s["id"]: s["requests"][0] for s in map(orjson.loads, sess.read_bytes().splitlines())}
    resp = [r for r in map(orjson.loads, run.read_bytes().splitlines()) if r["kind"] == "response"]
    assert len(resp) == 5 and all(r["status"] == "ok" for r in resp)
    got = []
    for r in resp:
        q = reqs[r["session_id"]]
        assert r["usage"]["prompt_tokens"] == q["input_tokens"]
        # a paged cache holds whole blocks, and the last prompt token is always computed
        want = min(q.get("prefix_tokens", 0), q["input_tokens"] - 1) // 16 * 16
        got.append((r["usage"]["cached_tokens"], want))
    assert [g for g, _ in got] == [w for _, w in got] and sum(g for g, _ in got) == 128


def test_output_control_prompt_asks_for_the_length(tok):
    gen_ = gen(T / "azure2024_code.csv", "azure", tok, count=2, output_control="prompt")
    r = gen_[0]["requests"][0]
    assert r["output_control"] == "prompt" and content(r).endswith(" Please write a reply of about 4 words.")
    assert r["input_tokens"] == 2162 == tok.count(content(r))  # the instruction is inside the trace's length
    txt = gen(T / "requests_text.jsonl", "requests", tok, count=1, output_spec={"text": {"output_control": "prompt"}})
    r = txt[0]["requests"][0]
    assert content(r) == "Write a haiku about the sea. Please write a reply of about 22 words."
    assert r["input_tokens"] == tok.count(content(r))  # verbatim text + the instruction


def test_compressed_trace_files(tok, tmp_path):
    import gzip
    import lzma

    gz = tmp_path / "azure.csv.gz"
    gz.write_bytes(gzip.compress((T / "azure2024_code.csv").read_bytes()))
    xz = tmp_path / "mc.jsonl.xz"
    xz.write_bytes(lzma.compress((T / "bad_mooncake.jsonl").read_bytes()))
    assert [s["trace_time"] for s in gen(gz, "azure", tok)] == [0.0, 0.01554, 0.51353, 1.24007, 1.990071]
    assert len(gen(xz, "mooncake", tok, max_rows=2)) == 2
    bad = tmp_path / "x.jsonl.gz"
    bad.write_bytes(b"not gzip")
    with pytest.raises(VkError, match="x.jsonl.gz: cannot read"):
        gen(bad, "mooncake", tok)


@pytest.mark.parametrize("name,flavor", [
    ("mooncake_head200.jsonl", "mooncake"), ("azure2023_head200.csv", "azure"), ("azure2024_code.csv", "azure"),
    ("burstgpt.csv", "burstgpt"), ("burstgpt_sessions.csv", {"type": "burstgpt", "session_column": "Session ID"}),
    ("claude_code.jsonl", "claude_code"), ("claude_code_clip.csv", "claude_code"), ("rag.jsonl", "rag"),
    ("mooncake_conv.jsonl", "mooncake_conv"), ("sharegpt.json", "conversations"),
    ("chat_messages.jsonl", "conversations"), ("requests_dag.jsonl", {"type": "requests", "lengths": "per_turn"}),
    ("requests_cumulative.csv", {"type": "requests", "lengths": "cumulative"}), ("requests_text.jsonl", "requests"),
])
def test_every_prompt_has_exactly_its_input_tokens(tok, name, flavor):
    out = gen(T / name, flavor, tok, count=25, format="completion")
    prompts = [r["prompt"] for s in out for r in s["requests"]]
    want = [r["input_tokens"] for s in out for r in s["requests"]]
    assert [len(x) for x in tok.encode_batch(prompts)] == want


def test_stats_say_why_rows_were_left_out_by_window_and_sample():
    st = traces.stats_dict(cfg(AZURE, "azure", sample=0.5, window={"start": 10}))
    assert st["dropped"]["sessions outside the time window"] > 0
    assert st["dropped"]["sessions not drawn by sample"] > 0
    assert st["sessions"] + sum(st["dropped"].values()) == 200
