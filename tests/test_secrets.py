"""The API key never leaks: not into any output file, not on stderr, not into `ps` of vk-send or of its workers,
whatever form it was given in (--api-key, -H with an attached value, --extra-body, the URL's userinfo or query,
a key file, the environment)."""

from __future__ import annotations

import os
import subprocess
import time

import orjson
import pytest
from conftest import vk_cmd
from test_send import open_schedule, req, session, write_jsonl
from test_send_faults import children

KEY = "sk-vktest-0123456789abcdefSECRET"


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def run_and_watch(args, tmp_path, env=None):
    """Run vk-send; while it runs, read the command lines of it and its workers (what ps shows)."""
    out = tmp_path / "run.jsonl"
    p = subprocess.Popen([*vk_cmd("vk-send"), *args, "-o", str(out)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
    seen = []
    deadline = time.monotonic() + 30
    while p.poll() is None and time.monotonic() < deadline:
        kids = children(p.pid)
        if len(kids) >= 2:
            time.sleep(0.3)  # the run is going: what ps shows now is what everybody sees for the whole run
            seen = [cmdline(p.pid)] + [cmdline(k) for k in children(p.pid)]
            break
        time.sleep(0.02)
    stdout, stderr = p.communicate(timeout=60)
    assert seen, "the workers were never seen"
    return p.returncode, out.read_bytes() + stdout, stderr.decode(), seen


@pytest.mark.parametrize("form", ["api-key", "api-key=", "H-attached", "H-separate", "header=", "extra-body",
                                  "url-query", "key-file", "env"])
def test_key_never_leaks(serve, tmp_path, form):
    srv = serve("--ttft", "0.02", "--tpot", "0.002")
    n = 60
    sched = write_jsonl(tmp_path / "s.jsonl", open_schedule([session(f"s{i}", [req("a")]) for i in range(n)],
                                                            [i * 0.02 for i in range(n)]))
    api = srv.url
    env = None
    extra: list[str] = []
    if form == "api-key":
        extra = ["--api-key", KEY]
    elif form == "api-key=":
        extra = [f"--api-key={KEY}"]
    elif form == "H-attached":
        extra = [f"-Hauthorization:Bearer {KEY}"]
    elif form == "H-separate":
        extra = ["-H", f"X-Api-Key: {KEY}"]
    elif form == "header=":
        extra = [f"--header=Authorization: Bearer {KEY}"]
    elif form == "extra-body":
        extra = ["--extra-body", orjson.dumps({"api_key": KEY, "temperature": 0}).decode()]
    elif form == "url-query":
        api = api + f"?api-key={KEY}&api-version=2024-10-21"
    elif form == "key-file":
        kf = tmp_path / "key"
        kf.write_text(KEY + "\n")
        extra = ["--api-key-file", str(kf)]
    elif form == "env":
        env = {"VK_API_KEY": KEY}
    rc, output, stderr, seen = run_and_watch([str(sched), "--api", api, "--model", "m", "--workers", "2",
                                              "--lag-threshold", "10", *extra], tmp_path, env)
    assert KEY.encode() not in output
    assert KEY not in stderr, stderr
    for c in seen:
        assert KEY not in c, c
    assert any("vk-send worker" in c for c in seen[1:])  # the workers show their own title
    if form == "url-query":
        assert b"api-version=2024-10-21" in output  # only secrets are masked


@pytest.mark.parametrize("model", [[], ["--model", "m"]])
def test_url_userinfo_is_refused_in_one_line_without_the_key(serve, tmp_path, model):
    """urllib cannot request user:password@host and the run's requests would not carry them: refused, redacted."""
    from conftest import run_vk

    srv = serve()
    sched = write_jsonl(tmp_path / "s.jsonl", open_schedule([session("s0", [req("a")])], [0.0]))
    api = srv.url.replace("http://", f"http://user:{KEY}@") + f"?key={KEY}"
    p = run_vk("vk-send", str(sched), "--api", api, *model, timeout=60)
    err = p.stderr.decode()
    assert p.returncode == 2 and len(err.strip().splitlines()) == 1, (p.returncode, err)
    assert KEY not in err and "Traceback" not in err and "credentials" in err, err


def test_model_lookup_failure_does_not_print_the_query_key(tmp_path):
    from conftest import run_vk
    from test_send import _free_port

    sched = write_jsonl(tmp_path / "s.jsonl", open_schedule([session("s0", [req("a")])], [0.0]))
    p = run_vk("vk-send", str(sched), "--api", f"http://127.0.0.1:{_free_port()}/v1?key={KEY}", timeout=60)
    err = p.stderr.decode()
    assert KEY not in err and "key=***" in err, err


def test_redirect_line_is_redacted():
    import email.message
    import urllib.error

    from vk.send.probe import _redirect_line

    hdrs = email.message.Message()
    hdrs["Location"] = f"http://127.0.0.1:9/v2/models?token={KEY}"
    e = urllib.error.HTTPError(f"http://127.0.0.1:9/v1/models?key={KEY}", 302, "Found", hdrs, None)
    line = _redirect_line(f"http://127.0.0.1:9/v1/models?key={KEY}", e)
    assert KEY not in line and "token=***" in line and "key=***" in line, line


def test_redact_argv_forms():
    from vk.send.options import redact_argv, redact_url

    argv = ["-Hauthorization:sk-abc", "-H", "X-Team: bench", "--extra-body", '{"api_key": "sk-abc", "max_tokens": 5}',
            "--api", "https://u:sk-abc@h/v1?key=sk-abc&api-version=1", "--api-key", "sk-abc"]
    out = " ".join(redact_argv(argv))
    assert "sk-abc" not in out
    assert "X-Team: bench" in out and '"max_tokens":5' in out and "api-version=1" in out
    assert redact_url("http://h/v1?sig=abc&x=1") == "http://h/v1?sig=***&x=1"
