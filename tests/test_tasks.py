"""Tasks beyond chat through every stage: embeddings and rerank requests from vk-gen, sent by vk-send, answered
by vk-serve (checked with the official openai client as an independent reader), reported by vk-eval."""

from __future__ import annotations

import base64
import subprocess

import httpx
import numpy as np
import orjson
import pytest
from conftest import run_vk, vk_cmd

from vk.errors import RecordError
from vk.records import validate_session
from vk.send.rawhttp import Exchange
from vk.send.tasks import api_base, interpret_answer, request_path
from vk.serve.tasks import EMBED_DIM, Encoder
from vk.tokenizer import load_tokenizer

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


# -- vk-serve's wire format, read by the openai client ------------------------------------------------------------

def test_openai_client_reads_vk_serve_embeddings(serve, tok):
    server = serve("--ttft", "0.001", "--tpot", "0.001")
    client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0)
    docs = ["Call me Ishmael.", "Some years ago, never mind how long precisely", "whale"]
    r = client.embeddings.create(model="vk-sim", input=docs)  # the client asks for base64 and decodes it
    assert [e.index for e in r.data] == [0, 1, 2]
    vecs = np.array([e.embedding for e in r.data])
    assert vecs.shape == (3, EMBED_DIM)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(tok.count(d) for d in docs)
    f = client.embeddings.create(model="vk-sim", input=docs[0], encoding_format="float")
    assert np.allclose(f.data[0].embedding, vecs[0], atol=1e-6)  # the same text, the same vector, both formats
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="other-model", input="x")
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="vk-sim", input=[])


def test_rerank_shapes_vllm_and_cohere(serve, tok):
    server = serve("--ttft", "0.001", "--tpot", "0.001")
    q, docs = "where is the whale", ["the white whale", "a ship", "the sea and the sky"]
    pair_tokens = sum(tok.count(q) + tok.count(d) for d in docs)
    for path in ("/v1/rerank", "/rerank"):
        r = httpx.post(server.base + path, json={"model": "vk-sim", "query": q, "documents": docs}).json()
        assert sorted(x["index"] for x in r["results"]) == [0, 1, 2]
        scores = [x["relevance_score"] for x in r["results"]]
        assert scores == sorted(scores, reverse=True) and all(0 < s < 1 for s in scores)
        assert r["results"][0]["document"]["text"] == docs[r["results"][0]["index"]]
        assert r["usage"]["total_tokens"] == pair_tokens
    r = httpx.post(server.base + "/v2/rerank", json={"model": "vk-sim", "query": q, "documents": docs,
                                                     "top_n": 2}).json()
    assert len(r["results"]) == 2 and "document" not in r["results"][0]
    assert r["meta"]["tokens"]["input_tokens"] == pair_tokens and r["meta"]["billed_units"]["search_units"] == 1
    bad = httpx.post(server.base + "/v1/rerank", json={"documents": docs})
    assert bad.status_code == 400 and "query" in bad.json()["message"]  # vLLM's error object


def test_encoder_cost_model_queues_in_arrival_order():
    e = Encoder(0.002, 0.001)
    assert e.finish_time(10.0, 100) == pytest.approx(10.102)
    assert e.finish_time(10.05, 10) == pytest.approx(10.114)  # waits for the first: the encoder was busy
    assert e.finish_time(11.0, 0) == pytest.approx(11.002)


# -- vk-send: paths, answers ------------------------------------------------------------------------------------

def test_paths_follow_the_api_base():
    assert api_base("/v1/chat/completions") == "/v1" and api_base("/x/v1/completions?a=1") == "/x/v1"
    r = {"task": "rerank", "documents": ["a"], "query": "b"}
    assert request_path("/v1/chat/completions", r) == "/v1/rerank"
    assert request_path("/v1/chat/completions", {**r, "endpoint": "/v2/rerank"}) == "/v2/rerank"
    assert request_path("/v1/chat/completions", {**r, "task": "embeddings"}) == "/v1/embeddings"


class _Clock:
    mono0 = 0.0


def _answer(body: dict | bytes, status: int = 200) -> Exchange:
    ex = Exchange()
    ex.status = status
    ex.headers = {"content-type": "application/json"}
    ex.chunks = [(1.0, body if isinstance(body, bytes) else orjson.dumps(body))]
    ex.t_done = 1.0
    return ex


EMB = {"task": "embeddings", "documents": ["a", "b"], "document_tokens": 3, "input_tokens": 6}


@pytest.mark.parametrize("body, error", [
    ({"data": [{"embedding": [0.1]}]}, "1 embeddings for 2 documents"),
    ({"object": "list"}, "no 'data' list"),
    ({"data": [{"embedding": [0.1]}, {"embedding": []}]}, "data[1] has no embedding"),
    (b"<html>", "not JSON"),
])
def test_embeddings_answers_vk_cannot_read_are_errors(body, error):
    v = interpret_answer(_answer(body), EMB, _Clock)
    assert v["status"] == "error" and error in v["error"]


def test_rerank_answer_checks_indexes_and_usage_against_targets():
    r = {"task": "rerank", "documents": ["a", "b"], "query": "q", "document_tokens": 5, "query_tokens": 2}
    ok = {"results": [{"index": 1, "relevance_score": 0.9}, {"index": 0, "relevance_score": 0.1}]}
    v = interpret_answer(_answer({**ok, "usage": {"total_tokens": 14}}), r, _Clock)  # pairs: 2 x (5 + 2)
    assert v["status"] == "ok" and v["warning"] is None and v["parsed"]["usage"] == {"prompt_tokens": 14}
    v = interpret_answer(_answer({**ok, "meta": {"tokens": {"input_tokens": 12}}}), r, _Clock)  # 2 x 5 + 2
    assert v["status"] == "ok" and v["warning"] is None
    v = interpret_answer(_answer({**ok, "usage": {"total_tokens": 99}}), r, _Clock)
    assert v["status"] == "ok" and "99 input tokens" in v["warning"]
    dup = {"results": [{"index": 0, "relevance_score": 0.9}, {"index": 0, "relevance_score": 0.1}]}
    assert "once each" in interpret_answer(_answer(dup), r, _Clock)["error"]
    v = interpret_answer(_answer({"error": {"message": "no"}}, 400), r, _Clock)
    assert v["status"] == "error" and "HTTP 400" in v["error"]


def test_records_need_documents_and_a_query():
    def sess(**req):
        return {"kind": "session", "v": 1, "id": "s", "requests": [{"id": "r0", "parents": [], **req}]}

    validate_session(sess(task="embeddings", documents=["x"]))
    validate_session(sess(task="speech", prompt="x", voice="alloy"))
    with pytest.raises(RecordError):
        validate_session(sess(task="image_generation", messages=[{"role": "user", "content": "x"}]))
    for bad, field in ((dict(task="embeddings"), "documents"), (dict(task="rerank", documents=["x"]), "query"),
                       (dict(task="video", prompt="x"), "task"), (dict(task="embeddings", documents=[1]),
                                                                  "documents")):
        with pytest.raises(RecordError) as e:
            validate_session(sess(**bad))
        assert field in str(e.value)


# -- the four commands -------------------------------------------------------------------------------------------

def _pipeline(server, tmp_path, *gen_args, send_args=(), exit_status=0):
    run = tmp_path / "run.jsonl"
    gen = subprocess.run([*vk_cmd("vk-gen"), *gen_args], capture_output=True, check=True)
    sched = subprocess.run([*vk_cmd("vk-schedule"), "--concurrency", "1"], input=gen.stdout, capture_output=True,
                           check=True)
    p = subprocess.run([*vk_cmd("vk-send"), "--api", server.url, "--workers", "1", "-o", str(run), *send_args],
                       input=sched.stdout, capture_output=True)
    assert p.returncode == exit_status, p.stderr.decode()
    recs = [orjson.loads(x) for x in run.read_bytes().splitlines()]
    return run, [r for r in recs if r["kind"] == "response"]


def test_embeddings_and_rerank_end_to_end(serve, tmp_path):
    server = serve("--ttft", "0.001", "--tpot", "0.001", "--encoder-fixed", "0.001", "--encoder-token", "0.00001")
    run, resp = _pipeline(server, tmp_path, "--scenario", "E(64)", "--scenario", "R(32,8)", "--count", "6",
                          "--set", "task.documents=3")
    assert len(resp) == 12 and all(r["status"] == "ok" for r in resp), resp[0]
    for r in resp:
        assert "documents" not in r and "query" not in r  # counts in the record, not the texts
        assert r["document_count"] == 3 and "warning" not in r  # usage agrees with the targets
        if r["task"] == "embeddings":
            assert r["usage"]["prompt_tokens"] == r["target_input_tokens"] == 3 * 64
        else:
            assert r["usage"]["prompt_tokens"] == 3 * (32 + 8)  # vk-serve counts pairs, as vLLM does
        assert r["t_first_byte"] is not None and r["t_done"] >= r["t_first_byte"] >= r["t_sent"]
    p = run_vk("vk-eval", str(run), "--json", "--group-by", "scenario", check=True)
    d = orjson.loads(p.stdout)
    t = d["overall"]["tasks"]
    assert set(t) == {"embeddings", "rerank"}
    assert t["embeddings"]["requests"] == 6 and t["embeddings"]["documents_per_request"] == 3
    dur = d["overall"]["throughput"]["whole"]["duration"]
    assert t["embeddings"]["documents_per_s"] == pytest.approx(18 / dur)
    assert t["embeddings"]["input_tokens_per_s"] == pytest.approx(18 * 64 / dur)
    lat = sorted(r["t_done"] - r["t_sent"] for r in resp if r["task"] == "rerank")
    assert t["rerank"]["request_latency"]["max"] == pytest.approx(lat[-1])
    groups = {g["key"]["scenario"]: g for g in d["groups"]}
    assert set(groups) == {"E(64)", "R(32,8)"} and set(groups["E(64)"]["summary"]["tasks"]) == {"embeddings"}
    text = run_vk("vk-eval", str(run), check=True).stdout.decode()
    assert "documents/s" in text and "embeddings request_latency" in text


def test_cohere_rerank_path_and_latency_grows_with_tokens(serve, tmp_path):
    """With 1 ms per token, a request of 200 tokens cannot be answered in less than 200 ms (the cost model is a
    lower bound whatever the load; less 1 ms: the server's loop has millisecond timers and t_sent is stamped once
    the write returned, after the server may have read it), and one of 20 tokens takes much less."""
    server = serve("--ttft", "0.001", "--tpot", "0.001", "--encoder-fixed", "0", "--encoder-token", "0.001")
    _, resp = _pipeline(server, tmp_path, "--scenario", "R(50,50)", "--scenario", "R(5,5)", "--count", "2",
                        "--set", "task.documents=2", "--set", "task.endpoint=/v2/rerank")
    assert all(r["status"] == "ok" for r in resp) and all(r["server_request_id"] for r in resp)
    big = [r["t_done"] - r["t_sent"] for r in resp if r["document_tokens"] == 50]
    small = [r["t_done"] - r["t_sent"] for r in resp if r["document_tokens"] == 5]
    assert min(big) >= 0.199 and max(small) < min(big) / 2
    assert all(r["usage"]["prompt_tokens"] == 2 * 2 * r["document_tokens"] for r in resp)  # Cohere's meta.tokens


def test_other_clients_refuse_encoder_requests_honestly(serve, tmp_path):
    server = serve("--ttft", "0.001", "--tpot", "0.001")
    _, resp = _pipeline(server, tmp_path, "--scenario", "E(8)", "--count", "1", send_args=("--client", "httpx"),
                        exit_status=4)  # nothing reached the server
    assert resp[0]["status"] == "error" and "--client raw" in resp[0]["error"]


def test_base64_vector_decodes_to_the_float_one(serve):
    server = serve("--ttft", "0.001", "--tpot", "0.001")
    a = httpx.post(server.url + "/embeddings", json={"input": "x", "encoding_format": "base64"}).json()
    b = httpx.post(server.url + "/embeddings", json={"input": "x"}).json()
    v = np.frombuffer(base64.b64decode(a["data"][0]["embedding"]), dtype=np.float32)
    assert np.allclose(v, b["data"][0]["embedding"])


# -- vision ------------------------------------------------------------------------------------------------------

def test_image_tokens_as_qwen2_vl_counts_them():
    from vk.serve.tasks import MAX_PIXELS, image_tokens

    # one token per 28 x 28 pixels once each side is rounded to a multiple of 28
    assert image_tokens(512, 512) == 18 * 18  # 512 / 28 = 18.3 -> 18
    assert image_tokens(1024, 512) == 37 * 18  # 36.6 -> 37
    assert image_tokens(2048, 2048) == 73 * 73
    assert image_tokens(10, 10) == 4  # below MIN_PIXELS (4 x 28 x 28): scaled up to 56 x 56
    assert image_tokens(8000, 8000) * 28 * 28 <= MAX_PIXELS  # above MAX_PIXELS: scaled down


def test_openai_client_vision_chat_counts_image_tokens(serve):
    from vk.gen.synth import component_rng
    from vk.gen.tasks import png_data_url
    from vk.serve.tasks import image_tokens

    server = serve("--ttft", "0.001", "--tpot", "0.001")
    client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0)
    text = {"type": "text", "text": "What is in this picture?"}
    url = png_data_url(280, 140, component_rng(0, "task"))
    plain = client.chat.completions.create(model="vk-sim", messages=[{"role": "user", "content": [text]}],
                                           max_tokens=5)
    seen = client.chat.completions.create(model="vk-sim", max_tokens=5, messages=[{"role": "user", "content": [
        text, {"type": "image_url", "image_url": {"url": url}}, {"type": "image_url", "image_url": {"url": url}}]}])
    assert seen.usage.prompt_tokens - plain.usage.prompt_tokens == 2 * image_tokens(280, 140) == 100
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="vk-sim", max_tokens=5, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.invalid/cat.png"}}]}])


def test_vision_end_to_end(serve, tmp_path):
    from vk.serve.tasks import image_tokens

    server = serve("--ttft", "0.01", "--tpot", "0.002")
    run, resp = _pipeline(server, tmp_path, "--scenario", "D(100,20)", "--scenario", "I(280,140,2)", "--count", "3",
                          "--set", "input.length.value=100", "--set", "output.length.value=20")
    assert all(r["status"] == "ok" and r["usage"]["completion_tokens"] == 20 for r in resp)
    text = {r["usage"]["prompt_tokens"] for r in resp if r.get("task") != "vision"}
    vision = {r["usage"]["prompt_tokens"] for r in resp if r.get("task") == "vision"}
    assert len(text) == len(vision) == 1 and vision.pop() - text.pop() == 2 * image_tokens(280, 140)
    d = orjson.loads(run_vk("vk-eval", str(run), "--json", "--group-by", "scenario", check=True).stdout)
    groups = {g["key"]["scenario"]: g["summary"] for g in d["groups"]}
    v = groups["I(280,140,2)"]
    assert v["latency"]["ttft"]["n"] == 3 and v["latency"]["tpot"]["n"] == 3
    over = v["tasks"]["vision"]["prompt_tokens_over_text"]
    assert over["min"] == over["max"] == 100 + groups["D(100,20)"]["tokens"]["input_tokens"]["mean"] - 100


# -- image generation and speech ---------------------------------------------------------------------------------

def test_openai_client_reads_images_and_speech(serve, tok):
    import io

    from PIL import Image

    from vk.serve.tasks import PCM_RATE, SPEECH_SECONDS_PER_TOKEN

    server = serve("--ttft", "0.001", "--tpot", "0.001", "--image-megapixel", "0.01", "--speech-speed", "50")
    client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0)
    r = client.images.generate(model="vk-sim", prompt="a white whale", size="320x200", n=2,
                               response_format="b64_json")
    assert len(r.data) == 2
    assert all(Image.open(io.BytesIO(base64.b64decode(x.b64_json))).size == (320, 200) for x in r.data)
    text = "Call me Ishmael. Some years ago, never mind how long precisely."
    want = int(tok.count(text) * SPEECH_SECONDS_PER_TOKEN * PCM_RATE) * 2
    with client.audio.speech.with_streaming_response.create(model="vk-sim", voice="alloy", input=text,
                                                            response_format="wav") as resp:
        audio = b"".join(resp.iter_bytes())
    assert audio[:4] == b"RIFF" and audio[8:12] == b"WAVE" and len(audio) == 44 + want
    with pytest.raises(openai.BadRequestError):
        client.audio.speech.create(model="vk-sim", voice="alloy", input=text)  # mp3: vk-serve makes pcm and wav


def test_image_generation_and_speech_end_to_end(serve, tmp_path):
    """Speech: the first audio after --speech-ttfb and the last after the whole audio at --speech-speed; images:
    n images of the size asked, one request after the other at --image-megapixel seconds per megapixel."""
    from vk.serve.tasks import PCM_RATE, SPEECH_CHUNK, SPEECH_SECONDS_PER_TOKEN

    server = serve("--ttft", "0.001", "--tpot", "0.001", "--image-megapixel", "1", "--speech-ttfb", "0.05",
                   "--speech-speed", "20")
    run = tmp_path / "run.jsonl"
    sessions = b"".join(subprocess.run([*vk_cmd("vk-gen"), "--seed", str(i), "--count", "3", "--set",
                                        "input.length.value=40", *args], capture_output=True, check=True).stdout
                        for i, args in enumerate((("--set", "task.type=speech"),
                                                  ("--set", "task.type=image_generation", "--set", "task.images=2",
                                                   "--set", "task.image_width=500", "--set", "task.image_height=200"))))
    sched = subprocess.run([*vk_cmd("vk-schedule"), "--concurrency", "1"], input=sessions, capture_output=True,
                           check=True)
    p = subprocess.run([*vk_cmd("vk-send"), "--api", server.url, "--workers", "1", "-o", str(run)],
                       input=sched.stdout, capture_output=True)
    assert p.returncode == 0, p.stderr.decode()
    resp = [orjson.loads(x) for x in run.read_bytes().splitlines()]
    resp = [r for r in resp if r["kind"] == "response"]
    assert len(resp) == 6 and all(r["status"] == "ok" for r in resp), resp
    seconds = 40 * SPEECH_SECONDS_PER_TOKEN
    chunks = round(seconds / SPEECH_CHUNK)
    for r in resp:
        first, last = r["t_first_body"] - r["t_sent"], r["t_done"] - r["t_sent"]
        if r["task"] == "speech":
            assert r["body_bytes"] == int(seconds * PCM_RATE) * 2
            # less 1 ms: the server's millisecond timers, t_sent stamped after the write returned
            assert first >= 0.049 and last >= 0.049 + (chunks - 1) * SPEECH_CHUNK / 20
            assert first < last - 0.3  # streamed: the first audio came long before the last (0.395 s of audio)
        else:
            assert first >= 2 * 0.5 * 0.2 - 0.001 and r["images"] == 2  # 2 images of 0.1 megapixel
    d = orjson.loads(run_vk("vk-eval", str(run), "--json", check=True).stdout)
    t = d["overall"]["tasks"]
    sp = [r for r in resp if r["task"] == "speech"]
    assert t["speech"]["time_to_first_byte"]["max"] == pytest.approx(max(r["t_first_body"] - r["t_sent"] for r in sp))
    assert t["speech"]["bytes_per_request"] == sp[0]["body_bytes"]
    assert t["image_generation"]["requests"] == 3


# -- datasets as input ---------------------------------------------------------------------------------------------

def _gen(*args, env=None):
    import os

    p = subprocess.run([*vk_cmd("vk-gen"), *args], capture_output=True, env={**os.environ, **(env or {})})
    return p.returncode, [orjson.loads(x) for x in p.stdout.splitlines()], p.stderr.decode()


def test_dataset_files_with_a_column_mapping(tmp_path, tok):
    import duckdb

    rows = [{"q": "What is a whale?", "id": 1}, {"q": "Where is Nantucket, and who sails from it?", "id": 2}]
    (tmp_path / "p.jsonl").write_text("\n".join(orjson.dumps(r).decode() for r in rows))
    (tmp_path / "p.json").write_text(orjson.dumps(rows).decode())
    (tmp_path / "p.txt").write_text("\n".join(r["q"] for r in rows) + "\n\n")
    duckdb.connect().execute(f"COPY (SELECT * FROM read_json_auto('{tmp_path / 'p.jsonl'}')) TO "
                             f"'{tmp_path / 'p.parquet'}' (FORMAT parquet)")
    duckdb.connect().execute(f"COPY (SELECT * FROM read_json_auto('{tmp_path / 'p.jsonl'}')) TO "
                             f"'{tmp_path / 'p.csv'}' (HEADER)")
    for name in ("p.jsonl", "p.json", "p.parquet", "p.csv", "p.txt"):
        col = () if name.endswith(".txt") else ("--set", "dataset.columns.prompt=q")
        rc, out, err = _gen("--set", f"dataset.file={tmp_path / name}", *col, "--count", "3")
        assert rc == 0, err
        msgs = [s["requests"][0]["messages"][0]["content"] for s in out]
        assert msgs == [rows[0]["q"], rows[1]["q"], rows[0]["q"]], name  # in order, wrapping
        assert [s["requests"][0]["input_tokens"] for s in out] == [tok.count(m) for m in msgs]
    # cut to the scenario's input length; shorter prompts stay as they are
    rc, out, err = _gen("--set", f"dataset.file={tmp_path / 'p.csv'}", "--set", "dataset.columns.prompt=q",
                        "--set", "dataset.lengths=cut", "--scenario", "D(6,10)", "--count", "2")
    assert rc == 0, err
    assert [s["requests"][0]["input_tokens"] for s in out] == [min(6, tok.count(r["q"])) for r in rows]
    assert all(tok.count(s["requests"][0]["messages"][0]["content"]) == s["requests"][0]["input_tokens"]
               for s in out)
    rc, _, err = _gen("--set", f"dataset.file={tmp_path / 'p.csv'}", "--set", "dataset.columns.prompt=question")
    assert rc == 2 and "no column 'question' (columns: q, id)" in err and "Traceback" not in err


def test_dataset_rerank_and_vision_rows(tmp_path, tok):
    from PIL import Image

    Image.new("RGB", (90, 60), (10, 20, 30)).save(tmp_path / "a.png")
    (tmp_path / "r.jsonl").write_text(orjson.dumps({"q": "whale?", "docs": ["a whale", "a ship", "sea"],
                                                    "img": "a.png"}).decode())
    rc, out, err = _gen("--set", f"dataset.file={tmp_path / 'r.jsonl'}", "--set", "task.type=rerank",
                        "--set", "dataset.columns={query: q, documents: docs}", "--count", "1")
    assert rc == 0, err
    r = out[0]["requests"][0]
    assert r["documents"] == ["a whale", "a ship", "sea"] and r["query"] == "whale?"
    assert r["input_tokens"] == sum(tok.count(x) for x in r["documents"]) + tok.count("whale?")
    rc, out, err = _gen("--set", f"dataset.file={tmp_path / 'r.jsonl'}", "--scenario", "I(56,28)",
                        "--set", "dataset.columns={prompt: q, image: img}", "--count", "1")
    assert rc == 0, err
    parts = out[0]["requests"][0]["messages"][0]["content"]
    url = parts[1]["image_url"]["url"]
    import io

    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (56, 28)  # resized as asked


def test_dataset_from_the_local_hugging_face_cache_only(tmp_path):
    import duckdb

    snap = tmp_path / "hub" / "datasets--me--toy" / "snapshots" / "abc123" / "data"
    snap.mkdir(parents=True)
    duckdb.connect().execute(f"COPY (SELECT 'prompt ' || i AS text FROM range(5) t(i)) TO "
                             f"'{snap / 'train-00000-of-00001.parquet'}' (FORMAT parquet)")
    env = {"HF_HUB_CACHE": str(tmp_path / "hub")}
    rc, out, err = _gen("--set", "dataset.hf=me/toy", "--set", "dataset.columns.prompt=text", "--count", "2", env=env)
    assert rc == 0, err
    assert [s["requests"][0]["messages"][0]["content"] for s in out] == ["prompt 0", "prompt 1"]
    rc, _, err = _gen("--set", "dataset.hf=me/other", "--count", "1", env=env)
    assert rc == 2 and "not in the local Hugging Face cache" in err and "never downloads" in err


def test_vision_images_from_a_directory(tmp_path):
    import io

    from PIL import Image

    d = tmp_path / "pics"
    d.mkdir()
    Image.new("RGB", (40, 30), (200, 0, 0)).save(d / "a.png")
    Image.new("RGB", (70, 20), (0, 200, 0)).save(d / "b.jpg")
    (d / "notes.txt").write_text("not an image")

    def sizes(*args):
        rc, out, err = _gen("--set", "task.type=vision", "--set", f"task.image_dir={d}", "--set", "task.images=3",
                            "--count", "4", *args)
        assert rc == 0, err
        got = []
        for s in out:
            r = s["requests"][0]
            for p in r["messages"][0]["content"][1:]:
                got.append(Image.open(io.BytesIO(base64.b64decode(p["image_url"]["url"].split(",", 1)[1]))).size)
            assert [tuple(x) for x in r["image_sizes"]] == got[-3:]
        return got

    assert set(sizes()) == {(40, 30), (70, 20)}  # as they are, both files picked
    assert set(sizes("--set", "task.image_width=32", "--set", "task.image_height=16")) == {(32, 16)}  # resized
    rc, _, err = _gen("--set", "task.type=vision", "--set", f"task.image_dir={tmp_path / 'none'}")
    assert rc == 2 and "no image files" in err


def test_rerank_through_vllm_score_api(serve, tmp_path, tok):
    server = serve("--ttft", "0.001", "--tpot", "0.001")
    r = httpx.post(server.url + "/score", json={"text_1": "whale", "text_2": ["a whale", "a ship"]}).json()
    assert [x["index"] for x in r["data"]] == [0, 1] and all(0 < x["score"] < 1 for x in r["data"])
    assert r["usage"]["prompt_tokens"] == 2 * tok.count("whale") + tok.count("a whale") + tok.count("a ship")
    _, resp = _pipeline(server, tmp_path, "--scenario", "R(16,4)", "--count", "2", "--set", "task.documents=3",
                        "--set", "task.endpoint=score")
    assert all(r["status"] == "ok" and r["usage"]["prompt_tokens"] == 3 * (16 + 4) for r in resp), resp
