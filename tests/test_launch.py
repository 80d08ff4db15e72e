"""vk.launch: start the server under test in its own process group, wait until ready, stop it, leave nothing."""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
import textwrap
import time

import orjson
import pytest

from tests.conftest import vk_cmd
from vk.launch import Server, ServerError, format_command, group_alive, launched

PY = shlex.quote(sys.executable)
VK_SERVE = shlex.join(vk_cmd("vk-serve")) + " --host 127.0.0.1 --port {port} --model launch-test"


def _gone(pgid: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while group_alive(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_vk_serve_is_started_described_and_stopped_with_its_whole_group(tmp_path):
    log = tmp_path / "server.log"
    # the shell forks a sleeper into the same group before it becomes vk-serve: stop() must take both
    cmd = f"sleep 300 & exec {VK_SERVE} --ttft 0.01"
    with launched(cmd, shell=True, log=log) as s:
        info = s.info()
        pgid = s.pgid
        assert group_alive(pgid)
        assert info["pid"] == pgid
        assert info["models"] == ["launch-test"]
        assert "vk-serve" in str(info["version"])
        assert info["ready_probe"] == "/health"
        assert info["ready_s"] is not None and 0 < info["ready_s"] < 60
        assert info["params"] == {"port": s.port}
        assert f"--port {s.port}" in info["cmd"]
        assert info["api"] == f"http://127.0.0.1:{s.port}/v1"
    assert _gone(pgid)
    assert log.exists()


def test_a_command_that_cannot_start_is_one_clear_error(tmp_path):
    with pytest.raises(ServerError, match="could not be started") as e:
        with launched("/nonexistent/vllm serve m --port {port}", log=tmp_path / "s.log"):
            pass
    assert "/nonexistent/vllm" in str(e.value).splitlines()[0]


def test_a_server_that_exits_early_shows_the_end_of_its_log(tmp_path):
    script = "import sys; print('loading model'); print('error: unknown flag --bogus', flush=True); sys.exit(3)"
    s = Server([sys.executable, "-c", script, "{port}"], log=tmp_path / "s.log")
    with pytest.raises(ServerError) as e:
        with s:
            pass
    lines = str(e.value).splitlines()
    assert "exited with status 3 before it was ready" in lines[0]
    assert lines[-1].endswith("error: unknown flag --bogus")
    assert _gone(s.pgid)


def test_a_server_that_never_gets_ready_is_stopped_even_when_it_ignores_sigterm(tmp_path):
    # it listens on nothing, ignores SIGTERM and has a child: the grace period ends in SIGKILL for the group
    script = textwrap.dedent("""
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        subprocess.Popen([sys.executable, '-c', 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)'])
        print('still loading', flush=True)
        time.sleep(300)
    """)
    s = Server([sys.executable, "-c", script, "{port}"], log=tmp_path / "s.log", ready_timeout=1.5,
               stop_grace=0.5)
    t0 = time.monotonic()
    with pytest.raises(ServerError, match=r"was not ready after 1.5 s") as e:
        with s:
            pass
    assert time.monotonic() - t0 < 15
    assert "still loading" in str(e.value)
    assert _gone(s.pgid)


def test_an_exception_in_the_block_stops_the_server(tmp_path):
    with pytest.raises(RuntimeError):
        with launched(VK_SERVE, log=tmp_path / "s.log") as s:
            pgid = s.pgid
            raise RuntimeError("the benchmark failed")
    assert _gone(pgid)


def test_ready_falls_back_to_the_model_list_when_there_is_no_health_endpoint(tmp_path):
    app = tmp_path / "app.py"
    app.write_text(textwrap.dedent("""
        import http.server, json, sys
        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == '/v1/models':
                    body = json.dumps({'data': [{'id': 'only-models'}]}).encode()
                    self.send_response(200); self.end_headers(); self.wfile.write(body)
                else:
                    self.send_response(404); self.end_headers()
            def log_message(self, *a):
                pass
        http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()
    """))
    with launched(f"{PY} {app} {{port}}", log=tmp_path / "s.log") as s:
        assert s.ready_probe == "/v1/models"
        assert s.models == ["only-models"]
        assert s.version is None
    assert _gone(s.pgid)


def test_sigint_to_the_benchmark_leaves_no_server_behind(tmp_path):
    script = tmp_path / "bench.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        from vk.launch import launched
        with launched({VK_SERVE!r}, log={str(tmp_path / 's.log')!r}) as s:
            print(s.pgid, flush=True)
            time.sleep(300)
    """))
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pgid = int(p.stdout.readline())
        assert group_alive(pgid)
        p.send_signal(signal.SIGINT)
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
    assert _gone(pgid)


def test_placeholders_are_substituted_and_unknown_ones_named():
    assert format_command("serve --max-num-seqs {max_num_seqs} --port {port}", {"port": 8, "max_num_seqs": 32}) \
        == "serve --max-num-seqs 32 --port 8"
    assert format_command(["a", "{x}"], {"x": 1}) == ["a", "1"]
    with pytest.raises(ServerError, match=r"no value for placeholder \{max_num_seqs\}"):
        format_command("serve {max_num_seqs}", {})
    with pytest.raises(ServerError, match="put \\{port\\} in the command"):
        Server("vllm serve m")


def test_run_benchmark_with_a_server_command_records_it_in_the_run_header(tmp_path):
    from vk import run_benchmark

    out = tmp_path / "run.jsonl"
    res = run_benchmark(count=3, output=out, server_cmd=VK_SERVE + " --ttft 0.01 --tpot 0.001")
    header = orjson.loads(out.read_bytes().splitlines()[0])
    server = header["server"]
    assert server["models"] == ["launch-test"] and server["pid"] > 0 and server["ready_s"] > 0
    assert header["api"] == server["api"]
    assert server["log"] == f"{out}.server.log"
    assert (tmp_path / "run.jsonl.server.log").exists()
    assert _gone(server["pid"])
    assert res is not None
