"""vk-send --api-style and vk-serve --api-style, checked against each provider's official Python SDK.

For each style, the provider's SDK (anthropic, openai's AzureOpenAI, boto3, google-genai, cohere, oci) is the
independent client of vk-serve in that style, so the simulated protocol is the real one; then vk-send runs the
same workload against it: the same token counts as the SDK and as the OpenAI style, and against a fixed-latency
vk-serve the same TTFT and TPOT, within the bounds of the OpenAI style's own tests, as the server's write times.
"""

from __future__ import annotations

import bisect
import itertools
import json
import logging
import os
import statistics

import orjson
import pytest

from vk import records
from vk.send.run import send

STYLES = ["anthropic", "azure", "bedrock", "vertex", "cohere", "oci"]
MODEL = "vk-sim"
AWS = {"AWS_ACCESS_KEY_ID": "AKIDVKTEST", "AWS_SECRET_ACCESS_KEY": "vk-test-secret", "AWS_REGION": "us-east-1"}
OCI_USER = "ocid1.user.oc1..aaaavktest"
OCI_TENANCY = "ocid1.tenancy.oc1..aaaavktest"
PROMPTS = ["Say something about whales.", "Tell me about the sea, at length and with feeling.",
           "Why is the sky blue?", "A haiku about autumn, please."]


@pytest.fixture
def aws_env(monkeypatch, tmp_path):
    """Dummy credentials: AWS for both sides (vk-serve then checks every SigV4 signature), and an OCI config
    with a fresh RSA key for vk-send and the oci SDK."""
    monkeypatch.setenv("OCI_CONFIG_FILE", oci_config(tmp_path, "oci"))
    monkeypatch.delenv("OCI_CLI_PROFILE", raising=False)
    monkeypatch.delenv("OCI_COMPARTMENT_ID", raising=False)
    for k, v in AWS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def oci_config(tmp_path, name: str) -> str:
    """An OCI config file with a fresh RSA API key; its path."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = tmp_path / f"{name}_key.pem"
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                      serialization.NoEncryption()))
    conf = tmp_path / f"{name}_config"
    conf.write_text(f"[DEFAULT]\nuser={OCI_USER}\nfingerprint={':'.join(['ab'] * 16)}\ntenancy={OCI_TENANCY}\n"
                    f"region=us-chicago-1\nkey_file={pem}\n")
    return str(conf)


def base_of(srv) -> str:
    return srv.base


def api_of(srv, style: str) -> str:
    return srv.url if style == "openai" else srv.base


# ------------------------------------------------------------------------------------------------------------
# each provider's SDK as the client: (text, prompt tokens, output tokens, finish reason)


def sdk_stream(style: str, base: str, prompt: str, max_tokens: int):
    if style == "anthropic":
        import anthropic

        client = anthropic.Anthropic(base_url=base, api_key="sk-ant-test")
        with client.messages.stream(model=MODEL, max_tokens=max_tokens,
                                    messages=[{"role": "user", "content": prompt}]) as stream:
            kinds = [ev.type for ev in stream]
            msg = stream.get_final_message()
        assert kinds[0] == "message_start" and "content_block_delta" in kinds and kinds[-1] == "message_stop"
        u = msg.usage
        return msg.content[0].text, u.input_tokens + u.cache_read_input_tokens, u.output_tokens, msg.stop_reason
    if style == "azure":
        import openai

        client = openai.AzureOpenAI(azure_endpoint=base, api_key="azure-test", api_version="2024-10-21")
        text, usage, finish = [], None, None
        for ch in client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                                 max_tokens=max_tokens, stream=True,
                                                 stream_options={"include_usage": True}):
            if ch.choices:
                text.append(ch.choices[0].delta.content or "")
                finish = ch.choices[0].finish_reason or finish
            if ch.usage:
                usage = ch.usage
        return "".join(text), usage.prompt_tokens, usage.completion_tokens, finish
    if style == "bedrock":
        import boto3

        client = boto3.session.Session().client("bedrock-runtime", endpoint_url=base, region_name="us-east-1")
        r = client.converse_stream(modelId=MODEL, messages=[{"role": "user", "content": [{"text": prompt}]}],
                                   inferenceConfig={"maxTokens": max_tokens})
        text, usage, finish = [], None, None
        for ev in r["stream"]:
            if "contentBlockDelta" in ev:
                text.append(ev["contentBlockDelta"]["delta"]["text"])
            elif "messageStop" in ev:
                finish = ev["messageStop"]["stopReason"]
            elif "metadata" in ev:
                usage = ev["metadata"]["usage"]
        return "".join(text), usage["inputTokens"] + usage.get("cacheReadInputTokens", 0), usage["outputTokens"], \
            finish
    if style == "vertex":
        from google import genai
        from google.genai import types
        from google.oauth2.credentials import Credentials

        client = genai.Client(vertexai=True, project="vk-project", location="us-central1",
                              credentials=Credentials(token="vk-test-token"),
                              http_options=types.HttpOptions(base_url=base))
        text, usage, finish = [], None, None
        for ch in client.models.generate_content_stream(
                model=MODEL, contents=prompt, config=types.GenerateContentConfig(max_output_tokens=max_tokens)):
            text.append(ch.text or "")
            usage = ch.usage_metadata
            finish = ch.candidates[0].finish_reason or finish
        return "".join(text), usage.prompt_token_count, usage.candidates_token_count, finish.value
    if style == "cohere":
        import cohere

        client = cohere.ClientV2(api_key="co-test", base_url=base)
        text, usage, finish, types_seen = [], None, None, []
        for ev in client.chat_stream(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                     max_tokens=max_tokens):
            types_seen.append(ev.type)
            if ev.type == "content-delta":
                text.append(ev.delta.message.content.text)
            elif ev.type == "message-end":
                usage, finish = ev.delta.usage.tokens, ev.delta.finish_reason
        assert types_seen[0] == "message-start" and types_seen[-1] == "message-end"
        return "".join(text), int(usage.input_tokens), int(usage.output_tokens), finish
    if style == "oci":
        import oci

        config = oci.config.from_file(os.environ["OCI_CONFIG_FILE"])
        client = oci.generative_ai_inference.GenerativeAiInferenceClient(
            config, service_endpoint=base, retry_strategy=oci.retry.NoneRetryStrategy())
        m = oci.generative_ai_inference.models
        details = m.ChatDetails(
            compartment_id=OCI_TENANCY, serving_mode=m.OnDemandServingMode(model_id=MODEL),
            chat_request=m.GenericChatRequest(messages=[m.UserMessage(content=[m.TextContent(text=prompt)])],
                                              max_tokens=max_tokens, is_stream=True,
                                              stream_options=m.StreamOptions(is_include_usage=True)))
        text, usage, finish = [], None, None
        for ev in client.chat(details).data.events():
            obj = json.loads(ev.data)
            for part in (obj.get("message") or {}).get("content") or []:
                text.append(part["text"])
            finish = obj.get("finishReason") or finish
            usage = obj.get("usage") or usage
        return "".join(text), usage["promptTokens"], usage["completionTokens"], finish
    raise AssertionError(style)


FINISH_AT_LENGTH = {"anthropic": "max_tokens", "azure": "length", "oci": "length", "bedrock": "max_tokens", "vertex": "MAX_TOKENS",
                    "cohere": "MAX_TOKENS", "openai": "length"}


def schedule(n: int, out: int, gap: float = 0.02):
    out_recs = [records.new_schedule("open", "test", seed=0)]
    for i in range(n):
        r = records.new_request("a", messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                output_tokens=out)
        out_recs.append(records.new_scheduled_session(records.new_session(f"s{i}", [r]), i * gap, i))
    return out_recs


def run_send(srv, style: str, n: int, out: int, tmp_path, gap: float = 0.02, **kw) -> list[dict]:
    path = tmp_path / f"run-{style}.jsonl"
    send(schedule(n, out, gap), api=api_of(srv, style), api_style=style, model=MODEL, output=str(path), workers=1,
         handle_signals=False, quiet=True, api_key=kw.pop("api_key", "vk-test-key"), **kw)
    recs = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    assert recs[0]["kind"] == "run" and recs[0]["api_style"] == style
    records.validate_run(recs[0])
    return sorted((r for r in recs if r["kind"] == "response"), key=lambda r: r["session_index"])


# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", STYLES)
def test_sdk_and_vk_send_read_the_same_answer(style, serve, tmp_path, aws_env, caplog):
    """The provider's SDK parses vk-serve's stream strictly; vk-send's records then carry the same token counts
    as the SDK reports for the same prompts, and as the OpenAI style does against the same server."""
    srv = serve("--api-style", style, "--stop-mean", "100000", "--ttft", "0.005", "--tpot", "0.001")
    with caplog.at_level(logging.WARNING):
        sdk = [sdk_stream(style, srv.base, p, 12) for p in PROMPTS]
    assert not [r for r in caplog.records if "Skipping SSE event" in r.getMessage()]  # cohere's lenient parser
    for text, prompt, output, finish in sdk:
        assert output == 12 and prompt > 5 and finish == FINISH_AT_LENGTH[style]
        assert len(text.split()) == 12  # vk-serve's words are one token each
    rs = run_send(srv, style, len(PROMPTS), 12, tmp_path, save_text=True)
    plain = run_send(srv, "openai", len(PROMPTS), 12, tmp_path)
    for r, o, (_, prompt, output, _) in zip(rs, plain, sdk, strict=True):
        assert r["status"] == "ok", r["error"]
        assert r["usage"]["prompt_tokens"] == prompt == o["usage"]["prompt_tokens"]
        assert r["usage"]["completion_tokens"] == output == o["usage"]["completion_tokens"] == 12
        assert r["finish_reason"] == FINISH_AT_LENGTH[style]
        assert r["events"]["kind"].count("c") == 12 and len(r["text"].split()) == 12
        assert r["t_first_token"] == r["t_first_content"] <= r["t_last_token"]


# azure streams reasoning as the openai style does (tested in test_send), so it is not a case of its own here
@pytest.mark.parametrize("style", [s for s in STYLES if s != "azure"])
def test_reasoning_tokens_are_reasoning_events(style, serve, tmp_path, aws_env):
    """--reasoning-tokens: each style's thinking events (Anthropic thinking_delta, Bedrock reasoningContent,
    Gemini thought parts, Cohere thinking) are vk's reasoning events, before the content."""
    srv = serve("--api-style", style, "--stop-mean", "100000", "--ttft", "0.005", "--tpot", "0.001",
                "--reasoning-tokens", "3")
    (r,) = run_send(srv, style, 1, 10, tmp_path)
    assert r["status"] == "ok", r["error"]
    toks = "".join(k for k in r["events"]["kind"] if k in "crt")
    assert toks == "rrr" + "c" * 7
    assert r["t_first_token"] < r["t_first_content"]
    if style == "vertex":
        assert r["usage"]["reasoning_tokens"] == 3 and r["usage"]["completion_tokens"] == 10


def server_token_times(r: dict) -> list[float]:
    return [t for t, k in zip(r["events"]["server_t"], r["events"]["kind"], strict=True) if k in "crt"]


@pytest.mark.parametrize("style", ["openai", *STYLES])
def test_fixed_latency_is_measured_the_same_in_every_style(style, serve, tmp_path, aws_env):
    """TTFT 50 ms and 10 ms per token at the server: every style's records agree with the server's own write
    times to 0.2 ms (the OpenAI style's bound in test_e2e), and with what the server was told."""
    srv = serve("--api-style", style, "--stop-mean", "100000", "--ttft", "0.05", "--tpot", "0.01",
                "--server-timestamps")
    rs = run_send(srv, style, 12, 6, tmp_path)[2:]  # the server's first requests warm up its tokenizer
    assert all(r["status"] == "ok" for r in rs)
    ttft = [r["t_first_token"] - r["t_sent"] for r in rs]
    tpot = [(r["t_last_token"] - r["t_first_token"]) / 5 for r in rs]
    server_ttft = [server_token_times(r)[0] - r["t_sent"] for r in rs]
    server_tpot = [(server_token_times(r)[-1] - server_token_times(r)[0]) / 5 for r in rs]
    assert statistics.median(ttft) == pytest.approx(statistics.median(server_ttft), abs=2e-4)
    assert statistics.median(tpot) == pytest.approx(statistics.median(server_tpot), abs=2e-4)
    assert abs(statistics.median(ttft) - 0.05) < 0.005
    assert abs(statistics.median(tpot) - 0.01) < 0.002


# ------------------------------------------------------------------------------------------------------------
# authentication


def test_bedrock_signatures_verify_and_a_wrong_secret_is_refused(serve, tmp_path, aws_env, monkeypatch):
    """vk-serve recomputes every SigV4 signature with botocore from the bytes it received: vk-send's (and
    boto3's) verify; signed with another secret, the same request is a 403 error record."""
    srv = serve("--api-style", "bedrock", "--stop-mean", "100000", "--ttft", "0.005", "--tpot", "0.001")
    assert all(r["status"] == "ok" for r in run_send(srv, "bedrock", 2, 4, tmp_path))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    rs = run_send(srv, "bedrock", 2, 4, tmp_path)
    assert all(r["status"] == "error" and r["http_status"] == 403 for r in rs)
    assert "signature" in rs[0]["error"]
    import botocore.exceptions

    with pytest.raises(botocore.exceptions.ClientError):
        sdk_stream("bedrock", srv.base, "hi", 4)


@pytest.mark.parametrize("style,header", [("anthropic", "x-api-key"), ("azure", "api-key"),
                                          ("cohere", "authorization"), ("vertex", "x-goog-api-key")])
def test_the_api_key_never_reaches_the_records(style, header, serve, tmp_path, aws_env):
    srv = serve("--api-style", style, "--stop-mean", "100000", "--ttft", "0.005", "--tpot", "0.001")
    secret = "sk-very-secret-4242"
    path = tmp_path / "run.jsonl"
    send(schedule(1, 3), api=srv.base, api_style=style, model=MODEL, output=str(path), workers=1,
         handle_signals=False, quiet=True, api_key=secret, argv=["--api-key", secret, "--api-style", style])
    data = path.read_text()
    assert secret not in data and '"ok"' in data


def test_missing_credentials_and_sdks_are_one_line(tmp_path, monkeypatch):
    from vk.errors import VkError

    with pytest.raises(VkError, match="--model: required"):
        send(schedule(1, 3), api="http://127.0.0.1:9", api_style="anthropic", output=str(tmp_path / "x"),
             quiet=True, handle_signals=False)
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.delenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", raising=False)
    monkeypatch.delenv("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", raising=False)
    with pytest.raises(VkError, match="no AWS credentials"):
        send(schedule(1, 3), api="http://127.0.0.1:9", api_style="bedrock", model=MODEL,
             output=str(tmp_path / "x"), quiet=True, handle_signals=False)


@pytest.mark.parametrize("style,extra", [("anthropic", {"ignore_eos": True}), ("cohere", {"ignore_eos": True}),
                                         ("azure", {"ignore_eos": True}),
                                         ("bedrock", {"additionalModelRequestFields": {"ignore_eos": True}})])
def test_a_style_max_is_a_maximum_and_extra_body_can_force_the_length(style, extra, serve, tmp_path, aws_env):
    """Natural stops after 2 tokens: the style's own limit is only a maximum (2 of 12 come out), and the server's
    extension sent through --extra-body gives the exact length."""
    srv = serve("--api-style", style, "--stop-mean", "2", "--stop-sigma", "0", "--ttft", "0.005", "--tpot", "0.001")
    assert {r["usage"]["completion_tokens"] for r in run_send(srv, style, 2, 12, tmp_path)} == {2}
    assert {r["usage"]["completion_tokens"] for r in run_send(srv, style, 2, 12, tmp_path, extra_body=extra)} == {12}


def test_the_run_header_style_is_validated():
    run = records.new_run("r", 1.0, api="http://x", model="m", endpoint="chat", vk_version="0", host="h", argv=[],
                          api_style="anthropic")
    records.validate_run(run)
    with pytest.raises(records.RecordError, match="api_style"):
        records.validate_run({**run, "api_style": "smoke-signals"})


def test_vertex_token_from_adc_is_refreshed_during_a_long_run(serve, tmp_path, monkeypatch):
    """Application-default credentials (a service-account file whose token endpoint is local): the first token
    is fetched before the run, and one near expiry is refreshed off the event loop while requests go on."""
    import http.server
    import threading

    issued = []

    class TokenEndpoint(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers.get("content-length", 0)))
            issued.append(f"tok-{len(issued)}")
            body = json.dumps({"access_token": issued[-1], "expires_in": 301.5, "token_type": "Bearer"}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), TokenEndpoint)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        adc = tmp_path / "adc.json"
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        adc.write_text(json.dumps({  # a service account whose token endpoint is local
            "type": "service_account", "project_id": "vk-project", "private_key_id": "vk", "client_id": "1",
            "private_key": key.decode(), "client_email": "vk@vk-project.iam.gserviceaccount.com",
            "token_uri": f"http://127.0.0.1:{httpd.server_address[1]}/token"}))
        monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(adc))
        monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "vk-project")
        for k in ("GEMINI_API_KEY", "GOOGLE_API_KEY", "VK_API_KEY"):
            monkeypatch.delenv(k, raising=False)
        srv = serve("--api-style", "vertex", "--stop-mean", "100000", "--ttft", "0.005", "--tpot", "0.001")
        rs = run_send(srv, "vertex", 8, 4, tmp_path, api_key=None, gap=0.4)
        assert all(r["status"] == "ok" for r in rs)
        assert len(issued) >= 2  # the first token, before the run, and at least one refresh during it
    finally:
        httpd.shutdown()


@pytest.mark.parametrize("style", ["anthropic", "bedrock"])
def test_a_broken_event_is_judged_by_the_one_answer_policy(style, serve, tmp_path, aws_env):
    """--fault-malformed: a bad SSE event is skipped with a warning (the stream still finished, as for OpenAI); a
    corrupt event-stream frame ends the stream: an error naming the checksum, never ok."""
    srv = serve("--api-style", style, "--stop-mean", "100000", "--ttft", "0.005", "--tpot", "0.001",
                "--fault-malformed", "1")
    (r,) = run_send(srv, style, 1, 6, tmp_path)
    if style == "bedrock":
        assert r["status"] == "error" and "checksum" in r["error"]
    else:
        assert r["status"] == "ok" and "malformed" in r["warning"] and r["usage"]["completion_tokens"] == 6


def test_bedrock_invoke_model_with_response_stream(serve, tmp_path, aws_env):
    """--endpoint invoke: InvokeModelWithResponseStream with Anthropic's native body; boto3 reads vk-serve's chunk
    frames, and vk-send's records carry the same counts, with times as exact as ConverseStream's."""
    import boto3

    srv = serve("--api-style", "bedrock", "--stop-mean", "100000", "--ttft", "0.05", "--tpot", "0.01",
                "--server-timestamps")
    client = boto3.session.Session().client("bedrock-runtime", endpoint_url=srv.base, region_name="us-east-1")
    sdk = []
    for prompt in PROMPTS[:2]:
        r = client.invoke_model_with_response_stream(modelId=MODEL, body=json.dumps({
            "anthropic_version": "bedrock-2023-05-31", "max_tokens": 6,
            "messages": [{"role": "user", "content": prompt}]}))
        events = [json.loads(ev["chunk"]["bytes"]) for ev in r["body"]]  # boto3 decodes the base64 blob
        assert [e["type"] for e in events][:2] == ["message_start", "content_block_start"]
        metrics = events[-1]["amazon-bedrock-invocationMetrics"]
        assert sum(e["type"] == "content_block_delta" for e in events) == metrics["outputTokenCount"] == 6
        sdk.append(metrics["inputTokenCount"])
    path = tmp_path / "invoke.jsonl"
    send(schedule(12, 6), api=srv.base, api_style="bedrock", endpoint="invoke", model=MODEL, output=str(path),
         workers=1, handle_signals=False, quiet=True)
    rs = sorted((r for r in map(orjson.loads, path.read_bytes().splitlines()) if r["kind"] == "response"),
                key=lambda r: r["session_index"])
    assert all(r["status"] == "ok" and r["usage"]["completion_tokens"] == 6 for r in rs)
    assert [r["usage"]["prompt_tokens"] for r in rs[:2]] == sdk
    rs = rs[2:]
    ttft = [r["t_first_token"] - r["t_sent"] for r in rs]
    server_ttft = [server_token_times(r)[0] - r["t_sent"] for r in rs]
    tpot = [(r["t_last_token"] - r["t_first_token"]) / 5 for r in rs]
    server_tpot = [(server_token_times(r)[-1] - server_token_times(r)[0]) / 5 for r in rs]
    assert statistics.median(ttft) == pytest.approx(statistics.median(server_ttft), abs=2e-4)
    assert statistics.median(tpot) == pytest.approx(statistics.median(server_tpot), abs=2e-4)


def test_oci_signatures_verify_and_another_key_is_refused(serve, tmp_path, aws_env, monkeypatch):
    """vk-serve checks every OCI signature against the public half of the configured API key: vk-send's (made
    by the oci SDK's signer over the bytes it sends) and the oci SDK's verify; signed with another key, 401."""
    srv = serve("--api-style", "oci", "--stop-mean", "100000", "--ttft", "0.005", "--tpot", "0.001")
    assert all(r["status"] == "ok" for r in run_send(srv, "oci", 2, 4, tmp_path))
    monkeypatch.setenv("OCI_CONFIG_FILE", oci_config(tmp_path, "other"))
    rs = run_send(srv, "oci", 2, 4, tmp_path)
    assert all(r["status"] == "error" and r["http_status"] == 401 for r in rs)
    import oci

    with pytest.raises(oci.exceptions.ServiceError):
        sdk_stream("oci", srv.base, "hi", 4)


def test_gemini_json_array_stream(serve, tmp_path, aws_env):
    """Without alt=sse (``--api '...?alt=json'``) Gemini streams one JSON array: vk frames its objects as they
    arrive, each timed by its closing brace's read, as exactly as the SSE form."""
    srv = serve("--api-style", "vertex", "--stop-mean", "100000", "--ttft", "0.05", "--tpot", "0.01",
                "--server-timestamps")
    path = tmp_path / "json.jsonl"
    send(schedule(12, 6), api=srv.base + "?alt=json", api_style="vertex", model=MODEL, output=str(path),
         workers=1, handle_signals=False, quiet=True, api_key="vk-test-key")
    rs = sorted((r for r in map(orjson.loads, path.read_bytes().splitlines()) if r["kind"] == "response"),
                key=lambda r: r["session_index"])[2:]
    assert all(r["status"] == "ok" and r["usage"]["completion_tokens"] == 6 for r in rs)
    assert all(r["events"]["kind"] == "cccccc" and r["events"]["tokens"] == [1] * 6 for r in rs)
    ttft = [r["t_first_token"] - r["t_sent"] for r in rs]
    server_ttft = [server_token_times(r)[0] - r["t_sent"] for r in rs]
    tpot = [(r["t_last_token"] - r["t_first_token"]) / 5 for r in rs]
    server_tpot = [(server_token_times(r)[-1] - server_token_times(r)[0]) / 5 for r in rs]
    assert statistics.median(ttft) == pytest.approx(statistics.median(server_ttft), abs=2e-4)
    assert statistics.median(tpot) == pytest.approx(statistics.median(server_tpot), abs=2e-4)


def test_json_array_framing_at_any_read_boundaries():
    import random

    from vk.send.apis.jsonarray import frames

    objs = [{"candidates": [{"content": {"parts": [{"text": f' w{i} "q" \\ {{}} [' * (i % 3)}]}}], "i": i}
            for i in range(50)]
    data = ("[" + ",\r\n".join(json.dumps(o) for o in objs) + "]").encode()
    rng = random.Random(1)
    for _ in range(100):
        cuts = sorted(rng.sample(range(1, len(data)), rng.randint(1, 300)))
        pieces = [(float(i), data[a:b]) for i, (a, b) in enumerate(zip([0, *cuts], [*cuts, len(data)], strict=True))]
        got = list(frames(pieces))
        assert [json.loads(b) for _, b in got] == objs
        ends = list(itertools.accumulate(len(p) for _, p in pieces))
        for (t, b), o in zip(got, objs, strict=True):
            end = data.index(json.dumps(o).encode()) + len(b)
            assert t == pieces[bisect.bisect_left(ends, end)][0]
    assert len(list(frames([(0.0, data[:-3])]))) == len(objs) - 1  # an unfinished object is not an event


@pytest.mark.parametrize("client", ["aiohttp", "httpx"])
@pytest.mark.parametrize("style", ["bedrock", "oci", "anthropic"])
def test_every_client_sends_the_same_signed_request(style, client, serve, tmp_path, aws_env):
    """The signature and the per-request headers reach the server alike through every HTTP client."""
    srv = serve("--api-style", style, "--stop-mean", "100000", "--ttft", "0.005", "--tpot", "0.001")
    rs = run_send(srv, style, 2, 4, tmp_path, client=client)
    assert all(r["status"] == "ok" and r["usage"]["completion_tokens"] == 4 for r in rs), rs[0]["error"]


def sdk_whole(style: str, base: str, prompt: str, max_tokens: int):
    """The SDK's non-streamed call: (text, prompt tokens, output tokens)."""
    if style == "anthropic":
        import anthropic

        m = anthropic.Anthropic(base_url=base, api_key="k").messages.create(
            model=MODEL, max_tokens=max_tokens, messages=[{"role": "user", "content": prompt}])
        return m.content[-1].text, m.usage.input_tokens, m.usage.output_tokens
    if style == "bedrock":
        import boto3

        r = boto3.session.Session().client("bedrock-runtime", endpoint_url=base, region_name="us-east-1").converse(
            modelId=MODEL, messages=[{"role": "user", "content": [{"text": prompt}]}],
            inferenceConfig={"maxTokens": max_tokens})
        return r["output"]["message"]["content"][-1]["text"], r["usage"]["inputTokens"], r["usage"]["outputTokens"]
    if style == "cohere":
        import cohere

        r = cohere.ClientV2(api_key="k", base_url=base).chat(model=MODEL, max_tokens=max_tokens,
                                                             messages=[{"role": "user", "content": prompt}])
        return r.message.content[-1].text, int(r.usage.tokens.input_tokens), int(r.usage.tokens.output_tokens)
    if style == "vertex":
        from google import genai
        from google.genai import types
        from google.oauth2.credentials import Credentials

        client = genai.Client(vertexai=True, project="p", location="us-central1", credentials=Credentials(token="t"),
                              http_options=types.HttpOptions(base_url=base))
        r = client.models.generate_content(model=MODEL, contents=prompt,
                                           config=types.GenerateContentConfig(max_output_tokens=max_tokens))
        return r.text, r.usage_metadata.prompt_token_count, r.usage_metadata.candidates_token_count
    if style == "oci":
        import oci

        client = oci.generative_ai_inference.GenerativeAiInferenceClient(
            oci.config.from_file(os.environ["OCI_CONFIG_FILE"]), service_endpoint=base,
            retry_strategy=oci.retry.NoneRetryStrategy())
        m = oci.generative_ai_inference.models
        r = client.chat(m.ChatDetails(
            compartment_id=OCI_TENANCY, serving_mode=m.OnDemandServingMode(model_id=MODEL),
            chat_request=m.GenericChatRequest(messages=[m.UserMessage(content=[m.TextContent(text=prompt)])],
                                              max_tokens=max_tokens))).data.chat_response
        return r.choices[0].message.content[0].text, r.usage.prompt_tokens, r.usage.completion_tokens
    raise AssertionError(style)


@pytest.mark.parametrize("style", ["anthropic", "bedrock", "cohere", "vertex", "oci"])
def test_non_streamed_answers(style, serve, tmp_path, aws_env):
    """--no-stream: each style's whole answer (Messages, Converse, chat, generateContent, OCI chat) is read by
    the SDK and by vk-send alike, with the same counts."""
    srv = serve("--api-style", style, "--stop-mean", "100000", "--ttft", "0.005", "--tpot", "0.001")
    sdk = [sdk_whole(style, srv.base, p, 9) for p in PROMPTS[:2]]
    assert all(len(text.split()) == 9 and out == 9 for text, _, out in sdk)
    rs = run_send(srv, style, 2, 9, tmp_path, stream=False, save_text=True)
    for r, (_, prompt, out) in zip(rs, sdk, strict=True):
        assert r["status"] == "ok", r["error"]
        assert r["usage"]["prompt_tokens"] == prompt and r["usage"]["completion_tokens"] == out == 9
        assert r["events"]["kind"] == "c" and len(r["text"].split()) == 9
        assert r["t_first_token"] == r["t_last_token"] == r["events"]["t"][0]
