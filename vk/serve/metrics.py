"""vk-serve's ``/metrics``: Prometheus text with vLLM's metric names."""

from __future__ import annotations


def exposition(app) -> str:
    """The Prometheus text exposition of ``/metrics``: vLLM's names, labelled ``model_name``."""
    s, sch = app.stats, app.sched
    lab = f'model_name="{app.opts.model}",engine="0"'
    usage = sch.kv_usage()
    out = []

    def g(name, kind, help_, value, labels=lab):
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")
        out.append(f"{name}{{{labels}}} {value}")

    g("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.", sch.running)
    g("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.", sch.waiting)
    g("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.", usage)
    g("vllm:gpu_cache_usage_perc", "gauge", "GPU KV-cache usage. 1 means 100 percent usage.", usage)
    g("vllm:prefix_cache_queries_total", "counter", "Prefix cache queries, in terms of number of queried "
      "tokens.", s.prefix_queries)
    g("vllm:prefix_cache_hits_total", "counter", "Prefix cache hits, in terms of number of cached tokens.",
      s.prefix_hits)
    g("vllm:gpu_prefix_cache_queries_total", "counter", "GPU prefix cache queries, in terms of number of "
      "queried tokens.", s.prefix_queries)
    g("vllm:gpu_prefix_cache_hits_total", "counter", "GPU prefix cache hits, in terms of number of cached "
      "tokens.", s.prefix_hits)
    g("vllm:num_preemptions_total", "counter", "Cumulative number of preemption from the engine.",
      s.preemptions)
    g("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.", s.prompt_tokens)
    g("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.", s.generation_tokens)
    out.append("# HELP vllm:request_success_total Count of successfully processed requests.")
    out.append("# TYPE vllm:request_success_total counter")
    for reason, v in s.success.items():
        out.append(f'vllm:request_success_total{{{lab},finished_reason="{reason}"}} {v}')
    for name, h, help_ in (
        ("vllm:time_to_first_token_seconds", s.ttft, "Histogram of time to first token in seconds."),
        ("vllm:time_per_output_token_seconds", s.tpot, "Histogram of time per output token in seconds."),
        ("vllm:e2e_request_latency_seconds", s.e2e, "Histogram of e2e request latency in seconds."),
        ("vllm:request_queue_time_seconds", s.queue, "Histogram of time spent in WAITING phase for request."),
        ("vllm:request_prompt_tokens", s.prompt_hist, "Number of prefill tokens processed."),
        ("vllm:request_generation_tokens", s.gen_hist, "Number of generation tokens processed."),
        ("vk_serve_step_lag_seconds", s.step_lag, "Lateness of step ends versus the model (vk-serve extension)."),
    ):
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} histogram")
        out.extend(h.lines(name, lab))
    if app.mode == "engine":
        c = app.cfg
        out.append("# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig")
        out.append("# TYPE vllm:cache_config_info gauge")
        out.append(f'vllm:cache_config_info{{block_size="{c.block_size}",num_gpu_blocks="{c.num_blocks}",'
                   f'enable_prefix_caching="{c.enable_prefix_caching}"}} 1.0')
    out.append("# HELP vk_serve_steps_total Engine steps simulated (vk-serve extension).")
    out.append("# TYPE vk_serve_steps_total counter")
    out.append(f"vk_serve_steps_total {s.steps}")
    out.append("# HELP vk_serve_step_lag_seconds_max Worst lateness of a step end versus the model "
               "(vk-serve extension).")
    out.append("# TYPE vk_serve_step_lag_seconds_max gauge")
    out.append(f"vk_serve_step_lag_seconds_max {s.step_lag_max}")
    out.append("# HELP vk_serve_step_lag_seconds_mean Mean lateness of a step end versus the model.")
    out.append("# TYPE vk_serve_step_lag_seconds_mean gauge")
    out.append(f"vk_serve_step_lag_seconds_mean {s.step_lag_sum / s.step_lag_n if s.step_lag_n else 0.0}")
    return "\n".join(out) + "\n"


