"""vk-gen sessions: shapes, exact lengths, prefixes, reproducibility, config errors, and the command itself."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import orjson
import pytest
from conftest import ROOT, run_vk

from vk.errors import VkError
from vk.gen import generate, graph_to_dot, render_session_graph
from vk.records import topological_order, validate_session
from vk.tokenizer import load_tokenizer

EXAMPLES = ROOT / "examples"


def sg(**kw) -> dict:
    return {"session_generator": kw}


def text_channel(**kw) -> list:
    return [{"type": "text", **kw}]


def content_tokens(tok, req) -> int:
    if "messages" in req:
        return sum(tok.count(m["content"]) for m in req["messages"])
    return tok.count(req["prompt"])


# -- exact lengths -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["qwen2.5", "deepseek-v3"])
def test_prompt_lengths_are_exact_under_two_tokenizers(name):
    tok = load_tokenizer(name)
    cfgs = [
        sg(channels=text_channel(body_length_generator={"type": "uniform", "min": 1, "max": 3000})),
        sg(session_graph={"type": "branching"},
           channels=text_channel(body_length_generator={"type": "zipf", "min": 1, "max": 2000, "alpha": 1.1},
                                 shared_prefix_ratio=0.4, shared_prefix_probability=0.7, unique_salt=True)),
        sg(session_graph={"type": "linear"},
           channels=text_channel(format="completion", prefix_groups={"lengths": [50, 333]}, unique_salt=True),
           output_spec={"text": {"output_control": "prompt",
                                 "output_length_generator": {"type": "uniform", "min": 1, "max": 300}}}),
    ]
    n = 0
    for cfg in cfgs:
        for s in generate(cfg, seed=5, count=12, tokenizer=name):
            for r in s["requests"]:
                assert content_tokens(tok, r) == r["input_tokens"], (cfg, r["id"])
                n += 1
    assert n > 50


def test_default_workload_is_single_512_in_128_out():
    tok = load_tokenizer()
    ss = list(generate(None, count=5))
    assert len(ss) == 5
    for s in ss:
        validate_session(s)
        (r,) = s["requests"]
        assert r["input_tokens"] == 512 and r["output_tokens"] == 128
        assert content_tokens(tok, r) == 512
        assert r["messages"][0]["role"] == "user"
        assert r.get("output_control", "exact") == "exact"
    assert len({s["requests"][0]["messages"][0]["content"] for s in ss}) == 5
    assert len(list(generate({}))) == 100  # the default count


def test_templated_lengths_match_the_chat_template():
    tok = load_tokenizer("qwen2.5")
    cfg = sg(channels=text_channel(body_length_generator={"type": "uniform", "min": 100, "max": 400},
                                   input_length_mode="templated", prefix_groups={"lengths": [200, 300]}),
             session_graph={"type": "linear", "num_request_generator": {"type": "fixed", "value": 2}})
    roots = 0
    for s in generate(cfg, seed=2, count=20):
        for r in s["requests"]:
            assert content_tokens(tok, r) == r["input_tokens"]
            assert r["template_tokens"] > 0
            if not r["parents"]:
                # what a server applying the chat template counts as prompt_tokens: the target exactly
                assert tok.count_chat(r["messages"]) == r["input_tokens"] + r["template_tokens"]
                roots += 1
    assert roots == 20
    with pytest.raises(VkError, match="templated.*no chat template|has none"):
        list(generate(sg(channels=text_channel(input_length_mode="templated")), count=1, tokenizer="deepseek-v3"))


def test_output_targets_control_and_params():
    cfg = sg(output_spec={"text": {"output_length_generator": {"type": "uniform", "min": 5, "max": 9},
                                   "output_control": "ignore_eos"}},
             request_params={"temperature": 0})
    outs = set()
    for s in generate(cfg, count=50):
        r = s["requests"][0]
        assert 5 <= r["output_tokens"] <= 9
        assert r["output_control"] == "ignore_eos"
        assert r["params"] == {"temperature": 0}
        outs.add(r["output_tokens"])
    assert outs == set(range(5, 10))
    s = next(iter(generate(sg(output_spec={"text": {"output_control": "prompt"}}), count=1)))
    assert "Please write a reply of about 96 words." in s["requests"][0]["messages"][0]["content"]


# -- shapes ----------------------------------------------------------------------------------------------------

def test_linear_sessions_chain_history_and_think_time():
    cfg = sg(session_graph={"type": "linear", "num_request_generator": {"type": "uniform", "min": 1, "max": 6},
                            "request_wait_generator": {"type": "exponential", "mean": 2.0}})
    turns = set()
    thinks = []
    for s in generate(cfg, seed=3, count=100):
        validate_session(s)
        reqs = s["requests"]
        turns.add(len(reqs))
        assert reqs[0]["parents"] == [] and "think_time" not in reqs[0]
        for j in range(1, len(reqs)):
            assert reqs[j]["parents"] == [f"r{j - 1}"] and reqs[j]["history"] == f"r{j - 1}"
            thinks.append(reqs[j]["think_time"])
    assert turns == {1, 2, 3, 4, 5, 6}
    assert abs(sum(thinks) / len(thinks) - 2.0) < 0.3
    # inherit_history: false -> dependencies without history
    s = next(iter(generate(sg(inherit_history=False, session_graph={"type": "linear"}), count=1)))
    assert all("history" not in r for r in s["requests"])


def test_branching_dags_are_valid():
    cfg = sg(session_graph={"type": "branching", "num_layers_generator": {"type": "uniform", "min": 1, "max": 6},
                            "layer_width_generator": {"type": "uniform", "min": 1, "max": 5},
                            "fan_out_generator": {"type": "uniform", "min": 0, "max": 3},
                            "fan_in_generator": {"type": "uniform", "min": 1, "max": 3},
                            "connection_dist_generator": {"type": "uniform", "min": 1, "max": 3}},
             channels=text_channel(body_length_generator={"type": "fixed", "value": 8}),
             output_spec={"text": {"output_length_generator": {"type": "fixed", "value": 1}}})
    sizes, multi_parent, skips = set(), 0, 0
    for s in generate(cfg, seed=4, count=300):
        validate_session(s)  # acyclic, parents exist, history among parents
        reqs = s["requests"]
        order = [r["id"] for r in topological_order(s)]
        assert order == [r["id"] for r in reqs]  # written in topological order
        roots = [r for r in reqs if not r["parents"]]
        assert len(roots) == 1 and roots[0]["id"] == "r0"  # single_root (default)
        for r in reqs[1:]:
            assert r["parents"], "every non-root request has a parent"
            assert r["history"] in r["parents"]
            multi_parent += len(r["parents"]) > 1
        sizes.add(len(reqs))
        depth = {}
        for r in reqs:
            depth[r["id"]] = 1 + max((depth[p] for p in r["parents"]), default=0)
        skips += any(depth[r["id"]] - depth[p] > 1 for r in reqs for p in r["parents"])
    assert len(sizes) > 10 and multi_parent > 50 and skips > 0


def test_branching_multiple_roots_and_no_history():
    cfg = sg(session_graph={"type": "branching", "single_root": False, "inherit_history": False,
                            "num_layers_generator": {"type": "fixed", "value": 3},
                            "layer_width_generator": {"type": "fixed", "value": 3}})
    nroots = set()
    for s in generate(cfg, seed=1, count=30):
        validate_session(s)
        nroots.add(sum(1 for r in s["requests"] if not r["parents"]))
        assert all("history" not in r for r in s["requests"])
    assert nroots == {3}


# -- shared prefixes -------------------------------------------------------------------------------------------

def test_shared_prefix_ratio_tokens_identical_across_sessions():
    tok = load_tokenizer("qwen2.5")
    cfg = sg(session_graph={"type": "linear", "num_request_generator": {"type": "fixed", "value": 2}},
             channels=text_channel(body_length_generator={"type": "uniform", "min": 200, "max": 1000},
                                   shared_prefix_ratio=0.25, shared_prefix_probability=0.6))
    with_prefix = []
    n = 0
    for s in generate(cfg, seed=9, count=60):
        root, turn = s["requests"]
        assert turn.get("prefix_tokens", 0) == 0  # prefixes only on roots; later turns carry history
        n += 1
        if root.get("prefix_tokens"):
            assert root["prefix_tokens"] == round(0.25 * root["input_tokens"])
            with_prefix.append((root["prefix_tokens"], tok.encode(root["messages"][0]["content"])))
    assert 0.4 < len(with_prefix) / n < 0.8
    k = min(p for p, _ in with_prefix)
    first = with_prefix[0][1][:k]
    assert all(ids[:k] == first for _, ids in with_prefix)  # the same leading tokens in every session
    # and the prefix is really shared text, not a coincidence: beyond the prefix the prompts differ
    assert len({tuple(ids[max(p for p, _ in with_prefix):][:20]) for _, ids in with_prefix}) > len(with_prefix) // 2


def test_prefix_groups_system_prompts():
    tok = load_tokenizer("qwen2.5")
    cfg = sg(channels=text_channel(prefix_groups={"num_groups": 3, "length_generator": {"type": "fixed",
                                                                                         "value": 150},
                                                  "group_distribution": {"type": "weights",
                                                                         "weights": [1, 1, 0]}},
                                   body_length_generator={"type": "fixed", "value": 50}))
    seen: dict[int, str] = {}
    for s in generate(cfg, seed=1, count=60):
        r = s["requests"][0]
        sys_msg, user = r["messages"]
        assert sys_msg["role"] == "system" and user["role"] == "user"
        assert r["prefix_tokens"] == 150 and r["input_tokens"] == 200
        assert tok.count(sys_msg["content"]) == 150
        g = r["prefix_group"]
        assert g in (0, 1)  # weight 0 never drawn
        assert seen.setdefault(g, sys_msg["content"]) == sys_msg["content"]
    assert len(seen) == 2 and seen[0] != seen[1]


def test_unique_salt_makes_every_prompt_distinct_at_the_start():
    tok = load_tokenizer("qwen2.5")
    cfg = sg(channels=text_channel(unique_salt=True, shared_prefix_ratio=0.5,
                                   body_length_generator={"type": "fixed", "value": 300}))
    starts = set()
    for s in generate(cfg, seed=1, count=40):
        r = s["requests"][0]
        ids = tok.encode(r["messages"][0]["content"])
        assert len(ids) == 300
        starts.add(tuple(ids[: r["prefix_tokens"] + 8]))  # shared prefix, then the salt
    assert len(starts) == 40


# -- reproducibility -------------------------------------------------------------------------------------------

def _bytes(cfg, **kw) -> bytes:
    return b"".join(orjson.dumps(s) + b"\n" for s in generate(cfg, **kw))


def test_same_seed_same_bytes_and_streams_are_independent():
    base = sg(session_graph={"type": "linear", "request_wait_generator": {"type": "exponential", "mean": 1}},
              channels=text_channel(body_length_generator={"type": "uniform", "min": 10, "max": 500}))
    a = _bytes(base, seed=11, count=30)
    assert a == _bytes(base, seed=11, count=30)
    assert a != _bytes(base, seed=12, count=30)
    # session N does not depend on how many are asked for
    assert _bytes(base, seed=11, count=10) == b"".join(a.splitlines(keepends=True)[:10])
    # changing the output lengths or the think time leaves graph, input lengths and text alone
    other = json.loads(json.dumps(base))
    other["session_generator"]["output_spec"] = {"text": {"output_length_generator": {"type": "fixed", "value": 7}}}
    other["session_generator"]["session_graph"]["request_wait_generator"] = {"type": "gamma", "mean": 3, "cv": 2}

    def strip(blob):
        out = []
        for line in blob.splitlines():
            s = orjson.loads(line)
            out.append([(r["id"], r["parents"], r["input_tokens"], r["messages"]) for r in s["requests"]])
        return out

    b = _bytes(other, seed=11, count=30)
    assert a != b and strip(a) == strip(b)


def test_cli_byte_identical_output(tmp_path):
    args = [str(EXAMPLES / "gen-branching.yaml"), "--seed", "3", "--count", "20"]
    p1 = run_vk("vk-gen", *args, check=True)
    run_vk("vk-gen", *args, "-o", str(tmp_path / "s.jsonl"), check=True)
    assert p1.stdout == (tmp_path / "s.jsonl").read_bytes()
    assert len(p1.stdout.splitlines()) == 20
    for line in p1.stdout.splitlines():
        validate_session(orjson.loads(line))


# -- config: examples, --set, errors ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gen-single.yaml", "gen-linear.yaml", "gen-branching.yaml", "gen-prefix.yaml",
                                  "demo.yaml"])
def test_examples_generate_valid_sessions(name):
    if not (EXAMPLES / name).exists():
        pytest.skip(f"{name} not present")
    tok = load_tokenizer()
    for s in generate(EXAMPLES / name, count=10):
        validate_session(s)
        for r in s["requests"]:
            assert content_tokens(tok, r) == r["input_tokens"]


def test_set_overrides_any_field():
    s = next(iter(generate(None, count=1, overrides=["input.length.value=64", "output.length.value=9",
                                                     "graph.type=linear",
                                                     "graph.num_request_generator={type: fixed, value: 3}",
                                                     "session_generator.request_params.temperature=0.5"])))
    assert [r["input_tokens"] for r in s["requests"]] == [64, 64, 64]
    assert all(r["output_tokens"] == 9 and r["params"] == {"temperature": 0.5} for r in s["requests"])
    s = next(iter(generate(str(EXAMPLES / "gen-linear.yaml"), count=1, overrides=["seed=5"])))
    assert s["source"]["seed"] == 5


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "w.yaml"
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("text, overrides, match", [
    ("session_generator:\n  chanels: []\n", [], r"w\.yaml:2: session_generator\.chanels: unknown key"),
    ("session_generator:\n  session_graph:\n    type: linear\n    fan_out_generator: {type: fixed, value: 1}\n",
     [], r"w\.yaml:4: session_generator\.session_graph\.fan_out_generator: unknown key"),
    ("session_generator:\n  channels:\n    - type: text\n      body_length_generator:\n        type: uniform\n"
     "        min: 10\n        maks: 20\n", [],
     r"w\.yaml:7: session_generator\.channels\[0\]\.body_length_generator\.maks: unknown key for type 'uniform'"),
    ("session_generator:\n  channels:\n    - type: text\n      shared_prefix_ratio: lots\n", [],
     r"w\.yaml:4: session_generator\.channels\[0\]\.shared_prefix_ratio: expected a number"),
    ("session_generator:\n  session_graph: {type: tree}\n", [],
     r"w\.yaml:2: session_generator\.session_graph\.type: expected one of single_request, linear, branching"),
    ("sesion_generator: {}\n", [], r"w\.yaml:1: sesion_generator: unknown key"),
    ("session_generator: [1, 2]\n", [], r"session_generator: expected a mapping"),
    ("a: [1, 2\n", [], r"w\.yaml:\d+: not valid YAML"),
    ("- 1\n- 2\n", [], r"expected a mapping of settings"),
    ("{}\n", ["graph.foo=1"], r"--set session_generator\.session_graph\.foo: unknown key"),
    ("{}\n", ["output.length.value=zero"], r"--set .*output_length_generator\.value: expected a number"),
    ("{}\n", ["nonsense"], r"--set 'nonsense': expected KEY=VALUE"),
    ("session_generator:\n  channels:\n    - prefix_groups: {lengths: [10, 0]}\n", [],
     r"prefix_groups\.lengths\[1\]: expected an integer >= 1"),
    ("session_generator:\n  channels:\n    - shared_prefix_ratio: 0.2\n      prefix_groups: {lengths: [10]}\n", [],
     r"either shared_prefix_ratio or prefix_groups"),
])
def test_config_errors_name_file_line_and_key(tmp_path, text, overrides, match):
    with pytest.raises(VkError, match=match):
        list(generate(write(tmp_path, text), count=1, overrides=overrides))


def test_cli_errors_are_one_line_exit_2(tmp_path):
    p = run_vk("vk-gen", write(tmp_path, "session_generator:\n  oops: 1\n"))
    assert p.returncode == 2
    err = p.stderr.decode().strip()
    assert err.startswith("vk-gen: ") and "w.yaml:2: session_generator.oops: unknown key" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    p = run_vk("vk-gen", str(tmp_path / "missing.yaml"))
    assert p.returncode == 2 and b"missing.yaml: no such file" in p.stderr
    p = run_vk("vk-gen", "--duration", "10")
    assert p.returncode == 2 and b"--duration applies to trace workloads" in p.stderr
    p = run_vk("vk-gen", "--flavor", "rag")
    assert p.returncode == 2 and b"--flavor goes with --trace" in p.stderr
    p = run_vk("vk-gen", "--seed", "-1")
    assert p.returncode == 2 and b"seed" in p.stderr


def test_cli_help_and_version():
    p = run_vk("vk-gen", "--help", check=True)
    assert b"Examples:" in p.stdout and b"--set KEY=VALUE" in p.stdout
    assert run_vk("vk-gen", "--version", check=True).stdout.startswith(b"vk-gen ")


def test_foreign_sections_of_a_seed_config_are_ignored(tmp_path):
    cfg = write(tmp_path, "seed: 3\nclient: {api_base: http://x}\nruntime: {max_sessions: 5}\n"
                          "session_generator:\n  type: synthetic\n")
    p = run_vk("vk-gen", cfg, "--count", "2", check=True)
    assert len(p.stdout.splitlines()) == 2
    assert b"ignoring client, runtime" in p.stderr


# -- graphs ----------------------------------------------------------------------------------------------------

def test_dot_output_and_python_api():
    s = next(iter(generate(sg(session_graph={"type": "linear", "num_request_generator": {"type": "fixed",
                                                                                          "value": 3}}),
                           count=1)))
    dot = graph_to_dot(s)
    assert dot.startswith("digraph") and '"r0" -> "r1" [style=bold]' in dot and '"r1" -> "r2"' in dot
    p = run_vk("vk-gen", str(EXAMPLES / "gen-branching.yaml"), "--dot", check=True)
    assert p.stdout.startswith(b"digraph") and b"->" in p.stdout
    p = run_vk("vk-gen", str(EXAMPLES / "gen-branching.yaml"), "--dot", "--count", "2", check=True)
    assert p.stdout.count(b"subgraph") == 2


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz is not installed")
def test_png_rendering(tmp_path):
    out = tmp_path / "dag.png"
    run_vk("vk-gen", str(EXAMPLES / "gen-branching.yaml"), "--png", str(out), check=True)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    s = next(iter(generate(None, count=1)))
    svg = render_session_graph(s, tmp_path / "one", format="svg")
    assert svg.suffix == ".svg" and b"<svg" in svg.read_bytes()


def test_png_without_graphviz_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no dot on this PATH
    s = next(iter(generate(None, count=1)))
    with pytest.raises(VkError, match="Graphviz's 'dot' command, which is not installed"):
        render_session_graph(s, tmp_path / "x.png")


# -- end to end: the lengths a real server counts --------------------------------------------------------------

def _pipeline(serve_url: str, gen_args: list[str]) -> list[dict]:
    import subprocess

    from conftest import vk_cmd

    gen = subprocess.Popen([*vk_cmd("vk-gen"), *gen_args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sch = subprocess.Popen([*vk_cmd("vk-schedule"), "--concurrency", "2", "-q"], stdin=gen.stdout,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    gen.stdout.close()
    out, err = subprocess.Popen([*vk_cmd("vk-send"), "--api", serve_url], stdin=sch.stdout,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE).communicate(timeout=120)
    assert gen.wait(30) == 0, gen.stderr.read()
    assert sch.wait(30) == 0, sch.stderr.read()
    recs = [orjson.loads(line) for line in out.splitlines()]
    return [r for r in recs if r.get("kind") == "response"]


def test_templated_lengths_are_the_servers_prompt_tokens(serve):
    srv = serve("--ttft", "0.001", "--tpot", "0.0005")
    resp = _pipeline(srv.url, ["--count", "3", "--seed", "4", "--set", "graph=linear",
                               "--set", "graph.num_request_generator=3", "--set", "channel.input_length_mode=templated",
                               "--set", "input.length={type: uniform, min: 50, max: 400}",
                               "--set", "output.length.value=16"])
    assert len(resp) == 9 and all(r["status"] == "ok" for r in resp), resp[:1]
    by = {(r["session_id"], r["request_id"]): r for r in resp}
    for (sid, rid), r in by.items():
        target = r["target_input_tokens"] + r["template_tokens"]
        j = int(rid[1:])
        if j == 0:
            assert r["usage"]["prompt_tokens"] == target  # a first message: exactly the target
        else:
            prev = by[(sid, f"r{j - 1}")]
            # a later turn adds exactly its target to the parent's prompt and answer
            assert r["usage"]["prompt_tokens"] == (prev["usage"]["prompt_tokens"] + prev["usage"]["completion_tokens"]
                                                   + target)
        assert r["usage"]["completion_tokens"] == 16


# -- delegation to vk.gen.traces, progress -----------------------------------------------------------------------

TRACE = ROOT / "tests" / "data" / "traces" / "mooncake_head200.jsonl"


@pytest.mark.skipif(not TRACE.exists(), reason="the traces engineer's test data is not here")
def test_trace_options_delegate_to_vk_gen_traces():
    pytest.importorskip("vk.gen.traces")
    p = run_vk("vk-gen", "--trace", str(TRACE), "--flavor", "mooncake", "--count", "5", "--seed", "1", check=True)
    ss = [orjson.loads(x) for x in p.stdout.splitlines()]
    assert len(ss) == 5
    for s in ss:
        validate_session(s)
    p = run_vk("vk-gen", "--trace", str(TRACE), "--flavor", "mooncake", "--duration", "5", check=True)
    times = [orjson.loads(x)["trace_time"] for x in p.stdout.splitlines()]
    assert times and max(times) <= 5
    p = run_vk("vk-gen", "--trace", str(TRACE), "--flavor", "mooncake", "--stats", check=True)
    assert b"mooncake" in p.stdout


def test_progress_bar_on_stderr(tmp_path):
    p = run_vk("vk-gen", "--count", "30", "--progress", "-o", str(tmp_path / "s.jsonl"), check=True)
    assert b"30/30" in p.stderr
    assert len((tmp_path / "s.jsonl").read_bytes().splitlines()) == 30
    p = run_vk("vk-gen", "--count", "3", check=True)
    assert p.stderr == b""  # not a terminal, no --progress: quiet


def test_endless_stream_stops_quietly_when_the_reader_goes_away():
    import subprocess

    from conftest import vk_cmd

    gen = subprocess.Popen([*vk_cmd("vk-gen"), "--count", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = gen.stdout.readline()
    gen.stdout.close()  # like `vk-gen --count 0 | head -n 1`
    assert gen.wait(60) == 0
    assert gen.stderr.read() == b""
    validate_session(orjson.loads(first))


def test_config_from_stdin():
    """`-` is stdin for the config too (principle 2)."""
    cfg = b"session_generator:\n  type: synthetic\n  channels:\n    - type: text\n      body_length_generator: {type: fixed, value: 40}\n"
    p = run_vk("vk-gen", "-", "--count", "2", input=cfg, check=True)
    sessions = [orjson.loads(x) for x in p.stdout.splitlines()]
    assert [s["requests"][0]["input_tokens"] for s in sessions] == [40, 40]
    bad = run_vk("vk-gen", "-", input=b"nonsense_key: 1\n")
    assert bad.returncode == 2 and bad.stderr.decode().startswith("vk-gen: <stdin>:1: nonsense_key")


def test_veeksha_client_keys_and_inherit_history_on_a_default_graph_are_not_silent(capsys):
    from vk.gen import generate as gen_sessions

    cfg = {"client": {"use_min_tokens_prompt_fallback": True, "max_tokens_param": "max_completion_tokens"},
           "session_generator": {"inherit_history": True}}
    out = list(gen_sessions(cfg, count=2))
    err = capsys.readouterr().err
    assert all(r["output_control"] == "prompt" for s in out for r in s["requests"])
    assert "vk-send --max-tokens-param max_completion_tokens" in err
    assert "inherit_history: true has no effect on a single_request graph" in err


def test_fastchat_system_field_and_empty_user_messages(tmp_path):
    from vk.gen import traces

    p = tmp_path / "fc.json"
    p.write_text('[{"id": "a", "system": "You are terse.", "conversations": [{"from": "human", "value": "Hi"}, '
                 '{"from": "gpt", "value": "Hello."}, {"from": "human", "value": " "}, {"from": "gpt", "value": '
                 '"Anything else?"}, {"from": "human", "value": "No"}, {"from": "gpt", "value": "Bye."}]}]')
    notes: list = []
    cfg = {"session_generator": {"type": "trace", "trace_file": str(p), "flavor": "conversations"}}
    (s,) = traces.generate(cfg, seed=1, warnings=notes)
    msgs = [r["messages"] for r in s["requests"]]
    assert msgs == [[{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
                    [{"role": "user", "content": "No"}]]
    assert all(r["input_tokens"] > 0 for r in s["requests"])
    assert any("1 empty user messages left out" in n for n in notes)
