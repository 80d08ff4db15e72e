"""vk-serve: a simulated OpenAI-compatible LLM server (vLLM's API) with a model of a serving engine."""

from __future__ import annotations

import math

import click

from vk.cli import command, examples, main_wrapper
from vk.errors import VkError
from vk.records import API_STYLES


def _prob(ctx, param, value):
    if value is not None and not 0.0 <= value <= 1.0:  # also refuses nan
        raise click.BadParameter("must be a fraction between 0 and 1")
    return value


def _profiles_help() -> str:
    from vk.serve.model import PROFILES

    return ", ".join(PROFILES)


@command("vk-serve", epilog=examples(
    "vk-serve --port 8000                               # engine model, default profile (Llama-3.1-8B on H100)",
    "vk-serve --port 0 --ttft 0.05 --tpot 0.01          # fixed latency; prints http://127.0.0.1:PORT/v1",
    "vk-serve --profile llama3.1-70b-4xh100 --num-blocks 2000 --max-num-seqs 64",
    "vk-serve --fault-429 0.05 --fault-disconnect 0.01 --fault-seed 7 --server-timestamps",
    "curl -N localhost:8000/v1/chat/completions -d '{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],"
    "\"stream\":true}'",
))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535),
              help="Port; 0 picks a free one.")
@click.option("--model", default="vk-sim", show_default=True, help="Model name served (and required if sent).")
@click.option("--tokenizer", default=None, help="Tokenizer for counting prompts and making output text "
              "(default qwen2.5).")
@click.option("--ttft", type=float, default=None, help="Fixed-latency mode: seconds to the first token.")
@click.option("--tpot", type=float, default=None, help="Fixed-latency mode: seconds per further output token.")
@click.option("--profile", default="llama3.1-8b-h100", show_default=True,
              help="Engine-model preset (model x GPU): see --list-profiles.")
@click.option("--list-profiles", is_flag=True, help="Print the profiles and their constants, then exit.")
@click.option("--max-num-seqs", type=int, default=None,
              help="Most sequences in one batch (profile default); in fixed-latency mode, most requests served at "
              "once, the rest wait in a FIFO queue (default: no cap).")
@click.option("--max-num-batched-tokens", type=int, default=None, help="Token budget per step (chunked prefill).")
@click.option("--num-blocks", type=int, default=None, help="KV-cache blocks.")
@click.option("--block-size", type=int, default=None, help="Tokens per KV-cache block.")
@click.option("--max-model-len", type=int, default=None, help="Context window in tokens.")
@click.option("--no-prefix-caching", is_flag=True, help="Switch prefix caching off.")
@click.option("--t-fixed", type=float, default=None, help="Step-time constant: seconds per step.")
@click.option("--t-weights", type=float, default=None, help="Step-time constant: seconds to stream the weights.")
@click.option("--t-token", type=float, default=None, help="Step-time constant: compute seconds per batched token.")
@click.option("--t-kv", type=float, default=None, help="Step-time constant: seconds per KV token attended.")
@click.option("--speed", type=float, default=1.0, show_default=True,
              help="Divide every step time by this factor (2 = a GPU twice as fast).")
@click.option("--stop-mean", type=float, default=256.0, show_default=True,
              help="Mean natural output length (tokens) when no min_tokens/ignore_eos forces one.")
@click.option("--stop-sigma", type=float, default=0.8, show_default=True,
              help="Log-normal sigma of the natural output length (0 = always --stop-mean).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for output lengths and text.")
@click.option("--server-timestamps", is_flag=True,
              help="Add \"vk_server_time\" (epoch seconds just before the write) to every streamed chunk.")
@click.option("--fault-429", type=float, default=0.0, callback=_prob, help="Fraction answered 429.")
@click.option("--fault-500", type=float, default=0.0, callback=_prob, help="Fraction answered 500.")
@click.option("--fault-503", type=float, default=0.0, callback=_prob, help="Fraction answered 503.")
@click.option("--fault-stall", type=float, default=0.0, callback=_prob,
              help="Fraction that send no byte for --stall-seconds first.")
@click.option("--stall-seconds", type=float, default=5.0, show_default=True, help="Length of an injected stall.")
@click.option("--fault-disconnect", type=float, default=0.0, callback=_prob,
              help="Fraction whose connection is closed mid-stream.")
@click.option("--fault-malformed", type=float, default=0.0, callback=_prob,
              help="Fraction with one malformed SSE event mid-stream.")
@click.option("--fault-seed", type=int, default=0, show_default=True, help="Seed of the fault draws.")
@click.option("--log-requests", is_flag=True, help="Log each request line on stderr.")
@click.option("--tls-cert", default=None, metavar="FILE", type=click.Path(exists=True, dir_okay=False),
              help="Serve https with this PEM certificate (with --tls-key).")
@click.option("--tls-key", default=None, metavar="FILE", type=click.Path(exists=True, dir_okay=False),
              help="The PEM private key of --tls-cert.")
@click.option("--reasoning-tokens", type=int, default=0, show_default=True,
              help="Chat outputs start with this many reasoning tokens (delta.reasoning_content), then content.")
@click.option("--max-body-bytes", type=int, default=32 * 1024 * 1024, show_default=True,
              help="Largest request body accepted; larger ones get 413.")
@click.option("--idle-timeout", type=float, default=5.0, show_default=True,
              help="Close a connection that sent nothing for this many seconds while no response is in progress "
              "(uvicorn's keep-alive timeout, as vLLM runs it; 0: never).")
@click.option("--api-style", type=click.Choice(API_STYLES),
              default="openai", show_default=True,
              help="Also speak this provider's API on its own route (see man vk-serve, API STYLES).")
@click.option("--encoder-fixed", type=float, default=0.002, show_default=True, metavar="S",
              help="Embeddings and rerank: seconds per request on the one encoder, plus --encoder-token per token.")
@click.option("--encoder-token", type=float, default=0.00002, show_default=True, metavar="S",
              help="Embeddings and rerank: seconds per input token (rerank: per query+document pair token).")
@click.option("--image-megapixel", type=float, default=0.5, show_default=True, metavar="S",
              help="Image generation: seconds per megapixel made, one request after the other.")
@click.option("--speech-ttfb", type=float, default=0.05, show_default=True, metavar="S",
              help="Speech: seconds to the first audio bytes.")
@click.option("--speech-speed", type=float, default=10.0, show_default=True, metavar="X",
              help="Speech: audio is made X times faster than real time (0.2 s of speech per input token).")
def cli_command(host, port, model, tokenizer, ttft, tpot, profile, list_profiles, max_num_seqs,
                max_num_batched_tokens, num_blocks, block_size, max_model_len, no_prefix_caching, t_fixed,
                t_weights, t_token, t_kv, speed, stop_mean, stop_sigma, seed, server_timestamps, fault_429,
                fault_500, fault_503, fault_stall, stall_seconds, fault_disconnect, fault_malformed, fault_seed,
                log_requests, tls_cert, tls_key, reasoning_tokens, max_body_bytes, idle_timeout, api_style, encoder_fixed,
                encoder_token, image_megapixel, speech_ttfb, speech_speed):
    """Serve a simulated LLM with vLLM's OpenAI-compatible API.

    Without --ttft/--tpot the engine model runs: continuous batching, chunked prefill, a paged KV cache with
    prefix caching, and a step time computed from the batch (see man vk-serve). The first line on stdout is the
    base URL, printed once the server accepts connections.
    """
    from vk.serve.model import PROFILES

    if list_profiles:
        for name, p in PROFILES.items():
            click.echo(f"{name}: {p.describe()}")
        return
    if profile not in PROFILES:
        raise VkError(f"--profile: unknown profile '{profile}' (known: {', '.join(PROFILES)})")
    total = fault_429 + fault_500 + fault_503 + fault_stall + fault_disconnect + fault_malformed
    if total > 1.0 + 1e-9:
        raise VkError(f"the --fault-* fractions add up to {total:g} > 1")
    for name, v in (("--ttft", ttft), ("--tpot", tpot), ("--stall-seconds", stall_seconds), ("--t-fixed", t_fixed),
                    ("--t-weights", t_weights), ("--t-token", t_token), ("--t-kv", t_kv), ("--speed", speed),
                    ("--stop-mean", stop_mean), ("--stop-sigma", stop_sigma), ("--idle-timeout", idle_timeout),
                    ("--encoder-fixed", encoder_fixed), ("--encoder-token", encoder_token),
                    ("--image-megapixel", image_megapixel), ("--speech-ttfb", speech_ttfb)):
        if v is not None and not (math.isfinite(v) and v >= 0):
            raise VkError(f"{name} must be a finite number >= 0, got {v:g}")
    if speed <= 0:
        raise VkError("--speed must be > 0")
    if not (math.isfinite(speech_speed) and speech_speed > 0):
        raise VkError(f"--speech-speed must be a finite number > 0, got {speech_speed:g}")
    for name, v in (("--max-num-seqs", max_num_seqs), ("--max-num-batched-tokens", max_num_batched_tokens),
                    ("--num-blocks", num_blocks), ("--block-size", block_size), ("--max-model-len", max_model_len)):
        if v is not None and v < 1:
            raise VkError(f"{name} must be >= 1")
    if reasoning_tokens < 0:
        raise VkError("--reasoning-tokens must be >= 0")
    if max_body_bytes < 1024:
        raise VkError("--max-body-bytes must be >= 1024")
    if stop_mean < 1:
        raise VkError("--stop-mean must be >= 1")
    if bool(tls_cert) != bool(tls_key):
        raise VkError("--tls-cert and --tls-key go together")
    from vk.serve.server import serve

    try:
        serve(host, port, model=model, tokenizer=tokenizer, ttft=ttft, tpot=tpot, profile=profile,
              max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, num_blocks=num_blocks,
              block_size=block_size, max_model_len=max_model_len, enable_prefix_caching=not no_prefix_caching,
              t_fixed=t_fixed, t_weights=t_weights, t_token=t_token, t_kv=t_kv, speed=speed, stop_mean=stop_mean,
              stop_sigma=stop_sigma, seed=seed, server_timestamps=server_timestamps, fault_429=fault_429,
              fault_500=fault_500, fault_503=fault_503, fault_stall=fault_stall, stall_seconds=stall_seconds,
              fault_disconnect=fault_disconnect, fault_malformed=fault_malformed, fault_seed=fault_seed,
              log_requests=log_requests, tls_cert=tls_cert, tls_key=tls_key, reasoning_tokens=reasoning_tokens,
              max_body_bytes=max_body_bytes, idle_timeout=idle_timeout, api_style=api_style, encoder_fixed=encoder_fixed,
              encoder_token=encoder_token, image_megapixel=image_megapixel, speech_ttfb=speech_ttfb,
              speech_speed=speech_speed)
    except OSError as e:
        raise VkError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


main = main_wrapper(cli_command, "vk-serve")

if __name__ == "__main__":
    main()
