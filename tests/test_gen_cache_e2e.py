"""Prefix-cache hits against vk-serve (16-token blocks) are exactly what the workload says: a Mooncake slice gets
its infinite-cache prediction, requests with nothing shared get 0 cached tokens (the per-request salt differs in
the FIRST token), and vk-schedule's copies are new requests unless --identical-copies asks otherwise."""

from __future__ import annotations

from pathlib import Path

import orjson
from conftest import run_vk

T = Path(__file__).resolve().parent / "data" / "traces"


def _run(srv, tmp_path, gen_args, sched_args, endpoint="chat"):
    sess, sched, run = tmp_path / "s.jsonl", tmp_path / "sched.jsonl", tmp_path / "run.jsonl"
    p = run_vk("vk-gen", *gen_args, "-o", str(sess))
    assert p.returncode == 0, p.stderr.decode()
    p = run_vk("vk-schedule", str(sess), *sched_args, "-o", str(sched), "--json")
    assert p.returncode == 0, p.stderr.decode()
    summary = orjson.loads(p.stderr.splitlines()[-1])
    p = run_vk("vk-send", "--api", srv.url, "--endpoint", endpoint, str(sched), "-o", str(run), timeout=300)
    assert p.returncode == 0, p.stderr.decode()
    scheduled = [orjson.loads(x)["session"] for x in sched.read_bytes().splitlines()[1:]]
    reqs = {(s["id"], r["id"]): r for s in scheduled for r in s["requests"]}
    resp = [r for r in map(orjson.loads, run.read_bytes().splitlines()) if r["kind"] == "response"]
    assert resp and all(r["status"] == "ok" for r in resp)
    return summary, scheduled, [(reqs[(r["session_id"], r["request_id"])], r["usage"], r["session_id"])
                                for r in resp]


def _paged(prefix: int, n: int) -> int:
    """What a paged cache of 16-token blocks serves of a prompt of n tokens whose first ``prefix`` are cached:
    whole blocks, and never the last prompt token (it is always computed)."""
    return min(prefix, n - 1) // 16 * 16


def test_mooncake_slice_cached_tokens_equal_the_infinite_cache_prediction(serve, tmp_path):
    srv = serve("--block-size", "16", "--num-blocks", "200000", "--speed", "1000")
    gen = ["--trace", str(T / "mooncake_head200.jsonl"), "--flavor", "mooncake", "--count", "40"]
    _, _, got = _run(srv, tmp_path, gen, ["--concurrency", "1"])
    assert len(got) == 40
    pairs = [(u["cached_tokens"], _paged(q.get("prefix_tokens", 0), q["input_tokens"])) for q, u, _ in got]
    assert [g for g, _ in pairs] == [w for _, w in pairs]
    assert sum(g for g, _ in pairs) > 0


def test_requests_with_nothing_shared_get_no_cached_tokens_even_at_block_size_1(serve, tmp_path):
    srv = serve("--block-size", "1", "--num-blocks", "200000", "--speed", "1000")
    gen = ["--trace", str(T / "requests_unique.csv"), "--flavor", "requests", "--set", "flavor.time_unit=ms"]
    summary, _, got = _run(srv, tmp_path, gen, ["--concurrency", "1"])
    assert summary["cache_share"] == 0
    # the chat template's own leading tokens are shared by every request (as on a real server); none of the
    # content is: what is cached is the template prefix alone
    head = got[1][1]["cached_tokens"]
    assert got[0][1]["cached_tokens"] == 0 and 0 < head <= 3
    assert [u["cached_tokens"] for _, u, _ in got[1:]] == [head] * (len(got) - 1)


def test_copies_are_new_requests_unless_asked_and_get_the_predicted_cache_share(serve, tmp_path):
    srv = serve("--block-size", "16", "--num-blocks", "200000", "--speed", "1000")
    gen = ["--trace", str(T / "mooncake_head200.jsonl"), "--flavor", "mooncake", "--count", "20"]
    # --cycle: pass 2 is a copy of the slice in the same order, a new request to the server: the same hits
    summary, scheduled, got = _run(srv, tmp_path, gen, ["--concurrency", "1", "--cycle", "--max-sessions", "40"])
    assert sum(1 for s in scheduled if "copy_of" in s) == 20
    for q, u, _ in got:
        assert u["cached_tokens"] == _paged(q.get("prefix_tokens", 0), q["input_tokens"])
    inp = sum(q["input_tokens"] for q, _, _ in got)
    assert summary["predicted_cached_tokens"] == sum(q.get("prefix_tokens", 0) for q, _, _ in got)
    assert summary["input_tokens"] == inp and 0 < summary["cache_share"] < 1


def test_target_rate_copies_and_identical_copies(serve, tmp_path):
    gen = ["--trace", str(T / "requests_unique.csv"), "--flavor", "requests", "--set", "flavor.time_unit=ms"]
    sched = ["--replay", "--target-rate", "40", "--speedup", "5"]  # about 2.3 copies of the trace
    srv = serve("--block-size", "16", "--num-blocks", "200000", "--speed", "1000")
    summary, scheduled, got = _run(srv, tmp_path, gen, sched)
    assert any("copy_of" in s for s in scheduled) and summary["cache_share"] == 0
    assert all(u["cached_tokens"] == 0 for _, u, _ in got)  # copies are new requests: nothing cached
    srv2 = serve("--block-size", "16", "--num-blocks", "200000", "--speed", "1000")
    summary, scheduled, got = _run(srv2, tmp_path, gen, [*sched, "--identical-copies"])
    copies = [s for s in scheduled if "copy_of" in s]
    assert summary["identical_copies"] is True and copies
    assert summary["predicted_cached_tokens"] == sum(r["input_tokens"] for s in copies for r in s["requests"])
    # of an original and its identical copies, the one sent first gets nothing from the cache, every later one is
    # served all of its prompt (whole blocks, never the last prompt token)
    order = {s["id"]: k for k, s in enumerate(scheduled)}
    usage = {sid: u for _, u, sid in got}
    family: dict = {}
    for s in scheduled:
        family.setdefault(s.get("copy_of", s["id"]), []).append(s["id"])
    for members in family.values():
        first, *later = sorted(members, key=order.get)
        assert usage[first]["cached_tokens"] == 0
        for sid in later:
            u = usage[sid]
            assert u["cached_tokens"] == (u["prompt_tokens"] - 1) // 16 * 16
