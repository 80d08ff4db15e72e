"""The record contract: every kind round-trips (write, read, validate), and bad lines give one precise error."""

from __future__ import annotations

import subprocess
import sys

import orjson
import pytest

from vk import records
from vk.errors import RecordError, VkError
from vk.jsonl import ListWriter, Writer, read_records


def a_session(sid="s1"):
    return records.new_session(
        sid,
        [
            records.new_request("r0", messages=[{"role": "user", "content": "hello"}], input_tokens=1,
                                output_tokens=8, prefix_tokens=1),
            records.new_request("r1", messages=[{"role": "user", "content": "more"}], parents=["r0"], history="r0",
                                think_time=0.5, output_tokens=4, output_control="ignore_eos",
                                params={"temperature": 0.0}),
            records.new_request("r2", prompt="plain prompt", parents=["r0", "r1"], output_tokens=2),
        ],
        source={"generator": "test", "seed": 1, "row": None},
        trace_time=1.5,
        label="annotated-by-user",
    )


def all_kinds():
    sched = records.new_schedule("open", "poisson", seed=3, params={"rate": 10.0})
    ss = records.new_scheduled_session(a_session(), 0.25, 0, warmup=True)
    run = records.new_run("run-1", 1.7e9, api="http://127.0.0.1:1/v1", model="m", endpoint="chat",
                          vk_version="0", host="h", argv=["vk-send"], schedule=sched)
    resp = records.new_response(
        "run-1", "s1", "r0", "ok", http_status=200, error=None, t_intended=0.25, t_dispatched=0.2501,
        t_sent=0.2502, t_first_byte=0.30, t_first_token=0.30, t_first_content=0.31, t_last_token=0.40, t_done=0.41,
        events={"t": [0.30, 0.31, 0.40], "tokens": [1, 2, 1], "kind": "rcc"},
        usage={"prompt_tokens": 10, "completion_tokens": 4, "cached_tokens": 0, "reasoning_tokens": 1},
        finish_reason="length", target_input_tokens=1, target_output_tokens=4,
    )
    end = records.new_run_end("run-1", requests=1, lagged=False)
    metric = records.new_server_metric("run-1", 0.5, "vllm:num_requests_waiting", 3.0,
                                       labels={"model_name": "m"}, type="gauge")
    return [a_session(), sched, ss, run, resp, metric, end]


def test_every_kind_round_trips(tmp_path):
    path = tmp_path / "all.jsonl"
    with Writer(path) as w:
        for rec in all_kinds():
            w.write(rec)
    back = [rec for _, _, rec in read_records(path)]
    assert back == all_kinds()
    assert {r["kind"] for r in back} == set(records.KINDS)
    assert all(r["v"] == records.VERSIONS[r["kind"]] for r in back)


def test_unknown_fields_pass_through():
    s = a_session()
    s["requests"][0]["my_note"] = {"x": 1}
    assert records.validate_session(s)["requests"][0]["my_note"] == {"x": 1}
    assert records.validate_session(s)["label"] == "annotated-by-user"


def test_list_writer_keeps_records():
    w = ListWriter()
    for rec in all_kinds():
        w.write(rec)
    assert w.records == all_kinds()


@pytest.mark.parametrize(
    "mutate, field, words",
    [
        (lambda s: s.pop("id"), "id", "missing"),
        (lambda s: s.update(requests=[]), "requests", "non-empty"),
        (lambda s: s["requests"][1].update(parents=["nope"]), "requests[1].parents", "unknown request id"),
        (lambda s: s["requests"][1].update(history="r2"), "requests[1].history", "not among the parents"),
        (lambda s: s["requests"][0].update(think_time=-1), "requests[0].think_time", ">= 0"),
        (lambda s: s["requests"][0].update(prompt="x"), "requests[0].messages", "exactly one"),
        (lambda s: s["requests"][0].update(output_tokens="ten"), "requests[0].output_tokens", "integer"),
        (lambda s: s["requests"][0].update(output_control="maybe"), "requests[0].output_control", "one of"),
        (lambda s: s["requests"][0].update(parents=["r2"]), "requests", "cycle"),
        (lambda s: s["requests"][2].update(id="r0"), "requests[2].id", "duplicate"),
        (lambda s: s.update(v=99), "v", "not supported"),
    ],
)
def test_session_errors_name_the_field(mutate, field, words):
    s = a_session()
    mutate(s)
    with pytest.raises(RecordError) as e:
        records.validate_session(s, "sessions.jsonl", 7)
    assert e.value.field == field
    assert words in str(e.value)
    assert str(e.value).startswith("sessions.jsonl:7: field")


def test_other_kinds_errors():
    with pytest.raises(RecordError, match="mode"):
        records.validate_schedule(records.new_schedule("sideways", "x", seed=1))
    with pytest.raises(RecordError, match="concurrency"):
        records.validate_schedule(records.new_schedule("closed", "closed", seed=1))
    bad = records.new_scheduled_session(a_session(), 1.0, 0)
    bad["session"]["requests"][0]["parents"] = "r1"
    with pytest.raises(RecordError) as e:
        records.validate_scheduled_session(bad, "sched", 3)
    assert e.value.field == "session.requests[0].parents"
    resp = all_kinds()[4]
    resp["status"] = "great"
    with pytest.raises(RecordError, match="status"):
        records.validate_response(resp)
    resp = all_kinds()[4]
    resp["events"]["kind"] = "c"
    with pytest.raises(RecordError, match="events.kind"):
        records.validate_response(resp)
    with pytest.raises(RecordError, match="unknown record kind"):
        records.validate({"kind": "banana", "v": 1})


def test_bad_json_line_names_file_and_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_bytes(orjson.dumps(a_session()) + b"\n\n{not json}\n")
    with pytest.raises(RecordError) as e:
        list(read_records(p, ("session",)))
    assert e.value.line == 3 and str(p) in str(e.value)
    with pytest.raises(VkError, match="no such file"):
        list(read_records(tmp_path / "missing.jsonl"))


def test_topological_order():
    s = a_session()
    s["requests"].reverse()
    assert [r["id"] for r in records.topological_order(s)] == ["r0", "r1", "r2"]


def test_tokenizer_errors_are_one_line(tmp_path):
    from vk.tokenizer import load_tokenizer

    with pytest.raises(VkError, match="not found"):
        load_tokenizer("no-such-tokenizer-name")
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(VkError, match="cannot load"):
        load_tokenizer(str(tmp_path))
    q = load_tokenizer()
    assert q.name == "qwen2.5" and q.count("Hello world") == 2
    assert q.count_chat([{"role": "user", "content": "hi"}]) > q.count("hi")
    assert load_tokenizer("deepseek-v3").vocab_size == 129280


def test_cli_error_is_one_line_exit_2():
    """A VkError in any command is one line on stderr and exit code 2 (no traceback)."""
    code = (
        "import click\n"
        "from vk.cli import command, main_wrapper\n"
        "from vk.errors import RecordError\n"
        "@command('vk-x')\n"
        "def c():\n"
        "    raise RecordError('in.jsonl', 4, 'requests[0].id', 'missing')\n"
        "main_wrapper(c, 'vk-x')([])\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr == "vk-x: in.jsonl:4: field 'requests[0].id': missing\n"
