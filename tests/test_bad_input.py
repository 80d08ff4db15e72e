"""Bad input to vk-gen, vk-schedule and vk-send: one clear line on stderr, exit status 2, never a traceback, and
(vk-send) no request sent."""

from __future__ import annotations

import orjson
import pytest
from conftest import run_vk
from test_send import _free_port, open_schedule, req, session, write_jsonl

BOMB = "\n".join(["a: &a [x, x, x, x, x, x, x, x, x, x]"]
                 + [f"{c}: &{c} [{', '.join(['*' + p] * 10)}]" for p, c in zip("abcdefgh", "bcdefghi", strict=True)])


def one_line_exit_2(p, *expect: str) -> str:
    err = p.stderr.decode()
    assert p.returncode == 2, (p.returncode, err)
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for e in expect:
        assert e in lines[0], (e, lines[0])
    return lines[0]


@pytest.fixture
def sched(tmp_path):
    sess = [session(f"s{i}", [req("a")]) for i in range(3)]
    return write_jsonl(tmp_path / "s.jsonl", open_schedule(sess, [0.0, 0.01, 0.02]))


@pytest.mark.parametrize("gen", [
    "{type: fixed, value: 1e12}",  # YAML 1.1 reads 1e12 as a string
    "{type: fixed, value: 1.0e12}",
    "{type: fixed, value: '1e12'}",
    "{type: fixed, value: 1e400}",
    "{type: uniform, min: 1, max: 1e12}",
    "{type: normal, mean: 1e400, std: 1}",
    "{type: normal, mean: '1e8', std: 1}",
    "{type: fixed_stair, values: [1, 100000000000]}",
    "{type: empirical, values: [1, '1e400']}",
])
def test_vk_gen_length_ceiling_however_the_number_is_written(tmp_path, gen):
    path = tmp_path / "L.yaml"
    path.write_text("seed: 1\nsession_generator: {type: synthetic, channels: [{type: text, "
                    f"body_length_generator: {gen}}}]}}\n")
    one_line_exit_2(run_vk("vk-gen", str(path), "--count", "1", timeout=60), "body_length_generator")


# ------------------------------------------------------------------------------------------------------------
# vk-gen


@pytest.mark.parametrize("args,expect", [
    (["--set", "input.length.value=1000000000000"], "ceiling"),
    (["--set", "input.length.value=.inf"], "not a finite number"),
    (["--set", "output.length.value=.nan"], "not a finite number"),
    (["--seed", str(2**64)], "--seed"),
    (["--flavor", "mooncake", "--trace", "."], "is a directory"),
    (["--flavor", "mooncake", "--trace", "/no/such/trace.jsonl"], "no such file"),
])
def test_vk_gen(args, expect):
    one_line_exit_2(run_vk("vk-gen", "--count", "1", *args, timeout=60), expect)


def test_vk_gen_yaml_alias_bomb(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB + "\n")
    one_line_exit_2(run_vk("vk-gen", str(path), "--count", "1", timeout=60), str(path), "aliases")


def test_vk_gen_seed_in_config_beyond_64_bits(tmp_path):
    path = tmp_path / "seed.yaml"
    path.write_text(f"seed: {2**64}\n")
    one_line_exit_2(run_vk("vk-gen", str(path), "--count", "1", timeout=60), f"{path}:1", "seed")


# ------------------------------------------------------------------------------------------------------------
# vk-schedule


@pytest.mark.parametrize("args,expect", [
    (["--poisson", "1", "--seed", str(2**70)], "--seed"),
    (["--poisson", "nan"], "--poisson"),
    (["--concurrency", "2", "--ramp-up", "nan"], "--ramp-up"),
])
def test_vk_schedule(tmp_path, args, expect):
    sessions = run_vk("vk-gen", "--count", "3", check=True).stdout
    p = run_vk("vk-schedule", *args, "--max-sessions", "3", input=sessions, timeout=60)
    one_line_exit_2(p, expect)


# ------------------------------------------------------------------------------------------------------------
# vk-send: nothing is sent (the API points at a port where nothing listens: a request would be a record)


@pytest.mark.parametrize("args,expect", [
    (["--api", "http://127.0.0.1:99999/v1"], "--api"),
    (["--api", "http://127.0.0.1:0/v1"], "--api"),
    (["--api", "http://[::1/v1"], "--api"),
    (["--timeout", "nan"], "--timeout"),
    (["--timeout", "inf"], "--timeout"),
    (["--first-byte-timeout", "nan"], "--first-byte-timeout"),
    (["--lag-threshold", "nan"], "--lag-threshold"),
    (["--max-errors", "nan"], "--max-errors"),
    (["--max-errors", "inf"], "--max-errors"),
    (["-H", "X-A: b\r\nX-Injected: 1"], "header injection"),
    (["-H", "X-A: b\nGET / HTTP/1.1"], "header injection"),
    (["-H", "Bad Name: x"], "not a valid header name"),
    (["--workers", "100000"], "--workers"),
    (["--api-key-file", "/no/such/key"], "--api-key-file"),
    (["--http2", "--client", "raw"], "--http2"),
    (["--http2", "--client", "aiohttp"], "--http2"),
])
def test_vk_send_options(sched, args, expect):
    base = ["--api", f"http://127.0.0.1:{_free_port()}/v1"]
    if args[0] == "--api":
        base = []
    p = run_vk("vk-send", sched, *base, "--model", "m", *args, timeout=60)
    one_line_exit_2(p, expect)
    assert p.stdout == b""  # not even a run header


def test_vk_schedule_missing_input_leaves_no_output(tmp_path):
    out = tmp_path / "x.jsonl"
    one_line_exit_2(run_vk("vk-schedule", str(tmp_path / "nonexist.jsonl"), "--poisson", "5", "-o", str(out)),
                    "nonexist.jsonl")
    assert not out.exists()


@pytest.mark.parametrize("stdin", [False, True])
def test_vk_send_no_sessions_is_one_line_exit_2(tmp_path, stdin):
    empty = tmp_path / "e.jsonl"
    empty.write_bytes(b"")
    args = ["--api", f"http://127.0.0.1:{_free_port()}/v1", "--model", "m"]
    p = run_vk("vk-send", *args, input=b"", timeout=60) if stdin else run_vk("vk-send", str(empty), *args)
    one_line_exit_2(p, "no sessions in the input")


def test_examples_makefile_deletes_on_error():
    from pathlib import Path

    assert ".DELETE_ON_ERROR:" in (Path(__file__).parent.parent / "examples" / "Makefile").read_text()


@pytest.mark.parametrize("model", [[], ["--model", "m"]])
def test_vk_send_unreachable_server_exits_4_with_or_without_model(sched, model):
    """No server: not bad input (man vk-send: EXIT STATUS 4), whether or not the model list had to be asked."""
    p = run_vk("vk-send", sched, "--api", f"http://127.0.0.1:{_free_port()}/v1", *model, timeout=60)
    err = p.stderr.decode()
    assert p.returncode == 4, (p.returncode, err)
    assert "Traceback" not in err, err
    if not model:
        assert len(err.strip().splitlines()) == 1 and "unreachable" in err, err


def _schedule_lines(tmp_path, recs) -> str:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    return str(path)


def test_vk_send_bad_line_late_in_a_file_is_found_before_any_request(tmp_path, serve):
    srv = serve("--ttft", "0.001")
    sess = [session(f"s{i}", [req("a")]) for i in range(50)]
    recs = open_schedule(sess, [i * 0.001 for i in range(50)])
    recs[40]["start"] = None  # an open-loop session without a start, far down the file
    path = _schedule_lines(tmp_path, recs)
    p = run_vk("vk-send", path, "--api", srv.url, timeout=60)
    one_line_exit_2(p, f"{path}:41", "start")
    assert p.stdout == b""


@pytest.mark.parametrize("field,value,expect", [
    ("start", 1e12, "days ahead"),
    ("think_time", 1e12, "think_time"),
])
def test_vk_send_absurd_times_refused(tmp_path, field, value, expect):
    sess = [session("s0", [req("a")])]
    recs = open_schedule(sess, [0.0])
    if field == "start":
        recs[1]["start"] = value
    else:
        recs[1]["session"]["requests"][0]["think_time"] = value
    path = _schedule_lines(tmp_path, recs)
    p = run_vk("vk-send", path, "--api", f"http://127.0.0.1:{_free_port()}/v1", "--model", "m", timeout=60)
    one_line_exit_2(p, expect)


def test_vk_send_absurd_start_at_refused(tmp_path):
    recs = open_schedule([session("s0", [req("a")])], [0.0], start_at=1e15)
    path = _schedule_lines(tmp_path, recs)
    p = run_vk("vk-send", path, "--api", f"http://127.0.0.1:{_free_port()}/v1", "--model", "m", timeout=60)
    one_line_exit_2(p, "start_at", "days")


def test_vk_send_far_start_is_announced(tmp_path, serve):
    import subprocess
    import time

    from conftest import vk_cmd

    srv = serve("--ttft", "0.001")
    recs = open_schedule([session("s0", [req("a")])], [3600.0])
    path = _schedule_lines(tmp_path, recs)
    p = subprocess.Popen([*vk_cmd("vk-send"), path, "--api", srv.url], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    try:
        line = p.stderr.readline().decode()
    finally:
        p.terminate()
        p.wait(10)
    assert "first request is due in 60 min" in line, line
    time.sleep(0)


def test_vk_send_warns_when_open_files_are_too_few(tmp_path, serve):
    import resource
    import subprocess

    from conftest import vk_cmd

    srv = serve("--ttft", "0.001")
    n = 300
    sess = [session(f"s{i}", [req("a", out=1)]) for i in range(n)]
    path = write_jsonl(tmp_path / "s.jsonl", open_schedule(sess, [0.0] * n))

    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))

    p = subprocess.run([*vk_cmd("vk-send"), path, "--api", srv.url, "--workers", "1", "-o", str(tmp_path / "r")],
                       capture_output=True, preexec_fn=limit, timeout=120)
    err = p.stderr.decode()
    assert "open-file limit is 128" in err and "starts up to 300 sessions within 10 s" in err, err


# ------------------------------------------------------------------------------------------------------------
# vk-eval compare, vk-serve


@pytest.mark.parametrize("args,expect", [
    (["--confidence", "2"], "--confidence"),
    (["--confidence", "nan"], "--confidence"),
    (["--confidence", "0"], "--confidence"),
    (["--confidence", "1"], "--confidence"),
    (["--bootstrap", "-1"], "--bootstrap"),
])
def test_vk_eval_compare_options(tmp_path, args, expect):
    run = write_jsonl(tmp_path / "a.jsonl", [])
    one_line_exit_2(run_vk("vk-eval", "compare", str(run), str(run), *args, timeout=60), expect)


def test_vk_serve_unknown_tokenizer_one_line_also_from_the_prompt_worker():
    one_line_exit_2(run_vk("vk-serve", "--port", "0", "--tokenizer", "nosuch", timeout=60), "nosuch")


@pytest.mark.parametrize("start_at", ["1e30", str(10**12)])
def test_vk_schedule_absurd_start_at_refused(tmp_path, start_at):
    sessions = write_jsonl(tmp_path / "s.jsonl", [session("s0", [req("a")])])
    one_line_exit_2(run_vk("vk-schedule", sessions, "--poisson", "1", "--start-at", start_at), "--start-at")


# ------------------------------------------------------------------------------------------------------------
# the documentation of what is refused above, and of the commands


def test_man_pages_render_without_warnings():
    import os
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("man") is None:
        pytest.skip("no man(1)")
    for page in sorted((Path(__file__).parent.parent / "man").glob("*.[15]")):
        p = subprocess.run(["man", "--warnings", "-l", str(page)], capture_output=True,
                           env={**os.environ, "MANWIDTH": "100"}, timeout=60)
        assert p.stderr == b"", (page.name, p.stderr.decode())
        if page.name != "vk-sweep.1" and page.name.endswith(".1"):
            assert b"vk-sweep" in p.stdout.split(b"SEE ALSO")[-1], page.name


def test_vk_eval_help_lists_every_subcommand():
    from vk.eval.cli import SUBCOMMANDS

    out = run_vk("vk-eval", "--help", check=True).stdout.decode()
    listed = out.split("Subcommands:")[1].split("(")[0]
    assert all(c in listed for c in SUBCOMMANDS), listed
